"""TFDS datasets as random-access sources, read with `tfds.data_source` (no TensorFlow).

A dataset prepared in TFDS's `array_record` format is read record by record: TFDS
decodes each record to numpy (`Image` features, PNG or JPEG, through PIL), and this
module picks the configured feature paths and turns them into what
`mmjax.data.pipeline.Featurize` consumes, through `mmjax.data.augment`:

  image  float32 [S, S, C] (/ 255 or / 65535; the centred square or, in training, a
         random crop, resized to `data.image_size`; normalised by `data.image_norm`)
  video  float32 [T, S, S, C] (frames as images, one crop per clip)
  audio  float32 [T] or [frames, mels] (integers are 16-bit PCM: / 32768; resampled
         to `data.sample_rate`; the centred or, in training, a random window of
         `data.audio_samples`, or zero-padded)
  text   str (of a Sequence of captions the first, or in training one at random)
  other  numpy arrays (floats as float32), for encoders of other modalities

plus `label` (int) when `data.label_feature` is set and `length` ({audio modality: samples
before padding}) when `data.audio_samples` is.

The config (`mmjax.config_lib.tfds_data`) maps modality names to feature paths, nested
ones joined by '/':

  data.name, data.data_dir = 'my_dataset:1.0.0', '/data/tfds'
  data.features = {'image': 'image', 'text': 'captions/text'}
  data.label_feature, data.splits = 'label', {'train': 'train', 'test': 'test[:1000]'}

Everything a user can get wrong is checked when the source is built, against the
dataset's `DatasetInfo`, with the fix in the message: a dataset that is not prepared in
`data_dir`, one prepared in another file format, a feature path or split the dataset
lacks, a feature whose type or shape the modality cannot take.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from mmjax.data import augment
from mmjax.data.info import DataInfo

# Keys of a record that are not modalities (`pipeline.Featurize` gives them meaning).
RESERVED_KEYS = ("label", "mask", "index", "factors", "length")
# Modalities read as pixels: (rank, layout).
_PIXEL_RANKS = {"image": (3, "[H, W, C]"), "video": (4, "[T, H, W, C]")}


def _tfds():
  # Imported on first use: importing tensorflow_datasets costs about a second, and
  # configs on the procedural world never need it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def feature_paths(features) -> dict[str, Any]:
  """`{'a/b': connector}` for every leaf of a TFDS `FeaturesDict`, nested paths joined by '/'.

  A `Sequence` (or any connector other than `FeaturesDict`) is a leaf.
  """
  tfds = _tfds()
  paths = {}
  for key, feature in features.items():
    if isinstance(feature, tfds.features.FeaturesDict):
      for sub, leaf in feature_paths(feature).items():
        paths[f"{key}/{sub}"] = leaf
    else:
      paths[key] = feature
  return paths


def _prepare_hint(name: str, data_dir: str) -> str:
  from mmjax.data import builders  # pylint: disable=g-import-not-at-top  (error path only)
  return builders.prepare_hint(name, data_dir) or (f"prepare it in array_record format, e.g. `tfds build {name.split(':')[0]} "
          f"--data_dir={data_dir} --file_format=array_record`, or for a dataset of your "
          f"own, `MyBuilder(data_dir={data_dir!r}, file_format='array_record')"
          ".download_and_prepare()` (see docs/data.md)")


def _dir_listing(name: str, data_dir: str) -> str:
  if not os.path.isdir(data_dir):
    return "the directory does not exist"
  names = sorted(n for n in os.listdir(data_dir) if n not in ("downloads",))
  listing = f"it holds {names}" if names else "it is empty"
  parts = re.split(r"[/:]", name)   # there under another config or version: say which
  for where in ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]:
    if os.path.isdir(os.path.join(data_dir, where)):
      listing += f"; {where}/ holds {sorted(os.listdir(os.path.join(data_dir, where)))}"
  return listing


def load_builder(name: str, data_dir: str | None = None):
  """The prepared TFDS builder of `name` ('dataset[/config][:version]') in `data_dir`.

  Reads only what is on disk: nothing is downloaded or generated.

  Raises:
    ValueError: the dataset is not prepared in `data_dir`, or was prepared in a file
      format other than array_record.
    ImportError: the dataset has a feature type that needs TensorFlow (e.g. `Audio`).
  """
  tfds = _tfds()
  data_dir = os.fspath(data_dir) if data_dir else tfds.core.constants.DATA_DIR
  if not name:
    raise ValueError("data.name: empty; give the TFDS dataset as 'name[/config][:version]'")
  reason = ""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, AssertionError) as e:
    # A registered builder asked for a version it does not have raises AssertionError.
    # The first line says what TFDS missed; the rest lists every registered dataset.
    builder, reason = None, f"; TFDS: {str(e).splitlines()[0]}"
  except ModuleNotFoundError as e:
    if e.name and e.name.startswith("tensorflow") and "datasets" not in e.name:
      raise ImportError(
          f"data.name={name!r}: the dataset has a feature type that TFDS can only build "
          "with TensorFlow installed (TFDS `Audio` features do); store such data as "
          "`tfds.features.Tensor` (e.g. float32 [T] waveforms), or install tensorflow"
      ) from e
    raise
  if builder is None or not builder.info.splits:
    raise ValueError(
        f"data.name: dataset {name!r} is not prepared in data.data_dir {data_dir!r} "
        f"({_dir_listing(name, data_dir)}{reason}); {_prepare_hint(name, data_dir)}")
  file_format = builder.info.file_format
  if file_format is not None and file_format.value != "array_record":
    raise ValueError(
        f"data.name: dataset {name!r} in {data_dir!r} is prepared as {file_format.value}, "
        f"which has no random access; {_prepare_hint(name, data_dir)}")
  return builder


def _split_names(tfds_split: str) -> list[str]:
  """'train[:90%]+test' -> ['train', 'test'] (the splits a TFDS split string reads)."""
  return [re.sub(r"\[.*\]$", "", part.strip()) for part in tfds_split.split("+")]


class TfdsSource:
  """A random-access source over one split of a prepared TFDS dataset.

  `len(source)` is the number of examples; `source[i]` is a record as the module doc
  says, in the deterministic evaluation form; `source.train_record(i, (seed, position))`
  the training form: random crop and flip (with `image_augment`), a random audio
  window, a random caption of several.

  Args:
    name: the dataset, 'name[/config][:version]'.
    tfds_split: the TFDS split to read ('train', 'test[:1000]', 'train+validation').
    features: modality name -> feature path ('image', 'captions/text').
    data_dir: where the dataset was prepared (TFDS's default when None).
    label_feature: path of an integer scalar feature to return as `label`, or None.
    image_size: the side of images and video frames; 0 keeps the stored size, which
      must then be fixed.
    audio_samples: the length of waveforms; 0 keeps the stored length, which must then
      be fixed.
    image_norm, image_mean, image_std, image_preset: `augment.pixel_transform`.
    image_augment, crop_scale, crop_ratio, flip_prob: `augment.PixelTransform`.
    sample_rate: resample waveforms to this rate (0: as stored).
    source_sample_rate: the stored rate (0: `stored_sample_rate`).
  """

  def __init__(self, name: str, tfds_split: str, features: Mapping[str, str], *,
               data_dir: str | None = None, label_feature: str | None = None,
               image_size: int = 0, audio_samples: int = 0, image_norm: str = "none",
               image_mean=(), image_std=(), image_preset: str = "", image_augment=False,
               crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5,
               sample_rate: int = 0, source_sample_rate: int = 0):
    self.name = name
    self.tfds_split = tfds_split
    self.features = dict(features)
    self.label_feature = label_feature or None
    self.image_size = int(image_size)
    self.audio_samples = int(audio_samples)
    if not self.features:
      raise ValueError("data.features: empty; map at least one modality to a feature path")
    if self.image_size < 0 or self.audio_samples < 0:
      raise ValueError(f"data.image_size={image_size} and data.audio_samples="
                       f"{audio_samples} must be >= 0 (0: keep the stored size)")
    for m in self.features:
      if m in RESERVED_KEYS:
        raise ValueError(f"data.features.{m}: {m!r} is not a modality name (reserved: "
                         f"{RESERVED_KEYS}); use data.label_feature for the label")
    self._pixels = augment.pixel_transform(
        self.image_size, image_norm, image_mean, image_std, image_preset,
        augment=image_augment, scale=crop_scale, ratio=crop_ratio, flip_prob=flip_prob)

    builder = load_builder(name, data_dir)
    self.info = builder.info
    available_splits = list(self.info.splits.keys())
    for s in _split_names(tfds_split):
      if s not in available_splits:
        raise ValueError(f"data.splits: dataset {name!r} has no split {s!r} (asked for "
                         f"{tfds_split!r}); it has {available_splits}")

    paths = feature_paths(self.info.features)
    wanted = {f"data.features.{m}": p for m, p in self.features.items()}
    if self.label_feature:
      wanted["data.label_feature"] = self.label_feature
    for where, path in wanted.items():
      if path not in paths:
        raise ValueError(f"{where}: dataset {name!r} has no feature {path!r}; its "
                         f"features are {sorted(paths)}")
    self._several = set()     # text modalities whose feature is a Sequence of strings
    for m, path in self.features.items():
      self._check_feature(m, path, paths[path])
    self.num_classes = None
    if self.label_feature:
      label = paths[self.label_feature]
      dtype = np.dtype(label.np_dtype)
      if tuple(label.shape) != () or dtype.kind not in "iu":
        raise ValueError(f"data.label_feature: {self.label_feature!r} must be an integer "
                         f"scalar, but it is {type(label).__name__} of shape "
                         f"{tuple(label.shape)} and dtype {dtype}")
      self.num_classes = getattr(label, "num_classes", None)

    audio = [m for m in self.features if m == "audio"]
    rates = _sample_rate(self.info, audio, sample_rate, source_sample_rate,
                         [paths[self.features[m]] for m in audio])
    self._wave = augment.WaveTransform(self.audio_samples, rates["stored"], rates["wanted"])
    self.sample_rate = rates["records"]      # of the records' audio; None: unknown
    self._parts = {m: p.split("/") for m, p in self.features.items()}
    self._strings = {m for m, p in self.features.items()
                     if np.dtype(paths[p].np_dtype).kind in "OSU"}
    self._label_parts = self.label_feature.split("/") if self.label_feature else None
    self._data_source = builder.as_data_source(split=tfds_split)
    self._len = len(self._data_source)
    self._builder, self._paths = builder, paths

  def _check_feature(self, modality: str, path: str, feature) -> None:
    """Feature type and shape against what the modality's input must be."""
    where = f"data.features.{modality} ({path!r})"
    dtype = np.dtype(feature.np_dtype) if not isinstance(feature.np_dtype, dict) else None
    shape = tuple(feature.shape) if isinstance(feature.shape, tuple) else None
    kind = type(feature).__name__
    is_string = dtype is not None and dtype.kind in "OSU"
    if modality == "text" or is_string:
      # Any modality may be text ('caption', 'transcript'): the pipeline tokenises the
      # strings of the modalities whose encoder kind is 'text'. A Sequence of strings
      # is several captions of one example.
      if is_string and shape is not None and len(shape) == 1:
        self._several.add(modality)
        return
      if not is_string or shape != ():
        raise ValueError(f"{where}: modality {modality!r} needs one string per example (a "
                         f"TFDS Text feature) or a Sequence of them, but it is {kind} of "
                         f"shape {shape} and dtype {dtype}")
      return
    if dtype is None or shape is None:
      raise ValueError(f"{where}: {kind} is not one array; map a leaf feature (its "
                       "fields are separate paths)")
    if modality in _PIXEL_RANKS:
      rank, layout = _PIXEL_RANKS[modality]
      if len(shape) != rank:
        raise ValueError(f"{where}: modality {modality!r} needs {layout} arrays, but the "
                         f"feature has shape {shape}")
      if dtype not in (np.uint8, np.uint16) and dtype.kind != "f":
        raise ValueError(f"{where}: {modality} dtype {dtype} is not uint8, uint16 or float")
      if None in shape[-3:-1] and not self._pixels.size:
        raise ValueError(f"{where}: {modality} frames have no fixed size {shape}; set "
                         "data.image_size to resize them")
      if modality == "video" and shape[0] is None:
        raise ValueError(f"{where}: videos have no fixed number of frames {shape}; "
                         "batches need one")
      norm = self._pixels.norm
      if norm is not None and shape[-1] not in (None, norm[0].shape[0]):
        raise ValueError(f"{where}: data.image_norm has {norm[0].shape[0]} channels' "
                         f"constants, but the {modality} has {shape[-1]} ({shape})")
    elif modality == "audio":
      if len(shape) not in (1, 2):
        raise ValueError(f"{where}: modality 'audio' needs a [T] waveform or [frames, mels] "
                         f"features, but the feature has shape {shape}")
      if dtype.kind not in "if":
        raise ValueError(f"{where}: audio dtype {dtype} is neither float nor integer PCM")
      if len(shape) == 2 and self.audio_samples:
        raise ValueError(f"{where}: data.audio_samples crops waveforms [T], but the feature "
                         f"has shape {shape}")
      if shape[0] is None and not self.audio_samples:
        raise ValueError(f"{where}: waveforms have no fixed length {shape}; set "
                         "data.audio_samples to crop / pad them")

  def __len__(self) -> int:
    return self._len

  def __repr__(self):
    return (f"TfdsSource(name={self.name!r}, split={self.tfds_split!r}, len={self._len}, "
            f"features={self.features})")

  def __getitem__(self, index: int) -> dict:
    return self._record(index, None)

  def train_record(self, index: int, key: tuple[int, int]) -> dict:
    """Record `index` in its training form, drawn from `key = (seed, position)`."""
    return self._record(index, key)

  def _record(self, index, key) -> dict:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range for {self.name!r} split "
                       f"{self.tfds_split!r} of size {self._len}")
    example = self._data_source[index]
    record, lengths = {}, {}
    for m, parts in self._parts.items():
      rng = None if key is None else augment.example_rng(key, m)
      value = _lookup(example, parts)
      if m in self._strings:
        record[m] = (augment.pick_caption([_string(v) for v in value], rng)
                     if m in self._several else _string(value))
      elif m in _PIXEL_RANKS:
        record[m] = self._pixels(np.asarray(value), rng)
      elif m == "audio":
        record[m], lengths[m] = self._wave(np.asarray(value), rng)
      else:
        array = np.asarray(value)
        record[m] = array.astype(np.float32) if array.dtype.kind == "f" else array
    if self._label_parts is not None:
      record["label"] = int(_lookup(example, self._label_parts))
    if self.audio_samples and lengths:
      record["length"] = lengths
    return record

  def all_texts(self, modality: str) -> list[tuple[str, ...]] | None:
    """Every caption of `modality` of every example, in index order, when its feature
    is a Sequence of strings (None otherwise). Images are not decoded."""
    if modality not in self._several:
      return None
    skip = {}
    for path, feature in self._paths.items():
      if isinstance(feature, (_tfds().features.Image, _tfds().features.Video)):
        node = skip
        for part in path.split("/")[:-1]:
          node = node.setdefault(part, {})
        node[path.split("/")[-1]] = _tfds().decode.SkipDecoding()
    raw = self._builder.as_data_source(split=self.tfds_split, decoders=skip or None)
    out, parts = [], self._parts[modality]
    for start in range(0, len(raw), 256):
      rows = raw.__getitems__(list(range(start, min(start + 256, len(raw)))))
      out += [tuple(_string(v) for v in _lookup(row, parts)) for row in rows]
    return out


def _string(value) -> str:
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _lookup(example: Mapping[str, Any], parts: list[str]):
  for part in parts:
    example = example[part]
  return example


def stored_sample_rate(info, audio_features) -> int | None:
  """The rate the dataset says its audio is at: the builder's metadata `sample_rate`,
  else an audio feature's doc ending '... at 8000 Hz' (`mmjax.data.builders`), else None."""
  known = (info.metadata or {}).get("sample_rate")
  if known:
    return int(known)
  for feature in audio_features:
    match = re.search(r"\bat (\d+) ?Hz\b", getattr(getattr(feature, "doc", None), "desc", "")
                      or "")
    if match:
      return int(match.group(1))
  return None


def _sample_rate(info, audio, wanted: int, stored: int, features) -> dict:
  """{'stored', 'wanted', 'records'}: the dataset's rate (`data.source_sample_rate`,
  else `stored_sample_rate`), the rate asked for (`data.sample_rate`, 0 or None: as
  stored) and the rate of the records (None: unknown)."""
  known = stored_sample_rate(info, features)
  stored, wanted = int(stored or 0) or None, int(wanted or 0) or None
  if stored and known and known != stored:
    raise ValueError(f"data.source_sample_rate={stored}, but the dataset says its audio "
                     f"is at {known} Hz; leave it 0 to use the dataset's rate")
  stored = stored or known
  if wanted and audio:
    if stored is None:
      raise ValueError(f"data.sample_rate={wanted}: the dataset's audio rate is unknown "
                       "(neither its metadata nor its feature says it); set "
                       "data.source_sample_rate")
    shapes = [tuple(f.shape) for f in features]
    if any(len(s) != 1 for s in shapes) and wanted != stored:
      raise ValueError(f"data.sample_rate={wanted}: only waveforms [T] can be resampled, "
                       f"but the audio feature has shape {shapes[0]} at {stored} Hz")
  return {"stored": stored, "wanted": wanted, "records": wanted or stored}


# Fields of `config.data` the source reads beyond those of `config_lib.tfds_data`'s first
# version, with the defaults that keep its behaviour (read with `.get`).
DECODE_DEFAULTS = {"image_norm": "none", "image_mean": (), "image_std": (), "image_preset": "",
                   "image_augment": False, "crop_scale": (0.9, 1.0),
                   "crop_ratio": (3 / 4, 4 / 3), "flip_prob": 0.5, "sample_rate": 0,
                   "source_sample_rate": 0}


def make_source(data_config, split: str) -> TfdsSource:
  """The source of mmjax split `split` ('train', 'test', ...) from `config.data`.

  `data.splits` maps mmjax splits to TFDS split strings.
  """
  splits = dict(data_config.splits)
  if split not in splits:
    raise ValueError(f"data.splits has no entry for split {split!r}; it maps {splits}")
  fields = {k: data_config.get(k, v) for k, v in DECODE_DEFAULTS.items()}
  return TfdsSource(data_config.name, splits[split], dict(data_config.features),
                    data_dir=data_config.data_dir, label_feature=data_config.label_feature,
                    image_size=data_config.image_size,
                    audio_samples=data_config.audio_samples, **fields)


def records_sample_rate(data_config) -> int | None:
  """The rate of the audio the source's records hold: `data.sample_rate` when set, else
  the stored rate (`data.source_sample_rate`, else `stored_sample_rate`), else None."""
  for field in ("sample_rate", "source_sample_rate"):
    if data_config.get(field):
      return int(data_config[field])
  info = load_builder(data_config.name, data_config.data_dir).info
  paths = feature_paths(info.features)
  return stored_sample_rate(info, [paths[p] for m, p in data_config.features.items()
                                   if m == "audio" and p in paths])


def data_info(data_config) -> DataInfo:
  """What a TFDS dataset tells the evaluators: its splits (`data.splits`), the number
  of classes (`data.num_classes`, else the label feature's `ClassLabel`), class names
  (`data.class_names`, else the builder's metadata `class_names`, else the
  `ClassLabel`'s names) and prompt templates (`data.prompt_templates`, else the
  metadata's `prompt_templates`). No oracle ceilings: a recorded dataset cannot know
  them.
  """
  num_classes = int(data_config.get("num_classes") or 0) or None
  names = tuple(data_config.get("class_names") or ()) or None
  templates = tuple(data_config.get("prompt_templates") or ()) or None
  label_path = data_config.get("label_feature")
  if templates is None or (label_path and (num_classes is None or names is None)):
    builder = load_builder(data_config.name, data_config.data_dir)
    metadata = builder.info.metadata or {}
    templates = templates or tuple(metadata.get("prompt_templates") or ()) or None
    label = feature_paths(builder.info.features).get(label_path) if label_path else None
    if label is not None and num_classes is None:
      num_classes = getattr(label, "num_classes", None)
    if label is not None and names is None:
      stored = tuple(metadata.get("class_names") or getattr(label, "names", None) or ())
      # A ClassLabel built from a count names its classes '0', '1', ...: no names.
      if stored and stored != tuple(str(i) for i in range(len(stored))):
        names = stored
  return DataInfo(name=f"tfds:{data_config.name}", splits=tuple(data_config.splits.keys()),
                  num_classes=num_classes, class_names=names, prompt_templates=templates)
