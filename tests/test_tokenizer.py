"""The Rust WordPiece tokenizer: bert-base-uncased ids, no padding, our own truncation."""

from __future__ import annotations

from conftest import MINILM_DIR, TEXTS
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from pipeline.tokenizer import TextTokenizer


def test_vocab_txt_gives_bert_base_uncased_specials_and_ids(vocab_file):
    tokenizer = TextTokenizer.from_folder(vocab_file.parent, max_length=4096)
    assert [tokenizer.token_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")] == [0, 101, 102, 103]
    assert tokenizer.encode(["Hello world!"]).ids[0].tolist() == [101, 7592, 2088, 999, 102]


def test_tokenizer_json_presets_are_switched_off():
    # all-MiniLM-L6-v2's tokenizer.json pads and truncates to 128 by default.
    tokenizer = TextTokenizer.from_folder(MINILM_DIR, max_length=512)
    short = tokenizer.encode(["hi"])
    long = tokenizer.encode(["word " * 300])
    assert short.lengths.tolist() == [3]
    assert long.lengths.tolist() == [302] and not long.truncated[0]


def test_tokenizer_json_and_vocab_txt_agree(tmp_path, vocab_file):
    from_json = TextTokenizer.from_folder(MINILM_DIR, max_length=64)
    (tmp_path / "vocab.txt").write_bytes(vocab_file.read_bytes())
    from_vocab = TextTokenizer.from_folder(tmp_path, max_length=64)
    texts = [*TEXTS, "word " * 100]
    a, b = from_json.encode(texts), from_vocab.encode(texts)
    assert [x.tolist() for x in a.ids] == [x.tolist() for x in b.ids]
    assert a.truncated.tolist() == b.truncated.tolist() == [False] * len(TEXTS) + [True]


def test_no_token_type_ids_and_no_padding_in_a_batch(vocab_file):
    tokenizer = TextTokenizer.from_folder(vocab_file.parent, max_length=4096)
    tokenized = tokenizer.encode(["a", "a b c d e f"])
    assert tokenized.lengths.tolist() == [3, 8]
    assert 0 not in tokenized.ids[0]


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(["a", "bb", " ", "   ", "\n", "Zürich", ".", "x" * 150, "émoji 🙂"]), max_size=3000)
)
def test_long_texts_tokenize_as_if_whole(pieces):
    # Texts past max_length x 64 characters are tokenized from a prefix first; the ids must not change.
    text = "".join(pieces)
    fast = TextTokenizer.from_folder(MINILM_DIR, max_length=8)
    whole = TextTokenizer(Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json")), 8, prefix_chars_per_token=None)
    a, b = fast.encode([text]), whole.encode([text])
    assert a.ids[0].tolist() == b.ids[0].tolist() and a.truncated.tolist() == b.truncated.tolist()
