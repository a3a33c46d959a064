"""Flex-MoE fusion (missing-modality bank, G-Router top-2 on full-modality samples,
S-Router top-1 to the expert of each sample's observed combination, 2^3 - 1 = 7
experts) on the world task that needs image, audio and text (see
configs/fusion_common.py).

The bank and the S-Router learn from incomplete samples, so this method trains on data
with each modality missing completely at random (30%); `:complete` turns that off.

  python -m mmjax.main --config=configs/fusion_flexmoe.py --workdir=runs/fusion_flexmoe
  python -m mmjax.main --config=configs/fusion_flexmoe.py:runlocal --workdir=/tmp/fusion_flexmoe
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_common.py"))


def get_config(arg=None):
  fusion = {"kind": "flexmoe", "num_experts": 7, "top_k": 2, "noisy_gating": True,
            "num_layers": 1, "num_heads": 2, "balance_loss_weight": 0.01,
            "specialization_loss_weight": 0.01}
  return _common().fusion_task_config("fusion_flexmoe", fusion, arg, train_missing=True)
