"""An imbalanced image + audio task in the procedural world, for the balance methods
(docs/balance.md).

Both modalities carry the whole label, the joint value of (shape, size), 15 classes:
the image draws the shape at its size with little noise (easy); the audio plays it as
a timbre (shape) and a loudness and envelope (size) under heavy noise (hard). Every
other factor is expressed by both (nuisance the label ignores). Trained jointly, the
fused model leans on the image and the audio encoder learns less than it does alone.

Concatenation fusion with a linear task head; auxiliary unimodal heads (weight 0.1)
give each modality's confidence and accuracy, which every method reads; for `mlb`
they are the method (its multi-loss: weight 2, the sum of the two unimodal losses).
Variants (`arg`, comma-separated):

  none | ogm_ge | mlb | inforeg | cggm   the balance method (default none)
  image_only | audio_only   the encoder trained alone (the same tower, projection,
                            fusion MLP over one modality and head); a linear probe on
                            its features gives the `alone` accuracy of the imbalance table
  runlocal                  seconds-long run with tiny towers, for tests

  python -m mmjax.main --config=configs/balance_world.py:ogm_ge --workdir=runs/bal_ogm
  python -m mmjax.main --config=configs/balance_world.py:audio_only --workdir=runs/bal_audio
"""

import ml_collections

from mmjax import config_lib

METHODS = ("none", "ogm_ge", "mlb", "inforeg", "cggm")
ALONE = ("image_only", "audio_only")
MODALITIES = ("audio", "image")
LABEL_FACTORS = ("colour", "size")
NUM_CLASSES = 6 * 3
NOISE = {"image": 0.05, "audio": 1.0, "text": 0.0}
UNIMODAL_WEIGHT = 0.1


def parse_arg(arg):
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = sorted(names - set(METHODS) - set(ALONE) - {"runlocal"})
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; valid: "
                     f"{list(METHODS + ALONE) + ['runlocal']}")
  chosen = names & (set(METHODS) | set(ALONE))
  if len(chosen) > 1:
    raise ValueError(f"config variants {sorted(chosen)} exclude each other")
  return (chosen.pop() if chosen else "none"), "runlocal" in names


def get_config(arg=None):
  variant, runlocal = parse_arg(arg)
  alone = variant.removesuffix("_only") if variant in ALONE else None
  modalities = (alone,) if alone else MODALITIES
  c = config_lib.base_config()
  c.name = f"balance_world_{variant}"
  c.total_steps = 400
  c.batch_size = 64
  c.log_every_steps = 50
  c.checkpoint_every_steps = 400
  c.eval_every_steps = 400

  c.data.modalities = modalities
  c.data.noise = ml_collections.ConfigDict(dict(NOISE))
  c.data.label = ml_collections.ConfigDict(
      {"factors": LABEL_FACTORS, "mode": "product", "num_classes": 0})
  c.data.sizes.test = 1024

  c.model.embed_dim = 64
  towers = {
      "image": config_lib.encoder("vit", "mu", patch_size=8, width=64, depth=1,
                                  num_heads=2),
      "audio": config_lib.encoder("audio", "mu", sample_rate=8000, n_fft=256, hop=128,
                                  n_mels=32, patch_size=(8, 8), max_frames=32,
                                  spec_mean=0.2, spec_std=1.6, width=64, depth=1,
                                  num_heads=2, time_masks=0, freq_masks=0),
  }
  c.model.encoders = ml_collections.ConfigDict({m: towers[m] for m in modalities})
  c.model.encoders.unlock()
  c.model.fusion = ml_collections.ConfigDict(
      {"kind": "concat", "hidden_dim": 128, "num_layers": 2, "width": 64})
  weight = 0.0 if alone else (2.0 if variant == "mlb" else UNIMODAL_WEIGHT)
  c.model.task = ml_collections.ConfigDict({"num_classes": NUM_CLASSES,
                                            "unimodal_weight": weight})
  c.objective.kind = "task"
  c.balance.method = "" if variant in ("none",) + ALONE else variant
  c.balance.inforeg.period = 20      # the authors' epoch, here 20 steps of 400

  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 1e-4

  probe = dict(split="test", every=0, batch_size=256, representation="features",
               train_examples=2048)
  if alone:
    c.evals = ml_collections.ConfigDict(
        {"probe": config_lib.evaluator_config("linear_probe", **probe)})
  else:
    c.evals = ml_collections.ConfigDict(
        {"imbalance": config_lib.evaluator_config("imbalance", **probe)})

  if runlocal:
    c.total_steps = 4
    c.batch_size = 16
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.eval_every_steps = 4
    c.data.sizes.train = 256
    c.data.sizes.test = 32
    c.data.sizes.validation = 32
    c.data.num_threads = 1
    c.optimizer.warmup_steps = 1
    c.balance.inforeg.period = 2
    for m in modalities:
      c.model.encoders[m].width = 16
      c.model.encoders[m].depth = 0
    c.model.fusion.width = 16
    c.model.fusion.num_layers = 1
    for e in c.evals.values():
      e.batch_size = 16
      e.train_examples = 64
      e.steps = 20
  return c
