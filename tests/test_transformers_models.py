"""Encoders other than NeoBERT, run through transformers: checked against sentence-transformers on the
real all-MiniLM-L6-v2 weights, and against plain one-text-at-a-time transformers on other architectures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import MINILM_DIR, TEXTS
from sentence_transformers import SentenceTransformer

from pipeline import Encoder
from pipeline.cli import main
from pipeline.errors import EXIT_OK, ModelError
from pipeline.io.layout import PARTS, RUN_RECORD
from pipeline.model.checkpoint import UnsupportedModelError
from pipeline.model.sentence_transformers_meta import UnsupportedSentenceTransformerError

# Past all-MiniLM-L6-v2's 256-token limit, so truncation has to agree too.
LONG_TEXTS = [
    " ".join(f"sentence {i} of a long report about embeddings, batching and storage." for i in range(60)),
    "Zürich " * 700,
]
ALL_TEXTS = [*TEXTS, *LONG_TEXTS]


def minilm_variant(tmp_path, *, pooling: dict | None = None, modules: list[dict] | None = None):
    """A copy of the MiniLM checkpoint (weights linked, not copied) with other sentence-transformers files."""
    folder = tmp_path / "minilm-variant"
    shutil.copytree(MINILM_DIR, folder, copy_function=_link_or_copy)
    if pooling is not None:
        (folder / "1_Pooling" / "config.json").unlink()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **pooling}))
    if modules is not None:
        (folder / "modules.json").unlink()
        (folder / "modules.json").write_text(json.dumps(modules))
    return folder


def _link_or_copy(source, target):
    if source.endswith(".safetensors"):
        return shutil.os.symlink(source, target)
    return shutil.copy2(source, target)


def sentence_transformers_encode(folder, texts, **options) -> np.ndarray:
    return SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=4, **options)


def assert_cosine_at_least(got: np.ndarray, expected: np.ndarray, minimum: float) -> None:
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= minimum, f"per-text cosine {cosine.round(6).tolist()}"


def test_minilm_equals_sentence_transformers_with_the_checkpoint_defaults():
    encoder = Encoder.from_pretrained(str(MINILM_DIR), device="cpu")
    assert (encoder.facts.pooling, encoder.facts.normalize, encoder.facts.max_length) == ("mean", True, 256)
    assert encoder.tokenize(LONG_TEXTS).truncated.tolist() == [True, True]
    expected = sentence_transformers_encode(MINILM_DIR, ALL_TEXTS)
    got = encoder.encode(ALL_TEXTS, max_tokens=300)  # small batches: many length buckets, padded within each
    assert_cosine_at_least(got, expected, 0.99999)
    np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize(
    "pooling_config, normalize",
    [
        ({"pooling_mode": "cls"}, False),
        ({"pooling_mode": "max"}, True),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, False),  # the legacy boolean keys
        ({"pooling_mode": "lasttoken"}, True),
    ],
)
def test_pooling_and_normalize_declared_by_the_checkpoint_are_followed(tmp_path, pooling_config, normalize):
    modules = json.loads((MINILM_DIR / "modules.json").read_text())
    folder = minilm_variant(tmp_path, pooling=pooling_config, modules=modules if normalize else modules[:2])
    encoder = Encoder.from_pretrained(str(folder), device="cpu")
    assert encoder.facts.normalize is normalize
    assert encoder.facts.setting_sources["pooling"] == "sentence-transformers 1_Pooling/config.json"
    np.testing.assert_allclose(
        encoder.encode(ALL_TEXTS), sentence_transformers_encode(folder, ALL_TEXTS), atol=2e-5, rtol=1e-5
    )


def test_explicit_options_win_over_the_checkpoint(tmp_path):
    encoder = Encoder.from_pretrained(str(MINILM_DIR), device="cpu", pooling="cls", normalize=False, max_length=128)
    assert encoder.facts.setting_sources == {"pooling": "option", "normalize": "option", "max_length": "option"}
    model = SentenceTransformer(str(MINILM_DIR), device="cpu")
    model.max_seq_length = 128
    tokens = model.encode(ALL_TEXTS, output_value="token_embeddings")
    expected = np.stack([t[0].numpy() for t in tokens])  # the [CLS] vector, not normalised
    np.testing.assert_allclose(encoder.encode(ALL_TEXTS), expected, atol=2e-5)


def test_a_stage_the_pipeline_cannot_reproduce_is_refused(tmp_path):
    modules = json.loads((MINILM_DIR / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    folder = minilm_variant(tmp_path, modules=modules)
    with pytest.raises(UnsupportedSentenceTransformerError, match="Dense stage"):
        Encoder.from_pretrained(str(folder), device="cpu")


def test_weightedmean_pooling_is_refused_unless_a_pooling_is_chosen(tmp_path):
    folder = minilm_variant(tmp_path, pooling={"pooling_mode": "weightedmean"})
    with pytest.raises(UnsupportedSentenceTransformerError, match="'weightedmean' pooling.*--pooling"):
        Encoder.from_pretrained(str(folder), device="cpu")
    assert Encoder.from_pretrained(str(folder), device="cpu", pooling="mean").encode(["ok"]).shape == (1, 384)


def test_a_model_type_that_needs_remote_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "custom-encoder", "auto_map": {"AutoModel": "modeling_custom.CustomModel"}})
    )
    (tmp_path / "model.safetensors").write_bytes((MINILM_DIR / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedModelError, match="never"):
        Encoder.from_pretrained(str(tmp_path), device="cpu")
    assert not marker.exists()


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522)


def _tiny_configs():
    from transformers import (
        BertConfig,
        DebertaV2Config,
        DistilBertConfig,
        ElectraConfig,
        ModernBertConfig,
        MPNetConfig,
        RobertaConfig,
        XLMRobertaConfig,
    )

    return {
        "bert": BertConfig(**TINY),
        "roberta": RobertaConfig(**TINY, max_position_embeddings=130, pad_token_id=1),
        "xlm-roberta": XLMRobertaConfig(**TINY, max_position_embeddings=130, pad_token_id=1),
        "distilbert": DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=30522),
        "electra": ElectraConfig(**TINY, embedding_size=16),
        "mpnet": MPNetConfig(**TINY, max_position_embeddings=130),
        "deberta-v2": DebertaV2Config(**TINY, relative_attention=True, position_buckets=16, pos_att_type=["c2p"]),
        "modernbert": ModernBertConfig(**TINY, global_attn_every_n_layers=2, local_attention=16, pad_token_id=0),
    }


@pytest.mark.parametrize("model_type", sorted(_tiny_configs()))
def test_architectures_give_the_same_vectors_batched_as_one_text_at_a_time(tmp_path, model_type):
    from transformers import AutoModel

    torch.manual_seed(0)
    reference = AutoModel.from_config(_tiny_configs()[model_type]).eval()
    # a small shard size makes a sharded checkpoint (model.safetensors.index.json), which must load too
    reference.save_pretrained(tmp_path, max_shard_size="200KB" if model_type == "bert" else "1GB")
    shutil.copy(MINILM_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    encoder = Encoder.from_pretrained(str(tmp_path), device="cpu", max_length=120)
    assert encoder.facts.pooling == "mean" and encoder.facts.family == "transformers"
    texts = [*ALL_TEXTS, "one more", "and a somewhat longer one to pad the others"]
    token_ids = encoder.tokenize(texts).ids
    with torch.inference_mode():
        expected = np.stack(
            [reference(input_ids=torch.tensor(ids[None], dtype=torch.long))[0][0].mean(0).numpy() for ids in token_ids]
        )
    np.testing.assert_allclose(encoder.encode(texts, max_tokens=256), expected, atol=1e-5, rtol=1e-4)
    if model_type == "bert":
        assert (tmp_path / "model.safetensors.index.json").exists()


def test_embed_job_on_local_ray_equals_sentence_transformers(ray_local, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    docs = [{"id": f"d{i}", "text": text} for i, text in enumerate(ALL_TEXTS * 3)]
    (tmp_path / "in" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    args = ["embed", str(tmp_path / "in"), str(out), "--model", str(MINILM_DIR), "--id-field", "id"]
    assert main([*args, "--tokens-per-batch", "512"]) == EXIT_OK
    assert "padding waste" in capsys.readouterr().out

    table = pq.read_table(out / PARTS)
    by_id = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist(), strict=True))
    assert sorted(by_id) == sorted(d["id"] for d in docs)
    got = np.array([by_id[d["id"]] for d in docs], dtype=np.float32)
    assert_cosine_at_least(got, sentence_transformers_encode(MINILM_DIR, [d["text"] for d in docs]), 0.9999)
    settings = json.loads((out / RUN_RECORD).read_text())["settings"]
    assert (settings["model_family"], settings["pooling"], settings["normalize"], settings["max_length"]) == (
        "transformers",
        "mean",
        True,
        256,
    )
    assert settings["setting_sources"]["max_length"] == "sentence-transformers sentence_bert_config.json"


def test_cli_names_the_refused_stage_with_the_model_exit_code(ray_local, tmp_path, capsys):
    modules = json.loads((MINILM_DIR / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    folder = minilm_variant(tmp_path, modules=modules)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "hello"}\n')
    assert main(["embed", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(folder)]) == ModelError.exit_code
    assert "Dense stage" in capsys.readouterr().err


def test_sentence_transformers_checkpoint_loads_from_an_s3_url(s3, s3_endpoint, tmp_path):
    s3.put(str(MINILM_DIR), f"{s3.bucket}/models/minilm", recursive=True)
    encoder = Encoder.from_pretrained(
        f"s3://{s3.bucket}/models/minilm",
        device="cpu",
        cache_dir=str(tmp_path),
        storage_options={"endpoint_url": s3_endpoint},
    )
    fetched = sorted(
        p.relative_to(next((tmp_path / "checkpoints").iterdir())).as_posix() for p in tmp_path.rglob("*.*")
    )
    assert "1_Pooling/config.json" in fetched and "README.md" not in fetched and "data_config.json" not in fetched
    assert encoder.facts.setting_sources["pooling"] == "sentence-transformers 1_Pooling/config.json"
    local = Encoder.from_pretrained(str(MINILM_DIR), device="cpu")
    assert encoder.facts.weights_sha256 == local.facts.weights_sha256
    np.testing.assert_array_equal(encoder.encode(ALL_TEXTS), local.encode(ALL_TEXTS))


def test_encode_takes_what_sentence_transformers_users_type(capsys):
    encoder = Encoder.from_pretrained(str(MINILM_DIR), device="cpu")
    model = SentenceTransformer(str(MINILM_DIR), device="cpu")
    sizes = []
    forward = encoder.embed_packed
    encoder.embed_packed = lambda ids, cu, *args: sizes.append(len(cu) - 1) or forward(ids, cu, *args)
    got = encoder.encode(ALL_TEXTS, batch_size=3, normalize_embeddings=True, show_progress_bar=True)
    np.testing.assert_allclose(got, model.encode(ALL_TEXTS, batch_size=3, normalize_embeddings=True), atol=2e-6)
    assert max(sizes) == 3 and sum(sizes) == len(ALL_TEXTS), "batch_size caps the texts per forward pass"
    assert "Batches" in capsys.readouterr().err
    one = encoder.encode(ALL_TEXTS[0])  # a single string gives a single vector, as in sentence-transformers
    assert one.shape == (384,)
    np.testing.assert_allclose(one, model.encode(ALL_TEXTS[0]), atol=2e-6)
    tensor = encoder.encode(ALL_TEXTS[:2], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (2, 384)
