"""A user's own paired data from JSONL manifests, without writing a builder.

The manual_dir holds `train.jsonl` (needed) and optionally `validation.jsonl` and
`test.jsonl`, one example a line, a JSON object mapping modality names to values:

  {"image": "photos/0001.jpg", "audio": "clips/0001.wav", "caption": "a dog barks", "label": 3}

A string ending in .jpg, .jpeg or .png is an image file, one ending in .wav or .flac an
audio file (paths relative to the manual_dir, or absolute); any other string is text;
`label` is an optional integer >= 0 (a ClassLabel with max + 1 classes). The features
come from the first line of train.jsonl and every line of every split is checked
against them: a key another line lacks, a value of another kind, a missing file or a
bad label is an error naming the file, the line and the key. Images are stored RGB (a
JPEG or PNG that is RGB as it is, others converted and stored as PNG), audio int16 mono
at the config's sample rate. A file that does not decode follows `on_bad_file`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import tensorflow_datasets as tfds

from mmjax.data.builders import common

TFDS_NAME = "mmjax_manifest"
SAMPLE_RATE = 16000
SPLITS = ("train", "validation", "test")
KINDS = {"image": (".jpg", ".jpeg", ".png"), "audio": (".wav", ".flac")}
RESERVED = ("mask", "index", "factors")     # record keys the pipeline gives a meaning


@dataclasses.dataclass(eq=False)
class ManifestConfig(common.LocalConfig):
  """`schema`: (key, kind) pairs, kind 'image', 'audio', 'text' or 'label', as
  `make_config` infers them; `num_classes`: of the label; `sample_rate`: Hz of audio."""
  schema: tuple = ()
  num_classes: int = 0
  sample_rate: int = SAMPLE_RATE


def kind_of(key: str, value) -> str | None:
  """'image', 'audio', 'text' or 'label' for a manifest value; None if none fits."""
  if key == "label":
    return "label" if isinstance(value, int) and not isinstance(value, bool) else None
  if not isinstance(value, str):
    return None
  for kind, extensions in KINDS.items():
    if value.lower().endswith(extensions):
      return kind
  return "text"


def manifest_files(manual_dir: str) -> dict[str, str]:
  """split -> path of the JSONL files present (train.jsonl must be)."""
  files = {s: os.path.join(manual_dir, f"{s}.jsonl") for s in SPLITS}
  if not os.path.isfile(files["train"]):
    raise common.missing(manual_dir, "the manifest: expected 'train.jsonl' in it (and "
                         "optionally 'validation.jsonl', 'test.jsonl')")
  return {s: f for s, f in files.items() if os.path.isfile(f)}


def read_lines(path: str) -> list[tuple[int, dict]]:
  """(line number, object) of every non-empty line."""
  out = []
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        entry = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON object ({e})") from None
      if not isinstance(entry, dict) or not entry:
        raise ValueError(f"{path}:{number}: not a JSON object of modality -> value")
      out.append((number, entry))
  if not out:
    raise ValueError(f"{path}: no examples in it")
  return out


def infer_schema(path: str, number: int, entry: dict) -> tuple:
  schema = []
  for key, value in entry.items():
    kind = kind_of(key, value)
    if kind is None:
      raise ValueError(f"{path}:{number}: key {key!r} has {value!r}; a value is a path "
                       f"to an image ({', '.join(KINDS['image'])}) or audio file "
                       f"({', '.join(KINDS['audio'])}), a text string, or for 'label' an "
                       "integer")
    if key in RESERVED or "/" in key:
      raise ValueError(f"{path}:{number}: key {key!r} cannot name a modality (reserved: "
                       f"{RESERVED}; no '/')")
    schema.append((key, kind))
  return tuple(schema)


def resolve(manual_dir: str, value: str) -> str:
  return value if os.path.isabs(value) else os.path.join(manual_dir, value)


def check(manual_dir: str, schema: tuple) -> dict[str, list[tuple[int, dict]]]:
  """split -> its lines, each checked against `schema`; files must exist."""
  kinds = dict(schema)
  splits = {}
  for split, path in manifest_files(manual_dir).items():
    lines = read_lines(path)
    for number, entry in lines:
      where = f"{path}:{number}"
      for key in kinds:
        if key not in entry:
          raise ValueError(f"{where}: no key {key!r}, which train.jsonl's first line has; "
                           "every line needs the same modalities")
      for key, value in entry.items():
        if key not in kinds:
          raise ValueError(f"{where}: key {key!r}, which the other lines lack (the "
                           f"features, from train.jsonl's first line, are {sorted(kinds)})")
        kind = kind_of(key, value)
        if kind != kinds[key]:
          raise ValueError(f"{where}: key {key!r} is {kind or 'a ' + type(value).__name__}"
                           f" here ({value!r}) but {kinds[key]} on train.jsonl's first line")
        if kind == "label" and value < 0:
          raise ValueError(f"{where}: label {value} is negative")
        if kind in KINDS and not os.path.isfile(resolve(manual_dir, value)):
          raise FileNotFoundError(f"{where}: key {key!r} names {value!r}, and "
                                  f"{resolve(manual_dir, value)} does not exist")
    splits[split] = lines
  return splits


def config_name(manual_dir: str) -> str:
  base = os.path.basename(os.path.normpath(manual_dir)).lower()
  return re.sub(r"[^a-z0-9_]+", "_", base).strip("_") or "default"


def make_config(manual_dir: str, *, config: str | None = None,
                sample_rate: int = SAMPLE_RATE, on_bad_file: str = "fail") -> ManifestConfig:
  """The config of the manifests in manual_dir, named `config` (default: the folder's
  name), features inferred and every line checked."""
  path = manifest_files(manual_dir)["train"]
  number, first = read_lines(path)[0]
  schema = infer_schema(path, number, first)
  splits = check(manual_dir, schema)
  labels = [e["label"] for lines in splits.values() for _, e in lines if "label" in e]
  name = common.rate_suffix(config or config_name(manual_dir), sample_rate, SAMPLE_RATE)
  return ManifestConfig(
      name=name, schema=schema, num_classes=max(labels) + 1 if labels else 0,
      sample_rate=int(sample_rate), on_bad_file=on_bad_file,
      description="features: " + ", ".join(f"{k} ({v})" for k, v in schema))


def usage(config: ManifestConfig) -> dict:
  """How `mmjax.data.prepare` says to read the dataset."""
  kinds = dict(config.schema)
  fields, notes = {}, []
  if "image" in kinds.values():
    fields["image_size"] = 224
    notes.append("image_size: images are resized to it (theirs may vary)")
  if "audio" in kinds.values():
    fields["audio_samples"] = config.sample_rate
    notes.append(f"audio_samples: 1 s at {config.sample_rate} Hz (cut or zero-padded)")
  features = {}
  for key, kind in config.schema:
    # mmjax reads pixels and waveforms for the modalities named 'image' and 'audio'.
    one = kind in KINDS and list(kinds.values()).count(kind) == 1
    if kind != "label":
      features[kind if one else key] = key
  return {"features": features, "label": "label" if "label" in kinds else None,
          "fields": fields, "notes": notes}


class Builder(common.LocalBuilder, skip_registration=True):
  """Examples from JSONL manifests (module docstring)."""

  name = TFDS_NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Write manual_dir/train.jsonl (and optionally validation.jsonl, test.jsonl): one "
      "JSON object a line mapping modality names to image/audio file paths or text, "
      "plus an optional integer 'label'.")

  def _info(self):
    config = self.builder_config
    if not config.schema:
      raise ValueError("the manifest builder needs the features of its manifest: build "
                       "its config with manifest.make_config(manual_dir)")
    features = {}
    for key, kind in config.schema:
      if kind == "image":
        features[key] = tfds.features.Image(shape=(None, None, 3))
      elif kind == "audio":
        features[key] = common.audio_feature(config.sample_rate)
      elif kind == "text":
        features[key] = tfds.features.Text()
      else:
        features[key] = tfds.features.ClassLabel(num_classes=config.num_classes)
    return self.dataset_info_from_configs(
        description=f"Examples from JSONL manifests; {config.description}.",
        features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    splits = check(manual_dir, self.builder_config.schema)
    return {split: self._generate_examples(split, manual_dir, lines)
            for split, lines in splits.items()}

  def _generate_examples(self, split, manual_dir, lines):
    config = self.builder_config
    for number, entry in common.split_progress(lines, len(lines), f"manifest {split}"):
      example = {}
      for key, kind in config.schema:
        value = entry[key]
        if kind == "image":
          value = self.read(split, resolve(manual_dir, value), common.read_image,
                            ("JPEG", "PNG"), "PNG")
          value = None if value is None else value[0]
        elif kind == "audio":
          value = self.read_audio(split, resolve(manual_dir, value), config.sample_rate)
        if value is None:
          break
        example[key] = value
      else:
        yield number, example
