"""Byte-level tokenizer: no vocabulary file, every UTF-8 string round-trips.

Ids: 0 = pad, 1 = bos, 2 = eos, 3 + b for byte b (vocab_size 259). A sequence is
`[bos, bytes..., eos, pad, ...]`, cut to `max_len`: when the text is too long its bytes
are truncated so that eos is always present (text towers pool at eos).

`make_tokenizer` builds the tokenizer `config.data.tokenizer` names: this one, a
SentencePiece model, OpenAI CLIP's BPE or a Hugging Face tokenizer.json
(`mmjax.data.hf_tokenizers`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


class ByteTokenizer:
  """Strings <-> int32 token ids of a fixed length."""

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  vocab_size = VOCAB_SIZE

  def __init__(self, max_len: int):
    if max_len < 3:
      raise ValueError(f"max_len must be >= 3 (bos, one byte, eos), got {max_len}")
    self.max_len = max_len

  def encode(self, text: str) -> np.ndarray:
    """int32 [max_len]."""
    if not isinstance(text, str):
      raise TypeError(f"ByteTokenizer.encode takes str, got {type(text).__name__}")
    body = np.frombuffer(text.encode("utf-8"), np.uint8)[: self.max_len - 2]
    ids = np.zeros(self.max_len, np.int32)
    ids[0] = BOS_ID
    ids[1:1 + len(body)] = body.astype(np.int32) + BYTE_OFFSET
    ids[1 + len(body)] = EOS_ID
    return ids

  def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_len]."""
    return np.stack([self.encode(t) for t in texts]) if len(texts) else np.zeros(
        (0, self.max_len), np.int32)

  def decode(self, ids) -> str:
    """Inverse of `encode` (special ids are dropped; stops at the first eos)."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if i >= BYTE_OFFSET:
        if i >= VOCAB_SIZE:
          raise ValueError(f"token id {i} is outside the byte vocabulary (size {VOCAB_SIZE})")
        out.append(i - BYTE_OFFSET)
    return bytes(out).decode("utf-8", errors="replace")


# data.tokenizer's kinds that take a path: 'kind:PATH' -> (module, class, what PATH is).
_PATH_KINDS = {
    "sentencepiece": ("mmjax.data.sentencepiece_tokenizer", "SentencePieceTokenizer",
                      "a SentencePiece .model file"),
    "siglip": ("mmjax.data.sentencepiece_tokenizer", "SentencePieceTokenizer",
               "SigLIP's SentencePiece .model file: no bos, padded with eos"),
    "clip_bpe": ("mmjax.data.hf_tokenizers", "ClipBpeTokenizer",
                 "CLIP's BPE merges file, bpe_simple_vocab_16e6.txt.gz"),
    "hf": ("mmjax.data.hf_tokenizers", "HfTokenizer",
           "a Hugging Face tokenizer.json, or a model directory holding one"),
}


def make_tokenizer(spec: str, max_len: int):
  """The tokenizer `config.data.tokenizer` names: 'byte' (this module's),
  'sentencepiece:PATH' (`SentencePieceTokenizer`), 'siglip:PATH' (the same with SigLIP's
  conventions: no bos, padded with eos), 'clip_bpe:PATH' (OpenAI CLIP's BPE,
  `hf_tokenizers.ClipBpeTokenizer`; CLIP's context is `max_len` 77) or 'hf:PATH' (a
  Hugging Face tokenizer.json, `hf_tokenizers.HfTokenizer`: WordPiece for BERT)."""
  if spec == "byte":
    return ByteTokenizer(max_len)
  kind, _, path = str(spec).partition(":")
  if kind in _PATH_KINDS and path:
    import importlib  # pylint: disable=g-import-not-at-top
    module, name, _ = _PATH_KINDS[kind]
    extra = dict(add_bos=False, pad_with_eos=True) if kind == "siglip" else {}
    return getattr(importlib.import_module(module), name)(path, max_len, **extra)
  kinds = ", ".join(f"'{k}:PATH' ({what})" for k, (_, _, what) in _PATH_KINDS.items())
  raise ValueError(f"data.tokenizer={spec!r}: expected 'byte' or {kinds}")
