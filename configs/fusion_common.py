"""What the fusion experiments (configs/fusion_*.py) share; not a config itself.

The task needs every modality. The procedural world renders image, audio and text,
and each modality expresses exactly one factor of the label (the others are random
nuisance in it):

  image -> colour (6 values)    audio -> size (3)    text -> shape (5)
  label  = the joint value of (shape, colour, size): 5 * 6 * 3 = 90 classes

Chance is 1/90 (1.1%). An oracle that sees the modalities of a subset S knows the
factors they express and guesses the others, so its accuracy is
1 / (number of values of the factors whose modality is absent):

  image 1/15 (6.7%), audio 1/30 (3.3%), text 1/18 (5.6%),
  audio+image 1/5, audio+text 1/6, image+text 1/3, all three 1.

Every single modality is worth something above chance and every missing one costs
accuracy. The `robustness` evaluator logs this ceiling next to each combination.

Every method gets the same encoders (micro towers, width 64), the same projection to
width 64 before fusion, the same linear task head, the same steps, batch and
optimizer; they differ in the fusion module and in the training-time missingness
each method is built for (see each config). Variants (`arg`, comma-separated):

  runlocal   seconds-long run with tiny towers, for tests
  moddrop    modality dropout 0.3 in training (each present modality dropped from
             the mask with probability 0.3, at least one kept)
  mcar       training data with each modality missing completely at random, 30%
  complete   training data with every modality present
  redundant  each modality expresses two label factors, so any two modalities carry
             the whole label (image: colour+shape, audio: size+colour, text:
             shape+size; oracle: 1/3, 1/5, 1/6 alone, 1 with any two); a model that
             reads each factor from one modality only loses accuracy it could keep
  interaction  the label is a relation across modalities: (colour + size) mod 3, with
             colour in the image and the text and size in the audio (3 classes,
             chance 1/3). No modality alone says anything about the label (oracle
             1/3), nor do image and text together; audio with image or with text
             decides it (oracle 1). A sum of per-modality scores cannot compute it
             (late fusion is at a disadvantage by construction), and an absent image
             or text can be made up for by the other (docs/data.md)
"""

from __future__ import annotations

import ml_collections

from mmjax import config_lib

MODALITIES = ("audio", "image", "text")
EXPRESSES = {"image": ("colour",), "audio": ("size",), "text": ("shape",)}
REDUNDANT_EXPRESSES = {"image": ("colour", "shape"), "audio": ("size", "colour"),
                       "text": ("shape", "size")}
LABEL_FACTORS = ("shape", "colour", "size")
NUM_CLASSES = 5 * 6 * 3
INTERACTION_EXPRESSES = {"image": ("colour",), "audio": ("size",), "text": ("colour",)}
INTERACTION_FACTORS = ("colour", "size")
INTERACTION_CLASSES = 3
TRAIN_MISSING_RATE = 0.3
VARIANTS = ("runlocal", "moddrop", "mcar", "complete", "redundant", "interaction")


def parse_arg(arg) -> set[str]:
  """'runlocal,mcar' -> {'runlocal', 'mcar'}; an unknown variant is an error."""
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = sorted(names - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; valid: {list(VARIANTS)}")
  if {"mcar", "complete"} <= names:
    raise ValueError("config variants 'mcar' and 'complete' exclude each other")
  if {"redundant", "interaction"} <= names:
    raise ValueError("config variants 'redundant' and 'interaction' are two tasks: "
                     "pick one")
  return names


def mcar_missing(rate: float = TRAIN_MISSING_RATE) -> ml_collections.ConfigDict:
  return config_lib.missing_config("mcar", rates={m: rate for m in MODALITIES}, seed=1)


def fusion_task_config(name: str, fusion: dict, arg=None, *,
                       train_missing: bool = False) -> ml_collections.ConfigDict:
  """The shared experiment around one fusion module.

  Args:
    name: experiment name.
    fusion: `config.model.fusion` fields (kind, width, ...).
    arg: comma-separated variants (see the module doc).
    train_missing: the method trains on MCAR-incomplete data by default.
  """
  variants = parse_arg(arg)
  c = config_lib.base_config()
  c.name = name
  c.total_steps = 600
  c.batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 300
  c.eval_every_steps = 600

  c.data.modalities = MODALITIES
  c.data.expresses = ml_collections.ConfigDict(
      dict(REDUNDANT_EXPRESSES if "redundant" in variants else
           INTERACTION_EXPRESSES if "interaction" in variants else EXPRESSES))
  c.data.label = ml_collections.ConfigDict(
      {"factors": LABEL_FACTORS, "mode": "product", "num_classes": 0})
  if "interaction" in variants:
    c.data.label = ml_collections.ConfigDict(
        {"factors": INTERACTION_FACTORS, "mode": "sum_mod",
         "num_classes": INTERACTION_CLASSES})
  c.data.sizes.test = 2048
  c.data.text_max_len = 32
  if ("mcar" in variants) or (train_missing and "complete" not in variants):
    c.data.missing = mcar_missing()

  c.model.embed_dim = 64
  c.model.encoders = ml_collections.ConfigDict({
      "image": config_lib.encoder("vit", "mu", patch_size=8, width=64, depth=1,
                                  num_heads=2),
      "audio": config_lib.encoder("audio", "mu", sample_rate=8000, n_fft=256, hop=128,
                                  n_mels=32, patch_size=(8, 8), max_frames=32,
                                  spec_mean=0.2, spec_std=1.6, width=64, depth=1,
                                  num_heads=2, time_masks=0, freq_masks=0),
      "text": config_lib.encoder("text", "mu", width=64, depth=1, num_heads=2,
                                 max_len=32),
  })
  c.model.encoders.unlock()
  fusion = dict(fusion)
  fusion.setdefault("width", 64)
  if "moddrop" in variants:
    fusion["modality_dropout"] = 0.3
  c.model.fusion = ml_collections.ConfigDict(fusion)
  c.model.task = ml_collections.ConfigDict(
      {"num_classes": INTERACTION_CLASSES if "interaction" in variants else NUM_CLASSES})
  c.objective.kind = "task"

  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 1e-4

  c.evals = ml_collections.ConfigDict({
      "robustness": config_lib.evaluator_config(
          "robustness", split="test", every=-1, batch_size=256,
          rates=(0.0, 0.1, 0.3, 0.5, 0.7)),
  })

  if "redundant" in variants:   # two factors in a caption: up to 38 bytes
    c.data.text_max_len = 40
    c.model.encoders.text.max_len = 40

  if "runlocal" in variants:
    c.total_steps = 6
    c.batch_size = 16
    c.log_every_steps = 3
    c.checkpoint_every_steps = 6
    c.eval_every_steps = 6
    c.data.sizes.train = 512
    c.data.sizes.test = 32
    c.data.num_threads = 1
    c.optimizer.warmup_steps = 2
    for m in MODALITIES:    # no transformer blocks: the towers embed and pool
      c.model.encoders[m].width = 16
      c.model.encoders[m].depth = 0
    c.model.fusion.width = 16
    if "num_layers" in c.model.fusion:    # one fusion block: compile time, not size, counts
      c.model.fusion.num_layers = 1
      if "moe_every" in c.model.fusion:
        c.model.fusion.moe_every = 1
    c.evals.robustness.batch_size = 16
  return c
