"""Exact cross-modal retrieval metrics, computed in query blocks.

Query `i` is matched with target `i` (several relevant targets per query, by
group: `mmjax.evals.grouped_retrieval`, on the same block program). Every query
is scored against every target, but never more than one `[block_size, N]` block
of scores exists at a time (per device), so 10k x 10k retrieval fits in a few
hundred MiB. With a `mesh`, the query blocks are spread over the devices of its
'data' axis and the targets are replicated; the ranks are bit-identical to
`mesh=None` because every device runs the same block program on blocks of the
same shape.

Tie rule (pessimistic): the rank of the match is the number of targets whose
score is greater than or equal to the match's score, the match included.
Equivalently `1 + #{j != i : s_ij >= s_ii}`. A query whose scores are all
equal therefore gets rank N, never a lucky rank 1. The rule needs no index
order, so it does not depend on how the queries are split over devices.

Scores are cosine similarities by default (`normalize=True` divides each row
by its L2 norm before the dot product).
"""

import functools
from typing import Callable, Dict, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# score_fn(query_block [b, D], target_tuples: list of K [N, D]) -> [b, N].
JointScoreFn = Callable[[jax.Array, Sequence[jax.Array]], jax.Array]

DATA_AXIS = "data"


# --------------------------------------------------------------------------
# Input checks shared by the evals modules.
# --------------------------------------------------------------------------


def as_float_matrix(x, name: str, where: str) -> np.ndarray:
  """Returns `x` as a finite float numpy array of rank 2, else ValueError."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(
        f"{where}: `{name}` must have rank 2 [N, D], got shape {x.shape}.")
  if x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{where}: `{name}` must be non-empty, got shape {x.shape}.")
  if not (np.issubdtype(x.dtype, np.floating) or
          np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{where}: `{name}` must be numeric, got dtype {x.dtype}.")
  if x.dtype == np.float64:
    out = x
  else:
    out = x.astype(np.float32, copy=False)
  if not np.all(np.isfinite(out)):
    raise ValueError(f"{where}: `{name}` contains NaN or Inf.")
  return out


def check_same_shape(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str,
                     where: str) -> None:
  """ValueError unless `x` and `y` have the same [N, D]; names the dimension."""
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f"{where}: `{y_name}` has N={y.shape[0]} rows but `{x_name}` has "
        f"N={x.shape[0]}; row i of both must be the same sample.")
  if x.shape[1] != y.shape[1]:
    raise ValueError(
        f"{where}: `{y_name}` has D={y.shape[1]} but `{x_name}` has "
        f"D={x.shape[1]}; both must live in the same embedding space.")


def as_labels(labels, n: int, num_classes: Optional[int], name: str,
              where: str) -> np.ndarray:
  """Returns `labels` as int64 [n] in [0, num_classes), else ValueError."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(
        f"{where}: `{name}` must have rank 1 [N], got shape {labels.shape}.")
  if labels.shape[0] != n:
    raise ValueError(
        f"{where}: `{name}` has {labels.shape[0]} entries, expected N={n}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"{where}: `{name}` must be integer class ids, got dtype {labels.dtype}.")
  labels = labels.astype(np.int64)
  if n and labels.min() < 0:
    raise ValueError(
        f"{where}: `{name}` has a negative class id {labels.min()}.")
  if num_classes is not None and n and labels.max() >= num_classes:
    raise ValueError(
        f"{where}: `{name}` has class id {labels.max()} out of range for "
        f"{num_classes} classes.")
  return labels


def l2_normalize_rows(x: np.ndarray, name: str, where: str) -> np.ndarray:
  """Divides each row by its L2 norm; a zero row is a ValueError."""
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  if np.any(norms == 0):
    row = int(np.flatnonzero(norms[..., 0] == 0)[0])
    raise ValueError(
        f"{where}: row {row} of `{name}` is all zeros and has no direction.")
  return x / norms


# --------------------------------------------------------------------------
# Blocked ranks.
# --------------------------------------------------------------------------


def block_scores(query_block, target_tuples, score_fn):
  """float32 [b, N] scores of one query block; an error for a score function of the
  wrong shape."""
  scores = score_fn(query_block, target_tuples)
  expected = (query_block.shape[0], target_tuples[0].shape[0])
  if scores.shape != expected:
    raise ValueError(
        f"score function returned shape {scores.shape} for a query block of "
        f"{query_block.shape[0]} against {expected[1]} targets; expected "
        f"[b, N] = {list(expected)}.")
  return scores.astype(jnp.float32)


def _block_ranks(query_block, query_groups, target_groups, target_tuples, score_fn,
                 ks):
  """Ranks of the first relevant target of one query block (relevant: the target's
  group is the query's; 1:1 retrieval: group i is query i and target i).

  Returns:
    {'rank': [b] int32}: 1 + #{irrelevant j : s_j >= the best relevant score}, the
    pessimistic position of the first relevant target; -1 for a query with a NaN
    score, 0 for one without a relevant target.
  """
  del ks
  scores = block_scores(query_block, target_tuples, score_fn)
  relevant = query_groups[:, None] == target_groups[None, :]
  best = jnp.max(jnp.where(relevant, scores, -jnp.inf), axis=1, keepdims=True)
  ranks = 1 + jnp.sum((scores >= best) & ~relevant, axis=1, dtype=jnp.int32)
  ranks = jnp.where(jnp.any(relevant, axis=1), ranks, 0)
  return {"rank": jnp.where(jnp.any(jnp.isnan(scores), axis=1), -1, ranks)}


def _blocks_ranks(query_blocks, group_blocks, target_groups, target_tuples, score_fn,
                  block_fn, ks):
  """lax.map of `block_fn` over [nb, b, D] query blocks -> {key: [nb, b, ...]}.

  A block made only of padding (group -1) is skipped: its outputs are 0.
  """
  def one_block(qg):
    query_block, groups = qg
    run = lambda: block_fn(query_block, groups, target_groups, target_tuples, score_fn,
                           ks)
    # zeros_like of the (device-varying) groups: the branches' types must agree.
    skip = lambda: jax.tree.map(lambda s: jnp.broadcast_to(
        jnp.zeros_like(groups[0], dtype=s.dtype), s.shape), jax.eval_shape(run))
    return jax.lax.cond(groups[0] >= 0, run, skip)
  return jax.lax.map(one_block, (query_blocks, group_blocks))


@functools.partial(jax.jit, static_argnames=("score_fn", "mesh", "block_fn", "ks"))
def _ranks_program(query_blocks, group_blocks, target_groups, target_tuples, *,
                   score_fn, mesh, block_fn, ks):
  run = functools.partial(_blocks_ranks, score_fn=score_fn, block_fn=block_fn, ks=ks)
  if mesh is None:
    return run(query_blocks, group_blocks, target_groups, target_tuples)
  per_device = jax.shard_map(run, mesh=mesh,
                             in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P()),
                             out_specs=P(DATA_AXIS))
  return per_device(query_blocks, group_blocks, target_groups, target_tuples)


def _sum_cosine_score(query_block, target_tuples):
  # sum_k <q, t_k> = <q, sum_k t_k>: one matmul whatever K is.
  summed = target_tuples[0]
  for t in target_tuples[1:]:
    summed = summed + t
  return jnp.matmul(query_block, summed.T, precision=jax.lax.Precision.HIGHEST)


def _check_mesh(mesh, where):
  if mesh is None:
    return 1
  if DATA_AXIS not in mesh.axis_names or len(mesh.axis_names) != 1:
    raise ValueError(
        f"{where}: `mesh` must be 1-D with axis '{DATA_AXIS}', got axes "
        f"{mesh.axis_names}.")
  return mesh.shape[DATA_AXIS]


def _blocked_ranks(queries: np.ndarray, target_tuples: Sequence[np.ndarray],
                   score_fn: JointScoreFn, mesh, block_size: int,
                   where: str, groups=None, block_fn=_block_ranks, ks=None):
  """Pads queries into equal blocks, runs `block_fn` over them: {key: [N, ...]} host
  arrays ('rank' at least). `groups`: (query groups [N], target groups [M]), ints >= 0;
  None: query i's match is target i."""
  if isinstance(block_size, bool) or not isinstance(block_size, int) or (
      block_size < 1):
    raise ValueError(f"{where}: `block_size` must be a positive int, got "
                     f"{block_size!r}.")
  num_devices = _check_mesh(mesh, where)
  n, d = queries.shape
  query_groups, target_groups = groups if groups is not None else (
      np.arange(n), np.arange(target_tuples[0].shape[0]))
  # The block shape must not depend on the mesh, so that every device runs
  # exactly the program mesh=None runs; only the number of blocks is padded
  # (to a multiple of the device count), and padding blocks are skipped.
  block = min(block_size, n)
  num_blocks = -(-n // block)
  num_blocks = -(-num_blocks // num_devices) * num_devices
  padded = num_blocks * block
  query_blocks = np.zeros((padded, d), np.float32)
  query_blocks[:n] = queries
  # Padding rows are in group -1; they sit at the end, so a block is all
  # padding exactly when its first row is.
  group_blocks = np.full((padded,), -1, np.int32)
  group_blocks[:n] = query_groups
  query_blocks = query_blocks.reshape(num_blocks, block, d)
  group_blocks = group_blocks.reshape(num_blocks, block)
  target_groups = np.asarray(target_groups, np.int32)
  targets = [np.asarray(t, np.float32) for t in target_tuples]
  if mesh is not None:
    query_blocks = jax.device_put(query_blocks,
                                  NamedSharding(mesh, P(DATA_AXIS)))
    group_blocks = jax.device_put(group_blocks, NamedSharding(mesh, P(DATA_AXIS)))
    target_groups, targets = jax.device_put((target_groups, targets),
                                            NamedSharding(mesh, P()))
  out = _ranks_program(query_blocks, group_blocks, target_groups, targets,
                       score_fn=score_fn, mesh=mesh, block_fn=block_fn, ks=ks)
  if not out["rank"].is_fully_addressable:   # several processes: each holds its blocks
    out = multihost_utils.process_allgather(out, tiled=True)
  out = {k: np.asarray(v).reshape(padded, *v.shape[2:])[:n] for k, v in out.items()}
  ranks = out["rank"] = out["rank"].astype(np.int64)
  for bad, why in ((ranks < 0, "the score function gave NaN scores for"),
                   (ranks == 0, "no target is relevant to")):
    if np.any(bad):
      query = int(np.flatnonzero(bad)[0])
      raise ValueError(
          f"{where}: {why} query {query} (and {int(np.sum(bad)) - 1} others); "
          "ranks are undefined.")
  return out


def retrieval_ranks(queries, targets, *, normalize: bool = True, mesh=None,
                    block_size: int = 1024) -> np.ndarray:
  """1-based rank of target i among all targets for query i.

  Args:
    queries: [N, D] query embeddings.
    targets: [N, D] target embeddings; row i is the match of query i.
    normalize: score by cosine similarity (rows L2-normalised) if True, by
      the raw dot product if False.
    mesh: None, or a 1-D mesh with axis 'data' over which query blocks are
      sharded. The result is identical to mesh=None.
    block_size: queries scored at once per device; memory is about
      4 * block_size * N bytes per device. With a mesh, the ceil(N /
      block_size) blocks are padded to a multiple of the device count, so a
      block_size with ceil(N / block_size) a multiple of it balances best.

  Returns:
    int64 numpy array [N]; rank = #{j : s_ij >= s_ii} (pessimistic ties).
  """
  where = "retrieval_ranks"
  queries = as_float_matrix(queries, "queries", where)
  targets = as_float_matrix(targets, "targets", where)
  check_same_shape(queries, targets, "queries", "targets", where)
  if normalize:
    queries = l2_normalize_rows(queries, "queries", where)
    targets = l2_normalize_rows(targets, "targets", where)
  return _blocked_ranks(queries, [targets], _sum_cosine_score, mesh,
                        block_size, where)["rank"]


def _check_ks(ks, n, where):
  if isinstance(ks, (int, np.integer)):
    ks = (ks,)
  ks = tuple(ks)
  if not ks:
    raise ValueError(f"{where}: `ks` must name at least one k.")
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"{where}: `ks` must be positive ints, got {k!r}.")
    if k > n:
      raise ValueError(
          f"{where}: k={k} in `ks` is larger than the number of targets "
          f"N={n}; R@{k} would be 1 by definition.")
  return tuple(int(k) for k in ks)


def metrics_from_ranks(ranks, ks: Sequence[int] = (1, 5, 10),
                       num_targets: Optional[int] = None) -> Dict[str, float]:
  """Recall@k (fraction of queries with rank <= k), median and mean rank.

  Args:
    ranks: [N] 1-based ranks.
    ks: the k of each 'R@k' key.
    num_targets: the number of candidates each query was ranked among
      (default N); a k above it is an error.

  Returns:
    {'R@k': float in [0, 1] for each k, 'median_rank': float,
     'mean_rank': float}.
  """
  where = "metrics_from_ranks"
  ranks = _as_ranks(ranks, where)
  n = ranks.shape[0] if num_targets is None else num_targets
  ks = _check_ks(ks, n, where)
  out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
  out["median_rank"] = float(np.median(ranks))
  out["mean_rank"] = float(np.mean(ranks))
  return out


def retrieval_metrics(queries, targets, ks: Sequence[int] = (1, 5, 10), *,
                      normalize: bool = True, mesh=None,
                      block_size: int = 1024) -> Dict[str, float]:
  """Exact retrieval metrics of queries against their paired targets.

  Args:
    queries: [N, D]; query i's match is target i.
    targets: [N, D].
    ks: cut-offs for the 'R@k' keys; each must be <= N.
    normalize: cosine similarity if True, raw dot product if False.
    mesh: None or a 1-D 'data' mesh; identical result either way.
    block_size: queries scored at once per device.

  Returns:
    {'R@1', 'R@5', 'R@10' (for ks=(1, 5, 10)), 'median_rank', 'mean_rank'},
    python floats; ranks are 1-based with pessimistic ties (see module doc).
  """
  n = np.shape(queries)[0] if np.ndim(queries) == 2 else None
  if n is not None:
    _check_ks(ks, n, "retrieval_metrics")
  ranks = retrieval_ranks(queries, targets, normalize=normalize, mesh=mesh,
                          block_size=block_size)
  return metrics_from_ranks(ranks, ks)


def joint_retrieval_ranks(queries, target_tuples, *,
                          score: Union[str, JointScoreFn] = "sum_cosine",
                          normalize: bool = True, mesh=None,
                          block_size: int = 1024) -> np.ndarray:
  """Ranks of query i's own tuple among all N tuples of the other modalities.

  Args:
    queries: [N, D], one modality.
    target_tuples: list of K >= 1 arrays [N, D]; tuple j is
      (target_tuples[0][j], ..., target_tuples[K-1][j]).
    score: 'sum_cosine' (sum over k of cos(q_i, t_k[j])) or a jax-traceable
      callable score(query_block [b, D], target_tuples) -> [b, N], higher is
      better; GRAM passes `lambda q, t: -gram_volume(q, t)`.
    normalize: L2-normalise queries and every target modality first.
    mesh, block_size: as in `retrieval_ranks`.

  Returns:
    int64 numpy array [N] of 1-based ranks (pessimistic ties).
  """
  where = "joint_retrieval_ranks"
  queries = as_float_matrix(queries, "queries", where)
  if isinstance(target_tuples, (np.ndarray, jax.Array)) or not isinstance(
      target_tuples, (list, tuple)):
    raise ValueError(
        f"{where}: `target_tuples` must be a list of K arrays [N, D], got "
        f"{type(target_tuples).__name__}.")
  if not target_tuples:
    raise ValueError(f"{where}: `target_tuples` must hold at least one "
                     "modality.")
  checked = []
  for k, t in enumerate(target_tuples):
    name = f"target_tuples[{k}]"
    t = as_float_matrix(t, name, where)
    check_same_shape(queries, t, "queries", name, where)
    if normalize:
      t = l2_normalize_rows(t, name, where)
    checked.append(t)
  if normalize:
    queries = l2_normalize_rows(queries, "queries", where)
  if isinstance(score, str):
    if score != "sum_cosine":
      raise ValueError(
          f"{where}: unknown `score` {score!r}; use 'sum_cosine' or a "
          "callable score(query_block, target_tuples) -> [b, N].")
    score_fn = _sum_cosine_score
  elif callable(score):
    score_fn = score
  else:
    raise ValueError(f"{where}: `score` must be 'sum_cosine' or a callable, "
                     f"got {type(score).__name__}.")
  return _blocked_ranks(queries, checked, score_fn, mesh, block_size, where)["rank"]


def joint_retrieval_metrics(queries, target_tuples,
                            ks: Sequence[int] = (1, 5, 10), *,
                            score: Union[str, JointScoreFn] = "sum_cosine",
                            normalize: bool = True, mesh=None,
                            block_size: int = 1024) -> Dict[str, float]:
  """`retrieval_metrics` of one modality against tuples of the others.

  See `joint_retrieval_ranks` for the arguments. Returns the same keys as
  `retrieval_metrics`.
  """
  n = np.shape(queries)[0] if np.ndim(queries) == 2 else None
  if n is not None:
    _check_ks(ks, n, "joint_retrieval_metrics")
  ranks = joint_retrieval_ranks(queries, target_tuples, score=score,
                                normalize=normalize, mesh=mesh,
                                block_size=block_size)
  return metrics_from_ranks(ranks, ks)


def _as_ranks(ranks, where):
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or ranks.shape[0] < 1:
    raise ValueError(
        f"{where}: `ranks` must be a non-empty rank-1 array [N], got shape "
        f"{ranks.shape}.")
  if not np.issubdtype(ranks.dtype, np.integer):
    raise ValueError(f"{where}: `ranks` must be integers, got dtype "
                     f"{ranks.dtype}.")
  if ranks.min() < 1:
    raise ValueError(f"{where}: `ranks` are 1-based; found {ranks.min()}.")
  return ranks


def recall_at_k_curve(ranks, max_k: int) -> np.ndarray:
  """Recall@k for every k = 1..max_k.

  Args:
    ranks: [N] 1-based ranks (e.g. from `retrieval_ranks`).
    max_k: the last k; must be >= 1.

  Returns:
    float64 numpy array [max_k]; entry k-1 is the fraction of ranks <= k.
  """
  where = "recall_at_k_curve"
  ranks = _as_ranks(ranks, where)
  if isinstance(max_k, bool) or not isinstance(max_k, (int, np.integer)) or (
      max_k < 1):
    raise ValueError(f"{where}: `max_k` must be a positive int, got {max_k!r}.")
  counts = np.bincount(np.minimum(ranks, max_k + 1), minlength=max_k + 2)
  return np.cumsum(counts[1:max_k + 1]) / ranks.shape[0]
