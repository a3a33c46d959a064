"""Missingness as a per-example transform: which modalities of an example are absent.

Seeded by `(seed, example index)`, so the same index always gets the same mask whatever
the shuffle, the process count or the epoch. Absent inputs are zero-filled and their
`mask` entry is False. Kinds:

  none         every modality present.
  mcar         each modality missing independently with its own rate
               (missing completely at random).
  combination  the present set is drawn from a fixed list of combinations
               (e.g. [['image'], ['image', 'text']]) with optional weights.
  mnar         missing not at random: modality m is missing with rate
               `rates[m][value]` where `value` is the example's label or one latent factor.

Unless `allow_none`, an example never loses every modality: when a draw removes all,
one modality (chosen uniformly by the same seed) is put back.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from mmjax import checks
from mmjax.data import world as world_lib

KINDS = ("none", "mcar", "combination", "mnar")


@dataclasses.dataclass(frozen=True)
class Missingness:
  modalities: tuple[str, ...]
  kind: str = "none"
  rates: Mapping[str, float] = dataclasses.field(default_factory=dict)         # mcar
  combinations: Sequence[Sequence[str]] = ()                                   # combination
  weights: Sequence[float] = ()                                                # combination
  mnar_on: str = "label"                                                       # mnar: 'label' or a factor
  mnar_rates: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
  allow_none: bool = False
  seed: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"missing.kind: unknown kind {self.kind!r}; valid: {KINDS}")
    known = set(self.modalities)
    # A rate of 0 (an empty table) for a modality the model does not encode changes
    # nothing: the configs hold one per modality the data has, for the command line.
    for field, names in (("missing.rates", self.rates), ("missing.mnar_rates", self.mnar_rates)):
      for m, value in names.items():
        if m not in known and (value != 0 if field == "missing.rates" else len(value)):
          raise ValueError(f"{field}.{m}={value!r}: the model encodes no modality {m!r}; "
                           f"it encodes {self.modalities}")
    for m, r in self.rates.items():
      checks.check_rate(f"data.missing.rates.{m}", r)
    for m, rs in self.mnar_rates.items():
      for i, r in enumerate(rs):
        checks.check_rate(f"data.missing.mnar_rates.{m}[{i}]", r)
    if self.kind == "combination":
      if not self.combinations:
        raise ValueError("missing.combinations must list at least one combination")
      for c in self.combinations:
        for m in c:
          if m not in known:
            raise ValueError(f"missing.combinations: modality {m!r} is not among "
                             f"{self.modalities}")
        if not c and not self.allow_none:
          raise ValueError("missing.combinations has an empty combination but "
                           "missing.allow_none is False")
      if self.weights and len(self.weights) != len(self.combinations):
        raise ValueError(f"missing.weights has {len(self.weights)} entries for "
                         f"{len(self.combinations)} combinations")
    if self.kind == "mnar" and self.mnar_on != "label" and \
        self.mnar_on not in world_lib.FACTOR_NAMES:
      raise ValueError(f"missing.mnar_on must be 'label' or a factor "
                       f"{world_lib.FACTOR_NAMES}, got {self.mnar_on!r}")

  @classmethod
  def from_config(cls, missing_config, modalities: Sequence[str]) -> "Missingness":
    c = missing_config
    return cls(modalities=tuple(modalities), kind=c.kind, rates=dict(c.rates),
               combinations=tuple(tuple(x) for x in c.combinations),
               weights=tuple(c.weights), mnar_on=c.mnar_on,
               mnar_rates={m: tuple(r) for m, r in c.mnar_rates.items()},
               allow_none=c.allow_none, seed=c.seed)

  def present(self, index: int, example: Mapping) -> dict[str, bool]:
    """Which modalities of example `index` are present."""
    if self.kind == "none":
      return {m: True for m in self.modalities}
    rng = np.random.default_rng((self.seed, 0x6D697373, int(index)))
    if self.kind == "combination":
      p = None
      if self.weights:
        p = np.asarray(self.weights, np.float64) / np.sum(self.weights)
      chosen = set(self.combinations[rng.choice(len(self.combinations), p=p)])
      return {m: m in chosen for m in self.modalities}
    u = rng.random(len(self.modalities))
    rates = self._rates(example)
    present = {m: bool(x >= r) for m, x, r in zip(self.modalities, u, rates)}
    if not any(present.values()) and not self.allow_none:
      present[self.modalities[rng.integers(len(self.modalities))]] = True
    return present

  def propensity(self, example: Mapping) -> dict[str, float]:
    """P(modality present) for an example with these label / factors: the missingness
    model `present` draws from, exactly (for `mnar` and `mcar`, an example whose draw
    removed every modality gets one back, chosen uniformly, unless `allow_none`)."""
    if self.kind == "none":
      return {m: 1.0 for m in self.modalities}
    if self.kind == "combination":
      weights = (np.asarray(self.weights, np.float64) if self.weights
                 else np.ones(len(self.combinations)))
      weights = weights / weights.sum()
      return {m: float(sum(w for c, w in zip(self.combinations, weights) if m in c))
              for m in self.modalities}
    rates = self._rates(example)
    put_back = 0.0 if self.allow_none else float(np.prod(rates)) / len(self.modalities)
    return {m: 1.0 - r + put_back for m, r in zip(self.modalities, rates)}

  def _rates(self, example: Mapping) -> list[float]:
    """Each modality's missing rate for this example (kinds mcar and mnar)."""
    if self.kind == "mcar":
      return [self.rates.get(m, 0.0) for m in self.modalities]
    value = int(example["label"] if self.mnar_on == "label" else
                example["factors"][world_lib.FACTOR_NAMES.index(self.mnar_on)])
    rates = []
    for m in self.modalities:
      table = self.mnar_rates.get(m, ())
      if table and value >= len(table):
        raise ValueError(f"missing.mnar_rates.{m} has {len(table)} rates but "
                         f"{self.mnar_on} = {value}")
      rates.append(table[value] if table else 0.0)
    return rates

  def __call__(self, example: dict) -> dict:
    present = self.present(int(example["index"]), example)
    for m, here in present.items():
      example["mask"][m] = np.bool_(here)
      if not here:
        example[m] = np.zeros_like(example[m])
    return example


def combination_name(modalities: Sequence[str]) -> str:
  """'audio+image': the sorted names joined with '+' (metric keys, plots)."""
  return "+".join(sorted(modalities))


def all_combinations(modalities: Sequence[str]) -> list[tuple[str, ...]]:
  """The 2^M - 1 non-empty subsets, smallest first, each sorted."""
  ms = sorted(modalities)
  subsets = [tuple(m for k, m in enumerate(ms) if bits >> k & 1)
             for bits in range(1, 2 ** len(ms))]
  return sorted(subsets, key=lambda s: (len(s), s))
