"""Entropy-gated fusion (AECF: per-instance gate over the present modalities, entropy
reward with a per-instance coefficient, training-time masking aimed at the modalities
an over-confident gate relies on) on the world task that needs image, audio and text
(see configs/fusion_common.py). Trains on complete data; its own curriculum does the
masking.

  python -m mmjax.main --config=configs/fusion_gated.py --workdir=runs/fusion_gated
  python -m mmjax.main --config=configs/fusion_gated.py:runlocal --workdir=/tmp/fusion_gated
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_common.py"))


def get_config(arg=None):
  fusion = {"kind": "gated", "entropy_coeff": 0.1, "curriculum_rate": 0.5}
  return _common().fusion_task_config("fusion_gated", fusion, arg)
