"""`--mode=eval` end to end on a tiny trained workdir: metrics equal the training run's
final evaluation, plots are valid PNGs, checkpoints and the run's files are untouched;
and each bad input (no checkpoints, a step not saved, an unknown evaluator) is named."""

import hashlib
import json
import os
import subprocess
import sys

import matplotlib.image
import pytest

from mmjax import config_lib
from mmjax.train import eval_mode
from mmjax.evals import evaluators as ev
from mmjax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "configs", "tiny.py")


def _config():
  """tests/configs/tiny.py, 4 steps, checkpoints at 2 and 4, every evaluator."""
  c = config_lib.load_config(TINY)
  c.total_steps = 4
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 4
  c.log_every_steps = 2
  c.data.sizes.validation = 16
  c.data.sizes.test = 24
  c.evals.zero_shot = config_lib.evaluator_config("zero_shot", every=0, batch_size=16)
  c.evals.linear_probe = config_lib.evaluator_config("linear_probe", every=0, batch_size=16,
                                             train_examples=32, l2_grid=(1e-2,), steps=50)
  c.evals.knn = config_lib.evaluator_config("knn", every=0, batch_size=16, train_examples=32, k=5)
  c.evals.calibration = config_lib.evaluator_config("calibration", every=0, batch_size=16)
  c.evals.geometry = config_lib.evaluator_config("geometry", every=0, batch_size=16, k=5)
  return c


PLOTS = ("retrieval_recall_at_k.png", "calibration_reliability.png", "geometry_pca.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  config = _config()
  metrics = trainer.train_and_evaluate(config, workdir)
  return config, workdir, metrics


def _snapshot(folder):
  """relative path -> (size, mtime_ns, sha256) of every file; folders too."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), folder) + "/"] = None
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
      st = os.stat(path)
      out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def _valid_png(path):
  image = matplotlib.image.imread(path)      # raises on a file that is not a PNG
  assert image.ndim == 3 and min(image.shape[:2]) > 100, image.shape
  assert image[..., :3].std() > 0.01         # something was drawn


def test_training_run_writes_every_evaluator_plots_and_summary(trained):
  _, workdir, metrics = trained
  for key in ("eval/retrieval/image->text/R@1", "eval/zero_shot/accuracy",
              "eval/zero_shot/per_class/circle", "eval/linear_probe/image/accuracy",
              "eval/knn/text/accuracy", "eval/calibration/ece",
              "eval/geometry/image-text/modality_gap", "eval/geometry/text/uniformity"):
    assert key in metrics, key
  for name in PLOTS + ("training_curves.png",):
    _valid_png(os.path.join(workdir, "plots", name))
  summary = open(os.path.join(workdir, "summary.md")).read()
  for section in ("# tiny", "- mode: train, steps: 4", "## Training (step 4)",
                  "## Evaluation: retrieval", "## Evaluation: zero_shot",
                  "## Evaluation: geometry", "## Plots", "(plots/geometry_pca.png)"):
    assert section in summary, section


def test_eval_mode_end_to_end_leaves_the_workdir_untouched(trained):
  config, workdir, train_metrics = trained
  before = _snapshot(workdir)
  metrics = eval_mode.evaluate_workdir(config, workdir)      # the latest step: 4
  after = _snapshot(workdir)
  new = {k for k in after if k not in before}
  # Only the eval folder is new; nothing else (checkpoints included) changed by a byte.
  assert new and all(k.startswith("eval/") for k in new), new
  assert {k: v for k, v in after.items() if k not in new} == before
  # The same params on the same data: the training run's final evaluation, exactly.
  assert set(metrics) == {k for k in train_metrics if k.startswith("eval/")}
  for k, v in metrics.items():
    assert v == pytest.approx(train_metrics[k], abs=1e-6), k
  out = eval_mode.output_dir(workdir, 4)
  assert out == os.path.join(workdir, "eval", "step_4")
  rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  assert len(rows) == 1 and rows[0] == {"step": 4, **metrics}
  for name in PLOTS:
    _valid_png(os.path.join(out, "plots", name))
  summary = open(os.path.join(out, "summary.md")).read()
  assert "- mode: eval of the checkpoint at step 4 (of 4)" in summary
  assert "## Evaluation: linear_probe" in summary


def test_eval_mode_checkpoint_step_and_evals_subset(trained):
  config, workdir, _ = trained
  ckpt = os.path.join(workdir, "checkpoints")
  before = _snapshot(ckpt)
  metrics = eval_mode.evaluate_workdir(config, workdir, checkpoint_step=2,
                                       evals=["retrieval"])
  assert metrics and all(k.startswith("eval/retrieval/") for k in metrics)
  out = eval_mode.output_dir(workdir, 2)
  assert json.loads(open(os.path.join(out, "metrics.jsonl")).read())["step"] == 2
  assert sorted(os.listdir(os.path.join(out, "plots"))) == ["retrieval_recall_at_k.png"]
  assert _snapshot(ckpt) == before


def test_eval_mode_bad_input(trained, tmp_path):
  config, workdir, _ = trained
  with pytest.raises(ValueError, match=r"has no checkpoints .*train it first"):
    eval_mode.evaluate_workdir(config, str(tmp_path))
  assert os.listdir(tmp_path) == []           # and created nothing there
  with pytest.raises(ValueError, match=r"--checkpoint_step=3: .* no checkpoint at that "
                                       r"step; saved steps: \[2, 4\]"):
    eval_mode.evaluate_workdir(config, workdir, checkpoint_step=3)
  with pytest.raises(ValueError, match=r"--evals: no evaluator named \['zero_shto'\]"):
    eval_mode.evaluate_workdir(config, workdir, evals=["retrieval", "zero_shto"])
  bad = _config()
  bad.evals.geometry.split = "dev"
  with pytest.raises(ValueError, match=r"geometry.split: .* no split 'dev'"):
    eval_mode.evaluate_workdir(bad, workdir, evals=["geometry"])
  bad = _config()
  bad.evals.zero_shot.modality = "audio"
  with pytest.raises(ValueError, match=r"zero_shot.modality: the model produces no 'audio'"):
    eval_mode.evaluate_workdir(bad, workdir)


def test_cli_eval_mode_names_the_saved_steps(trained):
  _, workdir, _ = trained
  env = dict(os.environ, CI="true")
  env["XLA_FLAGS"] = os.environ.get("MMJAX_TEST_CHILD_XLA_FLAGS", "")
  r = subprocess.run([sys.executable, "-m", "mmjax.main", f"--config={TINY}",
                      f"--workdir={workdir}", "--mode=eval", "--checkpoint_step=3",
                      "--evals=retrieval"],
                     env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert "saved steps: [2, 4]" in r.stderr, r.stderr[-2000:]
