"""SigLIP image <-> text alignment on the procedural world: configs/default.py with the
sigmoid loss (a device ring over 'data') in place of CLIP's softmax.

  python -m mmjax.main --config=configs/siglip.py --workdir=runs/siglip
  python -m mmjax.main --config=configs/siglip.py:runlocal --workdir=/tmp/siglip
"""

import os

from mmjax import config_lib


def get_config(arg=None):
  c = config_lib.load_config(os.path.join(os.path.dirname(__file__), "default.py"), arg)
  c.name = "siglip"
  c.objective.kind = "siglip"
  c.objective.label_smoothing = 0.0
  # SigLIP's init: logit_scale = exp(log 10) = 10, bias -10.
  c.model.logit_scale_init, c.model.logit_bias_init = config_lib.siglip_init()
  c.model.max_logit_scale = None    # big_vision clamps nothing
  return c
