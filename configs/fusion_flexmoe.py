"""Flex-MoE fusion (missing-modality bank, noisy top-2 routing over 2^3 - 1 = 7
experts, one per modality combination, with the G-Router balance and S-Router losses as
the authors' code has them) on the world task that needs image, audio and text (see
configs/fusion_common.py).

The bank and the S-Router learn from incomplete samples, so this method trains on data
with each modality missing completely at random (30%); `:complete` turns that off.
`model.fusion.s_router` picks the authors' code's routing ('code', the default) or the
paper's ('paper', forced combination expert); `data.modality_warmup_steps` (60) is the warm-up on
the training set ordered by number of present modalities.

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
            "specialization_loss_weight": 0.01, "s_router": "code"}
  c = _common().fusion_task_config("fusion_flexmoe", fusion, arg, train_missing=True)
  # The paper's and the code's warm-up: the first tenth of training (the authors' 5 of
  # 50 epochs) reads the training set ordered by number of present modalities, most
  # first, unshuffled; then the usual shuffle.
  c.data.modality_warmup_steps = max(1, c.total_steps // 10)
  return c
