"""Building blocks for experiment configs (`configs/*.py`).

Every experiment starts from `base_config()`, whose structure is locked: assigning a
field that does not exist (a typo) raises an error naming it, in a config file and on
the command line (`--config.optimizer.lr=...`). Parts are chosen by registered names.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from mmjax import align
from mmjax import balance as balance_lib
from mmjax.data import world as world_lib

# The logit-scale constants belong to the losses (`mmjax.align`); re-exported here for
# configs, which import only this module.
CLIP_INIT_LOGIT_SCALE = align.CLIP_INIT_LOGIT_SCALE
MAX_LOGIT_SCALE = align.MAX_LOGIT_SCALE
SIGLIP_INIT_LOGIT_BIAS = align.SIGLIP_INIT_LOGIT_BIAS
siglip_init = align.siglip_init


def encoder(kind: str, variant: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """One modality's encoder: a registered `kind`, a size `variant` and module overrides."""
  return ml_collections.ConfigDict({"kind": kind, "variant": variant, **overrides})


def world_data(modalities=("image", "text"), **overrides) -> ml_collections.ConfigDict:
  """`config.data` for the procedural world."""
  d = ml_collections.ConfigDict()
  d.kind = "world"
  d.seed = 0
  d.modalities = tuple(modalities)
  d.sizes = ml_collections.ConfigDict({"train": 50_000, "validation": 512, "test": 512})
  d.expresses = ml_collections.ConfigDict(
      {m: world_lib.FACTOR_NAMES for m in world_lib.MODALITIES})
  d.noise = ml_collections.ConfigDict({"image": 0.05, "audio": 0.05, "text": 0.0})
  d.image_size = 32
  d.audio_samples = 4000
  d.sample_rate = 8000
  d.text_max_len = 72
  d.tokenizer = "byte"              # or KIND:PATH, KIND sentencepiece|siglip|clip_bpe|hf
  d.label = ml_collections.ConfigDict(
      {"factors": ("shape",), "mode": "product", "num_classes": 0})
  d.missing = missing_config(modalities=world_lib.MODALITIES)
  # Hard negatives: training batches made of groups of `size` examples that share the
  # factors `share` (0: a plain shuffle).
  d.group_batches = ml_collections.ConfigDict({"size": 0, "share": ("colour", "size",
                                                                    "position")})
  # Flex-MoE's warm-up: the first N steps read the training set ordered by number of
  # present modalities, most first (0: none).
  d.modality_warmup_steps = 0
  d.num_threads = 2
  for k, v in overrides.items():
    setattr(d, k, v)
  return d


def tfds_data(name: str, features, *, data_dir: str | None = None,
              label_feature: str | None = None, splits=None,
              **overrides) -> ml_collections.ConfigDict:
  """`config.data` for a TFDS dataset prepared in array_record format (docs/data.md).

  Args:
    name: 'dataset[/config][:version]'.
    features: modality name -> feature path, nested paths joined by '/'
      (`{'image': 'image', 'text': 'captions/text'}`).
    data_dir: where the dataset was prepared (None: TFDS's default directory).
    label_feature: path of an integer scalar feature read as `label`, or None.
    splits: mmjax split -> TFDS split string (`{'train': 'train[:90%]', ...}`);
      default: train, test and validation under their own names.
    **overrides: any other field below (`image_size=64`, `num_threads=4`, ...).

  Returned locked; `features` and `splits` stay open for keys from the command line.
  """
  d = ml_collections.ConfigDict()
  d.kind = "tfds"
  d.name = name
  d.data_dir = ml_collections.config_dict.placeholder(str)
  d.data_dir = data_dir
  d.features = ml_collections.ConfigDict(dict(features))
  d.label_feature = ml_collections.config_dict.placeholder(str)
  d.label_feature = label_feature
  d.splits = ml_collections.ConfigDict(
      dict(splits) if splits is not None
      else {"train": "train", "test": "test", "validation": "validation"})
  d.num_classes = 0                 # 0: the label feature's ClassLabel, or the labels seen
  d.class_names = ()                # (): the label feature's ClassLabel names, if any
  d.prompt_templates = ()           # zero-shot prompts ('a photo of a {}.'); (): CLIP-style
  d.image_size = 0                  # > 0: resize images to [image_size, image_size]
  d.audio_samples = 0               # > 0: crop / zero-pad waveforms to this length
  d.image_norm = "none"             # 'none' ([0, 1]) | 'clip' | 'imagenet' | 'siglip' | 'custom'
  d.image_preset = ""               # '' | 'clip' | 'siglip': the published model's transform
  d.image_mean = ()                 # per channel, read with image_norm='custom'
  d.image_std = ()
  d.image_augment = False           # training: random resized crop + horizontal flip
  d.crop_scale = (0.9, 1.0)         # the crop's fraction of the image area
  d.crop_ratio = (3 / 4, 4 / 3)     # the crop's width / height (log-uniform)
  d.flip_prob = 0.5                 # horizontal flip in training
  d.sample_rate = 0                 # > 0: resample waveforms to this rate; 0: as stored
  d.source_sample_rate = 0          # the stored rate; 0: the dataset's (its metadata)
  d.text_max_len = 72
  d.tokenizer = "byte"              # or KIND:PATH, KIND sentencepiece|siglip|clip_bpe|hf
  d.missing = missing_config(modalities=tuple(features))
  d.modality_warmup_steps = 0       # as in world_data
  d.num_threads = 2
  d.lock()
  d.features.unlock()
  d.splits.unlock()
  for k, v in overrides.items():   # after lock(): a misspelt field is an error
    setattr(d, k, v)
  return d


def missing_config(kind="none", modalities=(), **overrides) -> ml_collections.ConfigDict:
  """`config.data.missing` (see `mmjax.data.missing`).

  `rates` and `mnar_rates` hold a key per name of `modalities` (rate 0, no table), so
  that the command line can set one: `--config.data.missing.rates.image=0.3`.
  """
  m = ml_collections.ConfigDict()
  m.kind = kind
  m.rates = ml_collections.ConfigDict({name: 0.0 for name in modalities})
  m.combinations = ()
  m.weights = ()
  m.mnar_on = "label"
  m.mnar_rates = ml_collections.ConfigDict({name: () for name in modalities})
  m.allow_none = False
  m.seed = 0
  for k, v in overrides.items():
    setattr(m, k, v)
  return m


# The kernels of a transformer block LoRA can adapt (`mmjax.models.lora.KERNELS`).
LORA_KERNELS = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")


def lora_config(rank: int = 0, alpha: float = 0.0, targets=LORA_KERNELS, towers=()
                ) -> ml_collections.ConfigDict:
  """`config.model.lora`: `rank` r of the adapters (0: no LoRA); `alpha` (the update is
  scaled by alpha / r; 0: alpha = r, scale 1); `targets`, regular expressions over the
  kernel names of a block (`LORA_KERNELS`), each matching one at least; `towers`, the
  modalities whose encoders get adapters (): every transformer tower)."""
  return ml_collections.ConfigDict({"rank": rank, "alpha": float(alpha),
                                    "targets": tuple(targets), "towers": tuple(towers)})


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults. Returned locked."""
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256                # global, over all processes and devices
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 500
  c.keep_checkpoints = 3
  # The device mesh (mmjax.train.mesh): data x fsdp x expert, every axis splits the batch;
  # one size may be -1 (the rest of the devices). docs/scaling.md.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1})
  # Parameter layout (mmjax.train.sharding): `rules`, pairs (pattern over '/'-joined
  # param paths, spec tuple), applied first; then the modules' defaults; then, on an
  # fsdp axis, arrays of at least `fsdp_min_size` elements sharded along their largest
  # dimension the axis divides.
  c.sharding = ml_collections.ConfigDict({"rules": (), "fsdp_min_size": 2 ** 16})
  # Chunks per device block (mmjax.train.grad_cache): plain gradient accumulation for
  # objectives that average over examples ('task'), or GradCache for the alignment
  # objectives (grad_cache.microbatches). 1: the whole block at once.
  c.microbatches = 1
  c.grad_cache = ml_collections.ConfigDict({"microbatches": 1})
  # Sum over devices in device order (all-gather, then add), so that losses and params
  # are the same bits on any split of the devices into processes; n x the gradient's
  # memory, transiently (mmjax.collectives). Off: the backend's all-reduce.
  c.deterministic_reductions = False

  c.data = world_data()

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 128
  c.model.encoders = ml_collections.ConfigDict({
      "image": encoder("vit", "mu"),
      "text": encoder("text", "mu"),
  })
  c.model.head = "linear"           # projection heads: linear | mlp | identity
  c.model.logit_scale_init = CLIP_INIT_LOGIT_SCALE
  # After every optimizer step the log-scale parameter t is clamped into
  # [0, log max_logit_scale] (CLIP: 100); None: no clamp (SigLIP). The forward pass
  # uses exp(t) as is, so its gradient can bring t back down.
  c.model.max_logit_scale = ml_collections.config_dict.placeholder(float)
  c.model.max_logit_scale = MAX_LOGIT_SCALE
  c.model.logit_bias_init = ml_collections.config_dict.placeholder(float)
  c.model.fusion = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
  c.model.task = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
  # GRAM's matching head (`mmjax.models.matching.MatchingHead` fields), for the
  # 'matching' objective.
  c.model.matching = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
  # LoRA (`mmjax.models.lora`): rank-r adapters on the chosen kernels of the chosen
  # transformer towers; only they train (the base params are frozen). rank 0: off.
  c.model.lora = lora_config()

  # A published checkpoint to start from (mmjax.pretrained, docs/pretrained.md): read
  # into the freshly initialised params before the first step; a run that resumes from
  # its own checkpoints does not read it again. path "": none.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = ""
  c.init_from.format = "auto"       # auto | open_clip | timm | big_vision | hf_bert
  # modality -> the checkpoint's tower ("image", "text"); empty: each of the
  # checkpoint's towers into the modality of the same name.
  c.init_from.towers = ml_collections.ConfigDict()
  c.init_from.scalars = True        # logit_scale and logit_bias, where both have them

  c.objective = ml_collections.ConfigDict()
  c.objective.kind = "clip"
  c.objective.label_smoothing = 0.0
  c.objective.anchor = ml_collections.config_dict.placeholder(str)
  c.objective.pairs = "anchor"      # pairwise: anchor | all
  c.objective.pair_kind = "clip"    # pairwise: clip | siglip
  # gram: True, the exact gradient; False, GRAM's reference gradient (each device's
  # negatives gathered without gradient: rows reach the anchors only, columns the
  # tuples only; docs/alignment.md).
  c.objective.negatives_gradient = True
  c.objective.weights = ml_collections.ConfigDict()

  # Modality balance (mmjax.balance, docs/balance.md): a gradient-modulation method
  # ('' none, 'ogm_ge', 'mlb', 'inforeg', 'cggm') over the modalities' encoders, read
  # from the auxiliary unimodal heads; each method's coefficients at its paper's
  # defaults.
  c.balance = balance_lib.balance_config()

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr_ratio = 0.0    # cosine decays to lr * min_lr_ratio
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.05
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.clip_norm = 1.0
  # Per-part rules, first match wins: (pattern, 'frozen' | lr_mult) pairs; a pattern is
  # a regular expression naming a subtree of '/'-joined param paths ('towers_image',
  # 'heads_.*'). LiT: (('towers_image', 'frozen'), ('heads_image', 'frozen')).
  # `mmjax.train.optimizer`; docs/pretrained.md.
  c.optimizer.rules = ()

  c.evals = ml_collections.ConfigDict()
  c.evals.retrieval = evaluator_config("retrieval")
  # An evaluator that raises: 'continue' reports it, skips its metrics and trains on
  # (checkpoints are saved); 'stop' ends the run with its error.
  c.evals_fail = "continue"
  c.lock()
  # Keys of these two are names checked against registries and the data when the run
  # starts (a modality the data lacks, an unknown evaluator), so configs may add them.
  c.model.encoders.unlock()
  c.evals.unlock()
  c.init_from.towers.unlock()
  return c


# Every evaluator's config fields and their defaults (`config.evals.<name>`), so that
# configs read without importing the evaluators; `mmjax.evals.evaluators.register` takes
# an evaluator's fields from here. Fields every evaluator has:
EVALUATOR_COMMON_FIELDS = {"kind": "", "split": "test", "every": -1, "batch_size": 256}
_RETRIEVAL_FIELDS = {"pairs": (), "ks": (1, 5, 10), "plot_max_k": 50}
_ZERO_SHOT_FIELDS = {"modality": "image", "text_modality": "text", "templates": (),
                     "class_names": ()}
_PROBE_FIELDS = {"modalities": (), "representation": "embeddings", "train_split": "train",
                 "train_examples": 2048}
EVALUATOR_FIELDS = {
    # relevance: 'instance' (the paired item) | 'class' (any item of the same label);
    # all_captions: an example with several captions is matched by any of them.
    "retrieval": dict(_RETRIEVAL_FIELDS, relevance="instance", all_captions=True),
    "joint_retrieval": dict(_RETRIEVAL_FIELDS, joint=(), score="auto"),
    "zero_shot": _ZERO_SHOT_FIELDS,
    "linear_probe": dict(_PROBE_FIELDS, val_split="validation",
                         l2_grid=(1e-4, 1e-3, 1e-2, 1e-1), steps=500),
    "knn": dict(_PROBE_FIELDS, k=20, temperature=0.07),
    "calibration": dict(_ZERO_SHOT_FIELDS, logits="zero_shot", n_bins=15),
    "geometry": {"pairs": (), "k": 10, "max_examples": 2000, "plot": True},
    "robustness": {"rates": (0.0, 0.1, 0.3, 0.5, 0.7), "n_bins": 15, "seed": 0,
                   "plot": True, "icym2i": False},
    # alone: (modality, accuracy) pairs, the probe accuracy of each encoder trained alone.
    "imbalance": dict(_PROBE_FIELDS, representation="features", val_split="validation",
                      l2_grid=(1e-4, 1e-3, 1e-2, 1e-1), steps=500, alone=()),
    # targets: (name, spec) pairs, spec a world factor or 'f1+f2%k'.
    "factor_probe": {"representation": "joint", "targets": (), "train_split": "train",
                     "train_examples": 2048, "val_split": "validation",
                     "l2_grid": (1e-4, 1e-3, 1e-2, 1e-1), "steps": 500},
}


def evaluator_fields(kind: str, where: str = "evaluator_config") -> dict:
  """The complete field set of evaluator `kind`: the common fields, then its own."""
  if kind not in EVALUATOR_FIELDS:
    raise ValueError(f"{where}: unknown evaluator {kind!r}; valid: "
                     f"{sorted(EVALUATOR_FIELDS)}")
  return dict(EVALUATOR_COMMON_FIELDS, **EVALUATOR_FIELDS[kind], kind=kind)


def evaluator_config(kind: str, **fields) -> ml_collections.ConfigDict:
  """A complete `config.evals.<name>` entry: common fields, the evaluator's own
  defaults, then `fields`. Returned locked, so a misspelt field is an error.

  `every` > 0: every that many steps and at the end of the run; -1: every
  `config.eval_every_steps` steps and at the end; 0: only at the end of the run (and
  in `--mode=eval`).

  Example: `c.evals.zero_shot = config_lib.evaluator_config('zero_shot', every=0)`.
  """
  entry = evaluator_fields(kind)
  unknown = sorted(set(fields) - set(entry))
  if unknown:
    raise ValueError(f"evaluator_config({kind!r}): unknown fields {unknown}; valid: "
                     f"{sorted(entry)}")
  entry.update(fields)
  c = ml_collections.ConfigDict(entry)
  c.lock()
  return c


def load_config_module(path: str):
  """The config file at `path` as a module (for a config built on another file's
  functions, e.g. configs/fusion_common.py)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file {path!r}")
  name = "config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`; 'file.py:arg' also gives `arg`
  (as on the command line: `--config=configs/default.py:runlocal`). For notebooks, tests
  and configs built on other configs."""
  if arg is None and ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  return load_config_module(path).get_config(arg)
