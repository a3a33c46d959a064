"""PNG plots of evaluation results and training curves.

Figures are `matplotlib.figure.Figure`s rendered by the Agg canvas: no pyplot state
or display, so plots can be written from any thread. Every function writes one PNG
(creating its folder) and returns the path as a string.
"""

import collections, json, math, os  # pylint: disable=multiple-imports
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmjax.evals.retrieval import as_float_matrix

PathLike = Union[str, os.PathLike]
_DPI = 110


def _check_png_path(path, where):
  path = os.fspath(path)
  if not path.lower().endswith(".png"):
    raise ValueError(f"{where}: `path` must end in '.png', got {path!r}.")
  return path


def _save(fig: Figure, path: str) -> str:
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=_DPI)
  return path


# --------------------------------------------------------------------------
# Recall@K.
# --------------------------------------------------------------------------


def plot_recall_at_k(curves: Union[np.ndarray, Mapping[str, np.ndarray]],
                     path: PathLike, title: str = "Recall@K",
                     *, log_k: bool = False) -> str:
  """Recall@K against K, one line per curve.

  Args:
    curves: a [max_k] array from `recall_at_k_curve` or a dict
      label -> such an array (e.g. {'image->text': ..., 'text->image': ...}).
    path: output .png path.
    title: figure title.
    log_k: logarithmic K axis.

  Returns:
    `path`.
  """
  where = "plot_recall_at_k"
  path = _check_png_path(path, where)
  if not isinstance(curves, Mapping):
    curves = {"recall": curves}
  if not curves:
    raise ValueError(f"{where}: `curves` is empty.")
  fig = Figure(figsize=(5.5, 4))
  ax = fig.add_subplot()
  for label, curve in curves.items():
    curve = np.asarray(curve, np.float64)
    if curve.ndim != 1 or curve.shape[0] < 1:
      raise ValueError(f"{where}: curve {label!r} must be a non-empty 1-D "
                       f"array [max_k], got shape {curve.shape}.")
    if not np.all((curve >= 0) & (curve <= 1)):
      raise ValueError(f"{where}: curve {label!r} has recalls outside [0, 1].")
    ks = np.arange(1, curve.shape[0] + 1)
    ax.plot(ks, curve, marker="." if curve.shape[0] <= 50 else None,
            label=str(label))
  if log_k:
    ax.set_xscale("log")
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("K")
  ax.set_ylabel("Recall@K")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  return _save(fig, path)


# --------------------------------------------------------------------------
# Reliability diagram.
# --------------------------------------------------------------------------


def plot_reliability_diagram(diagram: Mapping[str, np.ndarray],
                             path: PathLike,
                             title: str = "Reliability diagram") -> str:
  """Accuracy per confidence bin against the diagonal, with bin counts.

  Args:
    diagram: the dict returned by `calibration.reliability_diagram`.
    path: output .png path.
    title: figure title; the ECE is appended.

  Returns:
    `path`.
  """
  where = "plot_reliability_diagram"
  path = _check_png_path(path, where)
  needed = ("bin_edges", "bin_count", "bin_accuracy", "bin_confidence", "ece")
  missing = [k for k in needed if k not in diagram]
  if missing:
    raise ValueError(f"{where}: `diagram` lacks keys {missing}; pass the "
                     "output of reliability_diagram.")
  edges = np.asarray(diagram["bin_edges"], np.float64)
  count = np.asarray(diagram["bin_count"])
  acc = np.asarray(diagram["bin_accuracy"], np.float64)
  conf = np.asarray(diagram["bin_confidence"], np.float64)
  n_bins = edges.shape[0] - 1
  if not (count.shape == acc.shape == conf.shape == (n_bins,)):
    raise ValueError(f"{where}: `diagram` arrays disagree: {n_bins + 1} edges "
                     f"but counts {count.shape}, accuracies {acc.shape}.")
  fig = Figure(figsize=(5, 5.5))
  grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
  ax = fig.add_subplot(grid[0])
  hist = fig.add_subplot(grid[1], sharex=ax)
  centres = (edges[:-1] + edges[1:]) / 2
  widths = np.diff(edges)
  filled = count > 0
  ax.bar(centres[filled], acc[filled], width=widths[filled], color="tab:blue",
         edgecolor="black", label="accuracy")
  # The gap between confidence and accuracy, drawn from accuracy up or down.
  ax.bar(centres[filled], (conf - acc)[filled], bottom=acc[filled],
         width=widths[filled], color="tab:red", alpha=0.35, edgecolor="tab:red",
         label="gap to confidence")
  ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy")
  ax.set_title(f"{title} (ECE = {float(diagram['ece']):.4f})")
  ax.legend(loc="upper left")
  hist.bar(centres, count, width=widths, color="gray", edgecolor="black")
  hist.set_xlabel("confidence")
  hist.set_ylabel("samples")
  fig.tight_layout()
  return _save(fig, path)


# --------------------------------------------------------------------------
# PCA of embeddings.
# --------------------------------------------------------------------------


def pca_2d(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Projects rows of x [N, D] on their top two principal axes.

  Returns:
    (coords [N, 2], explained variance ratio [2]).
  """
  centred = x - x.mean(axis=0)
  _, singular, vt = np.linalg.svd(centred, full_matrices=False)
  variance = singular ** 2
  total = variance.sum()
  ratio = variance[:2] / total if total > 0 else np.zeros(2)
  coords = centred @ vt[:2].T
  if coords.shape[1] < 2:  # D == 1: a second axis with no spread.
    coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    ratio = np.pad(ratio, (0, 2 - ratio.shape[0]))
  return coords, ratio


def plot_embedding_pca(embeddings: Mapping[str, np.ndarray], path: PathLike,
                       title: str = "Embeddings (PCA)", *,
                       normalize: bool = True,
                       max_points_per_modality: int = 2000,
                       connect_pairs: int = 0, seed: int = 0) -> str:
  """2-D PCA of the embeddings of several modalities, coloured by modality.

  The principal axes are fitted on all modalities together, so the distance
  between the clouds (the modality gap) is visible.

  Args:
    embeddings: modality name -> [N_m, D] embeddings (same D for all).
    path: output .png path.
    title: figure title.
    normalize: L2-normalise rows first (the space the losses work in).
    max_points_per_modality: random subsample above this many rows; the same
      row indices are kept in modalities of equal N, so pairs survive.
    connect_pairs: draw a line between row i of the first two modalities for
      this many pairs (needs equal N); 0 for none.
    seed: seed of the subsample.

  Returns:
    `path`.
  """
  where = "plot_embedding_pca"
  path = _check_png_path(path, where)
  if not isinstance(embeddings, Mapping) or not embeddings:
    raise ValueError(f"{where}: `embeddings` must be a non-empty dict "
                     "modality -> [N, D].")
  arrays = {}
  for name, x in embeddings.items():
    x = as_float_matrix(x, f"embeddings[{name!r}]", where).astype(np.float64)
    if normalize:
      norms = np.linalg.norm(x, axis=1, keepdims=True)
      if np.any(norms == 0):
        raise ValueError(f"{where}: `embeddings[{name!r}]` has an all-zero "
                         "row, which cannot be normalised.")
      x = x / norms
    arrays[name] = x
  dims = {name: x.shape[1] for name, x in arrays.items()}
  if len(set(dims.values())) != 1:
    raise ValueError(f"{where}: modalities have different widths D: {dims}.")
  names = list(arrays)
  if connect_pairs and (len(names) < 2 or
                        arrays[names[0]].shape[0] != arrays[names[1]].shape[0]):
    raise ValueError(f"{where}: `connect_pairs` needs two modalities with the "
                     "same N.")
  rng = np.random.default_rng(seed)
  keep_by_n = {}
  for x in arrays.values():
    n = x.shape[0]
    if n not in keep_by_n:
      keep_by_n[n] = (np.sort(rng.choice(n, max_points_per_modality,
                                         replace=False))
                      if n > max_points_per_modality else np.arange(n))
  arrays = {name: x[keep_by_n[x.shape[0]]] for name, x in arrays.items()}
  stacked = np.concatenate(list(arrays.values()))
  if stacked.shape[0] < 2:
    raise ValueError(f"{where}: need at least 2 points in all.")
  coords, ratio = pca_2d(stacked)
  fig = Figure(figsize=(5.5, 5))
  ax = fig.add_subplot()
  offsets = np.cumsum([0] + [x.shape[0] for x in arrays.values()])
  per_modality = {name: coords[offsets[i]:offsets[i + 1]]
                  for i, name in enumerate(names)}
  if connect_pairs:
    a, b = per_modality[names[0]], per_modality[names[1]]
    for i in range(min(connect_pairs, a.shape[0])):
      ax.plot([a[i, 0], b[i, 0]], [a[i, 1], b[i, 1]], color="gray", lw=0.5,
              alpha=0.5, zorder=1)
  for name in names:
    pts = per_modality[name]
    ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.6, label=str(name),
               zorder=2)
  ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% var.)")
  ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% var.)")
  ax.set_title(title)
  ax.legend(loc="best", markerscale=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


# --------------------------------------------------------------------------
# Training curves.
# --------------------------------------------------------------------------


def read_metrics_jsonl(path: PathLike) -> Dict[str, Tuple[np.ndarray,
                                                          np.ndarray]]:
  """Reads a metrics.jsonl: one JSON object per line with an int 'step'.

  Numeric scalar values (int or float, not bool) become series; other values
  (strings, lists) are not series and are left out. Blank lines are skipped.

  Returns:
    key -> (steps int64 [n], values float64 [n]), in file order.
  """
  where = "read_metrics_jsonl"
  series = collections.defaultdict(lambda: ([], []))
  with open(path) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: line {line_number} of {path} is not JSON: "
                         f"{e.msg}.") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: line {line_number} of {path} is not a JSON "
                         "object.")
      step = record.get("step")
      if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{where}: line {line_number} of {path} has no int "
                         f"'step' (got {step!r}).")
      for key, value in record.items():
        if key == "step" or isinstance(value, bool):
          continue
        if isinstance(value, (int, float)):
          series[key][0].append(step)
          series[key][1].append(float(value))
  return {k: (np.asarray(s, np.int64), np.asarray(v, np.float64))
          for k, (s, v) in series.items()}


def default_training_panels(keys: Sequence[str]) -> Dict[str, List[str]]:
  """Groups metric keys into panels: losses, learning rate, logit scale and
  bias, then one panel per (evaluator, metric name) of the 'eval/' keys.

  'eval/retrieval/image->text/R@1' and 'eval/retrieval/text->image/R@1'
  share the panel 'retrieval R@1'. Keys matching none of these are not in
  the default panels; name them in `panels` to plot them.
  """
  fixed = {"loss": [], "learning rate": [], "logit scale": [],
           "logit bias": []}
  evals = {}
  for key in sorted(keys):
    leaf = key.rsplit("/", 1)[-1]
    if "loss" in leaf:
      fixed["loss"].append(key)
    elif leaf in ("learning_rate", "lr"):
      fixed["learning rate"].append(key)
    elif leaf == "logit_scale":
      fixed["logit scale"].append(key)
    elif leaf == "logit_bias":
      fixed["logit bias"].append(key)
    elif key.startswith("eval/"):
      parts = key.split("/")
      group = parts[1] if len(parts) > 2 else "eval"
      evals.setdefault(f"{group} {leaf}", []).append(key)
  panels = {title: keys for title, keys in fixed.items() if keys}
  panels.update(evals)
  return dict(panels)


def _series_label(key: str) -> str:
  parts = key.split("/")
  if key.startswith("eval/") and len(parts) > 3:
    return "/".join(parts[2:-1])  # e.g. 'image->text'
  return key


def plot_training_curves(metrics_path: PathLike, path: PathLike, *,
                         panels: Optional[Mapping[str, Sequence[str]]] = None,
                         title: Optional[str] = None, ncols: int = 3) -> str:
  """Metrics against step from a metrics.jsonl, one panel per group.

  Args:
    metrics_path: a metrics.jsonl (see `read_metrics_jsonl`).
    path: output .png path.
    panels: panel title -> keys to draw in it; default
      `default_training_panels` of the keys in the file.
    title: figure title (default: the file name).
    ncols: panels per row.

  Returns:
    `path`.
  """
  where = "plot_training_curves"
  path = _check_png_path(path, where)
  series = read_metrics_jsonl(metrics_path)
  if panels is None:
    panels = default_training_panels(list(series))
    if not panels:
      raise ValueError(
          f"{where}: {metrics_path} has no loss, learning rate, logit scale or "
          f"eval keys to plot (keys: {sorted(series)}); pass `panels`.")
  else:
    if not panels:
      raise ValueError(f"{where}: `panels` is empty.")
    absent = [k for keys in panels.values() for k in keys if k not in series]
    if absent:
      raise ValueError(f"{where}: keys {absent} in `panels` have no numeric "
                       f"values in {metrics_path}; keys there: "
                       f"{sorted(series)}.")
  if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
    raise ValueError(f"{where}: `ncols` must be a positive int, got {ncols!r}.")
  ncols = min(ncols, len(panels))
  nrows = math.ceil(len(panels) / ncols)
  fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.4))
  for i, (panel_title, keys) in enumerate(panels.items()):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    for key in keys:
      steps, values = series[key]
      ax.plot(steps, values, marker="." if len(steps) <= 30 else None,
              label=_series_label(key))
    ax.set_title(panel_title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.suptitle(title if title is not None else os.path.basename(
      os.fspath(metrics_path)))
  fig.tight_layout()
  return _save(fig, path)


# --------------------------------------------------------------------------
# Heatmap.
# --------------------------------------------------------------------------


def plot_heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str],
                 path: PathLike, title: str = "", *, cmap: str = "viridis",
                 vmin: Optional[float] = None, vmax: Optional[float] = None,
                 annotate: Optional[bool] = None, fmt: str = ".2f",
                 colorbar_label: str = "") -> str:
  """A labelled heatmap of a [R, C] matrix (NaN cells are left blank).

  Args:
    matrix: [R, C] values.
    row_labels: R labels; col_labels: C labels.
    path: output .png path.
    title: figure title.
    cmap, vmin, vmax: colour map and its range (default: the data range).
    annotate: write each value in its cell; default when R * C <= 400.
    fmt: format of the annotations.
    colorbar_label: label of the colour bar.

  Returns:
    `path`.
  """
  where = "plot_heatmap"
  path = _check_png_path(path, where)
  m = np.asarray(matrix, np.float64)
  if m.ndim != 2 or min(m.shape) < 1:
    raise ValueError(f"{where}: `matrix` must be a non-empty [R, C] array, got "
                     f"shape {m.shape}.")
  if np.any(np.isinf(m)):
    raise ValueError(f"{where}: `matrix` contains Inf.")
  if len(row_labels) != m.shape[0]:
    raise ValueError(f"{where}: {len(row_labels)} `row_labels` for "
                     f"{m.shape[0]} rows of `matrix`.")
  if len(col_labels) != m.shape[1]:
    raise ValueError(f"{where}: {len(col_labels)} `col_labels` for "
                     f"{m.shape[1]} columns of `matrix`.")
  rows, cols = m.shape
  fig = Figure(figsize=(min(2 + 0.7 * cols, 16), min(1.5 + 0.45 * rows, 16)))
  ax = fig.add_subplot()
  image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax,
                    aspect="auto")
  colorbar = fig.colorbar(image, ax=ax)
  if colorbar_label:
    colorbar.set_label(colorbar_label)
  ax.set_xticks(np.arange(cols), [str(c) for c in col_labels], rotation=45,
                ha="right")
  ax.set_yticks(np.arange(rows), [str(r) for r in row_labels])
  if annotate is None:
    annotate = rows * cols <= 400
  if annotate:
    lo, hi = image.get_clim()
    middle = (lo + hi) / 2
    for i in range(rows):
      for j in range(cols):
        if np.isfinite(m[i, j]):
          ax.text(j, i, format(m[i, j], fmt), ha="center", va="center",
                  fontsize=8, color="white" if m[i, j] < middle else "black")
  ax.set_title(title)
  fig.tight_layout()
  return _save(fig, path)
