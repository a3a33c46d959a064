"""TFDS datasets as random-access sources, read with `tfds.data_source` (no TensorFlow).

A dataset prepared in TFDS's `array_record` format is read record by record: TFDS
decodes each record to numpy (images through PIL), and this module picks the configured
feature paths and turns them into what `mmjax.data.pipeline.Featurize` consumes:

  image  float32 [H, W, C] in [0, 1]   (uint8 / 255, uint16 / 65535, floats as they are;
                                        optionally resized to `data.image_size`)
  video  float32 [T, H, W, C] in [0, 1] (frames converted and resized as images)
  audio  float32 [T] or [frames, mels] (integer samples are 16-bit PCM: / 32768;
                                        optionally cropped / zero-padded to
                                        `data.audio_samples`)
  text   str                           (TFDS `Text` bytes decoded as UTF-8)
  other  numpy arrays (floats as float32), for encoders of other modalities

plus `label` (int) when `data.label_feature` is set.

The config (`mmjax.config_lib.tfds_data`) maps modality names to feature paths, nested
ones joined by '/':

  data.name = 'my_dataset:1.0.0'
  data.data_dir = '/data/tfds'
  data.features = {'image': 'image', 'text': 'captions/text'}
  data.label_feature = 'label'
  data.splits = {'train': 'train', 'test': 'test[:1000]'}   # mmjax split -> TFDS split

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

from mmjax.data.info import DataInfo

# Keys of a record that are not modalities (`pipeline.Featurize` gives them meaning).
RESERVED_KEYS = ("label", "mask", "index", "factors")
_PCM16_SCALE = 32768.0
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
  return (f"prepare it in array_record format, e.g. `tfds build {name.split(':')[0]} "
          f"--data_dir={data_dir} --file_format=array_record`, or for a dataset of your "
          f"own, `MyBuilder(data_dir={data_dir!r}, file_format='array_record')"
          ".download_and_prepare()` (see docs/data.md)")


def _dir_listing(name: str, data_dir: str) -> str:
  if not os.path.isdir(data_dir):
    return "the directory does not exist"
  names = sorted(n for n in os.listdir(data_dir) if n not in ("downloads",))
  listing = f"it holds {names}" if names else "it is empty"
  base = re.split(r"[/:]", name)[0]
  if base in names and os.path.isdir(os.path.join(data_dir, base)):
    # The dataset is there under another version or config: say which exist.
    listing += f"; {base}/ holds {sorted(os.listdir(os.path.join(data_dir, base)))}"
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

  `len(source)` is the number of examples; `source[i]` is a dict with one entry per
  modality of `features` (converted as the module docstring says) and `label` (int)
  when `label_feature` is given.

  Args:
    name: the dataset, 'name[/config][:version]'.
    tfds_split: the TFDS split to read ('train', 'test[:1000]', 'train+validation').
    features: modality name -> feature path ('image', 'captions/text').
    data_dir: where the dataset was prepared (TFDS's default when None).
    label_feature: path of an integer scalar feature to return as `label`, or None.
    image_size: resize every image to [image_size, image_size] (bilinear); 0 keeps
      the stored size, which must then be fixed.
    audio_samples: crop or zero-pad every waveform to this many samples; 0 keeps the
      stored length, which must then be fixed.
  """

  def __init__(self, name: str, tfds_split: str, features: Mapping[str, str], *,
               data_dir: str | None = None, label_feature: str | None = None,
               image_size: int = 0, audio_samples: int = 0):
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

    self._parts = {m: p.split("/") for m, p in self.features.items()}
    self._strings = {m for m, p in self.features.items()
                     if np.dtype(paths[p].np_dtype).kind in "OSU"}
    self._label_parts = self.label_feature.split("/") if self.label_feature else None
    self._data_source = builder.as_data_source(split=tfds_split)
    self._len = len(self._data_source)

  def _check_feature(self, modality: str, path: str, feature) -> None:
    """Feature type and shape against what the modality's input must be."""
    where = f"data.features.{modality} ({path!r})"
    dtype = np.dtype(feature.np_dtype) if not isinstance(feature.np_dtype, dict) else None
    shape = tuple(feature.shape) if isinstance(feature.shape, tuple) else None
    kind = type(feature).__name__
    is_string = dtype is not None and dtype.kind in "OSU"
    if modality == "text" or is_string:
      # Any modality may be text ('caption', 'transcript'): the pipeline tokenises the
      # strings of the modalities whose encoder kind is 'text'.
      if not is_string or shape != ():
        raise ValueError(f"{where}: modality {modality!r} needs one string per example (a "
                         f"TFDS Text feature), but it is {kind} of shape {shape} and dtype "
                         f"{dtype}")
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
      if None in shape[-3:-1] and not self.image_size:
        raise ValueError(f"{where}: {modality} frames have no fixed size {shape}; set "
                         "data.image_size to resize them")
      if modality == "video" and shape[0] is None:
        raise ValueError(f"{where}: videos have no fixed number of frames {shape}; "
                         "batches need one")
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
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range for {self.name!r} split "
                       f"{self.tfds_split!r} of size {self._len}")
    example = self._data_source[index]
    record = {m: self._convert(m, _lookup(example, parts))
              for m, parts in self._parts.items()}
    if self._label_parts is not None:
      record["label"] = int(_lookup(example, self._label_parts))
    return record

  def _convert(self, modality: str, value):
    if modality in self._strings:
      value = value.item() if isinstance(value, np.ndarray) else value
      return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    array = np.asarray(value)
    if modality in _PIXEL_RANKS:
      return self._pixels(array)
    if modality == "audio":
      return self._audio(array)
    return array.astype(np.float32) if array.dtype.kind == "f" else array

  def _pixels(self, image: np.ndarray) -> np.ndarray:
    """An image [H, W, C] or video [T, H, W, C] as float32 in [0, 1]."""
    if self.image_size and image.shape[-3:-1] != (self.image_size, self.image_size):
      image = (_resize(image, self.image_size) if image.ndim == 3
               else np.stack([_resize(frame, self.image_size) for frame in image]))
    if image.dtype == np.uint8:
      return image.astype(np.float32) / np.float32(255)
    if image.dtype == np.uint16:
      return image.astype(np.float32) / np.float32(65535)
    return image.astype(np.float32)

  def _audio(self, audio: np.ndarray) -> np.ndarray:
    wave = (audio.astype(np.float32) / np.float32(_PCM16_SCALE) if audio.dtype.kind == "i"
            else audio.astype(np.float32))
    n = self.audio_samples
    if n and wave.shape[0] != n:
      wave = wave[:n] if wave.shape[0] > n else np.pad(wave, (0, n - wave.shape[0]))
    return wave


def _lookup(example: Mapping[str, Any], parts: list[str]):
  for part in parts:
    example = example[part]
  return example


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [H, W, C] to [size, size, C], channel by channel (any dtype)."""
  import PIL.Image  # pylint: disable=g-import-not-at-top  (TFDS decodes images with PIL)
  channels = [np.asarray(PIL.Image.fromarray(image[..., c].astype(np.float32), mode="F")
                         .resize((size, size), PIL.Image.BILINEAR))
              for c in range(image.shape[-1])]
  resized = np.stack(channels, axis=-1)
  if image.dtype.kind in "ui":
    info = np.iinfo(image.dtype)
    resized = np.clip(np.rint(resized), info.min, info.max)
  return resized.astype(image.dtype)


def make_source(data_config, split: str) -> TfdsSource:
  """The source of mmjax split `split` ('train', 'test', ...) from `config.data`.

  `data.splits` maps mmjax splits to TFDS split strings.
  """
  splits = dict(data_config.splits)
  if split not in splits:
    raise ValueError(f"data.splits has no entry for split {split!r}; it maps {splits}")
  return TfdsSource(data_config.name, splits[split], dict(data_config.features),
                    data_dir=data_config.data_dir, label_feature=data_config.label_feature,
                    image_size=data_config.image_size,
                    audio_samples=data_config.audio_samples)


def data_info(data_config) -> DataInfo:
  """What a TFDS dataset tells the evaluators: its splits (`data.splits`), the number
  of classes (`data.num_classes`, else the label feature's `ClassLabel`), class names
  (`data.class_names`, else the `ClassLabel`'s names) and prompt templates
  (`data.prompt_templates`). No oracle ceilings: a recorded dataset cannot know them.
  """
  num_classes = int(data_config.get("num_classes") or 0) or None
  names = tuple(data_config.get("class_names") or ()) or None
  if data_config.get("label_feature") and (num_classes is None or names is None):
    builder = load_builder(data_config.name, data_config.data_dir)
    label = feature_paths(builder.info.features).get(data_config.label_feature)
    if label is not None and num_classes is None:
      num_classes = getattr(label, "num_classes", None)
    if label is not None and names is None:
      stored = tuple(getattr(label, "names", None) or ())
      # A ClassLabel built from a count names its classes '0', '1', ...: no names.
      if stored and stored != tuple(str(i) for i in range(len(stored))):
        names = stored
  return DataInfo(name=f"tfds:{data_config.name}", splits=tuple(data_config.splits.keys()),
                  num_classes=num_classes, class_names=names,
                  prompt_templates=tuple(data_config.get("prompt_templates") or ()) or None)
