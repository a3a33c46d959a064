"""What the av_digits experiments (configs/av_digits_*.py) share; not a config itself.

The data: `mmjax_av_digits`, FSDD's spoken digits paired with MNIST images of the same
digit (docs/data.md, "Real datasets"), prepared once with

  python -m mmjax.data.prepare av_digits --manual_dir=RAW --data_dir=DIR

and read from DIR with `--config.data.data_dir=DIR` (a dataset that is not there is an
error that says this command). Splits: FSDD's own by take, 2,400 train / 300
validation / 300 test recordings, no MNIST image in two splits.

The towers, the same for every av_digits config:

  image  a ViT with a convolutional stem (two 3x3 stride-2 convs: 28 x 28 -> 7 x 7
         tokens), width 96, 2 blocks, mean-pooled; MNIST is grey: 1 channel
  audio  the AST-style transformer on log-mels at FSDD's 8 kHz: 0.75 s windows
         (6,000 samples; the median clip is 0.4 s, 95% are under 0.7 s), 32 ms frames
         every 16 ms, 32 mel bins, (4 frames x 8 mels) patches -> 48 tokens, width 96,
         2 blocks, SpecAugment
  text   (CLIP configs) a byte-level transformer, width 64, 1 block

Training images are a random resized crop (75-100% of the area, aspect 0.8-1.25,
which shifts and zooms the digit) without flips: a flipped digit is another glyph.
With 240 distinct images per digit this is what keeps the image tower from memorising.
"""

from __future__ import annotations

import ml_collections

from mmjax import config_lib

NAME = "mmjax_av_digits/default:1.0.0"
FEATURES = {"image": "image", "audio": "audio", "text": "text"}
NUM_CLASSES = 10
AUDIO_SAMPLES = 6000
SAMPLE_RATE = 8000


def data(modalities=("image", "audio", "text"), **overrides) -> ml_collections.ConfigDict:
  """`config.data` of the prepared av_digits dataset (data_dir from the command line)."""
  fields = dict(audio_samples=AUDIO_SAMPLES, image_augment=True, crop_scale=(0.75, 1.0),
                crop_ratio=(0.8, 1.25), flip_prob=0.0, text_max_len=48, num_classes=10)
  fields.update(overrides)
  return config_lib.tfds_data(NAME, {m: FEATURES[m] for m in modalities},
                              label_feature="label", **fields)


def encoders(modalities=("image", "audio"), tiny: bool = False) -> ml_collections.ConfigDict:
  """The towers of the module doc; `tiny`: embedding and pooling only (runlocal)."""
  width, depth = (16, 0) if tiny else (96, 2)
  towers = {
      "image": config_lib.encoder("vit", "mu", patch_size=4, stem="conv", channels=1,
                                  width=width, depth=depth, num_heads=4, pool="gap"),
      # Log-mel statistics of FSDD's training clips with floor 1e-6: mean -9.9, std 5.1.
      "audio": config_lib.encoder("audio", "mu", sample_rate=SAMPLE_RATE, n_fft=256,
                                  hop=128, n_mels=32, floor=1e-6, spec_mean=-9.9,
                                  spec_std=5.1, patch_size=(4, 8), max_frames=48,
                                  width=width, depth=depth, num_heads=4, time_masks=1,
                                  time_mask_max=6, freq_masks=1, freq_mask_max=4),
      "text": config_lib.encoder("text", "mu", width=64 if not tiny else 16,
                                 depth=1 if not tiny else 0, num_heads=2, max_len=48,
                                 causal=False, pool="mean"),
  }
  return ml_collections.ConfigDict({m: towers[m] for m in modalities})


# --- digit classification from image and audio under missing modalities --------------

FUSION_MODALITIES = ("audio", "image")
TRAIN_MISSING_RATE = 0.3
MODDROP_RATE = 0.5
# Auxiliary unimodal heads (docs/fusion.md, "Auxiliary unimodal heads"): without them
# the image, learnt faster, takes over the fused loss and the audio tower stops short
# (audio alone 83-92% at 600 steps); with weight 8, concat and gated fusion reach the
# audio classifier's own accuracy alone (~96.5%), Flex-MoE 92.7% (benchmarks/README.md,
# "Real data"). The unimodal classifiers (image_only, audio_only) have no such head.
UNIMODAL_WEIGHT = 8.0
VARIANTS = ("runlocal", "image_only", "audio_only", "complete", "mcar", "moddrop")
FUSION_DOC = """
Every method gets the towers of configs/av_digits_common.py, the same projection to
width 128 before fusion, the same linear task head over the 10 digits, the same
auxiliary unimodal heads (model.task.unimodal_weight=8), the same steps, batch and
optimizer; they differ in the fusion module and in the training-time
missingness each method is built for (see each config). The robustness evaluator
reports test accuracy with both modalities, image alone, audio alone, and at test-time
missing rates 0 / 0.3 / 0.5 / 0.7. Variants (`arg`, comma-separated):

  runlocal    seconds-long run with tiny towers, for tests
  image_only  (concat config only) the unimodal classifier on images: the same image
  audio_only  tower, projection, MLP and head, trained alone, MultiBench's unimodal
              baselines beside late fusion
  complete    training data with both modalities present
  mcar        training data with each modality missing completely at random, 30%
  moddrop     modality dropout 0.5 in training
"""


def parse_arg(arg) -> set[str]:
  """'runlocal,mcar' -> {'runlocal', 'mcar'}; an unknown variant is an error."""
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = sorted(names - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; valid: {list(VARIANTS)}")
  if {"image_only", "audio_only"} <= names or {"mcar", "complete"} <= names:
    raise ValueError(f"config variants {sorted(names)}: image_only / audio_only and "
                     "mcar / complete exclude each other")
  return names


def fusion_task_config(name: str, fusion: dict, arg=None, *, train_missing: str = "none",
                       unimodal: bool = False) -> ml_collections.ConfigDict:
  """The shared digit-classification experiment around one fusion module.

  Args:
    name: experiment name.
    fusion: `config.model.fusion` fields (kind, ...).
    arg: comma-separated variants (FUSION_DOC).
    train_missing: what the method trains with by default: 'none', 'mcar' (30% of each
      modality missing) or 'moddrop' (modality dropout 0.3).
    unimodal: the config may take the image_only / audio_only variants.
  """
  variants = parse_arg(arg)
  alone = [m for m in FUSION_MODALITIES if f"{m}_only" in variants]
  if alone and not unimodal:
    raise ValueError(f"{name}: the unimodal classifiers are variants of "
                     f"configs/av_digits_fusion_concat.py (:{alone[0]}_only)")
  modalities = tuple(alone) or FUSION_MODALITIES
  c = config_lib.base_config()
  c.name = f"av_digits_{alone[0]}_only" if alone else name
  c.total_steps = 600
  c.batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 300
  c.eval_every_steps = 300
  c.data = data(modalities)
  if alone:
    fusion = {"kind": "concat", "hidden_dim": 128, "num_layers": 2}
  mode = "none" if alone or "complete" in variants else train_missing
  mode = "mcar" if "mcar" in variants else mode
  if mode == "mcar":
    c.data.missing = config_lib.missing_config(
        "mcar", modalities=modalities, seed=1,
        rates={m: TRAIN_MISSING_RATE for m in modalities})
  fusion = dict(fusion)
  fusion.setdefault("width", 128)
  if "moddrop" in variants or mode == "moddrop":
    fusion["modality_dropout"] = MODDROP_RATE
  c.model.embed_dim = 128
  c.model.encoders = encoders(modalities)
  c.model.encoders.unlock()
  c.model.fusion = ml_collections.ConfigDict(fusion)
  c.model.task = ml_collections.ConfigDict({
      "num_classes": NUM_CLASSES, "unimodal_weight": 0.0 if alone else UNIMODAL_WEIGHT})
  c.objective.kind = "task"
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 1e-4
  c.evals = ml_collections.ConfigDict({
      "robustness": config_lib.evaluator_config(
          "robustness", split="test", every=-1, batch_size=300,
          rates=(0.0, 0.3, 0.5, 0.7)),
  })
  if "runlocal" in variants:
    c.total_steps = 4
    c.batch_size = 16
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.eval_every_steps = 4
    c.data.num_threads = 1
    c.optimizer.warmup_steps = 1
    c.model.encoders = encoders(modalities, tiny=True)
    c.model.encoders.unlock()
    c.model.fusion.width = 16
    if "num_layers" in c.model.fusion:    # one fusion block: compile time, not size, counts
      c.model.fusion.num_layers = 1
    c.evals.robustness.batch_size = 16
  return c
