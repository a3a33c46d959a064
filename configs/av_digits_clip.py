"""CLIP-style alignment of spoken and handwritten digits, with their captions as a third
tower, on av_digits (FSDD + MNIST; configs/av_digits_common.py).

  python -m mmjax.data.prepare av_digits --manual_dir=RAW --data_dir=DIR   # once
  python -m mmjax.main --config=configs/av_digits_clip.py --workdir=runs/av_digits_clip \\
      --config.data.data_dir=DIR
  python -m mmjax.main --config=configs/av_digits_clip.py:runlocal --workdir=/tmp/avd \\
      --config.data.data_dir=DIR

Objective: CLIP's InfoNCE averaged over all three pairs (image-audio, image-text,
audio-text; `objective.kind='pairwise'`, `pairs='all'`). A recording and an image share
only their digit, so what the image<->audio pair can learn is the class; the captions
name the digit in words or numerals, and the text tower learns those ten names in a
few dozen steps, so the two text pairs pull every image and every recording of a digit
towards one point from the start. That is faster than image<->audio alone, where both
towers must find the classes from each other, and it gives zero-shot classification
from the class names for free. GRAM would score one volume per (text, image, audio)
tuple and never ask image and audio directly to agree, which is the retrieval wanted.

Evaluation on the 300 test recordings: class-level audio<->image retrieval (a hit is
any image of the spoken digit), zero-shot digit classification of images and of
recordings from the prompts of the class names.
"""

import os

from mmjax import config_lib


def _common():
  return config_lib.load_config_module(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "av_digits_common.py"))


def get_config(arg=None):
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"unknown config variant {arg!r}; valid: 'runlocal'")
  common = _common()
  c = config_lib.base_config()
  c.name = "av_digits_clip"
  c.total_steps = 600
  c.batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 300
  c.eval_every_steps = 300
  c.data = common.data(("image", "audio", "text"))
  c.model.embed_dim = 128
  c.model.encoders = common.encoders(("image", "audio", "text"))
  c.model.encoders.unlock()
  c.objective.kind = "pairwise"
  c.objective.pairs = "all"
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.05
  c.evals.retrieval = config_lib.evaluator_config(
      "retrieval", pairs=(("audio", "image"),), relevance="class", batch_size=300)
  # Zero-shot prompts in the captions' own phrasings (mmjax.data.builders.av_digits).
  templates = ("a handwritten {}", "someone says {}", "the number {}, written and spoken",
               "{}, said aloud and written by hand")
  for m in ("image", "audio"):
    c.evals[f"zero_shot_{m}"] = config_lib.evaluator_config(
        "zero_shot", modality=m, every=0, batch_size=300, templates=templates)
  if arg == "runlocal":     # seconds: tiny towers, a few steps
    c.total_steps = 4
    c.batch_size = 16
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.eval_every_steps = 4
    c.data.num_threads = 1
    c.optimizer.warmup_steps = 1
    c.model.embed_dim = 16
    c.model.encoders = common.encoders(("image", "audio", "text"), tiny=True)
    c.model.encoders.unlock()
    c.evals.retrieval.ks = (1,)
    c.evals.retrieval.plot_max_k = 0
    for entry in c.evals.values():
      entry.batch_size = 16
  return c
