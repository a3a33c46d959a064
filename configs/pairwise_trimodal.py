"""Anchored pairwise InfoNCE on three modalities: the baseline of configs/gram_trimodal.py.

  python -m mmjax.main --config=configs/pairwise_trimodal.py --workdir=runs/pairwise

Image and audio are each aligned with the text anchor by CLIP's softmax InfoNCE
(ImageBind-style), with the model, data, budget and evals of the GRAM run; joint
retrieval text -> (image, audio) scores a tuple by the sum of its cosine similarities
to the text. `arg` takes the variants of gram_trimodal.py ('runlocal', 'matching').
"""

import os

from mmjax import config_lib


def _gram_trimodal():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "gram_trimodal.py"))


def get_config(arg=None):
  c = _gram_trimodal().trimodal_config("pairwise", arg)
  c.name = "pairwise_trimodal"
  c.objective.pairs = "anchor"
  c.objective.pair_kind = "clip"
  c.objective.label_smoothing = 0.0   # CLIP's
  return c
