"""What the procedural world knows about itself that no recorded dataset can: the
names of its label classes, captions' prompt templates, and the accuracy and recall
of an oracle that sees exactly the factors each modality expresses.

`data_info(spec)` gathers them into the `DataInfo` the evaluators read.
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np

from mmjax.data import world as world_lib
from mmjax.data.info import DataInfo

# Prompt templates in the style of the world's captions ("a small red circle at the
# top left", "large blue square, centre").
PROMPT_TEMPLATES = ("a {}", "{}", "there is a {}", "one {}")
# Word order of a class name: adjectives, the noun, then where it is.
_NAME_ORDER = ("size", "colour", "shape")


def class_names(spec: world_lib.WorldSpec) -> tuple[str, ...] | None:
  """Names of the label classes in label order ('small red circle', ...), or None
  for `sum_mod` labels, which have no names.

  A class of label factors (f1, ..., fk) is named by their canonical words: size,
  colour, then the shape (or 'shape' when the label has none), then 'at the
  <position>'.
  """
  if spec.label_mode != "product":
    return None
  names = []
  for values in itertools.product(*(world_lib.FACTORS[f] for f in spec.label_factors)):
    chosen = dict(zip(spec.label_factors, values))
    words = [chosen[f] for f in _NAME_ORDER[:2] if f in chosen]
    words.append(chosen.get("shape", "shape"))
    if "position" in chosen:
      words.append(f"at the {chosen['position']}")
    names.append(" ".join(words))
  return tuple(names)


def _label_distribution(spec: world_lib.WorldSpec, known: set[str]) -> float:
  """Largest probability of one label given the values of the `known` factors."""
  unknown = [len(world_lib.FACTORS[f]) for f in spec.label_factors if f not in known]
  if spec.label_mode == "product":
    return 1.0 / math.prod(unknown)
  # sum_mod: the label is a known offset plus the sum of independent uniform unknown
  # factors, modulo K; the offset only shifts the distribution.
  k = spec.label_num_classes
  dist = np.zeros(k)
  dist[0] = 1.0
  for n in unknown:
    step = np.zeros(k)
    for v in range(n):
      step[v % k] += 1.0 / n
    dist = np.real(np.fft.ifft(np.fft.fft(dist) * np.fft.fft(step)))
  return float(dist.max())


def oracle_accuracy(spec: world_lib.WorldSpec, present: Sequence[str]) -> float:
  """Accuracy of an oracle that sees exactly the factors the `present` modalities
  express (the others are uniform and independent): the best possible accuracy."""
  known = set()
  for m in present:
    known |= set(spec.expresses.get(m, ()))
  return _label_distribution(spec, known)


def mean_oracle_accuracy(spec: world_lib.WorldSpec, mask: Mapping[str, np.ndarray]
                         ) -> float:
  """Mean over examples of `oracle_accuracy` for each example's present set.

  Args:
    spec: the world.
    mask: modality -> bool [N].
  """
  names = sorted(mask)
  present = np.stack([np.asarray(mask[m], bool) for m in names], axis=1)
  subsets, inverse = np.unique(present, axis=0, return_inverse=True)
  per_subset = np.array([oracle_accuracy(spec, [m for m, p in zip(names, row) if p])
                         for row in subsets])
  return float(np.mean(per_subset[inverse.reshape(-1)]))


def chance(spec: world_lib.WorldSpec) -> float:
  """Accuracy of always predicting the most likely label."""
  return _label_distribution(spec, set())


def retrieval_ceiling(spec: world_lib.WorldSpec, query: str, targets: Sequence[str],
                      factors: np.ndarray) -> float:
  """Expected R@1 of an oracle that matches `query` to the tuple of `targets` by the
  factors the query expresses and any of the targets expresses (for one target: the
  factors both express)."""
  seen_by_targets = set(itertools.chain.from_iterable(
      spec.expresses.get(t, ()) for t in targets))
  used = [f for f in world_lib.FACTOR_NAMES
          if f in spec.expresses.get(query, ()) and f in seen_by_targets]
  return world_lib.oracle_recall_at_1(factors, used)


def data_info(spec: world_lib.WorldSpec) -> DataInfo:
  """The world's `DataInfo`: every field known."""
  return DataInfo(
      name="world", splits=tuple(spec.sizes), num_classes=spec.num_classes,
      class_names=class_names(spec), prompt_templates=PROMPT_TEMPLATES,
      chance=chance(spec),
      label_ceiling=lambda mask: mean_oracle_accuracy(spec, mask),
      retrieval_ceiling=lambda query, targets, factors: retrieval_ceiling(
          spec, query, targets, factors))
