"""The `calibration` evaluator: ECE and a reliability diagram of a classifier."""

from __future__ import annotations

from mmjax.evals import calibration as calibration_lib
from mmjax.evals.evaluators import EvalContext, labels, register
from mmjax.evals.evaluators.zero_shot import check_class_names, zero_shot_logits


def _check(c, data, where: str) -> None:
  if c.logits == "zero_shot":
    check_class_names(c, data, where)
  elif c.logits != "task":
    raise ValueError(f"{where}.logits must be 'zero_shot' or 'task', got {c.logits!r}")


@register("calibration", check=_check)
def calibration(ctx: EvalContext, c) -> dict[str, float]:
  """Expected calibration error and a reliability diagram of a classifier's output.

  Fields: `logits` — 'zero_shot' (logit_scale * cosine to the zero-shot class
  embeddings; the zero-shot fields `modality`, `text_modality`, `templates`,
  `class_names` apply) or 'task' (the model's task head, `model.task`); `n_bins`
  (default 15). Writes plots/<name>_reliability.png.

  Metrics: `ece`, `mce`, `accuracy`, `mean_confidence`.
  """
  if c.logits == "zero_shot":
    logits, y, _ = zero_shot_logits(ctx, c)
  else:
    outputs = ctx.outputs(c.split, c.batch_size)
    if outputs["logits"] is None:
      raise ValueError(f"{ctx.where}.logits='task': the model has no task head "
                       "(model.task); use logits='zero_shot' or configure a task head")
    logits, y = outputs["logits"], labels(outputs, ctx.where)
  diagram = calibration_lib.reliability_diagram(logits, y, c.n_bins, from_logits=True)
  if ctx.writes_files:
    from mmjax.evals import plots  # pylint: disable=g-import-not-at-top
    plots.plot_reliability_diagram(
        diagram, ctx.plot_path("reliability.png"),
        title=f"{c.logits} logits, {c.split}, step {ctx.step}")
  return {k: diagram[k] for k in ("ece", "mce", "accuracy", "mean_confidence")}
