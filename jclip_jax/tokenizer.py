"""Text tokenisation to fixed shapes: HF `tokenizers` (tokenizer.json, v1's WordPiece) or sentencepiece (v2).

XLA compiles once per input shape, so token ids are right-padded to one of a few bucket lengths
(`bucket_lengths`), never to the longest sentence of each batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer` or a `sentencepiece.SentencePieceProcessor`.

    Output ids carry the model's special tokens ([CLS] ... [SEP] for BERT WordPiece, <s> ... </s> for
    sentencepiece) and `pad_id` on the right.
    """

    def __init__(self, path: str | os.PathLike, pad_id: int | None = None):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"tokenizer file not found: {self.path!r}")
        if self.path.endswith(".model"):
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=self.path)
            self._hf = None
            self.pad_id = self._sp.pad_id() if pad_id is None else pad_id
            if self.pad_id < 0:
                self.pad_id = 1  # XLM-R convention: <s>=0, <pad>=1, </s>=2
        else:
            from tokenizers import Tokenizer

            try:
                self._hf = Tokenizer.from_file(self.path)
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise ValueError(f"cannot read tokenizer {self.path!r}: {e}") from e
            self._hf.no_padding()
            self._hf.no_truncation()
            self._sp = None
            if pad_id is None:
                pad_id = self._hf.token_to_id("[PAD]")
                if pad_id is None:
                    pad_id = self._hf.token_to_id("<pad>")
            if pad_id is None:
                raise ValueError(f"tokenizer {self.path!r} has no [PAD] or <pad> token; pass pad_id")
            self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() if self._sp is not None else self._hf.get_vocab_size()

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        if self._hf is not None:
            return [e.ids for e in self._hf.encode_batch(list(texts))]
        bos, eos = self._sp.bos_id(), self._sp.eos_id()
        pieces = self._sp.encode(list(texts))
        return [([bos] if bos >= 0 else []) + p + ([eos] if eos >= 0 else []) for p in pieces]

    def __call__(
        self,
        texts: Sequence[str],
        max_length: int,
        buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    ) -> np.ndarray:
        """Tokenise, truncate to `max_length` (keeping the final special token), right-pad.

        Returns int32 (len(texts), L) where L is the smallest bucket >= the longest sequence (capped at
        `max_length`), or `max_length` itself when `buckets` is None.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        seqs = []
        for ids in self._ids(texts):
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + ids[-1:]  # keep [SEP] / </s>
            seqs.append(ids)
        longest = max((len(s) for s in seqs), default=1)
        if buckets is None:
            length = max_length
        else:
            length = next((b for b in sorted(buckets) if b >= longest), max_length)
            length = min(length, max_length)
        out = np.full((len(seqs), length), self.pad_id, np.int32)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s
        return out
