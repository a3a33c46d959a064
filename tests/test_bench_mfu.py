"""benchmarks/bench_mfu.py: the analytic FLOP count against XLA's, and the peak table."""

import os
import sys

import jax
import pytest

from mmjax import config_lib, experiment
from mmjax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_mfu  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

BATCH, IMAGE, TEXT = 8, 64, 32


def _tiny_config():
  """One-block towers, width 64 (4 heads), bfloat16: a 64 px image in 4 px patches is
  257 tokens and a text 32, so attention and the MLPs are each a large share."""
  c = config_lib.base_config()
  c.model.embed_dim = 32
  tower = dict(width=64, depth=1, num_heads=4, dtype="bfloat16")
  c.model.encoders.image = config_lib.encoder("vit", "mu", patch_size=4, pool="cls",
                                              **tower)
  c.model.encoders.text = config_lib.encoder("text", "mu", max_len=TEXT, vocab_size=64,
                                             **tower)
  return c


def test_analytic_flops_match_xla_cost_analysis():
  """The forward pass, compiled from shapes alone (nothing is initialised or run).
  XLA counts every dot at 2 m n k, as the analytic count does, and also the elementwise
  work (LayerNorm, GELU, softmax, bias and residual adds), about a tenth of the total at
  width 64 and less at real widths; so analytic / XLA must sit just below 1: above 0.85,
  and at most 1.05 (above 1 the count would include a matmul XLA does not run). Without
  the attention term, or without the MLPs, it falls well below 0.85."""
  config = _tiny_config()
  model = experiment.build_model(config)
  batch = bench_common.b16_batch(BATCH, IMAGE, TEXT)
  params = step_lib.abstract_params(model, batch)
  compiled = jax.jit(lambda p, b: model.apply({"params": p}, b).embeddings).lower(
      params, batch).compile()
  xla = bench_mfu.xla_flops(compiled)
  flops = bench_mfu.forward_flops(config.model, BATCH, IMAGE)
  # The forward has no loss: the bench's logits term is not in this program.
  flops.pop("logits")
  analytic = bench_mfu.total(flops)
  assert 0.85 < analytic / xla <= 1.05, (analytic, xla)
  for term in ("attention", "mlp"):
    dropped = analytic - flops["image"][term] - flops["text"][term]
    assert dropped / xla < 0.8, (term, dropped / xla)


def test_counts_follow_the_variant_fields():
  """B/16 from the registry: 197 image tokens, 77 text tokens, widths 768 and 512."""
  flops = bench_mfu.forward_flops(bench_common.b16_config().model, 1, 224)
  image, text = flops["image"], flops["text"]
  assert image["embed"] == 2 * 196 * (16 * 16 * 3) * 768
  assert image["attention"] == 12 * 4 * 197 * 197 * 768
  assert image["mlp"] == 12 * 4 * 197 * 768 * 3072
  assert text["qkv_out"] == 12 * 8 * 77 * 512 * 512
  assert image["head"] == 2 * 768 * 512 and text["head"] == 2 * 512 * 512
  assert flops["logits"] == 4 * 512
  # About 35 GFLOPs for the image forward (ViT-B/16's 17.6 G multiply-adds).
  assert 34e9 < bench_mfu.total(image) < 36e9
  assert bench_mfu.train_flops_per_device(flops, 1) == 3 * bench_mfu.total(flops)


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-40GB", 312.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v5", 459.0), ("TPU v5p", 459.0)])
def test_peak_of_known_chips(kind, peak):
  value, source = bench_mfu.peak_tflops(kind)
  assert value == peak and source.startswith("table")
  assert bench_mfu.peak_tflops(kind, 100.0) == (100.0, "--peak_tflops")


def test_peak_of_unknown_devices():
  for kind in ("cpu", "NVIDIA H100 NVL", "TPU v6 lite"):
    value, source = bench_mfu.peak_tflops(kind)
    assert value is None and source == f"no peak known for {kind}"
    assert bench_mfu.peak_tflops(kind, 123.0) == (123.0, "--peak_tflops")
