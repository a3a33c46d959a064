"""Single-stream fusion (VL-BERT style: one transformer of 2 blocks over a class token
and the tokens of every present modality, with modality-type embeddings) on the world
tasks of configs/fusion_common.py. `:interaction` is the task whose label needs two
modalities together.

  python -m mmjax.main --config=configs/fusion_joint.py:interaction --workdir=runs/fusion_joint
  python -m mmjax.main --config=configs/fusion_joint.py:runlocal --workdir=/tmp/fusion_joint
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_common.py"))


def get_config(arg=None):
  fusion = {"kind": "joint", "num_layers": 2, "num_heads": 2}
  return _common().fusion_task_config("fusion_joint", fusion, arg)
