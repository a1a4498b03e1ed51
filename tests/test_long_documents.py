"""Documents past max_length: truncated and flagged, chunked into overlapping token windows, or pooled back."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import MINILM_DIR
from corpus import make_docs

from pipeline import Encoder
from pipeline.config import load_config
from pipeline.io.layout import ERRORS, PARTS
from pipeline.job import run_embedding_job
from pipeline.tokenizer import TextTokenizer
from pipeline.verify import verify_output

WINDOW, OVERLAP = 32, 8
LONG = " ".join(f"word{i % 17} and token {i}, then more." for i in range(60))


def test_windows_share_overlap_tokens_and_cover_the_whole_text():
    tokenizer = TextTokenizer.from_folder(MINILM_DIR, max_length=WINDOW)
    chunks = tokenizer.chunk([LONG, "short text"], OVERLAP)
    whole = TextTokenizer.from_folder(MINILM_DIR, max_length=100_000).encode([LONG]).ids[0][1:-1].tolist()
    windows = [ids.tolist() for ids in chunks.ids[: chunks.chunks_per_text[0]]]
    assert chunks.chunks_per_text.tolist()[1] == 1 and len(windows) > 3
    assert all(w[0] == 101 and w[-1] == 102 and len(w) <= WINDOW for w in windows)
    content = [w[1:-1] for w in windows]
    for before, after in zip(content, content[1:], strict=False):
        assert after[:OVERLAP] == before[-OVERLAP:]
    rebuilt = content[0] + [t for c in content[1:] for t in c[OVERLAP:]]
    assert rebuilt == whole
    starts, ends = chunks.char_start[: len(windows)], chunks.char_end[: len(windows)]
    assert starts[0] == 0 and ends[-1] == len(LONG.rstrip(".")) + 1 and all(np.diff(starts) > 0)


def write_corpus(folder) -> list[dict]:
    folder.mkdir()
    docs = [*make_docs(6, seed=11, prefix="short", max_words=8), {"id": "long-1", "text": LONG}]
    docs.append({"id": "long-2", "text": LONG.upper()[: len(LONG) // 2]})
    lines = [json.dumps(d) for d in docs] + ['{"id": "bad", "text": ""}']
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return docs


def run(tmp_path, checkpoint, mode: str):
    settings = {
        "input": str(tmp_path / "in"),
        "output": str(tmp_path / "out"),
        "model": str(checkpoint),
        "id_field": "id",
        "max_length": WINDOW,
        "long_documents": mode,
        "chunk_overlap": OVERLAP,
        "tokens_per_batch": 96,  # smaller than a long document's windows: they must still stay together
        "max_error_rate": 0.2,  # one of the 9 rows is an empty text on purpose
    }
    return run_embedding_job(load_config(None, settings))


@pytest.mark.timeout(180)
def test_chunk_writes_one_row_per_window_with_its_span(ray_local, tmp_path, tiny_checkpoint):
    docs = write_corpus(tmp_path / "in")
    summary = run(tmp_path, tiny_checkpoint, "chunk")
    assert summary.error_counts == {"empty_text": 1}
    assert verify_output(str(tmp_path / "out")).ok

    table = pq.read_table(tmp_path / "out" / PARTS).to_pylist()
    # The summary tells the output's rows (one per window) from the documents they come from.
    assert (summary.documents, summary.chunk_rows) == (len(docs), len(table)) and len(table) > len(docs)
    encoder = Encoder.from_pretrained(str(tiny_checkpoint), device="cpu", max_length=WINDOW)
    for doc in docs:
        rows = sorted((r for r in table if r["id"] == doc["id"]), key=lambda r: r["chunk"])
        chunks = encoder.tokenizer.chunk([doc["text"]], OVERLAP)
        assert [r["chunk"] for r in rows] == list(range(len(chunks.ids)))
        assert [(r["char_start"], r["char_end"]) for r in rows] == list(
            zip(chunks.char_start.tolist(), chunks.char_end.tolist(), strict=True)
        )
        assert [r["n_tokens"] for r in rows] == [len(c) for c in chunks.ids]
        np.testing.assert_allclose([r["embedding"] for r in rows], encoder.embed_token_ids(chunks.ids), atol=1e-5)
        assert not any(r["truncated"] for r in rows)
    assert len([r for r in table if r["id"] == "long-1"]) > 3
    assert pq.read_table(tmp_path / "out" / ERRORS).column("id").to_pylist() == ["bad"]


@pytest.mark.timeout(180)
def test_chunk_mean_pools_the_windows_back_into_one_vector(ray_local, tmp_path, tiny_checkpoint):
    docs = write_corpus(tmp_path / "in")
    run(tmp_path, tiny_checkpoint, "chunk-mean")
    assert verify_output(str(tmp_path / "out")).ok
    table = pq.read_table(tmp_path / "out" / PARTS)
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert sorted(by_id) == sorted(d["id"] for d in docs)
    encoder = Encoder.from_pretrained(str(tiny_checkpoint), device="cpu", max_length=WINDOW)
    for doc in docs:
        chunks = encoder.tokenizer.chunk([doc["text"]], OVERLAP)
        expected = encoder.embed_token_ids(chunks.ids).mean(axis=0)
        np.testing.assert_allclose(by_id[doc["id"]]["embedding"], expected, atol=1e-5)
        assert by_id[doc["id"]]["n_tokens"] == sum(len(c) for c in chunks.ids)


def test_an_overlap_that_leaves_no_room_is_refused(tmp_path, tiny_checkpoint):
    from pipeline.errors import SettingsError

    write_corpus(tmp_path / "in")
    settings = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": str(tiny_checkpoint)}
    config = load_config(None, {**settings, "max_length": 16, "long_documents": "chunk", "chunk_overlap": 14})
    with pytest.raises(SettingsError, match="--chunk-overlap 14"):
        run_embedding_job(config)
