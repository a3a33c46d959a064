"""GRAM loss: speed and memory against the direct determinant formula.

Three functions of the same inputs (B anchors, K others, width D, unit norm),
each timed forward+backward (value and gradient w.r.t. all embeddings):

* mmjax  - `mmjax.align.gram_loss` (single device, no label smoothing).
* direct - the textbook formula: the (K+1)x(K+1) Gram matrix of every
  (anchor i, tuple j) pair, B^2 of them, `jnp.linalg.det`, sqrt, then the two
  softmax cross-entropies.
* floor  - what any GRAM implementation must do at least: the K dense
  [B, D] x [D, B] similarity products and the two [B, B] softmax
  cross-entropies (logits = sum of the K similarities), nothing else.

Memory is the compiled temporary buffer size (`memory_analysis()`).

  python benchmarks/bench_gram.py                  # B=1024 and B=4096
  python benchmarks/bench_gram.py --batch 1024 --repeats 10
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import align

LOGIT_SCALE = 10.0


def _two_way_cross_entropy(logits):
  diagonal = jnp.diagonal(logits)
  rows = jax.nn.logsumexp(logits, axis=1) - diagonal
  columns = jax.nn.logsumexp(logits, axis=0) - diagonal
  return 0.5 * (jnp.mean(rows) + jnp.mean(columns))


def mmjax_loss(anchor, others):
  embeddings = {"anchor": anchor}
  embeddings.update({f"other{k}": o for k, o in enumerate(others)})
  return align.gram_loss(embeddings, anchor="anchor", logit_scale=LOGIT_SCALE,
                         label_smoothing=0.0)[0]


def direct_loss(anchor, others):
  """B^2 explicit (K+1)x(K+1) Gram matrices and their determinants."""
  stacked = jnp.stack(others, axis=1)  # [B, K, D]
  b, k, _ = stacked.shape
  anchor_anchor = jnp.sum(anchor * anchor, axis=1)  # [B]
  anchor_other = jnp.einsum("id,jkd->ijk", anchor, stacked)  # [B, B, K]
  other_other = jnp.einsum("jkd,jld->jkl", stacked, stacked)  # [B, K, K]
  top = jnp.concatenate(
      [jnp.broadcast_to(anchor_anchor[:, None, None], (b, b, 1)),
       anchor_other], axis=2)  # [B, B, K+1]
  bottom = jnp.concatenate(
      [anchor_other[..., None],
       jnp.broadcast_to(other_other[None], (b, b, k, k))], axis=3)
  gram = jnp.concatenate([top[:, :, None, :], bottom], axis=2)  # [B,B,K+1,K+1]
  volume = jnp.sqrt(jnp.maximum(jnp.linalg.det(gram), 1e-12))
  return _two_way_cross_entropy(-LOGIT_SCALE * volume)


def floor_loss(anchor, others):
  """K dense similarity products and two softmax cross-entropies, no more."""
  logits = sum(anchor @ o.T for o in others)
  return _two_way_cross_entropy(LOGIT_SCALE * logits)


def _inputs(batch, num_others, width, seed=0):
  keys = jax.random.split(jax.random.key(seed), num_others + 1)
  shared = jax.random.normal(keys[0], (batch, width))
  vectors = [jax.random.normal(k, (batch, width)) + 2.0 * shared
             for k in keys]
  vectors = [v / jnp.linalg.norm(v, axis=1, keepdims=True) for v in vectors]
  return vectors[0], vectors[1:]


def _compile(loss, anchor, others):
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = fn.lower(anchor, others).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes


def _time_round_robin(compiled, args, repeats):
  """Median seconds per call over `repeats` rounds.

  In each round every function runs twice in a row and the second call is
  timed: the functions take turns, so they share the machine's load, yet each
  timed call finds its own buffers warm (right after the direct formula's
  large buffers are freed, the first call of another function pays page
  faults that are not its own cost).
  """
  times = {name: [] for name in compiled}
  for _ in range(repeats):
    for name, fn in compiled.items():
      jax.block_until_ready(fn(*args))
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def run(batch, num_others, width, repeats, with_direct):
  anchor, others = _inputs(batch, num_others, width)
  losses = {"mmjax": mmjax_loss, "floor": floor_loss}
  if with_direct:
    losses["direct"] = direct_loss
  compiled, memory = {}, {}
  for name, loss in losses.items():
    compiled[name], memory[name] = _compile(loss, anchor, others)
  seconds = _time_round_robin(compiled, (anchor, others), repeats)

  mib = 2.0 ** 20
  print(f"\nB={batch} K={num_others} D={width} (median of {repeats} timed "
        "calls each; value + grad)")
  for name in losses:
    print(f"  {name:7s} {seconds[name] * 1e3:9.1f} ms   "
          f"temp memory {memory[name] / mib:9.1f} MiB")
  print(f"  mmjax / floor time:        "
        f"{seconds['mmjax'] / seconds['floor']:.2f}  (target <= 2.5)")
  if with_direct:
    mmjax_value, mmjax_grads = compiled["mmjax"](anchor, others)
    direct_value, direct_grads = compiled["direct"](anchor, others)
    grad_error = max(float(jnp.max(jnp.abs(g - h))) for g, h in zip(
        jax.tree.leaves(mmjax_grads), jax.tree.leaves(direct_grads)))
    print(f"  direct / mmjax time:       "
          f"{seconds['direct'] / seconds['mmjax']:.2f}  (target >= 5)")
    print(f"  direct / mmjax memory:     "
          f"{memory['direct'] / memory['mmjax']:.2f}  (target >= K = "
          f"{num_others})")
    print(f"  loss mmjax {float(mmjax_value):.6f}, direct "
          f"{float(direct_value):.6f}; max |grad difference| {grad_error:.2e}")
  else:
    print(f"  direct formula not run at this size (--direct_max_batch)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, nargs="*", default=[1024, 4096])
  parser.add_argument("--others", type=int, default=3)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--direct_max_batch", type=int, default=4096,
                      help="largest B at which the direct formula is run (it "
                      "needs about 5.3 GiB at B=4096, K=3)")
  args = parser.parse_args()
  print(f"devices: {jax.devices()}")
  for batch in args.batch:
    run(batch, args.others, args.width, args.repeats,
        with_direct=batch <= args.direct_max_batch)


if __name__ == "__main__":
  main()
