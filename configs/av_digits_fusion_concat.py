"""Concatenation fusion (zero-filled absent modalities + presence bits, then an MLP):
digits from image and audio on av_digits (configs/av_digits_common.py); also the
unimodal classifiers (`:image_only`, `:audio_only`).

Concatenation has no mechanism of its own for a missing modality, so it trains with
modality dropout 0.5 (ModDrop: each present modality dropped from the mask with
probability 0.5, at least one kept, so about 3/8 of the examples are image alone and
3/8 audio alone), the usual way to make it work on one modality;
`:complete` trains it on complete data with no dropout, the plain baseline.

  python -m mmjax.main --config=configs/av_digits_fusion_concat.py \\
      --workdir=runs/avd_concat --config.data.data_dir=DIR
  python -m mmjax.main --config=configs/av_digits_fusion_concat.py:image_only \\
      --workdir=runs/avd_image_only --config.data.data_dir=DIR
  python -m mmjax.main --config=configs/av_digits_fusion_concat.py:runlocal \\
      --workdir=/tmp/avd_concat --config.data.data_dir=DIR
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "av_digits_common.py"))


def get_config(arg=None):
  fusion = {"kind": "concat", "hidden_dim": 128, "num_layers": 2}
  variants = _common().parse_arg(arg)
  return _common().fusion_task_config(
      "av_digits_fusion_concat", fusion, arg, unimodal=True,
      train_missing="none" if "complete" in variants else "moddrop")
