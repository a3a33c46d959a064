"""Flex-MoE fusion (missing-modality bank, noisy top-2 routing over 2^2 - 1 = 3
experts, one per modality combination, G-Router balance and S-Router losses as the
authors' code has them): digits from image and audio on av_digits
(configs/av_digits_common.py).

The bank and the S-Router learn from incomplete samples, so this method trains on data
with each modality missing completely at random (30%, never both); `:complete` turns
that off. The first tenth of training reads the training set ordered by number of
present modalities, most first (the authors' warm-up).

  python -m mmjax.main --config=configs/av_digits_fusion_flexmoe.py \\
      --workdir=runs/avd_flexmoe --config.data.data_dir=DIR
  python -m mmjax.main --config=configs/av_digits_fusion_flexmoe.py:runlocal \\
      --workdir=/tmp/avd_flexmoe --config.data.data_dir=DIR
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "av_digits_common.py"))


def get_config(arg=None):
  fusion = {"kind": "flexmoe", "num_experts": 3, "top_k": 2, "noisy_gating": True,
            "num_layers": 1, "num_heads": 4, "balance_loss_weight": 0.01,
            "specialization_loss_weight": 0.01, "s_router": "code"}
  c = _common().fusion_task_config("av_digits_fusion_flexmoe", fusion, arg,
                                   train_missing="mcar")
  c.data.modality_warmup_steps = max(1, c.total_steps // 10)
  return c
