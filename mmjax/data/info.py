"""`DataInfo`: what a data source tells the evaluators about itself.

Evaluators know nothing of where the data comes from. What they need beyond the
batches of a split (class names to prompt a text tower with, prompt templates, the
number of classes, and, where the data can know it, the best accuracy or recall any
model could reach) comes through this one small record. `pipeline.data_info(config.data)`
builds it: the procedural world fills every field (`mmjax.data.world_info`); a TFDS
dataset fills what its metadata and config say (`mmjax.data.tfds_source.data_info`).
A field a source cannot know is None, and an evaluator that needs it says so, naming
itself and the source.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a data source knows about itself.

  Attributes:
    name: the source, for messages ('world', 'tfds:my_dataset').
    splits: the split names it has.
    num_classes: classes of `label`, or None (evaluators then count the labels seen).
    class_names: one name per class in label order, or None.
    prompt_templates: format strings with one '{}' that read like the source's
      captions, or None (the zero-shot evaluator then uses CLIP-style ones).
    chance: accuracy of always predicting the most likely label, when known exactly.
    label_ceiling: `mask {modality: bool [N]} -> float`, the mean accuracy of an
      oracle that sees exactly what the present modalities carry, or None.
    retrieval_ceiling: `(query, targets, factors [N, F]) -> float`, the expected R@1
      of an oracle retrieving `targets` (a tuple of modalities) from `query` among
      the rows of `factors`, or None.
  """
  name: str
  splits: tuple[str, ...] = ()
  num_classes: Optional[int] = None
  class_names: Optional[tuple[str, ...]] = None
  prompt_templates: Optional[tuple[str, ...]] = None
  chance: Optional[float] = None
  label_ceiling: Optional[Callable[[Mapping[str, np.ndarray]], float]] = None
  retrieval_ceiling: Optional[Callable[[str, Sequence[str], np.ndarray], float]] = None

  def __post_init__(self):
    if self.class_names is not None and self.num_classes is not None and (
        len(self.class_names) != self.num_classes):
      raise ValueError(f"{self.name}: {len(self.class_names)} class names for "
                       f"{self.num_classes} classes")
