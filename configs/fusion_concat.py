"""Concatenation fusion (zero-filled absent modalities + presence bits, then an MLP) on
the world task that needs image, audio and text (see configs/fusion_common.py).

The plain baseline trains on complete data; `:moddrop` adds modality dropout and
`:mcar` trains on the same incomplete data as Flex-MoE.

  python -m mmjax.main --config=configs/fusion_concat.py --workdir=runs/fusion_concat
  python -m mmjax.main --config=configs/fusion_concat.py:moddrop --workdir=runs/fusion_concat_moddrop
  python -m mmjax.main --config=configs/fusion_concat.py:runlocal --workdir=/tmp/fusion_concat
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_common.py"))


def get_config(arg=None):
  fusion = {"kind": "concat", "hidden_dim": 128, "num_layers": 2}
  return _common().fusion_task_config("fusion_concat", fusion, arg)
