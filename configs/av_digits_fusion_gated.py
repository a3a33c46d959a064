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

import ml_collections

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "av_digits_common.py"))


def get_config(arg=None):
  fusion = {"kind": "gated", "entropy_per_instance": False, "curriculum_rate": 0.0}
  c = _common().fusion_task_config("av_digits_fusion_gated", fusion, arg)
  total = c.get_ref("total_steps")
  c.model.fusion.entropy_coeff = ml_collections.ConfigDict({
      "shape": "aecf", "value": 0.05, "free_steps": 0,
      "ramp_steps": max(1, c.total_steps // 10), "total_steps": total,
      "decay_fraction": 0.1})
  c.model.fusion.mask_rate = ml_collections.ConfigDict({
      "shape": "linear", "init": 0.0, "end": 0.4, "steps": max(1, 2 * c.total_steps // 3)})
  return c
