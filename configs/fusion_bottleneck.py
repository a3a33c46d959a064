"""Attention bottlenecks (MBT: 2 per-modality transformer blocks over the encoders'
tokens, exchanging only through 4 shared bottleneck tokens from the first block on
(the encoders' own block is the unimodal part; a bottleneck the last block updates
reaches no one, so exchange needs fusion_layer <= num_layers - 2); per-modality
heads, logits averaged) on the world tasks of configs/fusion_common.py.
`:interaction` is the task whose label needs two modalities together.

  python -m mmjax.main --config=configs/fusion_bottleneck.py:interaction --workdir=runs/fusion_bottleneck
  python -m mmjax.main --config=configs/fusion_bottleneck.py:runlocal --workdir=/tmp/fusion_bottleneck
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_common.py"))


def get_config(arg=None):
  fusion = {"kind": "bottleneck", "num_layers": 2, "fusion_layer": 0,
            "num_bottlenecks": 4, "num_heads": 2}
  return _common().fusion_task_config("fusion_bottleneck", fusion, arg)
