"""One experiment's parts, built from its config: the checks, the data, the model.

The trainer (`mmjax.train.trainer`) and eval mode (`mmjax.train.eval_mode`) build what
they run here, so a config means the same to both and each check runs once, where the
config becomes objects:

  check_config(config, mesh)       errors a user can fix in the config, before any build
  build_model(config)              the model, with LoRA adapters when `model.lora` says
  make_featurize(config)           records -> fixed-shape arrays (tokenizer, missingness)
  sample_batch(source, featurize)  a host batch whose shapes initialise the model
  train_dataset(config, source, featurize)   the grain pipeline of the training split
  model_modalities(config)         the modalities the model encodes (sorted)
  build_evaluators(config)         `config.evals`, checked against the data and model
  eval_context(config, ...)        what the evaluators see of a run (no config)

It sits between the library (data, models) and the runners (train): the evaluators
never import it, nor anything of `mmjax.train`.
"""

from __future__ import annotations

import jax
import numpy as np

from mmjax import balance as balance_lib
from mmjax import checks
from mmjax import models
from mmjax.align import comm as comm_lib
from mmjax.data import world as world_lib
from mmjax.evals import evaluators as evaluators_lib
from mmjax.data import missing as missing_lib
from mmjax.data import pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.models import lora as lora_lib
from mmjax.train import distributed
from mmjax.train import grad_cache


def model_modalities(config) -> tuple[str, ...]:
  return tuple(sorted(config.model.encoders.keys()))


def check_config(config, mesh) -> None:
  """Errors a user can fix in the config, raised before anything is built: the data
  produces every modality the model encodes, the global batch splits over processes
  and devices, text encoders read the tokenizer's ids, and the task head has as many
  classes as the data's label."""
  check_run_fields(config)
  produced = pipeline.source_modalities(config.data)
  for m in model_modalities(config):
    if m not in produced:
      raise ValueError(f"model.encoders.{m}: the data ({config.data.kind}) produces no "
                       f"modality {m!r}; it produces {sorted(produced)}")
  distributed.check_global_batch(config.batch_size, num_processes=jax.process_count(),
                                 devices_per_process=jax.local_device_count(),
                                 mesh_shape=dict(mesh.shape))
  grad_cache.check_config(config, mesh.size)
  check_tokenizer(config)
  pipeline.check_sample_rates(config.data, {
      m: models.encoder_fields(enc, where=f"model.encoders.{m}")["sample_rate"]
      for m, enc in config.model.encoders.items() if enc.kind == "audio"})
  lora_lib.spec_from_config(config.model.get("lora"), model_modalities(config))
  balance_lib.check(config)
  comm_lib.check_config(config, world_lib.FACTOR_NAMES)
  task = config.model.get("task")
  info = pipeline.data_info(config.data)
  if task is not None and info.num_classes and task.num_classes != info.num_classes:
    raise ValueError(f"model.task.num_classes={task.num_classes}, but the data's label "
                     f"({info.name}) has {info.num_classes} classes")


def build_model(config):
  """`models.build(config.model)`, wrapped in a `models.lora.LoraModel` when
  `model.lora.rank` > 0 (its params then hold the adapters under `lora.ADAPTERS`)."""
  model = models.build(config.model)
  return lora_lib.wrap(model, lora_lib.spec_from_config(config.model.get("lora"),
                                                        model_modalities(config)))


def build_objective(config):
  """The loss of `config.objective` (`objectives.build`), with the loss terms of
  `config.balance` (CGGM's direction term) added."""
  from mmjax.train import objectives  # pylint: disable=g-import-not-at-top
  return balance_lib.wrap_objective(config, objectives.build(config.objective, config.model))


def balance_optimizer(config, tx):
  """`tx`, with `config.balance`'s gradient modulation chained in front (the train step
  then passes its metrics to the update: `balance_lib.enabled(config)`)."""
  return balance_lib.chain(config, tx)


def balance_enabled(config) -> bool:
  """Whether `config.balance` names a method (the train step's `update_args`)."""
  return balance_lib.enabled(config)


def adapters_key(config):
  """The params' key of the LoRA adapters when `model.lora` is on (the optimizer then
  trains them and freezes the rest: `make_optimizer(..., adapters=...)`), else None."""
  spec = lora_lib.spec_from_config(config.model.get("lora"))
  return None if spec is None else lora_lib.ADAPTERS


def check_run_fields(config) -> None:
  """The run's own numbers: steps, batch, cadences (each a whole number in range)."""
  checks.check_count("total_steps", config.total_steps)
  checks.check_count("batch_size", config.batch_size)
  checks.check_count("log_every_steps", config.log_every_steps)
  checks.check_count("checkpoint_every_steps", config.checkpoint_every_steps)
  checks.check_count("eval_every_steps", config.eval_every_steps, low=0)
  checks.check_count("keep_checkpoints", config.keep_checkpoints)
  checks.check_count("seed", config.seed, low=0)
  checks.check_count("model.embed_dim", config.model.embed_dim)


def check_tokenizer(config) -> None:
  """Text encoders must read the ids the data's tokenizer writes: same vocabulary size,
  pad and eos ids, and room for `data.text_max_len` tokens."""
  spec = config.data.get("tokenizer", "byte")
  tokenizer = tokenizer_lib.make_tokenizer(spec, config.data.text_max_len)
  for m, enc in config.model.encoders.items():
    if enc.kind not in models.registry.TEXT_KINDS:
      continue
    fields = models.encoder_fields(enc, where=f"model.encoders.{m}")
    wanted = {"vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id,
              "eos_id": tokenizer.eos_id}
    wrong = {k: (fields[k], v) for k, v in wanted.items() if fields[k] != v}
    if wrong:
      raise ValueError(
          f"model.encoders.{m} does not match data.tokenizer={spec!r}: "
          + ", ".join(f"{k}={have} (the tokenizer's is {want})"
                      for k, (have, want) in wrong.items())
          + "; set these fields in the encoder config")
    if fields["max_len"] < config.data.text_max_len:
      raise ValueError(f"model.encoders.{m}.max_len={fields['max_len']} is shorter than "
                       f"data.text_max_len={config.data.text_max_len}")


def text_modalities(config) -> tuple[str, ...]:
  """The modalities whose encoder reads token ids (kind 'text' or 'bert'), whatever
  their name."""
  return tuple(m for m in model_modalities(config)
               if config.model.encoders[m].kind in models.registry.TEXT_KINDS)


def make_featurize(config, *, missing: bool = True) -> pipeline.Featurize:
  """The featurizer of `config.data` for the model's modalities; `missing=False`
  leaves out the configured missingness (every modality present)."""
  modalities = model_modalities(config)
  missingness = (missing_lib.Missingness.from_config(config.data.missing, modalities)
                 if missing else None)
  return pipeline.Featurize.from_config(config.data, modalities, missingness,
                                        text_modalities=text_modalities(config))


def sample_batch(source, featurize, size: int = 1) -> dict:
  """The first `size` examples of `source`, featurised and stacked (host numpy)."""
  rows = [featurize((i, source[i])) for i in range(size)]
  return jax.tree.map(lambda *xs: np.stack(xs), *rows)


def group_batches(data_config) -> dict:
  """`pipeline.train_dataset`'s grouping arguments from `config.data.group_batches`."""
  groups = data_config.get("group_batches")
  if groups is None or not groups.size:
    return {}
  return {"group_size": int(groups.size), "group_share": tuple(groups.share)}


def modality_warmup(data_config, source, featurize) -> dict:
  """`pipeline.train_dataset`'s warm-up arguments from `config.data.modality_warmup_steps`
  (default 0, none): that many first steps read the training set ordered by number of
  present modalities, most first (Flex-MoE's warm-up), then the usual stream."""
  steps = data_config.get("modality_warmup_steps", 0) or 0
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f"data.modality_warmup_steps must be a whole number of steps >= 0, "
                     f"got {steps!r}")
  if not steps:
    return {}
  return {"warmup_steps": steps, "warmup_order": pipeline.modality_count_order(
      source, getattr(featurize, "missingness", None))}


def train_dataset(config, source, featurize):
  """The training stream of `config`: shuffled (or grouped) batches of this process,
  after the modality-ordered warm-up if `data.modality_warmup_steps` is set."""
  return pipeline.train_dataset(source, featurize, seed=config.seed,
                                global_batch_size=config.batch_size,
                                num_threads=config.data.num_threads,
                                **group_batches(config.data),
                                **modality_warmup(config.data, source, featurize))


def build_evaluators(config, only=None) -> dict:
  """`config.evals` -> name -> (fn, full config, every), every entry checked."""
  return evaluators_lib.build_evaluators(
      config.evals, config.eval_every_steps, data=pipeline.data_info(config.data),
      modalities=model_modalities(config), only=only)


def eval_context(config, *, workdir: str, mesh, predict, featurize, step: int,
                 reports: dict | None = None, data=None) -> evaluators_lib.EvalContext:
  """What the evaluators see of a run: the model's predictions, the data's splits and
  `DataInfo` (`data`, computed here when None), and the objective's anchor and kind;
  never the config itself."""
  return evaluators_lib.EvalContext(
      predict=predict, featurize=featurize,
      sources=lambda split: pipeline.make_source(config.data, split),
      data=data if data is not None else pipeline.data_info(config.data),
      modalities=model_modalities(config),
      mesh=mesh, workdir=workdir, step=step, anchor=config.objective.get("anchor"),
      objective=str(config.objective.kind),
      reports=reports if reports is not None else {})
