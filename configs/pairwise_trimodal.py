"""Anchored pairwise InfoNCE on three modalities: the baseline of configs/gram_trimodal.py.

  python -m mmjax.main --config=configs/pairwise_trimodal.py --workdir=runs/pairwise

Image and audio are each aligned with the text anchor by CLIP's softmax InfoNCE
(ImageBind-style), with the model, data, budget and evals of the GRAM run; joint
retrieval text -> (image, audio) scores a tuple by the sum of its cosine similarities
to the text. `arg` takes the variants of gram_trimodal.py ('runlocal', 'matching').
"""

import importlib.util
import os


def _gram_trimodal():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gram_trimodal.py")
  spec = importlib.util.spec_from_file_location("gram_trimodal_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _gram_trimodal().trimodal_config("pairwise", arg)
  c.name = "pairwise_trimodal"
  c.objective.pairs = "anchor"
  c.objective.pair_kind = "clip"
  c.objective.label_smoothing = 0.0   # CLIP's
  return c
