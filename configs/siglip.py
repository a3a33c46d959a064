"""SigLIP image <-> text alignment on the procedural world: configs/default.py with the
sigmoid loss (a device ring over 'data') in place of CLIP's softmax.

  python -m mmjax.main --config=configs/siglip.py --workdir=runs/siglip
  python -m mmjax.main --config=configs/siglip.py:runlocal --workdir=/tmp/siglip
"""

import importlib.util
import os

from mmjax import align


def _default_config(arg):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
  spec = importlib.util.spec_from_file_location("default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  c = _default_config(arg)
  c.name = "siglip"
  c.objective.kind = "siglip"
  c.objective.label_smoothing = 0.0
  # SigLIP's init: logit_scale = exp(log 10) = 10, bias -10.
  c.model.logit_scale_init, c.model.logit_bias_init = align.siglip_init()
  return c
