"""Entropy-gated fusion (AECF: a per-instance gate over the present modalities):
digits from image and audio on av_digits (configs/av_digits_common.py), trained the
way the authors' code trains it (as configs/fusion_gated.py): complete data, a scalar
entropy coefficient on their schedule ('aecf': 10% ramp to 0.05, flat, cosine decay
over the last tenth) and random masking whose rate ramps linearly to 0.4 over the first
two thirds of training.

  python -m mmjax.main --config=configs/av_digits_fusion_gated.py \\
      --workdir=runs/avd_gated --config.data.data_dir=DIR
  python -m mmjax.main --config=configs/av_digits_fusion_gated.py:runlocal \\
      --workdir=/tmp/avd_gated --config.data.data_dir=DIR
"""

import os

from mmjax import config_lib


def _sibling(name):
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), name))


def get_config(arg=None):
  fusion = {"kind": "gated", "entropy_per_instance": False, "curriculum_rate": 0.0}
  c = _sibling("av_digits_common.py").fusion_task_config("av_digits_fusion_gated", fusion,
                                                         arg)
  _sibling("fusion_gated.py").set_authors_schedules(c)   # the same schedules, same shape
  return c
