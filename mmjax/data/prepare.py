"""Prepares a dataset of local files for mmjax, in TFDS's array_record format:

  python -m mmjax.data.prepare NAME --manual_dir=DIR --data_dir=DIR [options]

NAME is one of `mmjax.data.builders.BUILDERS` (av_digits, coco_captions,
audio_captions, manifest); `--manual_dir` holds the dataset's files as its builder's
docs say (docs/data.md, "Real datasets"), `--data_dir` is where the prepared dataset
goes. Options, for the builders that take them: `--config` (coco_captions: captions |
objects; audio_captions: clotho | audiocaps; manifest: the config's name; default: by
what manual_dir holds), `--sample_rate`, `--seed` (av_digits), `--on_bad_file` (fail |
skip) and `--overwrite`. It prints the examples written per split, the files skipped,
and the config lines that read the dataset.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys

from absl import app
from absl import flags

from mmjax.data import builders

def define_flags(flag_values=flags.FLAGS) -> None:
  """The command's flags; defined when it runs, not on import, so that importing this
  module (the tests, a notebook) leaves absl's global flags to other commands (mmjax.main
  has its own --config)."""
  f = flag_values
  flags.DEFINE_string("manual_dir", None, "The dataset's files, as its builder expects "
                      "them (docs/data.md).", flag_values=f)
  flags.DEFINE_string("data_dir", None, "Where the prepared dataset is written "
                      "(data.data_dir).", flag_values=f)
  flags.DEFINE_string("config", None, "The builder config: coco_captions captions|objects, "
                      "audio_captions clotho|audiocaps, manifest a name (default: chosen by "
                      "what manual_dir holds).", flag_values=f)
  flags.DEFINE_integer("sample_rate", None, "Hz of stored audio (av_digits: 8000, others: "
                       "16000).", flag_values=f)
  flags.DEFINE_integer("seed", None, "av_digits: the seed of the image pairing.",
                       flag_values=f)
  flags.DEFINE_enum("on_bad_file", None, ["fail", "skip"], "An unreadable image or audio "
                    "file: fail naming it (default), or skip it and count it.",
                    flag_values=f)
  flags.DEFINE_bool("overwrite", False, "Prepare again over a prepared copy.",
                    flag_values=f)
  flags.mark_flags_as_required(["manual_dir", "data_dir"], flag_values=f)


OPTION_FLAGS = ("config", "sample_rate", "seed", "on_bad_file")


@dataclasses.dataclass
class Prepared:
  """What `prepare` wrote: `name` ('tfds_name/config:version', data.name), `data_dir`,
  examples per split, skipped files per split, multi-channel audio files mixed down to
  mono per split, and whether an earlier copy was reused."""
  name: str
  data_dir: str
  counts: dict
  skipped: dict
  reused: bool
  usage: dict
  mixed_down: dict = dataclasses.field(default_factory=dict)

  def summary(self) -> str:
    lines = [f"{'Reused' if self.reused else 'Prepared'} {self.name} in {self.data_dir}"
             + (" (already there; --overwrite prepares it again)" if self.reused else "")]
    lines += [f"  {split:<12}{n:>8} examples" for split, n in self.counts.items()]
    for split, paths in self.skipped.items():
      lines.append(f"  skipped {len(paths)} unreadable file(s) of {split}, e.g. {paths[0]}")
    for split, paths in self.mixed_down.items():
      lines.append(f"  mixed down {len(paths)} multi-channel audio file(s) of {split} to "
                   f"mono (channels averaged), e.g. {paths[0]}")
    u = self.usage
    features = ", ".join(f"{m!r}: {p!r}" for m, p in u["features"].items())
    fields = "".join(f", {k}={v!r}" for k, v in u["fields"].items())
    label = f", label_feature={u['label']!r}" if u.get("label") else ""
    splits = {s: s for s in self.counts}
    if "test" not in splits and "validation" in splits:
      splits["test"] = "validation"
    lines += [f"Read it with mmjax: data.name={self.name!r}, data.data_dir="
              f"{self.data_dir!r}; in a config's get_config():",
              f"  c.data = config_lib.tfds_data(\n      {self.name!r}, {{{features}}},\n"
              f"      data_dir={self.data_dir!r}{label},\n      splits={splits!r}{fields})"]
    lines += [f"  # {note}" for note in u.get("notes", ())]
    return "\n".join(lines)


def make_config(name: str, manual_dir: str, **options):
  """The builder config of `name` for the files in `manual_dir`; options it does not
  take are an error naming them."""
  if name not in builders.BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(builders.BUILDERS)}")
  module = builders.BUILDERS[name]
  accepted = set(inspect.signature(module.make_config).parameters) - {"manual_dir"}
  unknown = sorted(set(options) - accepted)
  if unknown:
    raise ValueError(f"{name} takes no option {unknown}; its options are {sorted(accepted)}")
  return module.make_config(manual_dir, **options)


def prepare(name: str, manual_dir: str, data_dir: str, *, overwrite: bool = False,
            **options) -> Prepared:
  """Prepares dataset `name` from `manual_dir` into `data_dir` (array_record).

  Raises:
    FileNotFoundError: manual_dir lacks a file the builder needs (the message names it).
    ValueError: bad input (`common.BadFileError` for a file that does not decode).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  manual_dir, data_dir = os.path.abspath(manual_dir), os.path.abspath(data_dir)
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir {manual_dir!r} is not a directory")
  module = builders.BUILDERS.get(name)
  config = make_config(name, manual_dir, **options)
  builder = module.Builder(data_dir=data_dir, config=config, file_format="array_record")
  reused = builder.is_prepared() and not overwrite
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=mode))
  info = builder.info
  counts = {s: info.splits[s].num_examples for s in ("train", "validation", "test")
            if s in info.splits}
  return Prepared(name=f"{module.TFDS_NAME}/{config.name}:{info.version}",
                  data_dir=data_dir, counts=counts,
                  skipped={s: p for s, p in builder.skipped.items() if p}, reused=reused,
                  usage=module.usage(config),
                  mixed_down={s: p for s, p in builder.mixed_down.items() if p})


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"give one dataset name, one of {sorted(builders.BUILDERS)} "
                         f"(got {argv[1:]})")
  if not any(flags.FLAGS[f].present for f in ("verbosity", "logger_levels")):
    logging.getLogger("absl").setLevel(logging.ERROR)   # TFDS's INFO and config notices
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()          # the builders show their own, with totals
  options = {f: flags.FLAGS[f].value for f in OPTION_FLAGS if flags.FLAGS[f].present}
  try:
    result = prepare(argv[1], flags.FLAGS.manual_dir, flags.FLAGS.data_dir,
                     overwrite=flags.FLAGS.overwrite, **options)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(result.summary())


if __name__ == "__main__":
  define_flags()
  app.run(main)
