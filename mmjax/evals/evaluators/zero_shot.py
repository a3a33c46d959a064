"""The `zero_shot` evaluator: class names through prompt templates into a text tower.

`templates` is a prompt ensemble: each class's embedding is the normalised mean of the
normalised text embeddings of its prompts (CLIP's evaluation). An entry may name a
preset list of `mmjax.evals.prompts` ('imagenet_clip': CLIP's 80 ImageNet prompts).
"""

from __future__ import annotations

import re

import numpy as np

from mmjax.evals import classification as classification_lib
from mmjax.evals import prompts as prompts_lib
from mmjax.evals.evaluators import EvalContext, labels, present, register


def check_class_names(c, data, where: str) -> None:
  """Zero-shot needs class names: the evaluator's own, or the source's."""
  if not c.class_names and data.class_names is None:
    raise ValueError(f"{where}: evaluator {c.kind!r} needs class names, but the data "
                     f"source {data.name} has none; list them in {where}.class_names "
                     "(or data.class_names for a TFDS dataset)")
  if c.templates:
    prompts_lib.expand(list(c.templates), f"{where}.templates")


def _with_article(prompt: str) -> str:
  # Captions say "an" before a vowel; prompts should read the same.
  return re.sub(r"(^|\s)a ([aeiou])", r"\1an \2", prompt)


def class_prompts(names, templates, where: str = "templates") -> list[str]:
  """The prompts of every class, class by class in template order: preset templates
  (`mmjax.evals.prompts`) verbatim, others with 'a' before a vowel made 'an'."""
  expanded = prompts_lib.expand(list(templates), where)
  return [t.format(n) if preset else _with_article(t.format(n))
          for n in names for t, preset in expanded]


def class_embeddings(ctx: EvalContext, c) -> tuple[list[str], np.ndarray]:
  """(class names, class embeddings [C, D]) for `c`, cached per round: each class is
  the normalised mean of its prompts' normalised text embeddings."""
  names = list(c.class_names or ctx.data.class_names)
  templates = list(c.templates or ctx.data.prompt_templates
                   or classification_lib.DEFAULT_PROMPT_TEMPLATES)
  key = ("zero_shot", c.text_modality, tuple(names), tuple(templates), c.batch_size)
  if key not in ctx._cache:
    prompts = class_prompts(names, templates, f"{ctx.where}.templates")
    emb = ctx.embed_texts(prompts, c.batch_size, modality=c.text_modality)
    emb = emb.reshape(len(names), len(prompts) // len(names), -1)
    ctx._cache[key] = (names, classification_lib.zero_shot_classifier(emb))
  return ctx._cache[key]


def zero_shot_logits(ctx: EvalContext, c):
  """(logits [N, C] = logit_scale * cosine, labels [N], class names) on `c.split`,
  rows where `c.modality` is present."""
  outputs = ctx.outputs(c.split, c.batch_size)
  y = labels(outputs, ctx.where)
  names, classes = class_embeddings(ctx, c)
  keep = present(outputs, (c.modality,))
  x = outputs["embeddings"][c.modality][keep].astype(np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  if y.max() >= len(names):
    raise ValueError(f"{ctx.where}.class_names: {len(names)} names but the split has "
                     f"label {int(y.max())}")
  return outputs["logit_scale"] * (x @ classes.T), y[keep], names


@register("zero_shot", check=check_class_names)
def zero_shot(ctx: EvalContext, c) -> dict[str, float]:
  """Zero-shot classification: class names through prompt templates into the text tower.

  A sample of `modality` takes the class of highest cosine. Fields: `modality`
  (default 'image'), `text_modality` ('text'), `templates` (format strings with one
  '{}', or preset names such as 'imagenet_clip' (`mmjax.evals.prompts`); default: the
  source's, else CLIP-style ones; a class is the normalised mean of its prompts'
  normalised embeddings), `class_names` (default: the source's).

  Metrics: `accuracy`, `mean_per_class_accuracy`, `chance` (1 / classes) and
  `per_class/<class name>` (spaces become '_'; classes without samples are left out).
  """
  logits, y, names = zero_shot_logits(ctx, c)
  result = classification_lib._accuracy_summary(np.argmax(logits, axis=1), y, len(names))
  metrics = {"accuracy": result["accuracy"],
             "mean_per_class_accuracy": result["mean_per_class_accuracy"],
             "chance": 1.0 / len(names)}
  for name, acc in zip(names, result["per_class_accuracy"]):
    if np.isfinite(acc):
      metrics[f"per_class/{name.replace(' ', '_')}"] = float(acc)
  return metrics
