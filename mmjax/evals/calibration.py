"""Calibration of classifier confidences: expected calibration error.

Confidence is the largest class probability, the prediction its argmax
(lowest class id on ties). Confidences fall into `n_bins` equal-width bins of
[0, 1]; bin b holds confidences in (b / n_bins, (b + 1) / n_bins], and bin 0
also holds 0. ECE is the sample-weighted mean over bins of
|accuracy(bin) - mean confidence(bin)| (Guo et al., 2017).
"""

from typing import Dict, Union

import numpy as np

from mmjax.evals.retrieval import as_float_matrix
from mmjax.evals.retrieval import as_labels

# Rows of `probs` must sum to 1 within this tolerance.
_SUM_TOLERANCE = 1e-3


def _probabilities(probs, from_logits, where):
  p = as_float_matrix(probs, "logits" if from_logits else "probs",
                      where).astype(np.float64)
  if from_logits:
    p = p - p.max(axis=1, keepdims=True)
    p = np.exp(p)
    return p / p.sum(axis=1, keepdims=True)
  if p.min() < 0 or p.max() > 1:
    raise ValueError(
        f"{where}: `probs` must lie in [0, 1], found values in "
        f"[{p.min():.4g}, {p.max():.4g}]; pass from_logits=True for logits.")
  sums = p.sum(axis=1)
  worst = int(np.argmax(np.abs(sums - 1)))
  if abs(sums[worst] - 1) > _SUM_TOLERANCE:
    raise ValueError(
        f"{where}: row {worst} of `probs` sums to {sums[worst]:.6g}, not 1; "
        "pass from_logits=True for logits.")
  return p


def reliability_diagram(probs, labels, n_bins: int = 15, *,
                        from_logits: bool = False
                        ) -> Dict[str, Union[float, np.ndarray]]:
  """Per-bin accuracy and confidence, the data of a reliability diagram.

  Args:
    probs: [N, C] class probabilities (rows sum to 1), or logits with
      from_logits=True (softmax is applied).
    labels: [N] int class ids in [0, C).
    n_bins: number of equal-width confidence bins, >= 1.
    from_logits: whether `probs` holds logits.

  Returns:
    {'bin_edges': [n_bins + 1], 'bin_count': int64 [n_bins],
     'bin_accuracy': [n_bins], 'bin_confidence': [n_bins] (NaN where a bin
     is empty), 'ece': float, 'mce': float (largest gap over non-empty
     bins), 'accuracy': float, 'mean_confidence': float}.
  """
  return _reliability(probs, labels, n_bins, from_logits,
                      "reliability_diagram")


def _reliability(probs, labels, n_bins, from_logits, where):
  if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or (
      n_bins < 1):
    raise ValueError(f"{where}: `n_bins` must be an int >= 1, got {n_bins!r}.")
  p = _probabilities(probs, from_logits, where)
  y = as_labels(labels, p.shape[0], p.shape[1], "labels", where)
  confidence = p.max(axis=1)
  correct = (np.argmax(p, axis=1) == y).astype(np.float64)
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  # side='left' puts a confidence equal to an edge in the bin below it, so the
  # bins are right-closed; clip sends 0 to bin 0.
  bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0,
                 n_bins - 1)
  count = np.bincount(bins, minlength=n_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
    mean_conf = np.bincount(bins, weights=confidence, minlength=n_bins) / count
  gaps = np.abs(accuracy - mean_conf)
  filled = count > 0
  return {
      "bin_edges": edges,
      "bin_count": count.astype(np.int64),
      "bin_accuracy": accuracy,
      "bin_confidence": mean_conf,
      "ece": float(np.sum(count[filled] * gaps[filled]) / p.shape[0]),
      "mce": float(np.max(gaps[filled])),
      "accuracy": float(correct.mean()),
      "mean_confidence": float(confidence.mean()),
  }


def expected_calibration_error(probs, labels, n_bins: int = 15, *,
                               from_logits: bool = False) -> float:
  """Expected calibration error with `n_bins` equal-width bins.

  Args:
    probs: [N, C] probabilities, or logits with from_logits=True.
    labels: [N] int class ids in [0, C).
    n_bins: number of bins, >= 1.
    from_logits: whether `probs` holds logits.

  Returns:
    ECE as a python float in [0, 1].
  """
  return _reliability(probs, labels, n_bins, from_logits,
                      "expected_calibration_error")["ece"]
