"""The fast Rust WordPiece tokenizer, with the pipeline (not the tokenizer file) owning length limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece


@dataclass(frozen=True)
class TokenizedTexts:
    """Token ids per text ([CLS] ... [SEP]), and whether each text was cut at max_length."""

    ids: list[np.ndarray]
    truncated: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int32, count=len(self.ids))


class TextTokenizer:
    """Encodes texts to [CLS] ... [SEP] token ids, truncated to max_length tokens in all."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.max_length = max_length
        self._tokenizer = tokenizer
        # A tokenizer.json may carry padding or truncation presets (all-MiniLM pads to 128): the
        # pipeline batches without padding and truncates at its own max_length instead.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)

    @classmethod
    def from_folder(cls, folder: Path, max_length: int) -> TextTokenizer:
        """From folder/tokenizer.json, else a bert-base-uncased style WordPiece built from folder/vocab.txt."""
        if (folder / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), max_length)
        if (folder / "vocab.txt").is_file():
            return cls(bert_uncased_wordpiece(folder / "vocab.txt"), max_length)
        raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.txt")

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text, to rebuild it in worker processes."""
        return self._tokenizer.to_str()

    def token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the tokenizer's vocabulary")
        return token_id

    def encode(self, texts: list[str]) -> TokenizedTexts:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        return TokenizedTexts(
            ids=[np.asarray(e.ids, dtype=np.int32) for e in encodings],
            truncated=np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings)),
        )


def bert_uncased_wordpiece(vocab_file: Path) -> Tokenizer:
    """The bert-base-uncased tokenizer pipeline around a WordPiece vocab.txt."""
    tokenizer = Tokenizer(WordPiece.from_file(str(vocab_file), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"{vocab_file} lacks [CLS] or [SEP]; is it a BERT WordPiece vocabulary?")
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer
