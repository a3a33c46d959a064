"""Plots are written as valid PNGs of the expected size; bad input is refused."""

import json

import matplotlib.image
import numpy as np
import pytest

from mmjax.evals import calibration
from mmjax.evals import plots
from mmjax.evals import retrieval

DPI = plots._DPI


def _read_png(path, figsize):
  """Reads back a PNG and checks its size is figsize * dpi and it is not blank."""
  image = matplotlib.image.imread(path)
  width, height = figsize
  rows, cols, channels = image.shape
  assert channels == 4
  # Within a pixel: the renderer truncates fractional sizes.
  assert abs(rows - height * DPI) < 1 and abs(cols - width * DPI) < 1
  assert image[..., :3].std() > 0.01  # Something was drawn.
  return image


def test_recall_at_k_plot(tmp_path):
  ranks = np.array([1, 1, 2, 5, 9, 3, 1, 20])
  curves = {"image->text": retrieval.recall_at_k_curve(ranks, 10),
            "text->image": retrieval.recall_at_k_curve(ranks + 1, 10)}
  path = plots.plot_recall_at_k(curves, tmp_path / "plots" / "recall.png")
  assert path == str(tmp_path / "plots" / "recall.png")
  _read_png(path, (5.5, 4))
  single = plots.plot_recall_at_k(curves["image->text"], tmp_path / "one.png",
                                  log_k=True)
  _read_png(single, (5.5, 4))


def test_reliability_diagram_plot(tmp_path):
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(3), size=200)
  diagram = calibration.reliability_diagram(probs, rng.integers(0, 3, 200), 10)
  path = plots.plot_reliability_diagram(diagram, tmp_path / "rel.png")
  _read_png(path, (5, 5.5))


def test_embedding_pca_plot_and_projection(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(30, 5))
  path = plots.plot_embedding_pca(
      {"image": x, "text": x + 0.2 * rng.normal(size=x.shape) + 1.0,
       "audio": rng.normal(size=(12, 5))},
      tmp_path / "pca.png", connect_pairs=10, max_points_per_modality=20)
  _read_png(path, (5.5, 5))
  # The projection is onto the top principal axes: the variance along PC1
  # matches the largest eigenvalue of the covariance.
  coords, ratio = plots.pca_2d(x)
  eig = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
  np.testing.assert_allclose(coords.var(axis=0), eig[:2], rtol=1e-8)
  np.testing.assert_allclose(ratio, eig[:2] / eig.sum(), rtol=1e-8)


def _write_metrics(path):
  with open(path, "w") as f:
    for step in range(0, 50, 5):
      f.write(json.dumps({
          "step": step, "train/loss": 3.0 / (1 + step),
          "train/learning_rate": 1e-3 * min(1.0, step / 10),
          "train/logit_scale": 10.0 + step / 5, "note": "text is not a series",
          "train/finite": True}) + "\n")
      if step % 10 == 0:
        f.write(json.dumps({
            "step": step, "eval/retrieval/image->text/R@1": step / 50,
            "eval/retrieval/text->image/R@1": step / 60,
            "eval/retrieval/image->text/median_rank": 50 - step}) + "\n")
    f.write("\n")


def test_read_metrics_jsonl(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write_metrics(path)
  series = plots.read_metrics_jsonl(path)
  assert set(series) == {
      "train/loss", "train/learning_rate", "train/logit_scale",
      "eval/retrieval/image->text/R@1", "eval/retrieval/text->image/R@1",
      "eval/retrieval/image->text/median_rank"}
  steps, values = series["train/loss"]
  np.testing.assert_array_equal(steps, np.arange(0, 50, 5))
  np.testing.assert_allclose(values, 3.0 / (1 + steps))
  steps, values = series["eval/retrieval/text->image/R@1"]
  np.testing.assert_array_equal(steps, [0, 10, 20, 30, 40])
  panels = plots.default_training_panels(list(series))
  assert list(panels) == ["loss", "learning rate", "logit scale",
                          "retrieval R@1", "retrieval median_rank"]
  assert panels["retrieval R@1"] == ["eval/retrieval/image->text/R@1",
                                     "eval/retrieval/text->image/R@1"]


def test_training_curves_plot(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  _write_metrics(metrics)
  path = plots.plot_training_curves(metrics, tmp_path / "curves.png")
  # 5 panels, 3 per row -> 2 rows.
  _read_png(path, (4.2 * 3, 3.2 * 2 + 0.4))
  chosen = plots.plot_training_curves(
      metrics, tmp_path / "loss.png", panels={"loss": ["train/loss"]})
  _read_png(chosen, (4.2, 3.2 + 0.4))


def test_heatmap_plot(tmp_path):
  matrix = np.arange(12, dtype=float).reshape(3, 4) / 11
  matrix[1, 2] = np.nan  # e.g. a combination that was not evaluated
  path = plots.plot_heatmap(matrix, ["none", "image", "text"],
                            ["a", "b", "c", "d"], tmp_path / "heat.png",
                            "accuracy by missing modality")
  _read_png(path, (2 + 0.7 * 4, 1.5 + 0.45 * 3))


def test_plots_bad_input(tmp_path):
  with pytest.raises(ValueError, match="path.*'.png'"):
    plots.plot_recall_at_k(np.array([0.5, 1.0]), tmp_path / "r.jpg")
  with pytest.raises(ValueError, match="outside"):
    plots.plot_recall_at_k(np.array([0.5, 1.5]), tmp_path / "r.png")
  with pytest.raises(ValueError, match="lacks keys"):
    plots.plot_reliability_diagram({"ece": 0.1}, tmp_path / "d.png")
  with pytest.raises(ValueError, match="different widths"):
    plots.plot_embedding_pca({"a": np.ones((3, 4)), "b": np.ones((3, 5))},
                             tmp_path / "p.png")
  with pytest.raises(ValueError, match="row_labels"):
    plots.plot_heatmap(np.ones((2, 3)), ["a"], ["x", "y", "z"],
                       tmp_path / "h.png")
  with pytest.raises(ValueError, match="col_labels"):
    plots.plot_heatmap(np.ones((2, 3)), ["a", "b"], ["x"], tmp_path / "h.png")
  with pytest.raises(ValueError, match=r"rank 2|\[R, C\]"):
    plots.plot_heatmap(np.ones(3), ["a"], ["x"], tmp_path / "h.png")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"step": 0, "train/loss": 1.0}\n{"train/loss": 2.0}\n')
  with pytest.raises(ValueError, match="line 2.*'step'"):
    plots.read_metrics_jsonl(bad)
  bad.write_text('{"step": 0, "train/loss": 1.0}\nnot json\n')
  with pytest.raises(ValueError, match="line 2.*not JSON"):
    plots.read_metrics_jsonl(bad)
  good = tmp_path / "good.jsonl"
  _write_metrics(good)
  with pytest.raises(ValueError, match="train/accuracy"):
    plots.plot_training_curves(good, tmp_path / "c.png",
                               panels={"acc": ["train/accuracy"]})
  assert not list(tmp_path.glob("*.png"))  # Nothing written on bad input.
