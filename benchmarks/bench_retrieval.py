"""Retrieval on N x N embeddings: time and peak memory against brute-force NumPy.

Each measurement runs in a fresh subprocess so that its peak resident set size
(`resource.getrusage(...).ru_maxrss`) belongs to that computation alone. The
baseline is the peak RSS after importing jax and mmjax.evals and starting the
JAX backend; the reported memory is peak minus baseline (the embeddings
themselves, 2 * N * D * 4 bytes, are part of it).

  mmjax: `mmjax.evals.retrieval_metrics`, exact, in query blocks.
  numpy: the whole [N, N] float32 cosine matrix at once, then the ranks.

Both must give the same ranks. Separately, on the first `--subset` pairs the
mmjax metrics are checked against a float64 brute-force NumPy computation.

Usage:
  python benchmarks/bench_retrieval.py [--n 10000] [--dim 512] [--devices 1]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


def make_pairs(n, dim, noise, seed):
  """Queries and noisy targets [n, dim] float32; row i of both is one pair."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  queries = rng.standard_normal((n, dim), dtype=np.float32)
  targets = queries + noise * rng.standard_normal((n, dim), dtype=np.float32)
  return queries, targets


def brute_force_ranks(queries, targets, dtype):
  """Pessimistic 1-based ranks from the full [N, N] cosine matrix."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  q = queries.astype(dtype)
  t = targets.astype(dtype)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  scores = q @ t.T
  return np.sum(scores >= np.diag(scores)[:, None], axis=1)


def _peak_mib():
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB.


def child(args):
  """One measurement in this fresh process; prints a JSON line."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmjax.evals import retrieval  # pylint: disable=g-import-not-at-top
  jax.devices()  # Start the backend inside the baseline.
  baseline = _peak_mib()
  queries, targets = make_pairs(args.n, args.dim, args.noise, args.seed)
  with_data = _peak_mib()
  out = {"baseline_mib": baseline, "data_mib": with_data - baseline}
  if args.child == "mmjax":
    mesh = None
    if args.devices > 1:
      mesh = jax.make_mesh((args.devices,), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))
    start = time.perf_counter()
    ranks = retrieval.retrieval_ranks(queries, targets, mesh=mesh,
                                      block_size=args.block_size)
    out["first_call_s"] = time.perf_counter() - start  # includes compilation
    start = time.perf_counter()
    ranks = retrieval.retrieval_ranks(queries, targets, mesh=mesh,
                                      block_size=args.block_size)
    out["second_call_s"] = time.perf_counter() - start
  else:
    start = time.perf_counter()
    ranks = brute_force_ranks(queries, targets, np.float32)
    out["first_call_s"] = time.perf_counter() - start
  out["peak_mib"] = _peak_mib()
  out["peak_minus_baseline_mib"] = out["peak_mib"] - baseline
  np.save(args.ranks_out, ranks)
  print(json.dumps(out))


def run_child(kind, args, ranks_path):
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  if args.devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count="
                        f"{args.devices}").strip()
  command = [sys.executable, os.path.abspath(__file__), "--child", kind,
             "--ranks_out", ranks_path] + [
                 f"--{k}={getattr(args, k)}"
                 for k in ("n", "dim", "noise", "seed", "block_size",
                           "devices")]
  done = subprocess.run(command, env=env, capture_output=True, text=True,
                        check=False)
  if done.returncode != 0:
    sys.exit(f"{kind} run failed:\n{done.stderr}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=10_000)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--noise", type=float, default=6.0,
                      help="target = query + noise * N(0, 1); 6 gives R@1 "
                           "near 0.5 at N=10k, D=512")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--block_size", type=int, default=1024)
  parser.add_argument("--devices", type=int, default=1,
                      help="> 1: shard query blocks over this many simulated "
                           "CPU devices")
  parser.add_argument("--subset", type=int, default=2000)
  parser.add_argument("--child", choices=("mmjax", "numpy"))
  parser.add_argument("--ranks_out")
  args = parser.parse_args()
  if args.child:
    child(args)
    return

  import numpy as np  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    results, ranks = {}, {}
    for kind in ("mmjax", "numpy"):
      path = os.path.join(tmp, f"{kind}.npy")
      results[kind] = run_child(kind, args, path)
      ranks[kind] = np.load(path)

  from mmjax.evals import retrieval  # pylint: disable=g-import-not-at-top
  queries, targets = make_pairs(args.n, args.dim, args.noise, args.seed)
  sub_q, sub_t = queries[:args.subset], targets[:args.subset]
  sub_mmjax = retrieval.retrieval_metrics(sub_q, sub_t,
                                          block_size=args.block_size)
  sub_reference = retrieval.metrics_from_ranks(
      brute_force_ranks(sub_q, sub_t, np.float64))

  mm, ref = results["mmjax"], results["numpy"]
  print(f"retrieval N={args.n} D={args.dim} block_size={args.block_size} "
        f"devices={args.devices}")
  print(f"  baseline RSS (jax + mmjax imported, backend up): "
        f"{mm['baseline_mib']:.0f} MiB; embeddings: {mm['data_mib']:.0f} MiB")
  print(f"  {'':8s}{'first call s':>14s}{'second call s':>15s}"
        f"{'peak RSS MiB':>14s}{'peak - baseline MiB':>21s}")
  for kind in ("mmjax", "numpy"):
    r = results[kind]
    second = r.get("second_call_s")
    second = f"{second:15.2f}" if second is not None else f"{'-':>15s}"
    print(f"  {kind:8s}{r['first_call_s']:14.2f}{second}{r['peak_mib']:14.0f}"
          f"{r['peak_minus_baseline_mib']:21.0f}")
  print(f"  time ratio mmjax/numpy (first call): "
        f"{mm['first_call_s'] / ref['first_call_s']:.2f}; memory ratio "
        f"(peak - baseline): {mm['peak_minus_baseline_mib'] / ref['peak_minus_baseline_mib']:.2f}")
  full = retrieval.metrics_from_ranks(ranks["mmjax"])
  print(f"  metrics: {json.dumps({k: round(v, 4) for k, v in full.items()})}")
  print(f"  full set: ranks differing from numpy float32 brute force: "
        f"{int(np.sum(ranks['mmjax'] != ranks['numpy']))} of {args.n}")
  same = sub_mmjax == sub_reference
  print(f"  subset of {args.subset}: mmjax == numpy float64 brute force: "
        f"{same} {json.dumps({k: round(v, 4) for k, v in sub_mmjax.items()})}")
  if not same:
    sys.exit("subset metrics differ from the brute-force reference")


if __name__ == "__main__":
  main()
