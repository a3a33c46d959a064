"""SentencePiece tokenizer loaded from a local model file.

Same interface as `mmjax.data.tokenizer.ByteTokenizer`: a sequence is
`[bos, pieces..., eos, pad, ...]` of length `max_len`; a text that is too
long loses pieces from its end so that eos is always present (text towers
pool at eos).

Ids: when the model defines a pad piece its ids are used unchanged. Most
models (SentencePiece's default: unk 0, bos 1, eos 2, no pad) have none; then
every SentencePiece id is shifted by one and 0 is padding, so the text
encoder needs `vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
eos_id=tokenizer.eos_id`.

SigLIP's convention (big_vision's `tokenize(eos='sticky', pad_value=1)` with T5's
SentencePiece model, where </s> is 1): no bos, pieces then eos, padded with the eos
id itself (`add_bos=False, pad_with_eos=True`, `data.tokenizer='siglip:PATH'`); ids
are then SentencePiece's, unshifted. A text tower reading them attends to every
position (SigLIP's: `mask_padding=False`, pooled at the final position).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


class SentencePieceTokenizer:
  """Strings <-> int32 token ids of a fixed length, via SentencePiece.

  Attributes:
    max_len: length of every encoded sequence.
    vocab_size: number of ids (SentencePiece's vocabulary, plus one when a
      padding id had to be added).
    pad_id, bos_id, eos_id: special ids in this tokenizer's numbering.
  """

  def __init__(self, model_path: str, max_len: int, add_bos: bool = True,
               pad_with_eos: bool = False):
    """Loads `model_path` (a `.model` file written by SentencePieceTrainer);
    `pad_with_eos` pads with the eos id (SigLIP's convention, module docstring).

    Raises:
      ValueError: the file does not exist, the model has no eos piece, or
        max_len leaves no room for a piece.
    """
    import sentencepiece  # pylint: disable=g-import-not-at-top

    if not os.path.isfile(model_path):
      raise ValueError(f'no SentencePiece model file at {model_path!r}')
    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    self.add_bos = add_bos
    specials = 2 if add_bos else 1
    if max_len < specials + 1:
      raise ValueError(
          f'max_len must be >= {specials + 1} (bos/eos and one piece), got '
          f'{max_len}')
    self.max_len = max_len
    if self._sp.eos_id() < 0:
      raise ValueError(
          f'the SentencePiece model {model_path!r} has no eos piece; text '
          'encoders pool at eos')
    if add_bos and self._sp.bos_id() < 0:
      raise ValueError(
          f'the SentencePiece model {model_path!r} has no bos piece; pass '
          'add_bos=False')
    self._shift = 0 if self._sp.pad_id() >= 0 or pad_with_eos else 1
    self.pad_id = self._sp.pad_id() if self._shift == 0 else 0
    if pad_with_eos:
      self.pad_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id() + self._shift
    self.eos_id = self._sp.eos_id() + self._shift
    self.vocab_size = self._sp.vocab_size() + self._shift

  def pieces(self, text: str) -> list[int]:
    """Ids of the pieces of `text` (no bos/eos/padding), this numbering."""
    if not isinstance(text, str):
      raise TypeError(
          f'SentencePieceTokenizer takes str, got {type(text).__name__}')
    return [i + self._shift for i in self._sp.encode(text, out_type=int)]

  def encode(self, text: str) -> np.ndarray:
    """int32 [max_len]: bos, pieces (truncated to fit), eos, padding."""
    body = self.pieces(text)[: self.max_len - (2 if self.add_bos else 1)]
    ids = np.full(self.max_len, self.pad_id, np.int32)
    head = [self.bos_id] if self.add_bos else []
    seq = head + body + [self.eos_id]
    ids[: len(seq)] = seq
    return ids

  def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_len]."""
    if not len(texts):
      return np.zeros((0, self.max_len), np.int32)
    return np.stack([self.encode(t) for t in texts])

  def decode(self, ids) -> str:
    """Inverse of `encode`: stops at the first eos, drops bos and padding."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i in (self.pad_id, self.bos_id):
        continue
      if not 0 <= i < self.vocab_size:
        raise ValueError(
            f'token id {i} is outside the vocabulary (size {self.vocab_size})')
      out.append(i - self._shift)
    return self._sp.decode(out)
