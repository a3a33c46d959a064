"""GRAM on three modalities of the procedural world: text anchors, (image, audio) tuples.

  python -m mmjax.main --config=configs/gram_trimodal.py --workdir=runs/gram
  python -m mmjax.main --config=configs/gram_trimodal.py:matching --workdir=runs/gram_matching
  python -m mmjax.main --config=configs/gram_trimodal.py:runlocal --workdir=/tmp/gram

`arg` is a comma-separated list of variants:
  matching  adds GRAM's volume-guided matching objective and its head
            (objective.kind='gram+matching').
  runlocal  seconds instead of minutes, for tests and a first look.

`configs/pairwise_trimodal.py` trains the same model, data and budget with anchored
pairwise InfoNCE; both evaluate joint retrieval text -> (image, audio) beside the
pairwise directions (`eval/retrieval/text->image+audio/R@1`).
"""

import ml_collections

from mmjax import config_lib

VARIANTS = ("matching", "runlocal")


def parse_arg(arg) -> set[str]:
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = sorted(variants - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; valid: {VARIANTS}")
  return variants


def trimodal_config(objective: str, arg=None) -> ml_collections.ConfigDict:
  """Data, model, budget and evals shared by the GRAM and pairwise trimodal runs, with
  `objective` as objective.kind (plus '+matching' in the matching variant)."""
  variants = parse_arg(arg)
  c = config_lib.base_config()
  c.objective.kind = objective
  c.total_steps = 600
  c.batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 300
  c.eval_every_steps = 300

  c.data.modalities = ("image", "audio", "text")
  c.data.text_max_len = 56
  # The caption describes all four factors; the image misses the size and the sound
  # misses the position (each shows a random value instead), so only the (image,
  # audio) tuple pins a caption down. Test-split R@1 ceilings (512 samples, chance
  # 0.002): text->image 0.44, text->audio 0.17, text->image+audio 0.75.
  c.data.expresses.image = ("shape", "colour", "position")
  c.data.expresses.audio = ("shape", "colour", "size")
  c.model.embed_dim = 128
  c.model.encoders.image = config_lib.encoder("vit", "mu", patch_size=8, width=64, depth=2)
  c.model.encoders.text = config_lib.encoder("text", "mu", width=64, depth=2, max_len=56,
                                            causal=False, pool="mean")
  # 0.5 s at 8 kHz -> 30 frames of 32 mel bins -> 4 x 4 patches. The log-mel values of
  # the world's audio have mean ~0.25 and std ~1.7. No SpecAugment: the run is too
  # short to overfit.
  c.model.encoders.audio = config_lib.encoder(
      "audio", "mu", width=64, depth=2, sample_rate=c.data.sample_rate, n_fft=256,
      hop=128, n_mels=32, patch_size=(8, 8), max_frames=32, spec_mean=0.25,
      spec_std=1.7, time_masks=0, freq_masks=0)

  c.objective.anchor = "text"
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  c.evals.retrieval = ml_collections.ConfigDict({
      "kind": "joint_retrieval", "split": "test", "every": -1, "batch_size": 256,
      "joint": ("text->image+audio",), "score": "auto"})

  if "matching" in variants:
    c.objective.kind = f"{objective}+matching"
    c.objective.weights = ml_collections.ConfigDict({objective: 1.0, "matching": 1.0})
    c.model.matching = ml_collections.ConfigDict(
        {"width": 64, "tokens": 4, "num_heads": 4, "depth": 1})
  if "runlocal" in variants:
    c.total_steps = 20
    c.batch_size = 32
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    c.eval_every_steps = 10
    c.data.sizes.test = 64
    c.evals.retrieval.batch_size = 32
  return c


def get_config(arg=None):
  c = trimodal_config("gram", arg)
  c.name = "gram_trimodal"
  c.objective.label_smoothing = 0.1   # GRAM's
  return c
