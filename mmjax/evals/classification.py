"""Classification from frozen embeddings: zero-shot, linear probe, k-NN.

All functions take numpy or jax arrays and return python floats and numpy
arrays. Class ids are ints in [0, C). Where several classes tie for the top
score, the lowest class id wins (numpy/jax argmax order).
"""

from typing import Callable, Dict, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from mmjax.evals.retrieval import as_float_matrix
from mmjax.evals.retrieval import as_labels
from mmjax.evals.retrieval import l2_normalize_rows

# Prompt templates for zero-shot classification; '{}' is the class name.
# Several phrasings average out the quirks of any single one.
DEFAULT_PROMPT_TEMPLATES = (
    "a picture of a {}.",
    "an image showing a {}.",
    "a {} in the picture.",
    "a close-up view of a {}.",
    "a small {} seen from afar.",
    "a blurry snapshot of a {}.",
    "a simple drawing of a {}.",
    "there is a {} here.",
)

# encode_texts(list of T strings) -> [T, D] embeddings.
TextEncoder = Callable[[Sequence[str]], np.ndarray]


# --------------------------------------------------------------------------
# Zero-shot.
# --------------------------------------------------------------------------


def _check_templates(templates, where):
  if isinstance(templates, str) or not templates:
    raise ValueError(
        f"{where}: `templates` must be a non-empty list of format strings.")
  for t in templates:
    if not isinstance(t, str) or t.count("{}") != 1:
      raise ValueError(
          f"{where}: every template needs exactly one '{{}}' for the class "
          f"name, got {t!r}.")
  return list(templates)


def zero_shot_classifier(
    class_text_embeddings: Union[np.ndarray, jax.Array, TextEncoder],
    class_names: Optional[Sequence[str]] = None,
    templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES) -> np.ndarray:
  """Class embeddings for zero-shot classification.

  Each prompt embedding is L2-normalised, the prompts of a class are
  averaged, and the mean is normalised again.

  Args:
    class_text_embeddings: either an array [C, T, D] (T prompt embeddings per
      class), or a function encode_texts(list of T strings) -> [T, D] that is
      called once per class on `[t.format(name) for t in templates]`.
    class_names: C names; required with a function, ignored otherwise.
    templates: format strings with one '{}'; used with a function only.

  Returns:
    float32 numpy array [C, D], rows of unit norm.
  """
  where = "zero_shot_classifier"
  if callable(class_text_embeddings):
    encode = class_text_embeddings
    if class_names is None or isinstance(class_names, str) or not class_names:
      raise ValueError(
          f"{where}: `class_names` (a non-empty list) is needed when "
          "`class_text_embeddings` is a text encoder function.")
    templates = _check_templates(templates, where)
    per_class = []
    for name in class_names:
      prompts = [t.format(name) for t in templates]
      emb = np.asarray(encode(prompts))
      if emb.ndim != 2 or emb.shape[0] != len(prompts):
        raise ValueError(
            f"{where}: the text encoder returned shape {emb.shape} for "
            f"{len(prompts)} prompts of class {name!r}; expected [T, D] = "
            f"[{len(prompts)}, D].")
      per_class.append(emb)
    dims = {e.shape[1] for e in per_class}
    if len(dims) != 1:
      raise ValueError(f"{where}: the text encoder returned different widths "
                       f"D {sorted(dims)} for different classes.")
    stacked = np.stack(per_class)
  else:
    stacked = np.asarray(class_text_embeddings)
    if stacked.ndim != 3:
      raise ValueError(
          f"{where}: `class_text_embeddings` must have rank 3 [C, T, D], got "
          f"shape {stacked.shape}.")
  c, t, d = stacked.shape
  if min(c, t, d) < 1:
    raise ValueError(f"{where}: `class_text_embeddings` must be non-empty, "
                     f"got shape {stacked.shape}.")
  flat = as_float_matrix(stacked.reshape(c * t, d), "class_text_embeddings",
                         where)
  flat = l2_normalize_rows(flat, "class_text_embeddings", where)
  means = flat.reshape(c, t, d).mean(axis=1)
  norms = np.linalg.norm(means, axis=1, keepdims=True)
  if np.any(norms < 1e-12):
    cls = int(np.flatnonzero(norms[:, 0] < 1e-12)[0])
    raise ValueError(f"{where}: the prompt embeddings of class {cls} cancel "
                     "out; their mean has no direction.")
  return (means / norms).astype(np.float32)


def zero_shot_metrics(embeddings, class_embeddings,
                      labels) -> Dict[str, Union[float, np.ndarray]]:
  """Zero-shot accuracy: each embedding gets the class of highest cosine.

  Args:
    embeddings: [N, D] sample embeddings (e.g. images).
    class_embeddings: [C, D] from `zero_shot_classifier`.
    labels: [N] int class ids in [0, C).

  Returns:
    {'accuracy': float,
     'per_class_accuracy': float64 [C], NaN for a class with no sample,
     'mean_per_class_accuracy': float, mean over classes with samples,
     'predictions': int64 [N]}.
  """
  where = "zero_shot_metrics"
  x = as_float_matrix(embeddings, "embeddings", where)
  w = as_float_matrix(class_embeddings, "class_embeddings", where)
  if w.shape[1] != x.shape[1]:
    raise ValueError(
        f"{where}: `class_embeddings` has D={w.shape[1]} but `embeddings` has "
        f"D={x.shape[1]}.")
  y = as_labels(labels, x.shape[0], w.shape[0], "labels", where)
  x = l2_normalize_rows(x, "embeddings", where)
  w = l2_normalize_rows(w, "class_embeddings", where)
  predictions = np.argmax(x @ w.T, axis=1)
  return _accuracy_summary(predictions, y, w.shape[0])


def _accuracy_summary(predictions, labels, num_classes):
  correct = predictions == labels
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  hits = np.bincount(labels, weights=correct, minlength=num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    per_class = np.where(counts > 0, hits / counts, np.nan)
  return {
      "accuracy": float(np.mean(correct)),
      "per_class_accuracy": per_class,
      "mean_per_class_accuracy": float(np.nanmean(per_class)),
      "predictions": predictions.astype(np.int64),
  }


# --------------------------------------------------------------------------
# Linear probe.
# --------------------------------------------------------------------------


def logistic_objective(params, x, y_onehot, l2):
  """Mean softmax cross-entropy plus 0.5 * l2 * ||W||_F^2 (bias unpenalised).

  Args:
    params: {'w': [D, C], 'b': [C]}.
    x: [N, D] features.
    y_onehot: [N, C] one-hot labels.
    l2: scalar regularisation strength.

  Returns:
    scalar objective.
  """
  logits = x @ params["w"] + params["b"]
  ce = optax.softmax_cross_entropy(logits, y_onehot).mean()
  return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@jax.jit
def _fit_logistic(x, y_onehot, l2, max_steps, tolerance):
  """Full-batch L-BFGS on `logistic_objective`, until the gradient is small.

  Returns (params, steps_taken, final_gradient_norm).
  """
  d, c = x.shape[1], y_onehot.shape[1]
  params = {"w": jnp.zeros((d, c), x.dtype), "b": jnp.zeros((c,), x.dtype)}
  objective = lambda p: logistic_objective(p, x, y_onehot, l2)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (count == 0) | ((count < max_steps) & (grad_norm >= tolerance))

  params, state = jax.lax.while_loop(keep_going, step,
                                     (params, solver.init(params)))
  grad_norm = otu.tree_norm(jax.grad(objective)(params))
  return params, otu.tree_get(state, "count"), grad_norm


def _predict(params, x):
  return np.argmax(x @ np.asarray(params["w"]) + np.asarray(params["b"]),
                   axis=1)


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, *,
                 l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
                 steps: int = 500, tolerance: float = 1e-5,
                 num_classes: Optional[int] = None) -> Dict[str, object]:
  """L2-regularised multinomial logistic regression on frozen embeddings.

  For each l2 in `l2_grid`, fits on the train set with full-batch L-BFGS
  (optax.lbfgs with zoom line search) until the gradient norm is below
  `tolerance` or `steps` iterations are done, and scores the val set. The l2
  with the best val accuracy (ties: the larger l2) is reported on the test
  set. Features are used as given (no normalisation); the objective is
  `logistic_objective`.

  Args:
    train_x, val_x, test_x: [N_split, D] features.
    train_y, val_y, test_y: [N_split] int class ids in [0, C).
    l2_grid: regularisation strengths to try, each >= 0.
    steps: iteration cap of L-BFGS per l2.
    tolerance: gradient norm at which L-BFGS stops.
    num_classes: C; default 1 + the largest label in any split.

  Returns:
    {'test_accuracy': float, 'val_accuracy': float, 'l2': float,
     'val_accuracy_per_l2': {l2: float}, 'steps': int (L-BFGS iterations of
     the chosen fit), 'grad_norm': float (its final gradient norm),
     'params': {'w': [D, C], 'b': [C]} numpy arrays of the chosen fit}.
  """
  where = "linear_probe"
  splits = {}
  for split, x, y in (("train", train_x, train_y), ("val", val_x, val_y),
                      ("test", test_x, test_y)):
    x = as_float_matrix(x, f"{split}_x", where).astype(np.float32)
    y = as_labels(y, x.shape[0], None, f"{split}_y", where)
    splits[split] = (x, y)
  d = splits["train"][0].shape[1]
  for split in ("val", "test"):
    if splits[split][0].shape[1] != d:
      raise ValueError(
          f"{where}: `{split}_x` has D={splits[split][0].shape[1]} but "
          f"`train_x` has D={d}.")
  largest = max(int(y.max()) for _, y in splits.values())
  if num_classes is None:
    num_classes = largest + 1
  elif largest >= num_classes:
    raise ValueError(f"{where}: a label {largest} is out of range for "
                     f"num_classes={num_classes}.")
  if num_classes < 2:
    raise ValueError(f"{where}: need at least 2 classes, got {num_classes}.")
  l2_grid = [float(l2) for l2 in l2_grid]
  if not l2_grid or any(l2 < 0 or not np.isfinite(l2) for l2 in l2_grid):
    raise ValueError(f"{where}: `l2_grid` must be non-empty finite values "
                     f">= 0, got {l2_grid}.")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"{where}: `steps` must be a positive int, got {steps!r}.")

  x_train, y_train = splits["train"]
  onehot = jax.nn.one_hot(y_train, num_classes, dtype=jnp.float32)
  fits, val_acc = {}, {}
  for l2 in l2_grid:
    params, taken, grad_norm = _fit_logistic(
        x_train, onehot, jnp.float32(l2), jnp.int32(steps),
        jnp.float32(tolerance))
    fits[l2] = (jax.device_get(params), int(taken), float(grad_norm))
    val_acc[l2] = float(np.mean(_predict(fits[l2][0], splits["val"][0]) ==
                                splits["val"][1]))
  best = max(l2_grid, key=lambda l2: (val_acc[l2], l2))
  params, taken, grad_norm = fits[best]
  test_acc = float(np.mean(_predict(params, splits["test"][0]) ==
                           splits["test"][1]))
  return {
      "test_accuracy": test_acc,
      "val_accuracy": val_acc[best],
      "l2": best,
      "val_accuracy_per_l2": val_acc,
      "steps": taken,
      "grad_norm": grad_norm,
      "params": {k: np.asarray(v) for k, v in params.items()},
  }


# --------------------------------------------------------------------------
# k-NN.
# --------------------------------------------------------------------------


def knn_classify(train_x, train_y, test_x, test_y, k: int = 20,
                 temperature: Optional[float] = 0.07, *,
                 num_classes: Optional[int] = None,
                 block_size: int = 1024) -> Dict[str, Union[float, np.ndarray]]:
  """Cosine k-nearest-neighbour vote over a labelled train set.

  Each test sample takes its k train neighbours of highest cosine
  similarity (ties: lower train index first). Neighbour j votes for its
  class with weight exp(cos_j / temperature), or 1 if temperature is None.
  The class with the largest total weight wins (ties: lower class id).

  Args:
    train_x: [N_train, D]; train_y: [N_train] int labels.
    test_x: [N_test, D]; test_y: [N_test] int labels.
    k: neighbours per test sample, 1 <= k <= N_train.
    temperature: > 0, or None for an unweighted majority vote.
    num_classes: C; default 1 + the largest label.
    block_size: test samples scored at once (memory ~ 8 * block * N_train B).

  Returns:
    {'accuracy': float, 'per_class_accuracy': [C], 'mean_per_class_accuracy':
     float, 'predictions': int64 [N_test]}.
  """
  where = "knn_classify"
  xtr = as_float_matrix(train_x, "train_x", where)
  xte = as_float_matrix(test_x, "test_x", where)
  if xte.shape[1] != xtr.shape[1]:
    raise ValueError(f"{where}: `test_x` has D={xte.shape[1]} but `train_x` "
                     f"has D={xtr.shape[1]}.")
  ytr = as_labels(train_y, xtr.shape[0], num_classes, "train_y", where)
  yte = as_labels(test_y, xte.shape[0], num_classes, "test_y", where)
  if num_classes is None:
    num_classes = int(max(ytr.max(), yte.max())) + 1
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
      1 <= k <= xtr.shape[0]):
    raise ValueError(f"{where}: `k` must be an int in [1, N_train="
                     f"{xtr.shape[0]}], got {k!r}.")
  if temperature is not None and not temperature > 0:
    raise ValueError(f"{where}: `temperature` must be > 0 or None, got "
                     f"{temperature!r}.")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or (
      block_size < 1):
    raise ValueError(f"{where}: `block_size` must be a positive int, got "
                     f"{block_size!r}.")
  xtr = l2_normalize_rows(xtr.astype(np.float64), "train_x", where)
  xte = l2_normalize_rows(xte.astype(np.float64), "test_x", where)
  predictions = np.empty(xte.shape[0], np.int64)
  for start in range(0, xte.shape[0], block_size):
    sims = xte[start:start + block_size] @ xtr.T
    neighbours = top_k_indices(sims, k)
    nsims = np.take_along_axis(sims, neighbours, axis=1)
    if temperature is None:
      weights = np.ones_like(nsims)
    else:
      # Shifting by the row max leaves the vote unchanged and avoids overflow.
      weights = np.exp((nsims - nsims[:, :1]) / temperature)
    votes = np.zeros((sims.shape[0], num_classes))
    np.add.at(votes, (np.arange(sims.shape[0])[:, None], ytr[neighbours]),
              weights)
    predictions[start:start + block_size] = np.argmax(votes, axis=1)
  return _accuracy_summary(predictions, yte, num_classes)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices [b, k] of the k largest entries of each row of `scores` [b, n].

  Best first; equal scores go to the lower column index (stable sort).
  """
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]
