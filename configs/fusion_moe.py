"""Sparse mixture-of-experts fusion transformer (top-2 of 4 experts, noisy gating,
capacity factor 1.25, Switch balance loss and router z-loss) on the world task that
needs image, audio and text (see configs/fusion_common.py). Trains on complete data;
`:moddrop` / `:mcar` add training-time missingness.

  python -m mmjax.main --config=configs/fusion_moe.py --workdir=runs/fusion_moe
  python -m mmjax.main --config=configs/fusion_moe.py:runlocal --workdir=/tmp/fusion_moe
  python -m mmjax.main --config=configs/fusion_moe.py:expert --workdir=runs/fusion_moe_ep
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_common.py"))


def get_config(arg=None):
  """`arg`: fusion_common's variants, and 'expert': the same experiment with its 4
  experts sharded over a mesh axis 'expert' of size 4 (one expert per device of it; the
  rest of the devices on 'data'; docs/fusion.md, expert parallelism)."""
  names = [a.strip() for a in (arg or "").split(",") if a.strip()]
  fusion = {"kind": "moe", "num_experts": 4, "top_k": 2, "capacity_factor": 1.25,
            "noisy_gating": True, "num_layers": 2, "num_heads": 2, "moe_every": 2,
            "balance_loss_weight": 0.01, "z_loss_weight": 0.001}
  c = _common().fusion_task_config(
      "fusion_moe", fusion, ",".join(n for n in names if n != "expert"))
  if "expert" in names:
    c.name = "fusion_moe_expert"
    c.mesh.data, c.mesh.expert = -1, fusion["num_experts"]
  return c
