"""Co-attention streams (ViLBERT style: every modality's tokens attend to the other
modalities' tokens, then to their own; one layer) on the world tasks of
configs/fusion_common.py. `:interaction` is the task whose label needs two
modalities together.

  python -m mmjax.main --config=configs/fusion_cross_attention.py:interaction --workdir=runs/fusion_cross_attention
  python -m mmjax.main --config=configs/fusion_cross_attention.py:runlocal --workdir=/tmp/fusion_cross_attention
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_common.py"))


def get_config(arg=None):
  fusion = {"kind": "cross_attention", "num_layers": 1, "num_heads": 2}
  return _common().fusion_task_config("fusion_cross_attention", fusion, arg)
