"""TFDS builders of real datasets from files already on disk (docs/data.md, "Real
datasets"), prepared in array_record format with
`python -m mmjax.data.prepare NAME --manual_dir=DIR --data_dir=DIR`.

Each module has a `Builder` (a `tfds.core.GeneratorBasedBuilder`), its `TFDS_NAME` and
`make_config(manual_dir, **options)`, the builder config for what the manual_dir holds.
"""

from __future__ import annotations

import inspect
import re

from mmjax.data.builders import audio_captions
from mmjax.data.builders import av_digits
from mmjax.data.builders import coco_captions
from mmjax.data.builders import manifest

BUILDERS = {
    "av_digits": av_digits,
    "coco_captions": coco_captions,
    "audio_captions": audio_captions,
    "manifest": manifest,
}


def prepare_hint(name: str, data_dir: str) -> str | None:
  """How to prepare dataset `name` ('mmjax_NAME[/config][:version]', as `data.name`
  gives it) into `data_dir`: the prepare command with the options that give its config
  name, and what the command's manual_dir holds; None when no builder here makes it."""
  base, _, config = name.split(":")[0].partition("/")
  for key, module in BUILDERS.items():
    if module.TFDS_NAME != base:
      continue
    command = f"python -m mmjax.data.prepare {key} --manual_dir=DIR --data_dir={data_dir}"
    match = re.fullmatch(r"(.*?)(?:_(\d+)hz)?(?:_seed(\d+))?", config)
    if match[1] and "config" in inspect.signature(module.make_config).parameters:
      command += f" --config={match[1]}"
    command += f" --sample_rate={match[2]}" if match[2] else ""
    command += f" --seed={match[3]}" if match[3] else ""
    return (f"prepare it with `{command}`, where DIR holds the raw files: "
            f"{module.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS} (docs/data.md, 'Real "
            "datasets'); or point data.data_dir (--config.data.data_dir) at where it is")
  return None
