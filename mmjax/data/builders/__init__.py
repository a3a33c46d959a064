"""TFDS builders of real datasets from files already on disk (docs/data.md, "Real
datasets"), prepared in array_record format with
`python -m mmjax.data.prepare NAME --manual_dir=DIR --data_dir=DIR`.

Each module has a `Builder` (a `tfds.core.GeneratorBasedBuilder`), its `TFDS_NAME` and
`make_config(manual_dir, **options)`, the builder config for what the manual_dir holds.
"""

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
