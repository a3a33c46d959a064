"""mmjax.evals: evaluation metrics, evaluators, plots and the eval-only mode.

Metrics are pure functions of arrays (numpy or jax) returning python floats:

  retrieval_metrics(queries [N,D], targets [N,D], ks=(1, 5, 10)) -> {'R@1', ..., 'median_rank',
      'mean_rank'}   (query i's match is target i; exact, in blocks; optional `mesh`)
  joint_retrieval_metrics(queries, [targets_1, ..., targets_K], score='sum_cosine' | fn)
  zero_shot_classifier, zero_shot_metrics, linear_probe, knn_classify
  expected_calibration_error, reliability_diagram
  modality_gap, alignment, uniformity, mutual_knn_alignment, linear_cka

Evaluators (`config.evals`, see `evaluators`: one module per evaluator) and the
plotting functions (`plots`, matplotlib) are loaded on first use, so
`from mmjax import evals` stays cheap. `--mode=eval` (a checkpoint's evaluation) is
`mmjax.train.eval_mode`: this package imports nothing of `mmjax.train`.
"""

import importlib

from mmjax.evals.calibration import expected_calibration_error
from mmjax.evals.calibration import reliability_diagram
from mmjax.evals.classification import DEFAULT_PROMPT_TEMPLATES
from mmjax.evals.classification import knn_classify
from mmjax.evals.classification import linear_probe
from mmjax.evals.classification import zero_shot_classifier
from mmjax.evals.classification import zero_shot_metrics
from mmjax.evals.geometry import alignment
from mmjax.evals.geometry import linear_cka
from mmjax.evals.geometry import modality_gap
from mmjax.evals.geometry import mutual_knn_alignment
from mmjax.evals.geometry import uniformity
from mmjax.evals.retrieval import joint_retrieval_metrics
from mmjax.evals.retrieval import joint_retrieval_ranks
from mmjax.evals.retrieval import metrics_from_ranks
from mmjax.evals.retrieval import recall_at_k_curve
from mmjax.evals.retrieval import retrieval_metrics
from mmjax.evals.retrieval import retrieval_ranks

# name -> (module, attribute or None for the module itself), imported on first access.
_LAZY = {
    "plots": ("mmjax.evals.plots", None),
    "plot_recall_at_k": ("mmjax.evals.plots", "plot_recall_at_k"),
    "plot_reliability_diagram": ("mmjax.evals.plots", "plot_reliability_diagram"),
    "plot_embedding_pca": ("mmjax.evals.plots", "plot_embedding_pca"),
    "plot_training_curves": ("mmjax.evals.plots", "plot_training_curves"),
    "plot_heatmap": ("mmjax.evals.plots", "plot_heatmap"),
    "evaluators": ("mmjax.evals.evaluators", None),
    "EvalContext": ("mmjax.evals.evaluators", "EvalContext"),
    "register": ("mmjax.evals.evaluators", "register"),
    "evaluator_config": ("mmjax.config_lib", "evaluator_config"),
    "build_evaluators": ("mmjax.evals.evaluators", "build_evaluators"),
    "run_evaluators": ("mmjax.evals.evaluators", "run_evaluators"),
}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'mmjax.evals' has no attribute {name!r}")
  module_name, attribute = _LAZY[name]
  module = importlib.import_module(module_name)
  value = module if attribute is None else getattr(module, attribute)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "alignment", "DEFAULT_PROMPT_TEMPLATES", "expected_calibration_error",
    "joint_retrieval_metrics", "joint_retrieval_ranks", "knn_classify", "linear_cka",
    "linear_probe", "metrics_from_ranks", "modality_gap", "mutual_knn_alignment",
    "recall_at_k_curve", "reliability_diagram", "retrieval_metrics", "retrieval_ranks",
    "uniformity", "zero_shot_classifier", "zero_shot_metrics", *_LAZY,
]
