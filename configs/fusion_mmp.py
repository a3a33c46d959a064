"""Masked modality projection (MMP) on the world tasks of configs/fusion_common.py:
in training each present modality is masked with probability 0.3 (at least one
kept; none for the first fifth of the steps, then a linear ramp to 0.3 over the next
fifth) and a projection per pair of modalities learns to predict the masked one's
tokens from the others' (alignment loss: mean squared error against the true
tokens); wherever a modality is absent its predicted tokens stand in for it, and the
single-stream `joint` backbone (2 blocks) fuses all three. One model for every
combination of modalities. It trains on complete data (its own masking is the
missingness it learns from); `:mcar` trains it on the 30% MCAR data of Flex-MoE.

  python -m mmjax.main --config=configs/fusion_mmp.py:interaction --workdir=runs/fusion_mmp
  python -m mmjax.main --config=configs/fusion_mmp.py:redundant,mcar --workdir=runs/fusion_mmp_redundant
  python -m mmjax.main --config=configs/fusion_mmp.py:runlocal --workdir=/tmp/fusion_mmp
"""

import os

import ml_collections

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_common.py"))


def get_config(arg=None):
  # No masking for the first fifth of training, then a ramp to 0.3 over the next
  # fifth (set below from the budget): masked from the first step, the backbone does
  # not leave chance on the interaction task (benchmarks/README.md, "Fusion under
  # missing modalities").
  mask_rate = ml_collections.ConfigDict({"shape": "linear", "init": 0.0, "end": 0.3,
                                         "begin": 0, "steps": 1})
  fusion = {"kind": "mmp", "backbone": "joint", "mask_rate": mask_rate,
            "loss_weight": 1.0,
            "backbone_config": ml_collections.ConfigDict({"num_layers": 2,
                                                          "num_heads": 2})}
  c = _common().fusion_task_config("fusion_mmp", fusion, arg)
  c.model.fusion.mask_rate.begin = c.total_steps // 5
  c.model.fusion.mask_rate.steps = max(1, c.total_steps // 5)
  if "runlocal" in _common().parse_arg(arg):
    c.model.fusion.backbone_config.num_layers = 1
  return c
