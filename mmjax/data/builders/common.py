"""What the local-data builders share: a base builder and config, reading audio and
images into what TFDS stores, and errors that name the file at fault.

Every builder here reads files the user already has in a `manual_dir`, downloads
nothing, needs no TensorFlow, and is prepared in `array_record` format by
`mmjax.data.prepare`. A file the builder cannot read (an image that does not decode, an
audio file that is not PCM or float) is a `BadFileError` naming it when the config's
`on_bad_file` is 'fail' (the default); with 'skip' the example is left out, and the
skipped files are counted per split in `builder.skipped` and written to the dataset's
description.

The builders are not entered in TFDS's registry: a prepared dataset is always read from
its files (features.json), the same way whether or not this package was imported.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds

BAD_FILE_POLICIES = ("fail", "skip")
# Sample formats kept as they are (integer PCM) or converted (float); anything else
# (u-law, A-law, ADPCM, GSM, MP3, Vorbis, ...) is refused.
PCM_SUBTYPES = ("PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32")
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")
_PCM16_SCALE = 32768.0
_LOG = logging.getLogger(__name__)


class BadFileError(ValueError):
  """A file of the manual_dir that the builder cannot read; the message names it."""


class UnreadableFile(Exception):
  """Raised by the readers below with the reason; the builder adds the path and policy."""


@dataclasses.dataclass(eq=False)
class LocalConfig(tfds.core.BuilderConfig):
  """Fields every builder here takes. `on_bad_file`: 'fail' or 'skip' (module docstring)."""
  on_bad_file: str = "fail"

  def __post_init__(self):
    if self.on_bad_file not in BAD_FILE_POLICIES:
      raise ValueError(f"on_bad_file={self.on_bad_file!r}: expected one of "
                       f"{BAD_FILE_POLICIES}")


def rate_suffix(name: str, sample_rate: int, default: int) -> str:
  """A config name that says its sample rate when it is not the builder's default."""
  if sample_rate <= 0:
    raise ValueError(f"sample_rate={sample_rate}: must be > 0 (Hz)")
  return name if sample_rate == default else f"{name}_{sample_rate}hz"


def audio_feature(sample_rate: int) -> tfds.features.Tensor:
  """Waveforms as stored here: int16 mono [T] (TFDS's `Audio` feature needs TensorFlow)."""
  return tfds.features.Tensor(shape=(None,), dtype=np.int16,
                              doc=f"mono 16-bit PCM waveform at {sample_rate} Hz")


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders of local files: config checks and the bad-file policy."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self, *, config: LocalConfig, **kwargs):
    if not isinstance(config, LocalConfig):
      raise TypeError(f"{type(self).__name__} needs its config object (from its module's "
                      f"make_config), got {config!r}")
    self.skipped: dict[str, list[str]] = {}
    self.mixed_down: dict[str, list[str]] = {}   # split -> multi-channel audio files
    super().__init__(config=config, **kwargs)

  def _description(self, text: str) -> str:
    skipped = {s: len(v) for s, v in self.skipped.items() if v}
    return text + (f" Files skipped as unreadable (on_bad_file='skip'): {skipped}."
                   if skipped else "")

  def bad_file(self, split: str, path: str, reason: str) -> None:
    """Fails naming `path`, or with on_bad_file='skip' counts it and returns."""
    if self.builder_config.on_bad_file == "fail":
      raise BadFileError(f"{path}: {reason}; to leave such files out and count them, "
                         "prepare with on_bad_file='skip' (--on_bad_file=skip)")
    self.skipped.setdefault(split, []).append(path)
    _LOG.warning("skipping %s: %s", path, reason)

  def read(self, split: str, path: str, reader, *args, **kwargs):
    """`reader(path, *args)`, or None when the file is bad and the policy skips it."""
    try:
      return reader(path, *args, **kwargs)
    except UnreadableFile as e:
      self.bad_file(split, path, str(e))
      return None

  def read_audio(self, split: str, path: str, sample_rate: int):
    """`read(split, path, read_audio, sample_rate)`, recording multi-channel files (mixed
    down to mono: the prepare summary counts and names them)."""
    def note(channels):
      self.mixed_down.setdefault(split, []).append(path)
      _LOG.info("%s has %d channels: averaged to mono", path, channels)
    return self.read(split, path, read_audio, sample_rate, on_mixdown=note)

  def _download_and_prepare(self, dl_manager, download_config=None):
    # The skip counts are known only once the examples are written: record them in the
    # description, which is saved after this returns.
    result = super()._download_and_prepare(dl_manager, download_config=download_config)
    self.info.as_proto.description = self._description(self.info.description)
    return result


def missing(manual_dir: str, expected: str) -> FileNotFoundError:
  """The error for a manual_dir without `expected`; it says what the directory holds."""
  listing = sorted(os.listdir(manual_dir)) if os.path.isdir(manual_dir) else None
  held = f"it holds {listing[:20]}" if listing else (
      "it is empty" if listing is not None else "it does not exist")
  return FileNotFoundError(f"manual_dir {manual_dir!r} lacks {expected} ({held})")


def require(manual_dir: str, candidates: Sequence[str], what: str) -> str:
  """The first of `candidates` (paths relative to `manual_dir`) that exists.

  Raises:
    FileNotFoundError: none exists; the message names the patterns and the directory.
  """
  for candidate in candidates:
    path = os.path.join(manual_dir, candidate)
    if os.path.exists(path):
      return path
  raise missing(manual_dir, f"{what}: expected "
                f"{' or '.join(repr(c) for c in candidates)} in it")


def split_progress(items: Iterable, total: int, desc: str):
  """A tqdm bar over one split's inputs (tqdm writes to stderr)."""
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(items, total=total, desc=desc, unit="file", leave=False, delay=0.5)


def read_audio(path: str, sample_rate: int, on_mixdown=None) -> np.ndarray:
  """The file as int16 mono [T] at `sample_rate` Hz.

  Integer PCM and float samples are read (libsndfile: WAV, FLAC, AIFF); several
  channels are averaged to one; another rate is resampled with a polyphase filter
  (`scipy.signal.resample_poly`); float samples are clipped to [-1, 1). A mono 16-bit
  file at `sample_rate` is returned sample for sample. `on_mixdown(channels)`, if given,
  is called for a file of several channels.

  Raises:
    UnreadableFile: not an audio file libsndfile reads, or a compressed sample format.
  """
  import soundfile  # pylint: disable=g-import-not-at-top
  try:
    info = soundfile.info(path)
  except (soundfile.LibsndfileError, RuntimeError) as e:
    raise UnreadableFile(f"cannot be read as audio ({e})") from None
  if info.subtype not in PCM_SUBTYPES + FLOAT_SUBTYPES:
    raise UnreadableFile(
        f"its samples are {info.subtype_info} ({info.format} {info.subtype}), not "
        "integer PCM or float; the builders write no codec: convert it first, e.g. "
        "`sox in.wav -e signed-integer -b 16 out.wav`")
  try:
    if info.channels == 1 and info.subtype == "PCM_16" and info.samplerate == sample_rate:
      return soundfile.read(path, dtype="int16")[0]
    data, rate = soundfile.read(path, dtype="float64", always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError) as e:
    raise UnreadableFile(f"cannot be read as audio ({e})") from None
  if data.shape[1] > 1 and on_mixdown is not None:
    on_mixdown(data.shape[1])
  wave = data.mean(axis=1)
  if rate != sample_rate:
    from scipy import signal  # pylint: disable=g-import-not-at-top
    g = math.gcd(int(rate), int(sample_rate))
    wave = signal.resample_poly(wave, sample_rate // g, rate // g)
  return np.clip(np.rint(wave * _PCM16_SCALE), -32768, 32767).astype(np.int16)


def read_image(path: str, keep_formats: Sequence[str], encode_as: str,
               quality: int = 95) -> tuple[bytes, tuple[int, int]]:
  """(bytes TFDS stores as an RGB image, (width, height)) of the image file at `path`.

  The image is decoded in full (so a truncated file is caught). An RGB file in one of
  `keep_formats` ('JPEG', 'PNG') is stored byte for byte; any other (grey, CMYK,
  palette, alpha, another format) is converted to RGB and encoded as `encode_as`.

  Raises:
    UnreadableFile: PIL cannot decode it.
  """
  import PIL.Image  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      image.load()
      size = image.size
      if image.format in keep_formats and image.mode == "RGB":
        return data, size
      out = io.BytesIO()
      image.convert("RGB").save(out, format=encode_as,
                                **({"quality": quality} if encode_as == "JPEG" else {}))
      return out.getvalue(), size
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise UnreadableFile(f"cannot be decoded as an image ({type(e).__name__}: {e})") from None
