"""Entropy-gated fusion (AECF: per-instance gate over the present modalities) on the
world task that needs image, audio and text (see configs/fusion_common.py), trained
the way the authors' code trains it: a scalar entropy coefficient on their schedule
(free period, ramp, flat, cosine decay over the last tenth: the 'aecf' schedule shape)
and random masking whose rate ramps linearly to 0.4. Trains on complete data; the
masking does the rest. The library's reading of the paper is one override away:
`--config.model.fusion.entropy_per_instance=True --config.model.fusion.curriculum_rate=0.5`
(with `--config.model.fusion.mask_rate.end=0.0` to drop the random masking).

  python -m mmjax.main --config=configs/fusion_gated.py --workdir=runs/fusion_gated
  python -m mmjax.main --config=configs/fusion_gated.py:runlocal --workdir=/tmp/fusion_gated
"""

import os

import ml_collections

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusion_common.py"))


def get_config(arg=None):
  fusion = {"kind": "gated", "entropy_per_instance": False, "curriculum_rate": 0.0}
  c = _common().fusion_task_config("fusion_gated", fusion, arg)
  set_authors_schedules(c)
  return c


def set_authors_schedules(c) -> None:
  """The authors' training script (30 epochs: entropy_free 0, entropy_warmup 3,
  entropy_max 0.05, random masking p_missing 0.4 with a 20-epoch ramp), in fractions
  of this run's steps: a 10% ramp of the entropy coefficient, flat, cosine decay over
  the last 10%; the masking rate ramps to 0.4 over the first two thirds. Also used by
  configs/av_digits_fusion_gated.py."""
  total = c.get_ref("total_steps")
  c.model.fusion.entropy_coeff = ml_collections.ConfigDict({
      "shape": "aecf", "value": 0.05, "free_steps": 0,
      "ramp_steps": max(1, c.total_steps // 10), "total_steps": total,
      "decay_fraction": 0.1})
  c.model.fusion.mask_rate = ml_collections.ConfigDict({
      "shape": "linear", "init": 0.0, "end": 0.4, "steps": max(1, 2 * c.total_steps // 3)})
