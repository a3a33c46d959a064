"""Captioned audio clips from Clotho's or AudioCaps' CSV files and a folder of audio.

Two layouts, one config each (the config name, with '_{rate}hz' when the sample rate is
not 16000):

  clotho     clotho_captions_{development,validation,evaluation}.csv, columns
             file_name, caption_1 .. caption_5 (other columns ignored); the audio in
             development/, validation/, evaluation/ under its file_name.
  audiocaps  {train,val,test}.csv, columns audiocap_id, youtube_id, start_time,
             caption, one caption a row and several rows per clip; the audio in
             train/, val/, test/ as {youtube_id}.wav (or .flac), the clip already cut
             at its start_time (as AudioCaps' download scripts leave it).

Splits: development / train -> 'train', validation / val -> 'validation', evaluation /
test -> 'test'; each split whose CSV is there. Audio is stored int16 mono at the
config's sample rate (averaged over channels, resampled with a polyphase filter). A
missing or unreadable audio file follows `on_bad_file`: AudioCaps downloads usually lack
the clips YouTube no longer serves, and 'skip' leaves them out and counts them.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os

import tensorflow_datasets as tfds

from mmjax.data.builders import common

TFDS_NAME = "mmjax_audio_captions"
SAMPLE_RATE = 16000
# layout -> split -> (CSV file, audio folder)
LAYOUTS = {
    "clotho": {s: (f"clotho_captions_{c}.csv", c) for s, c in (
        ("train", "development"), ("validation", "validation"), ("test", "evaluation"))},
    "audiocaps": {s: (f"{c}.csv", c) for s, c in (
        ("train", "train"), ("validation", "val"), ("test", "test"))},
}
COLUMNS = {"clotho": ("file_name",) + tuple(f"caption_{i}" for i in range(1, 6)),
           "audiocaps": ("audiocap_id", "youtube_id", "start_time", "caption")}
AUDIO_EXTENSIONS = (".wav", ".flac")      # AudioCaps' clips, by youtube_id


@dataclasses.dataclass(eq=False)
class AudioCaptionsConfig(common.LocalConfig):
  """`layout`: 'clotho' or 'audiocaps'; `sample_rate`: Hz of the stored waveforms."""
  layout: str = "clotho"
  sample_rate: int = SAMPLE_RATE


def present_splits(manual_dir: str, layout: str) -> dict[str, tuple[str, str]]:
  return {s: (os.path.join(manual_dir, f), os.path.join(manual_dir, d))
          for s, (f, d) in LAYOUTS[layout].items()
          if os.path.isfile(os.path.join(manual_dir, f))}


def make_config(manual_dir: str | None = None, *, config: str | None = None,
                sample_rate: int = SAMPLE_RATE,
                on_bad_file: str = "fail") -> AudioCaptionsConfig:
  """The config of `config` ('clotho', 'audiocaps'; None: the layout the manual_dir has)."""
  if config is None:
    if manual_dir is None:
      raise ValueError(f"audio_captions: give config= one of {sorted(LAYOUTS)}, or the "
                       "manual_dir to choose by what it holds")
    found = [layout for layout in LAYOUTS if present_splits(manual_dir, layout)]
    if len(found) != 1:
      expected = " or ".join(repr(f) for lay in LAYOUTS.values() for f, _ in lay.values())
      if not found:
        raise common.missing(manual_dir, f"captions CSVs: expected {expected} in it")
      raise ValueError(f"manual_dir {manual_dir!r} holds the CSVs of both layouts "
                       f"{found}; say which with --config")
    config = found[0]
  if config not in LAYOUTS:
    raise ValueError(f"audio_captions: config={config!r}, expected one of {sorted(LAYOUTS)}")
  return AudioCaptionsConfig(
      name=common.rate_suffix(config, sample_rate, SAMPLE_RATE), layout=config,
      sample_rate=int(sample_rate), on_bad_file=on_bad_file,
      description=f"{config} layout, audio at {sample_rate} Hz")


def usage(config: AudioCaptionsConfig) -> dict:
  """How `mmjax.data.prepare` says to read the dataset."""
  return {"features": {"audio": "audio", "text": "captions"},
          "fields": {"audio_samples": 10 * config.sample_rate},
          "notes": [f"audio_samples: 10 s at {config.sample_rate} Hz (clips are cut or "
                    "zero-padded)",
                    "text: captions, a Sequence(Text) of several per clip; training "
                    "reads one at random, the retrieval evaluator all of them "
                    "(all_captions=True)"]}


def _rows(path: str, columns) -> list[dict]:
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      header = reader.fieldnames or []
      lacking = [c for c in columns if c not in header]
      if lacking:
        raise ValueError(f"{path}: no column {lacking} (its columns are {header})")
      return list(reader)
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot be read as UTF-8 CSV ({e})") from None


def read_clips(csv_path: str, audio_dir: str, layout: str) -> list[tuple[str, str, list]]:
  """(audio id, audio path, captions) of every clip a split's CSV lists."""
  rows = _rows(csv_path, COLUMNS[layout])
  clips = {}
  if layout == "clotho":
    for line, row in enumerate(rows, start=2):
      name = row["file_name"].strip()
      if name in clips:
        raise ValueError(f"{csv_path}:{line}: file_name {name!r} is listed twice")
      captions = [row[c].strip() for c in COLUMNS["clotho"][1:] if (row[c] or "").strip()]
      clips[name] = (os.path.join(audio_dir, name), captions)
    return [(name, path, captions) for name, (path, captions) in clips.items()]
  starts, captions = {}, collections.defaultdict(list)
  for line, row in enumerate(rows, start=2):
    clip, start = row["youtube_id"].strip(), row["start_time"].strip()
    if starts.setdefault(clip, start) != start:
      raise ValueError(f"{csv_path}:{line}: youtube_id {clip!r} has start_time {start}, "
                       f"and {starts[clip]} on an earlier row; one file cannot be both")
    captions[clip].append(row["caption"].strip())
  out = []
  for clip, texts in captions.items():
    paths = [os.path.join(audio_dir, clip + ext) for ext in AUDIO_EXTENSIONS]
    out.append((clip, next((p for p in paths if os.path.isfile(p)), paths[0]), texts))
  return out


class Builder(common.LocalBuilder, skip_registration=True):
  """Audio clips with their captions, from Clotho's or AudioCaps' CSVs (module docstring)."""

  name = TFDS_NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Clotho: clotho_captions_{development,validation,evaluation}.csv and the folders "
      "development/, validation/, evaluation/ of its audio in manual_dir/. AudioCaps: "
      "{train,val,test}.csv and the folders train/, val/, test/ holding "
      "{youtube_id}.wav.")

  def _info(self):
    config = self.builder_config
    return self.dataset_info_from_configs(
        description=(f"{config.layout} audio clips (mono int16 PCM at "
                     f"{config.sample_rate} Hz) with all their captions."),
        features=tfds.features.FeaturesDict({
            "audio": common.audio_feature(config.sample_rate),
            "audio_id": tfds.features.Text(
                doc="Clotho: the file name; AudioCaps: the youtube_id"),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }))

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    layout = self.builder_config.layout
    splits = present_splits(manual_dir, layout)
    if not splits:
      expected = " or ".join(repr(f) for f, _ in LAYOUTS[layout].values())
      raise common.missing(manual_dir, f"{layout}'s captions CSVs: expected {expected} "
                           "in it")
    generators = {}
    for split, (csv_path, audio_dir) in splits.items():
      if not os.path.isdir(audio_dir):
        raise common.missing(manual_dir, f"the audio of {os.path.basename(csv_path)}: "
                             f"expected the folder '{os.path.basename(audio_dir)}/' in it")
      generators[split] = self._generate_examples(split,
                                                  read_clips(csv_path, audio_dir, layout))
    return generators

  def _generate_examples(self, split, clips):
    rate = self.builder_config.sample_rate
    for audio_id, path, captions in common.split_progress(
        clips, len(clips), f"audio_captions {split}"):
      if not os.path.isfile(path):
        self.bad_file(split, path, "does not exist (the CSV lists it)")
        continue
      audio = self.read_audio(split, path, rate)
      if audio is not None:
        yield audio_id, {"audio": audio, "audio_id": audio_id, "captions": captions}
