"""ICYM2I in the robustness evaluator: the IPW estimate against a direct computation
with known propensities, the missingness model's propensities against the masks it
draws, naive / IPW / true on the world where the truth is known, and the error without
a missingness model."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import experiment
from mmjax.data import missing as missing_lib
from mmjax.evals import evaluators as evaluators_lib
from mmjax.evals.evaluators import robustness


def test_ipw_estimate_against_a_direct_computation():
  values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.5])
  observed = np.array([1, 1, 0, 1, 0, 1], bool)
  p = np.array([0.5, 0.25, 0.9, 0.8, 0.1, 1.0])
  w = 1 / p[observed]
  direct = np.sum(w * values[observed]) / np.sum(w)   # (2 + 0 + 1.25 + 0.5) / (2 + 4 + 1.25 + 1)
  assert robustness.ipw_estimate(values, observed, p) == pytest.approx(direct, rel=1e-12)
  assert robustness.ipw_estimate(values, observed, p) == pytest.approx(3.75 / 8.25)
  with pytest.raises(ValueError, match="propensity 0"):
    robustness.ipw_estimate(values, observed, np.where(observed, 0.0, 1.0))


def test_propensities_are_the_frequencies_of_the_drawn_masks():
  mi = missing_lib.Missingness(("audio", "image"), kind="mnar", mnar_on="size",
                               mnar_rates={"audio": (0.9, 0.5, 0.0), "image": (0.8, 0.0, 0.0)})
  n = 6000
  example = {"label": 0, "factors": np.array([0, 0, 0, 0], np.int32)}     # size small
  drawn = np.array([[mi.present(i, example)[m] for m in ("audio", "image")]
                    for i in range(n)])
  p = mi.propensity(example)
  # Both removed with probability 0.72; then one comes back, each with probability 1/2.
  assert p == pytest.approx({"audio": 0.1 + 0.36, "image": 0.2 + 0.36})
  np.testing.assert_allclose(drawn.mean(0), [p["audio"], p["image"]], atol=0.02)
  combos = missing_lib.Missingness(("a", "b"), kind="combination",
                                   combinations=(("a",), ("a", "b")), weights=(3, 1))
  assert combos.propensity({}) == {"a": 1.0, "b": 0.25}


class _Oracle:
  """A fake model: with audio present it is right exactly when the size is not small;
  with image only, right when the shape is a circle; otherwise it predicts class 0."""

  def __call__(self, batch):
    label, factors, mask = batch["label"], batch["factors"], batch["mask"]
    right = jnp.where(mask["audio"], factors[:, 2] > 0,
                      jnp.where(mask["image"], factors[:, 0] == 0, label == 0))
    guess = jnp.where(right, label, (label + 1) % 15)
    logits = 5.0 * jax.nn.one_hot(guess, 15)
    return types.SimpleNamespace(logits=logits, logit_scale=jnp.float32(1.0))


def _config(missing):
  c = config_lib.base_config()
  c.data.modalities = ("audio", "image")
  c.data.label = ml_collections.ConfigDict({"factors": ("shape", "size"), "mode": "product",
                                            "num_classes": 0})
  c.data.sizes = ml_collections.ConfigDict({"train": 8, "validation": 8, "test": 384})
  c.data.audio_samples = 256
  c.data.image_size = 16
  c.data.missing = missing
  c.model.encoders = ml_collections.ConfigDict({"audio": config_lib.encoder("audio", "mu"),
                                                "image": config_lib.encoder("vit", "mu")})
  return c


def test_icym2i_naive_ipw_and_true_where_the_truth_is_known(mesh8, tmp_path):
  # Audio is mostly missing for small shapes, exactly where the model given audio is
  # wrong: the naive estimate of its accuracy is too high; IPW corrects it.
  missing = config_lib.missing_config("mnar", modalities=("audio", "image"), mnar_on="size",
                                       mnar_rates={"audio": (0.9, 0.2, 0.0), "image": ()})
  config = _config(missing)
  ctx = experiment.eval_context(config, workdir=str(tmp_path), mesh=mesh8,
                                predict=_Oracle(), featurize=experiment.make_featurize(config),
                                step=1)
  ctx = evaluators_lib.dataclasses.replace(ctx, name="robustness")
  metrics = robustness.evaluate_icym2i(ctx, split="test", batch_size=64)
  factors = np.stack([ctx.source("test")[i]["factors"] for i in range(384)])
  true = np.mean(factors[:, 2] > 0)                          # about 2/3
  assert metrics["icym2i/audio/accuracy/true"] == pytest.approx(true)
  assert metrics["icym2i/audio/accuracy/naive"] > true + 0.15
  naive_error = metrics["icym2i/audio/accuracy/naive"] - true
  assert abs(metrics["icym2i/audio/accuracy/ipw"] - true) < 0.4 * naive_error
  assert metrics["icym2i/image/accuracy/true"] == pytest.approx(np.mean(factors[:, 0] == 0))
  # Image is never missing: its three estimates agree.
  assert metrics["icym2i/image/observed"] == 1.0
  assert metrics["icym2i/image/accuracy/naive"] == metrics["icym2i/image/accuracy/ipw"]
  # Information gain of audio over image alone: log p(y | both) - log p(y | image).
  assert np.isfinite(metrics["icym2i/audio/info_gain/ipw"])
  table = robustness.icym2i_table(metrics, ("audio", "image"))
  assert "| audio | accuracy |" in table


def test_icym2i_without_a_missingness_model_says_what_it_needs(mesh8, tmp_path):
  config = _config(config_lib.missing_config("none", modalities=("audio", "image")))
  ctx = experiment.eval_context(config, workdir=str(tmp_path), mesh=mesh8,
                                predict=_Oracle(), featurize=experiment.make_featurize(config),
                                step=1)
  with pytest.raises(ValueError, match="needs a model of the missingness: set data.missing"):
    robustness.evaluate_icym2i(ctx, split="test", batch_size=64)
