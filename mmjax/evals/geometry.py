"""Geometry of an embedding space: modality gap, alignment, uniformity,
mutual k-NN alignment and linear CKA.

Computed in float64 numpy; pairwise quantities are accumulated over row
blocks so that no N x N matrix is held at once beyond one block.
"""

import numpy as np

from mmjax.evals.classification import top_k_indices
from mmjax.evals.retrieval import as_float_matrix
from mmjax.evals.retrieval import check_same_shape
from mmjax.evals.retrieval import l2_normalize_rows

_BLOCK = 1024


def _unit(x, name, where):
  x = as_float_matrix(x, name, where).astype(np.float64)
  return l2_normalize_rows(x, name, where)


def modality_gap(x, y) -> float:
  """Distance between the centroids of two modalities on the unit sphere.

  gap = || mean_i x_i / |x_i|  -  mean_j y_j / |y_j| ||_2  (Liang et al.,
  2022). The two sets need not be paired: N_x may differ from N_y.

  Args:
    x: [N_x, D] embeddings of one modality.
    y: [N_y, D] embeddings of another, same D.

  Returns:
    python float in [0, 2]; 0 when both sets have the same centroid.
  """
  where = "modality_gap"
  xu, yu = _unit(x, "x", where), _unit(y, "y", where)
  if xu.shape[1] != yu.shape[1]:
    raise ValueError(f"{where}: `y` has D={yu.shape[1]} but `x` has "
                     f"D={xu.shape[1]}.")
  return float(np.linalg.norm(xu.mean(axis=0) - yu.mean(axis=0)))


def alignment(x, y, alpha: float = 2.0) -> float:
  """Mean distance between paired unit embeddings (Wang & Isola, 2020).

  alignment = mean_i || x_i/|x_i| - y_i/|y_i| ||_2 ** alpha; lower is better.

  Args:
    x, y: [N, D] paired embeddings; row i of both is one sample.
    alpha: exponent, > 0.

  Returns:
    python float in [0, 2 ** alpha].
  """
  where = "alignment"
  if not alpha > 0:
    raise ValueError(f"{where}: `alpha` must be > 0, got {alpha!r}.")
  xu, yu = _unit(x, "x", where), _unit(y, "y", where)
  check_same_shape(xu, yu, "x", "y", where)
  return float(np.mean(np.linalg.norm(xu - yu, axis=1) ** alpha))


def uniformity(x, t: float = 2.0) -> float:
  """Log of the mean Gaussian potential over distinct pairs (Wang & Isola).

  uniformity = log( mean_{i != j} exp(-t || u_i - u_j ||^2) ), u the unit
  rows of x; lower (more negative) is more uniform. Equals 0 when all
  embeddings coincide.

  Args:
    x: [N, D] embeddings, N >= 2.
    t: temperature of the potential, > 0.

  Returns:
    python float <= 0.
  """
  where = "uniformity"
  if not t > 0:
    raise ValueError(f"{where}: `t` must be > 0, got {t!r}.")
  u = _unit(x, "x", where)
  n = u.shape[0]
  if n < 2:
    raise ValueError(f"{where}: `x` needs at least 2 rows, got {n}.")
  # log-sum-exp over blocks: keep the running max to avoid underflow for
  # large t, where every exp(-t d^2) would round to 0.
  running_max, running_sum = -np.inf, 0.0
  for start in range(0, n, _BLOCK):
    block = u[start:start + _BLOCK]
    sq_dist = np.maximum(2.0 - 2.0 * block @ u.T, 0.0)
    rows = np.arange(block.shape[0])
    exponent = -t * sq_dist
    exponent[rows, start + rows] = -np.inf  # i == j is not a pair.
    block_max = exponent.max()
    new_max = max(running_max, block_max)
    running_sum = (running_sum * np.exp(running_max - new_max) +
                   np.exp(exponent - new_max).sum())
    running_max = new_max
  return float(running_max + np.log(running_sum) - np.log(n * (n - 1)))


def _knn_sets(u, k):
  """[N, k] indices of each row's k most cosine-similar other rows."""
  n = u.shape[0]
  out = np.empty((n, k), np.int64)
  for start in range(0, n, _BLOCK):
    sims = u[start:start + _BLOCK] @ u.T
    rows = np.arange(sims.shape[0])
    sims[rows, start + rows] = -np.inf  # a sample is not its own neighbour.
    out[start:start + _BLOCK] = top_k_indices(sims, k)
  return out


def mutual_knn_alignment(x, y, k: int = 10) -> float:
  """Mean overlap of the k-NN sets of each sample in two modalities.

  For sample i, N_x(i) are the k samples (other than i) of highest cosine
  similarity to x_i, and N_y(i) likewise in y (ties: lower index). The
  score is mean_i |N_x(i) & N_y(i)| / k (Huh et al., 2024).

  Args:
    x: [N, D_x] and y: [N, D_y] paired embeddings (widths may differ).
    k: neighbours, 1 <= k <= N - 1.

  Returns:
    python float in [0, 1]; 1 when both kNN graphs are the same.
  """
  where = "mutual_knn_alignment"
  xu, yu = _unit(x, "x", where), _unit(y, "y", where)
  if xu.shape[0] != yu.shape[0]:
    raise ValueError(f"{where}: `y` has N={yu.shape[0]} rows but `x` has "
                     f"N={xu.shape[0]}; row i of both must be one sample.")
  n = xu.shape[0]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
      1 <= k <= n - 1):
    raise ValueError(f"{where}: `k` must be an int in [1, N - 1 = {n - 1}], "
                     f"got {k!r}.")
  both = np.concatenate([_knn_sets(xu, k), _knn_sets(yu, k)], axis=1)
  # Each set has distinct indices, so a repeated index in the union of the
  # two rows is a shared neighbour.
  both.sort(axis=1)
  shared = np.sum(both[:, 1:] == both[:, :-1], axis=1)
  return float(shared.mean() / k)


def linear_cka(x, y) -> float:
  """Linear centred kernel alignment (Kornblith et al., 2019).

  With X, Y column-centred, CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).
  Invariant to orthogonal transforms and isotropic scaling of either side;
  the features are used as given (no normalisation).

  Args:
    x: [N, D_x] and y: [N, D_y] paired features (widths may differ), N >= 2.

  Returns:
    python float in [0, 1]; 1 for identical (or rotated/scaled) sets.
  """
  where = "linear_cka"
  xc = as_float_matrix(x, "x", where).astype(np.float64)
  yc = as_float_matrix(y, "y", where).astype(np.float64)
  if xc.shape[0] != yc.shape[0]:
    raise ValueError(f"{where}: `y` has N={yc.shape[0]} rows but `x` has "
                     f"N={xc.shape[0]}; row i of both must be one sample.")
  if xc.shape[0] < 2:
    raise ValueError(f"{where}: need at least 2 samples, got {xc.shape[0]}.")
  xc = xc - xc.mean(axis=0)
  yc = yc - yc.mean(axis=0)
  # Feature-space Gram matrices: cost O(N D^2), no N x N matrix.
  cross = np.linalg.norm(yc.T @ xc) ** 2
  norm_x = np.linalg.norm(xc.T @ xc)
  norm_y = np.linalg.norm(yc.T @ yc)
  for name, norm in (("x", norm_x), ("y", norm_y)):
    if norm == 0:
      raise ValueError(f"{where}: every row of `{name}` is the same; CKA is "
                       "undefined for a constant representation.")
  return float(cross / (norm_x * norm_y))
