"""What an alignment objective captures, where the world knows the answer: CoMM against
CLIP-style pairwise alignment and GRAM, image + audio, the same towers, steps and batch.

The image draws shape and colour, the audio plays shape and size (every other factor is
nuisance in it), so:

  shared        shape                    both modalities express it
  unique image  colour                   only the image
  unique audio  size                     only the audio
  synergy       (colour + size) mod 3    neither alone predicts it (chance 1/3)

The `factor_probe` evaluator fits a linear probe for each from the representation:
CoMM's fused one (`joint`), the concatenated embeddings for pairwise and GRAM.

CoMM's views are pairs of renderings of the same latent factors
(`data.group_batches`: size 2, every factor shared), fused by concatenation with
modality dropout 0.3 (views with one modality: CoMM's unimodal terms, drawn).

  python -m mmjax.main --config=configs/comm_world.py:comm --workdir=runs/comm
  python -m mmjax.main --config=configs/comm_world.py:pairwise --workdir=runs/comm_pairwise
  python -m mmjax.main --config=configs/comm_world.py:gram --workdir=runs/comm_gram

Variants: comm (default) | pairwise | gram, and runlocal (seconds, tiny towers).
"""

import ml_collections

from mmjax import config_lib

OBJECTIVES = ("comm", "pairwise", "gram")
FACTORS = ("shape", "colour", "size", "position")
TARGETS = (("shared", "shape"), ("unique_image", "colour"), ("unique_audio", "size"),
           ("synergy", "colour+size%3"))


def get_config(arg=None):
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = sorted(names - set(OBJECTIVES) - {"runlocal"})
  chosen = names & set(OBJECTIVES)
  if unknown or len(chosen) > 1:
    raise ValueError(f"unknown config variant(s) {unknown} or more than one objective "
                     f"in {sorted(names)}: one of {OBJECTIVES}, and runlocal")
  objective = chosen.pop() if chosen else "comm"
  c = config_lib.base_config()
  c.name = f"comm_world_{objective}"
  c.total_steps = 400
  c.batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 400
  c.eval_every_steps = 400

  c.data.modalities = ("audio", "image")
  c.data.expresses = ml_collections.ConfigDict(
      {"image": ("shape", "colour"), "audio": ("shape", "size"), "text": FACTORS})
  c.data.sizes.test = 1024
  if objective == "comm":
    c.data.group_batches = ml_collections.ConfigDict({"size": 2, "share": FACTORS})

  c.model.embed_dim = 64
  c.model.encoders = ml_collections.ConfigDict({
      "image": config_lib.encoder("vit", "mu", patch_size=8, width=64, depth=1,
                                  num_heads=2),
      "audio": config_lib.encoder("audio", "mu", sample_rate=8000, n_fft=256, hop=128,
                                  n_mels=32, patch_size=(8, 8), max_frames=32,
                                  spec_mean=0.2, spec_std=1.6, width=64, depth=1,
                                  num_heads=2, time_masks=0, freq_masks=0),
  })
  c.model.encoders.unlock()
  c.objective.kind = objective
  if objective == "comm":
    c.model.fusion = ml_collections.ConfigDict(
        {"kind": "concat", "hidden_dim": 128, "num_layers": 2, "width": 64,
         "modality_dropout": 0.3})
  else:
    c.objective.anchor = "image"

  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 1e-4
  c.evals = ml_collections.ConfigDict({"factors": config_lib.evaluator_config(
      "factor_probe", split="test", every=0, batch_size=256, targets=TARGETS,
      representation="joint" if objective == "comm" else "embeddings")})

  if "runlocal" in names:
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
    for m in ("audio", "image"):
      c.model.encoders[m].width = 16
      c.model.encoders[m].depth = 0
    if objective == "comm":
      c.model.fusion.width = 16
      c.model.fusion.num_layers = 1
    c.evals.factors.batch_size = 16
    c.evals.factors.train_examples = 64
    c.evals.factors.steps = 20
  return c
