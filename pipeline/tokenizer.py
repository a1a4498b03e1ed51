"""The fast Rust WordPiece tokenizer, with the pipeline (not the tokenizer file) owning length limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from pipeline.errors import ModelError, SettingsError


@dataclass(frozen=True)
class TokenizedChunks:
    """Overlapping windows of each text, each [CLS] ... [SEP]: chunk ids in text order, then per text."""

    ids: list[np.ndarray]
    chunks_per_text: np.ndarray
    char_start: np.ndarray
    """Character span [char_start, char_end) of each chunk's tokens in its text."""
    char_end: np.ndarray


@dataclass(frozen=True)
class TokenizedTexts:
    """Token ids per text ([CLS] ... [SEP]), and whether each text was cut at max_length."""

    ids: list[np.ndarray]
    truncated: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int32, count=len(self.ids))


# A text this many characters per allowed token is tokenized from a prefix first (see encode).
PREFIX_CHARS_PER_TOKEN = 64


class TextTokenizer:
    """Encodes texts to [CLS] ... [SEP] token ids, truncated to max_length tokens in all."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int,
        *,
        lowercase: bool = False,
        prefix_chars_per_token: int | None = PREFIX_CHARS_PER_TOKEN,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.max_length = max_length
        self._prefix_chars = max_length * prefix_chars_per_token if prefix_chars_per_token else None
        self._tokenizer = tokenizer
        if lowercase:  # sentence-transformers' do_lower_case lowercases texts before tokenizing
            steps = [tokenizer.normalizer] if tokenizer.normalizer is not None else []
            tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *steps])
        # A tokenizer.json may carry padding or truncation presets (all-MiniLM pads to 128): the
        # pipeline batches without padding and truncates at its own max_length instead.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        self._chunkers: dict[int, Tokenizer] = {}

    @classmethod
    def from_folder(cls, folder: Path, max_length: int, *, neobert: bool = True, lowercase: bool = False):
        """From folder/tokenizer.json; else NeoBERT's bert-base-uncased WordPiece from folder/vocab.txt, or
        for other models the fast tokenizer transformers converts from the checkpoint's vocabulary files."""
        if (folder / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif neobert and (folder / "vocab.txt").is_file():
            tokenizer = bert_uncased_wordpiece(folder / "vocab.txt")
        elif not neobert:
            tokenizer = _converted_fast_tokenizer(folder)
        else:
            raise ModelError(f"{folder} has neither tokenizer.json nor vocab.txt; add the checkpoint's tokenizer files")
        return cls(tokenizer, max_length, lowercase=lowercase)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text, to rebuild it in worker processes."""
        return self._tokenizer.to_str()

    def token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the tokenizer's vocabulary")
        return token_id

    def encode(self, texts: list[str]) -> TokenizedTexts:
        """Token ids of each text, the same as tokenizing it whole and truncating.

        A very long text (a 10 MB log, say) is first tokenized only up to a whitespace well past
        max_length tokens: words before that whitespace tokenize the same either way, so if the
        prefix alone overflows, its first max_length tokens are the text's. Otherwise the whole
        text is tokenized.
        """
        prefixes = [self._prefix(t) for t in texts]
        encodings = self._tokenizer.encode_batch(prefixes, add_special_tokens=True)
        for i, (text, prefix, encoding) in enumerate(zip(texts, prefixes, encodings, strict=True)):
            if len(prefix) < len(text) and not (encoding.overflowing and _ends_before_last_word(encoding, prefix)):
                encodings[i] = self._tokenizer.encode(text, add_special_tokens=True)
        return TokenizedTexts(
            ids=[np.asarray(e.ids, dtype=np.int32) for e in encodings],
            truncated=np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings)),
        )

    def chunk(self, texts: list[str], overlap: int) -> TokenizedChunks:
        """Cut each whole text into windows of max_length tokens (special tokens included) that share
        overlap tokens with the window before; a short text is one window."""
        check_chunk_overlap(overlap, self.max_length)
        if overlap not in self._chunkers:  # a copy that keeps what truncation cuts off, as overflow windows
            self._chunkers[overlap] = Tokenizer.from_str(self._tokenizer.to_str())
            self._chunkers[overlap].enable_truncation(max_length=self.max_length, stride=overlap)
        chunker = self._chunkers[overlap]
        ids, counts, starts, ends = [], [], [], []
        for encoding in chunker.encode_batch(texts, add_special_tokens=True):
            windows = [encoding, *encoding.overflowing]
            counts.append(len(windows))
            for window in windows:
                ids.append(np.asarray(window.ids, dtype=np.int32))
                spans = [
                    o for o, special in zip(window.offsets, window.special_tokens_mask, strict=True) if not special
                ]
                starts.append(min((a for a, _ in spans), default=0))
                ends.append(max((b for _, b in spans), default=0))
        return TokenizedChunks(
            ids, np.array(counts, dtype=np.int32), np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
        )

    def _prefix(self, text: str) -> str:
        # Only where the pre-tokenizer splits words, so a word's tokens cannot depend on later text.
        if self._prefix_chars is None or len(text) <= self._prefix_chars or self._tokenizer.pre_tokenizer is None:
            return text
        cut = max(text.rfind(" ", 0, self._prefix_chars), text.rfind("\n", 0, self._prefix_chars))
        return text[:cut] if cut > 0 else text


def check_chunk_overlap(overlap: int, max_length: int) -> None:
    """A window of max_length tokens holds 2 special tokens; the overlap must leave room for new ones."""
    if not 0 <= overlap < max_length - 2:
        raise SettingsError(
            f"chunk overlap must be at least 0 and below the window of {max_length} tokens less its 2 special "
            f"tokens, got {overlap}"
        )


def _ends_before_last_word(encoding, prefix: str) -> bool:
    """Whether every kept token lies before the prefix's last word, the only one the cut may change."""
    stripped = prefix.rstrip()
    last_word = max(stripped.rfind(" "), stripped.rfind("\n"))
    return max(end for _, end in encoding.offsets) <= last_word


def bert_uncased_wordpiece(vocab_file: Path) -> Tokenizer:
    """The bert-base-uncased tokenizer pipeline around a WordPiece vocab.txt."""
    tokenizer = Tokenizer(WordPiece.from_file(str(vocab_file), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ModelError(f"{vocab_file} lacks [CLS] or [SEP]; is it a BERT WordPiece vocabulary?")
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _converted_fast_tokenizer(folder: Path) -> Tokenizer:
    """The Rust tokenizer behind transformers' fast tokenizer, converted from vocab/sentencepiece files."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False).backend_tokenizer
    except (OSError, ValueError, AttributeError) as err:
        raise ModelError(
            f"{folder} has no tokenizer.json, and transformers could not build a fast tokenizer from its other "
            f"files ({err}); add the model's tokenizer.json"
        ) from err
