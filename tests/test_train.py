"""The trainer: 1-vs-8-device equivalence, learning, exact resume, the CLI, bad input."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmjax import experiment
from mmjax import config_lib, models
from mmjax.data import pipeline
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import logging as log_lib
from mmjax.train import mesh as mesh_lib
from mmjax.train import objectives, trainer
from mmjax.train import optimizer as opt_lib
from mmjax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """tests/configs/tiny.py with `field.path=value` overrides."""
  c = config_lib.load_config(os.path.join(REPO, "tests", "configs", "tiny.py"))
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _grad_fn(config, mesh, deterministic_reductions=False):
  """A jitted grad_fn of `config`'s model on `mesh`, and its params."""
  model = models.build(config.model)
  featurize = experiment.make_featurize(config)
  source = pipeline.make_source(config.data, "train")
  tx = opt_lib.make_optimizer(config.optimizer, config.total_steps)
  state = step_lib.create_train_state(model, tx, experiment.sample_batch(source, featurize),
                                      jax.random.key(0), mesh)
  grad_fn = jax.jit(step_lib.make_grad_fn(model, objectives.get("clip"), config.objective,
                                          mesh,
                                          deterministic_reductions=deterministic_reductions))
  return grad_fn, state.params


def _grads(grad_fn, params, batch):
  loss, grads, _ = grad_fn(params, batch, jax.random.key(1))
  return float(loss), jax.device_get(grads)


def test_train_step_8_devices_equals_1_device(mesh1, mesh8):
  config = tiny_config()
  source = pipeline.make_source(config.data, "train")
  batch = experiment.sample_batch(source, experiment.make_featurize(config), size=16)
  loss1, grads1 = _grads(*_grad_fn(config, mesh1), pipeline.to_global(batch, mesh1))
  batch8 = pipeline.to_global(batch, mesh8)
  loss8, grads8 = _grads(*_grad_fn(config, mesh8), batch8)
  # Sums over devices in device order (mmjax.collectives): the same gradient, and the
  # same bits on every call.
  fixed = _grad_fn(config, mesh8, deterministic_reductions=True)
  loss_fixed, grads_fixed = _grads(*fixed, batch8)
  again = _grads(*fixed, batch8)
  assert loss1 == pytest.approx(loss8, abs=1e-5)
  assert loss1 == pytest.approx(loss_fixed, abs=1e-5)
  assert again[0] == loss_fixed
  for g1, g8, gf, ga in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8),
                            jax.tree.leaves(grads_fixed), jax.tree.leaves(again[1])):
    np.testing.assert_allclose(g1, g8, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(g1, gf, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(gf, ga)
  # The gradient is the global-batch gradient, not a per-device one: it is not zero
  # and it changes when any single device's rows change.
  assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(grads8)) > 0


def test_short_run_learns_above_chance(tmp_path):
  config = tiny_config(total_steps=150, batch_size=32, log_every_steps=50,
                       checkpoint_every_steps=150, eval_every_steps=150)
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 20
  config.data.sizes.test = 256     # R@1 over 32 samples is too coarse to compare with chance
  config.evals.retrieval.batch_size = 128
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  chance = 1 / config.data.sizes.test
  r1 = metrics["eval/retrieval/image->text/R@1"]
  assert r1 > 5 * chance, metrics
  assert metrics["eval/retrieval/text->image/R@1"] > 5 * chance, metrics
  assert 0 < metrics["eval/retrieval/image->text/R@1_ceiling"] <= 1
  rows = log_lib.read_metrics(str(tmp_path))
  assert rows[0]["train/loss"] > rows[-2]["train/loss"]   # the last row is the eval row


def _cli(workdir, *overrides, config="tests/configs/tiny.py"):
  env = dict(os.environ, CI="true", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = os.environ.get("MMJAX_TEST_CHILD_XLA_FLAGS", "")      # the CLI runs on 1 CPU device; fast to start
  return [sys.executable, "-m", "mmjax.main", f"--config={config}",
          f"--workdir={workdir}", *overrides], env


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in log_lib.read_metrics(workdir)
          if "train/loss" in r}


def test_cli_resume_after_sigkill_is_exact(tmp_path):
  steps = ["--config.total_steps=40", "--config.checkpoint_every_steps=20"]
  full = str(tmp_path / "full")
  cmd, env = _cli(full, *steps)
  subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=300, capture_output=True)
  for name in ("config.json", "metrics.jsonl", "summary.md"):
    assert os.path.exists(os.path.join(full, name)), name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(full, "tensorboard")))
  rows = log_lib.read_metrics(full)
  keys = set().union(*rows)
  for key in ("train/loss", "train/logit_scale", "train/learning_rate",
              "train/steps_per_second", "eval/retrieval/image->text/R@1",
              "eval/retrieval/text->image/R@10", "eval/retrieval/image->text/R@1_ceiling"):
    assert key in keys, key

  killed = str(tmp_path / "killed")
  cmd, env = _cli(killed, *steps)
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt20 = os.path.join(killed, "checkpoints", "20")
  deadline = time.time() + 300
  while not os.path.isdir(ckpt20) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(ckpt20), "the run ended before its step-20 checkpoint"
  resumed = subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=300,
                           capture_output=True, text=True)
  assert "resumed from step 20" in resumed.stdout + resumed.stderr
  a, b = _losses(full), _losses(killed)
  assert sorted(b) == list(range(1, 41))
  for s in range(21, 41):
    assert a[s] == b[s], (s, a[s], b[s])     # bit for bit


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  cmd, env = _cli(workdir, "--config.total_steps=100000", "--config.checkpoint_every_steps=100000",
                  "--config.eval_every_steps=100000")
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while (not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
         and time.time() < deadline):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "preempted (SIGTERM): saved step" in out
  manager = ckpt_lib.make_manager(workdir, read_only=True)
  assert manager.latest_step() is not None and manager.latest_step() > 0


def test_unknown_field_on_command_line_is_an_error(tmp_path):
  cmd, env = _cli(str(tmp_path), "--config.optimizer.lrr=0.1")
  r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "lrr" in r.stderr


def test_unknown_field_in_config_file_is_an_error():
  c = config_lib.base_config()
  with pytest.raises(AttributeError, match="learnig_rate"):
    c.optimizer.learnig_rate = 0.1
  with pytest.raises(AttributeError, match="total_step"):
    c.total_step = 10


def test_modality_the_data_does_not_produce(mesh8):
  c = tiny_config()
  c.model.encoders.audio = config_lib.encoder("vit", "mu")
  with pytest.raises(ValueError, match="produces no modality 'audio'"):
    experiment.check_config(c, mesh8)


def test_batch_not_divisible_by_devices(mesh8):
  with pytest.raises(ValueError, match="batch_size 12 is not divisible by the 8 devices"):
    experiment.check_config(tiny_config(batch_size=12), mesh8)


def test_mesh_config_errors():
  with pytest.raises(ValueError, match=r"the axes are \['data', 'fsdp', 'expert'\].*'model'"):
    mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict({"model": -1}))
  with pytest.raises(ValueError, match="config.mesh.fsdp must be a positive int or -1"):
    mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict({"data": -1, "fsdp": 0}))
  # Axis sizes whose product is not the device count.
  with pytest.raises(ValueError, match=r"\{'data': 2, 'fsdp': 3\} needs 6 devices, there are 8"):
    mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict({"data": 2, "fsdp": 3}))
  with pytest.raises(ValueError, match="needs 3 devices"):
    mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict({"data": 3}), jax.devices()[:2])


def test_incompatible_checkpoint_is_refused_and_kept(tmp_path):
  workdir = str(tmp_path)
  trainer.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every_steps=2,
                                         eval_every_steps=100), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  before = {f: os.path.getmtime(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir)}
  config_before = open(os.path.join(workdir, "config.json")).read()
  changed = tiny_config(total_steps=4)
  changed.model.embed_dim = 48
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="model.embed_dim: 32 -> 48"):
    trainer.train_and_evaluate(changed, workdir)
  after = {f: os.path.getmtime(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir)}
  assert before == after
  assert open(os.path.join(workdir, "config.json")).read() == config_before


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  trainer.train_and_evaluate(tiny_config(total_steps=4, checkpoint_every_steps=4,
                                         eval_every_steps=100), workdir)
  to_global = trainer.pipeline.to_global

  def poisoned(batch, mesh):     # every image NaN from the first step of the rerun on
    return to_global(dict(batch, image=batch["image"] * np.float32("nan")), mesh)

  monkeypatch.setattr(trainer.pipeline, "to_global", poisoned)
  with pytest.raises(trainer.NonFiniteLossError, match="at step 5.*checkpoint \\(step 4\\)"):
    trainer.train_and_evaluate(tiny_config(total_steps=10, checkpoint_every_steps=1,
                                           eval_every_steps=100), workdir)
  assert ckpt_lib.make_manager(workdir, read_only=True).latest_step() == 4


def test_config_differences_names_fields():
  a = {"model": {"embed_dim": 32, "encoders": {"image": {"width": 8}}}, "total_steps": 5}
  b = {"model": {"embed_dim": 32, "encoders": {"image": {"width": 16}}}, "total_steps": 9}
  assert ckpt_lib.config_differences(a, b) == ["model.encoders.image.width: 8 -> 16"]


def test_a_field_added_since_the_checkpoint_is_compatible_at_its_default():
  saved = {"model": {"embed_dim": 32}}
  at_default = {"model": {"embed_dim": 32, "lora": {"rank": 0}}}
  changed = {"model": {"embed_dim": 32, "lora": {"rank": 8}}}
  assert ckpt_lib.config_differences(saved, at_default) == []
  assert ckpt_lib.config_differences(saved, changed) == ["model.lora.rank: '<absent>' -> 8"]
  # Present in both and different is a difference, defaults or not.
  assert ckpt_lib.config_differences(changed, at_default) == ["model.lora.rank: 8 -> 0"]
