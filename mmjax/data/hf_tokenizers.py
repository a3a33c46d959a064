"""Tokenizers of published text towers, through the `tokenizers` library.

Same interface as `mmjax.data.tokenizer.ByteTokenizer` (`encode`, `encode_batch`,
`decode`, `max_len`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`):

`ClipBpeTokenizer` is OpenAI CLIP's byte-level BPE, built from its merges file
(`bpe_simple_vocab_16e6.txt.gz`, which open_clip ships; a local path). Its ids are
open_clip's: the text is cleaned (ftfy's `fix_text` when ftfy is installed, see
`clean_text`; HTML entities unescaped twice; runs of whitespace made one space;
stripped) and lower-cased, split by CLIP's pattern (contractions, runs of letters,
single digits, runs of other non-space characters), each piece's UTF-8 bytes
mapped to GPT-2's byte alphabet and merged by BPE with the end-of-word marker
'</w>'. A sequence is `[<start_of_text>, pieces..., <end_of_text>, 0, ...]` of
length `max_len` (CLIP: 77); a longer one is cut to `max_len` with its last id
replaced by <end_of_text>. Padding is 0 (the id of '!'), as open_clip pads, so a
CLIP text tower must not read 0 as padding (it pools at the end token).

`HfTokenizer` reads a Hugging Face `tokenizer.json` (WordPiece for BERT-family
towers, or any other model the file describes) with the file's own normalizer,
pre-tokenizer and special tokens, truncated and padded to `max_len`; its start and
end ids are the special tokens its post-processor adds ([CLS] and [SEP]), its
padding id the file's (else its [PAD] or <pad> token).
"""
from __future__ import annotations

import gzip
import html
import json
import os
import unicodedata
import zlib
from typing import Sequence

import numpy as np

SOT, EOT = "<start_of_text>", "<end_of_text>"
EOW = "</w>"
CLIP_NUM_MERGES = 49152 - 256 - 2     # CLIP's vocabulary: 512 byte symbols + merges + 2
CLIP_CONTEXT = 77
# CLIP's split of cleaned text into pieces (Oniguruma syntax, as `tokenizers` reads it).
CLIP_PATTERN = (r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
                r"[\p{N}]|[^\s\p{L}\p{N}]+")


def byte_alphabet() -> list[str]:
  """GPT-2's byte -> character table as a list indexed by byte: printable Latin-1
  bytes stand for themselves, the others for the characters from U+0100 on, in byte
  order. CLIP's vocabulary starts with these 256 characters in the table's order
  (the printable ones first); see `clip_vocab`."""
  printable = (set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD))
               | set(range(0xAE, 0x100)))
  table, extra = [], 0
  for b in range(256):
    if b in printable:
      table.append(chr(b))
    else:
      table.append(chr(256 + extra))
      extra += 1
  return table


def _clip_base_symbols() -> list[str]:
  """The 256 byte characters in CLIP's id order: printable bytes, then the others."""
  table = byte_alphabet()
  return [c for c in table if ord(c) < 256] + [c for c in table if ord(c) >= 256]


def clean_text(text: str, use_ftfy: bool | None = None) -> str:
  """CLIP's cleaning before BPE: fix the text (ftfy's `fix_text`), unescape HTML
  twice, strip, collapse whitespace, lower-case.

  `use_ftfy`: None uses ftfy when it is installed. Without it a narrower fix runs
  (Unicode NFC, curly quotes made straight, Latin ligatures, digraphs and full-width
  forms expanded, control characters dropped), which gives open_clip's ids on ordinary
  text but not where ftfy repairs mojibake or other rarer cases.
  """
  if use_ftfy is None:
    use_ftfy = _has_ftfy()
  if use_ftfy:
    import ftfy  # pylint: disable=g-import-not-at-top
    text = ftfy.fix_text(text)
  else:
    text = _basic_fix(text)
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).lower()


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})


# Latin ligatures and digraphs ftfy expands: ff, fi, ... st; IJ, ij, 'n; DZ, Dz, dz, LJ...
_LIGATURES = frozenset("\u0132\u0133\u0149" + "".join(map(chr, range(0x1C4, 0x1CD)))
                       + "\u01f1\u01f2\u01f3" + "".join(map(chr, range(0xFB00, 0xFB07))))


def _basic_fix(text: str) -> str:
  out = []
  for ch in unicodedata.normalize("NFC", text):
    if ch in _LIGATURES or "\uff01" <= ch <= "\uff5e":   # ligatures, full-width forms
      ch = unicodedata.normalize("NFKC", ch)
    elif unicodedata.category(ch) == "Cc" and ch not in "\t\n\r":
      continue
    out.append(ch)
  return "".join(out).translate(_QUOTES)


def _has_ftfy() -> bool:
  try:
    import ftfy  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def read_clip_merges(path: str, num_merges: int = CLIP_NUM_MERGES) -> list[tuple[str, str]]:
  """The BPE merges of a CLIP merges file (gzipped or plain UTF-8 text): a header line
  ('#version: ...'), then one merge a line, two symbols separated by a space; the
  first `num_merges` are read (CLIP's vocabulary uses 48,894).

  Raises:
    ValueError: no such file, not UTF-8 text, no header, or a line that is not two
      symbols of the byte alphabet (the line number is given).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"no CLIP BPE merges file at {path!r} (open_clip ships it as "
                     "bpe_simple_vocab_16e6.txt.gz)")
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")
  except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
    raise ValueError(f"{path}: not a CLIP BPE merges file (gzipped or plain UTF-8 "
                     f"text): {e}") from None
  if "#version" not in lines[0]:
    raise ValueError(f"{path}: not a CLIP BPE merges file: its first line should be a "
                     f"'#version: ...' header, got {lines[0][:80]!r}")
  alphabet = set(byte_alphabet())
  merges = []
  for number, line in enumerate(lines[1:], start=2):
    if len(merges) == num_merges:
      break
    if not line:
      if number == len(lines):   # the file's final newline
        break
    parts = line.split(" ")
    bad = len(parts) != 2 or any(
        not p or not set(p[:-len(EOW)] if p.endswith(EOW) else p) <= alphabet
        for p in parts)
    if bad:
      raise ValueError(f"{path}, line {number}: {line[:80]!r} is not a merge (two "
                       "symbols of the byte alphabet, the second may end in '</w>')")
    merges.append((parts[0], parts[1]))
  if not merges:
    raise ValueError(f"{path}: holds no merges after its header")
  return merges


def clip_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
  """CLIP's tokens in id order: the byte symbols, the same with '</w>', one token per
  merge, then <start_of_text> and <end_of_text>."""
  base = _clip_base_symbols()
  return base + [s + EOW for s in base] + [a + b for a, b in merges] + [SOT, EOT]


class ClipBpeTokenizer:
  """OpenAI CLIP's BPE tokenizer (module docstring), ids identical to open_clip's.

  Args:
    merges_path: the merges file (`read_clip_merges`).
    max_len: the context length (CLIP's 77).
    use_ftfy: see `clean_text` (None: ftfy when installed).
  """

  def __init__(self, merges_path: str, max_len: int = CLIP_CONTEXT,
               use_ftfy: bool | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    from tokenizers import models, pre_tokenizers  # pylint: disable=g-import-not-at-top
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 (start and end tokens), got {max_len}")
    merges = read_clip_merges(merges_path)
    vocab = clip_vocab(merges)
    ids = {token: i for i, token in enumerate(vocab)}
    if len(ids) != len(vocab):
      raise ValueError(f"{merges_path}: the merges make a token twice; not a CLIP BPE "
                       "merges file")
    try:
      bpe = models.BPE(vocab=ids, merges=list(merges), end_of_word_suffix=EOW)
    except Exception as e:  # pylint: disable=broad-except  (the Rust side's errors)
      raise ValueError(f"{merges_path}: the merges do not make a BPE model: {e}") from None
    self._tok = tokenizers.Tokenizer(bpe)
    self._tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(CLIP_PATTERN), behavior="removed",
                             invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    self._tok.add_special_tokens([SOT, EOT])
    self.max_len, self.use_ftfy = int(max_len), use_ftfy
    self.vocab_size = len(vocab)
    self.bos_id, self.eos_id, self.pad_id = ids[SOT], ids[EOT], 0
    self._vocab = vocab
    self._byte_of = {c: b for b, c in enumerate(byte_alphabet())}

  def pieces(self, text: str) -> list[int]:
    """The BPE ids of `text` after cleaning (no start/end tokens)."""
    if not isinstance(text, str):
      raise TypeError(f"ClipBpeTokenizer takes str, got {type(text).__name__}")
    return self._tok.encode(clean_text(text, self.use_ftfy),
                            add_special_tokens=False).ids

  def _frame(self, body: Sequence[int]) -> np.ndarray:
    seq = [self.bos_id, *body, self.eos_id]
    if len(seq) > self.max_len:
      seq = seq[:self.max_len]
      seq[-1] = self.eos_id
    ids = np.full(self.max_len, self.pad_id, np.int32)
    ids[:len(seq)] = seq
    return ids

  def encode(self, text: str) -> np.ndarray:
    """int32 [max_len]: start, pieces, end (truncated keeping the end), zeros."""
    return self._frame(self.pieces(text))

  def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_len]."""
    if not len(texts):
      return np.zeros((0, self.max_len), np.int32)
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f"ClipBpeTokenizer takes str, got {type(t).__name__}")
    cleaned = [clean_text(t, self.use_ftfy) for t in texts]
    encoded = self._tok.encode_batch(cleaned, add_special_tokens=False)
    return np.stack([self._frame(e.ids) for e in encoded])

  def decode(self, ids) -> str:
    """The cleaned text of `ids` up to the first end token (start token dropped);
    word ends become spaces."""
    tokens = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary (size "
                         f"{self.vocab_size})")
      if i != self.bos_id:
        tokens.append(self._vocab[i])
    words = "".join(tokens).split(EOW)
    data = b" ".join(bytes(self._byte_of[c] for c in w if c in self._byte_of)
                     for w in words)
    return data.decode("utf-8", errors="replace").strip()


class HfTokenizer:
  """A Hugging Face `tokenizer.json` (module docstring), padded to `max_len`.

  Args:
    path: the tokenizer.json file, or a directory holding one.
    max_len: length of every sequence (truncated keeping the end token).
  """

  def __init__(self, path: str, max_len: int):
    import tokenizers  # pylint: disable=g-import-not-at-top
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"no Hugging Face tokenizer file at {path!r} (a tokenizer.json, "
                       "or a model directory holding one)")
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (the Rust side's errors)
      raise ValueError(f"{path}: not a Hugging Face tokenizer.json: {e}") from None
    tok.no_truncation()
    tok.no_padding()
    specials = tok.encode("").ids      # what the post-processor adds around a text
    if not specials:
      raise ValueError(f"{path}: the tokenizer adds no end token (its post-processor "
                       "adds none); text encoders need one")
    if max_len < len(specials) + 1:
      raise ValueError(f"max_len must be >= {len(specials) + 1} (the special tokens and "
                       f"one more), got {max_len}")
    self.eos_id = specials[-1]
    self.bos_id = specials[0] if len(specials) > 1 else None
    self.pad_id = self._pad_id(path, tok)
    self.max_len = int(max_len)
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tok.enable_truncation(self.max_len)
    tok.enable_padding(length=self.max_len, pad_id=self.pad_id,
                       pad_token=tok.id_to_token(self.pad_id))
    self._tok = tok

  @staticmethod
  def _pad_id(path, tok) -> int:
    with open(path, encoding="utf-8") as f:
      padding = json.load(f).get("padding") or {}
    if "pad_id" in padding:
      return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>"):
      if tok.token_to_id(token) is not None:
        return tok.token_to_id(token)
    raise ValueError(f"{path}: the tokenizer has no padding token (no 'padding' entry, "
                     "no [PAD] or <pad> token)")

  def encode(self, text: str) -> np.ndarray:
    """int32 [max_len]."""
    if not isinstance(text, str):
      raise TypeError(f"HfTokenizer takes str, got {type(text).__name__}")
    return np.asarray(self._tok.encode(text).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_len]."""
    if not len(texts):
      return np.zeros((0, self.max_len), np.int32)
    return np.asarray([e.ids for e in self._tok.encode_batch(list(texts))], np.int32)

  def decode(self, ids) -> str:
    """The text of `ids` up to the first end token, special tokens dropped."""
    flat = np.asarray(ids).reshape(-1).tolist()
    if self.eos_id in flat:
      flat = flat[:flat.index(self.eos_id)]
    if flat and flat[0] == self.bos_id:
      flat = flat[1:]
    return self._tok.decode(flat, skip_special_tokens=True)
