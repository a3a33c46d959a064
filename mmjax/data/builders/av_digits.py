"""AV-Digits: spoken digits paired with handwritten ones, AV-MNIST's construction.

Every recording of the Free Spoken Digit Dataset (FSDD, `{digit}_{speaker}_{take}.wav`)
is paired with an MNIST image of its digit, as MultiBench builds AV-MNIST. Splits follow
FSDD's official one (takes 0-4 test, 5-49 train) with a validation split carved from
train by take, the same for every speaker and digit:

  test        takes 0-4
  validation  takes 5-9
  train       takes 10 and up

MNIST images (the `train-*` and `t10k-*` IDX files that are present, train's first) are
split per digit: the images of digit d, in file order, are cut into three consecutive
ranges, one per split, sized in proportion to the split's recordings of d. A split's
recordings of d, in (speaker, take) order, take images from its range in an order drawn
from `(seed, d, split)`, without repeats while the range lasts. So no image is in two
splits, and the pairing is a function of the files and the seed alone.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data.builders import common

TFDS_NAME = "mmjax_av_digits"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")
SAMPLE_RATE = 8000
SPLITS = ("train", "validation", "test")
RECORDING_DIRS = ("recordings", "fsdd/recordings")
MNIST_DIRS = ("", "mnist")
MNIST_PREFIXES = ("train", "t10k")       # the image pool's order
# Captions name the digit in words or numerals; one is picked per example from
# (seed, audio_id).
TEMPLATES = ("a handwritten {name}", "the digit {digit}", "someone says {name}",
             "the number {name}, written and spoken", "a {name} ({digit})",
             "a photo of the digit {name}", "a spoken and handwritten {digit}",
             "{name}, said aloud and written by hand")
_RECORDING = re.compile(r"^(\d)_([^_]+)_(\d+)\.wav$")


@dataclasses.dataclass(eq=False)
class AvDigitsConfig(common.LocalConfig):
  """`sample_rate`: Hz of the stored waveforms (FSDD's own: 8000, kept sample for
  sample); `seed`: the image drawing."""
  sample_rate: int = SAMPLE_RATE
  seed: int = 0


def make_config(manual_dir: str | None = None, *, sample_rate: int = SAMPLE_RATE,
                seed: int = 0, on_bad_file: str = "fail") -> AvDigitsConfig:
  """The config, named 'default' at 8 kHz and seed 0 ('default_16000hz_seed1' otherwise)."""
  del manual_dir  # what the config holds does not depend on the files
  name = common.rate_suffix("default", sample_rate, SAMPLE_RATE)
  if seed:
    name = f"{name}_seed{seed}"
  return AvDigitsConfig(name=name, sample_rate=int(sample_rate), seed=int(seed),
                        on_bad_file=on_bad_file,
                        description=f"{sample_rate} Hz audio, image draw seed {seed}")


def usage(config: AvDigitsConfig) -> dict:
  """How `mmjax.data.prepare` says to read the dataset (FSDD clips are 0.1-2.3 s)."""
  return {"features": {"image": "image", "audio": "audio", "text": "text"},
          "label": "label", "fields": {"audio_samples": config.sample_rate},
          "notes": [f"audio_samples: 1 s at {config.sample_rate} Hz (clips are cut or "
                    "zero-padded); class_names: the label's names, 'zero' .. 'nine'"]}


def split_of_take(take: int) -> str:
  if take < 5:
    return "test"
  return "validation" if take < 10 else "train"


def read_idx(path: str) -> np.ndarray:
  """An IDX file of unsigned bytes (MNIST's format), gzipped or not, as a uint8 array."""
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path}: cannot be read ({e})") from None
  if len(data) < 4 or data[:3] != b"\x00\x00\x08":
    raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4]!r})")
  ndim = data[3]
  dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f"{path}: {body.size} bytes of data, but its header says {dims}")
  return body.reshape(dims)


def _idx_file(manual_dir: str, stem: str) -> str | None:
  for folder in MNIST_DIRS:
    for name in (stem, stem + ".gz"):
      path = os.path.join(manual_dir, folder, name)
      if os.path.isfile(path):
        return path
  return None


def read_mnist(manual_dir: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(image ids 'file:index', images uint8 [N, 28, 28], labels [N]) of the IDX files."""
  ids, images, labels = [], [], []
  for prefix in MNIST_PREFIXES:
    image_path = _idx_file(manual_dir, f"{prefix}-images-idx3-ubyte")
    label_path = _idx_file(manual_dir, f"{prefix}-labels-idx1-ubyte")
    if image_path is None and label_path is None:
      continue
    if image_path is None or label_path is None:
      missing = f"{prefix}-{'images-idx3' if image_path is None else 'labels-idx1'}-ubyte"
      raise FileNotFoundError(f"manual_dir {manual_dir!r} has {image_path or label_path} "
                              f"but not {missing}[.gz] beside it")
    x, y = read_idx(image_path), read_idx(label_path)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
      raise ValueError(f"{image_path} and {label_path}: images {x.shape} and labels "
                       f"{y.shape} are not [N, 28, 28] and [N]")
    if y.max(initial=0) > 9:
      raise ValueError(f"{label_path}: labels up to {y.max()}, not digits 0-9")
    ids += [f"{prefix}:{i}" for i in range(len(y))]
    images.append(x)
    labels.append(y)
  if not images:
    where = " or ".join(repr(os.path.join(d, "t10k-images-idx3-ubyte[.gz]"))
                        for d in MNIST_DIRS)
    raise common.missing(manual_dir, f"MNIST's IDX files: expected {where} in it, with "
                         "its labels file (train-* files are read too when present)")
  return ids, np.concatenate(images), np.concatenate(labels)


def read_recordings(manual_dir: str) -> list[tuple[int, str, int, str]]:
  """(digit, speaker, take, path) of every FSDD recording, sorted by (speaker, take)."""
  folder = common.require(manual_dir, RECORDING_DIRS,
                          "the FSDD recordings ({digit}_{speaker}_{take}.wav)")
  recordings = []
  for name in sorted(os.listdir(folder)):
    if not name.lower().endswith(".wav"):
      continue
    match = _RECORDING.match(name)
    if not match:
      raise ValueError(f"{os.path.join(folder, name)}: not named as FSDD recordings are, "
                       "{digit}_{speaker}_{take}.wav")
    digit, speaker, take = int(match[1]), match[2], int(match[3])
    recordings.append((digit, speaker, take, os.path.join(folder, name)))
  if not recordings:
    raise FileNotFoundError(f"{folder}: no .wav recordings in it")
  return sorted(recordings, key=lambda r: (r[1], r[2], r[0]))


def assign_images(recordings, labels: np.ndarray, seed: int) -> dict[str, list]:
  """split -> [(recording, pool index of its image)] (module docstring)."""
  plan = {s: [] for s in SPLITS}
  for digit in range(10):
    pool = np.flatnonzero(labels == digit)
    by_split = {s: [r for r in recordings if r[0] == digit and split_of_take(r[2]) == s]
                for s in SPLITS}
    counts = np.array([len(by_split[s]) for s in SPLITS])
    if not counts.sum():
      continue
    bounds = np.floor(len(pool) * np.cumsum(np.r_[0, counts]) / counts.sum()).astype(int)
    for k, split in enumerate(SPLITS):
      if not counts[k]:
        continue
      images = pool[bounds[k]:bounds[k + 1]]
      if not len(images):
        raise ValueError(f"MNIST has {len(pool)} images of digit {digit}: too few to "
                         f"give each split its own ({dict(zip(SPLITS, counts.tolist()))} "
                         "recordings)")
      rng = np.random.default_rng([seed, digit, k])
      rounds = -(-counts[k] // len(images))
      order = np.concatenate([rng.permutation(len(images)) for _ in range(rounds)])
      plan[split] += list(zip(by_split[split], images[order[:counts[k]]].tolist()))
  return plan


def caption(digit: int, audio_id: str, seed: int) -> str:
  template = TEMPLATES[zlib.crc32(f"{seed}:{audio_id}".encode()) % len(TEMPLATES)]
  return template.format(name=DIGIT_NAMES[digit], digit=digit)


class Builder(common.LocalBuilder, skip_registration=True):
  """FSDD recordings paired with MNIST images (module docstring)."""

  name = TFDS_NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the FSDD recordings in manual_dir/recordings/ (or fsdd/recordings/), "
      "{digit}_{speaker}_{take}.wav, and MNIST's IDX files t10k-images-idx3-ubyte[.gz] "
      "and t10k-labels-idx1-ubyte[.gz] (train-* too, if you have them) in manual_dir/ "
      "(or manual_dir/mnist/).")

  def _info(self):
    rate = self.builder_config.sample_rate
    return self.dataset_info_from_configs(
        description=(f"FSDD spoken digits (mono int16 PCM at {rate} Hz) paired with "
                     "MNIST images of the same digit, AV-MNIST's construction; splits "
                     "by take: test 0-4, validation 5-9, train 10+."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "audio": common.audio_feature(rate),
            "label": tfds.features.ClassLabel(names=DIGIT_NAMES),
            "speaker": tfds.features.Text(),
            "text": tfds.features.Text(),
            "audio_id": tfds.features.Text(doc="the recording, {digit}_{speaker}_{take}"),
            "image_id": tfds.features.Text(doc="the MNIST image, {train|t10k}:{index}"),
        }),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    recordings = read_recordings(manual_dir)
    ids, images, labels = read_mnist(manual_dir)
    plan = assign_images(recordings, labels, self.builder_config.seed)
    return {split: self._generate_examples(split, pairs, ids, images)
            for split, pairs in plan.items() if pairs}

  def _generate_examples(self, split, pairs, ids, images):
    import PIL.Image  # pylint: disable=g-import-not-at-top
    config = self.builder_config
    for (digit, speaker, take, path), image in common.split_progress(
        pairs, len(pairs), f"av_digits {split}"):
      audio = self.read_audio(split, path, config.sample_rate)
      if audio is None:
        continue
      audio_id = f"{digit}_{speaker}_{take}"
      yield audio_id, {
          "image": PIL.Image.fromarray(images[image]),
          "audio": audio,
          "label": digit,
          "speaker": speaker,
          "text": caption(digit, audio_id, config.seed),
          "audio_id": audio_id,
          "image_id": ids[image],
      }
