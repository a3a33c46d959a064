"""The procedural world: a random-access multimodal source rendered from latent factors.

Sample `i` of a split is a pure function of `(seed, split, i)`: its latent factors are
drawn, then each modality renders the factors it *expresses* (config) and sees random
nuisance in place of the others, so a modality carries no information about a factor
it does not express. With the defaults every modality expresses every factor.

Factors (all categorical, drawn uniformly and independently):

  shape     circle, square, triangle, ring, cross         (5)
  colour    red, green, blue, yellow, magenta, cyan       (6)
  size      small, medium, large                          (3)
  position  3 x 3 grid: top left ... bottom right         (9)

Renderings:

  image  [H, W, 3] float32 in [0, 1]: the shape on a noisy grey background, with
         jitter of colour, position and background brightness as nuisance.
  audio  [T] float32 waveform: colour -> fundamental pitch, shape -> timbre (harmonic
         recipe), size -> loudness and envelope, position -> (onset, tremolo rate).
  text   str caption describing the expressed factors, drawn from several templates,
         synonyms and word orders.

`label`: one factor, or a combination of factors (`product`: the index of the joint
value; `sum_mod`: the sum of the factor values modulo `num_classes`), so a label can need
information from two modalities.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import re

import numpy as np

from mmjax import checks

FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "ring", "cross"),
    "colour": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "size": ("small", "medium", "large"),
    "position": ("top left", "top", "top right", "left", "centre", "right",
                 "bottom left", "bottom", "bottom right"),
}
FACTOR_NAMES: tuple[str, ...] = tuple(FACTORS)
_NUM_VALUES = np.array([len(v) for v in FACTORS.values()])
MODALITIES: tuple[str, ...] = ("image", "audio", "text")
SPLITS: tuple[str, ...] = ("train", "test", "validation")

_RGB = np.array([(0.9, 0.1, 0.1), (0.1, 0.8, 0.1), (0.15, 0.25, 0.95),
                 (0.95, 0.9, 0.1), (0.9, 0.1, 0.9), (0.1, 0.9, 0.9)], np.float32)

# Words a caption may use for each value: the first is the canonical name.
_SYNONYMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "shape": (("circle", "disc", "ball"), ("square", "box", "block"),
              ("triangle", "wedge", "pyramid"), ("ring", "hoop", "donut"),
              ("cross", "plus", "x mark")),
    "colour": (("red", "crimson", "scarlet"), ("green", "emerald", "lime"),
               ("blue", "navy", "azure"), ("yellow", "golden", "lemon"),
               ("magenta", "pink", "fuchsia"), ("cyan", "turquoise", "teal")),
    "size": (("small", "tiny", "little"), ("medium", "mid-size", "average"),
             ("large", "big", "huge")),
    "position": (("top left", "upper left", "NW corner"), ("top", "upper middle", "top edge"),
                 ("top right", "upper right", "NE corner"),
                 ("left", "middle left", "left side"), ("centre", "middle", "center"),
                 ("right", "middle right", "right side"),
                 ("bottom left", "lower left", "SW corner"),
                 ("bottom", "lower middle", "bottom edge"),
                 ("bottom right", "lower right", "SE corner")),
}
_NOUN_FALLBACK = ("shape", "object", "thing", "figure")
# Short templates: captions stay under 48 bytes, which keeps the text tower cheap.
_TEMPLATES = (
    "a {size} {colour} {shape} {at} the {position}",
    "{position}: {size} {colour} {shape}",
    "{size} {colour} {shape}, {position}",
    "a {colour} {shape}, {size}, {at} the {position}",
    "{at} the {position}, a {size} {colour} {shape}",
    "one {size} {shape} in {colour}, {position}",
)
_AT = ("in", "at", "near", "by")
_AN_BEFORE_VOWEL = re.compile(r"(^|\s)a ([aeiou])")


# Rendering helpers. Drawing fresh Gaussian noise and evaluating sines per sample cost
# more than everything else a sample needs, so noise comes from a fixed bank (each sample
# reads a window at a random offset) and waveforms from one-period tables.
_NOISE_BANK_SIZE = 1 << 20
_SEED_SALT = 0x9E3779B97F4A7C15
_WAVETABLE_SIZE = 4096
# Shape radius per size, as a fraction of the image side.
_RADII = (0.2, 0.27, 0.34)
# Timbre of each shape: the amplitudes of harmonics 1..5.
_HARMONICS = ((1, 0, 0, 0, 0), (1, 0, 1 / 3, 0, 1 / 5), (1, 1 / 2, 1 / 3, 1 / 4, 1 / 5),
              (1, 0, 1 / 9, 0, 1 / 25), (1, 0.8, 0, 0.6, 0))


@functools.cache
def _noise_bank() -> np.ndarray:
  return np.random.default_rng(7).standard_normal(_NOISE_BANK_SIZE, dtype=np.float32)


def _noise(rng, shape) -> np.ndarray:
  """Standard-normal noise of `shape`: a window of the bank at a random offset."""
  n = math.prod(shape)
  start = int(rng.integers(0, _NOISE_BANK_SIZE - n))
  return _noise_bank()[start:start + n].reshape(shape)


def _audio_tables(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(timbres [5, WAVETABLE], amplitudes [9, 3, T]).

  timbres[shape]: one period of the shape's harmonic recipe, peak-normalised by the sum
  of its amplitudes. amplitudes[position, size]: loudness x envelope x tremolo, where
  size sets loudness and decay (larger shapes ring longer and louder) and position sets
  the onset (its row) and the tremolo rate (its column).
  """
  phase = 2 * np.pi * np.arange(_WAVETABLE_SIZE) / _WAVETABLE_SIZE
  timbres = np.stack([sum(a * np.sin((k + 1) * phase) for k, a in enumerate(h)) / sum(h)
                      for h in _HARMONICS]).astype(np.float32)
  duration = float(t[-1] + t[1]) if len(t) > 1 else 1.0
  amplitudes = np.zeros((9, 3, len(t)), np.float32)
  for position in range(9):
    onset_slot, tremolo_slot = divmod(position, 3)
    onset = (0.0, 0.15, 0.3)[onset_slot] * duration
    tremolo = 1.0 + 0.5 * np.sin(2 * np.pi * (4.0, 10.0, 20.0)[tremolo_slot] * t)
    for size, (decay, loudness) in enumerate(((12.0, 0.4), (5.0, 0.7), (1.5, 1.0))):
      envelope = np.where(t < onset, 0.0, np.exp(-decay * np.maximum(t - onset, 0.0)))
      amplitudes[position, size] = loudness * envelope * tremolo
  return timbres, amplitudes


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """What the world renders. Built from `config.data` by `WorldSpec.from_config`."""
  seed: int = 0
  sizes: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"train": 50_000, "test": 512, "validation": 512})
  modalities: Sequence[str] = MODALITIES
  expresses: Mapping[str, Sequence[str]] = dataclasses.field(
      default_factory=lambda: {m: FACTOR_NAMES for m in MODALITIES})
  noise: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"image": 0.05, "audio": 0.05, "text": 0.0})
  image_size: int = 32
  audio_samples: int = 4000
  sample_rate: int = 8000
  label_factors: Sequence[str] = ("shape",)
  label_mode: str = "product"         # product | sum_mod
  label_num_classes: int = 0          # sum_mod only

  def __post_init__(self):
    for m in self.modalities:
      if m not in MODALITIES:
        raise ValueError(f"data.modalities: unknown modality {m!r}; valid: {MODALITIES}")
    for m, fs in self.expresses.items():
      if m not in MODALITIES:
        raise ValueError(f"data.expresses: unknown modality {m!r}; valid: {MODALITIES}")
      for f in fs:
        if f not in FACTORS:
          raise ValueError(f"data.expresses.{m}: unknown factor {f!r}; valid: {FACTOR_NAMES}")
    for m in self.noise:
      if m not in MODALITIES:
        raise ValueError(f"data.noise: unknown modality {m!r}; valid: {MODALITIES}")
      checks.check_range(f"data.noise.{m}", self.noise[m], low=0)
    checks.check_count("data.audio_samples", self.audio_samples)
    checks.check_count("data.sample_rate", self.sample_rate)
    for f in self.label_factors:
      if f not in FACTORS:
        raise ValueError(f"data.label.factors: unknown factor {f!r}; valid: {FACTOR_NAMES}")
    if self.label_mode not in ("product", "sum_mod"):
      raise ValueError(f"data.label.mode must be 'product' or 'sum_mod', got {self.label_mode!r}")
    if self.label_mode == "sum_mod" and self.label_num_classes < 2:
      raise ValueError("data.label.num_classes must be >= 2 for mode 'sum_mod'")
    if self.image_size < 16:
      raise ValueError(f"data.image_size must be >= 16, got {self.image_size}")
    for split, n in self.sizes.items():
      if split not in SPLITS:
        raise ValueError(f"data.sizes: unknown split {split!r}; valid: {SPLITS}")
      checks.check_count(f"data.sizes.{split}", n)

  @classmethod
  def from_config(cls, data_config) -> "WorldSpec":
    c = data_config
    return cls(seed=c.seed, sizes=dict(c.sizes), modalities=tuple(c.modalities),
               expresses={m: tuple(fs) for m, fs in c.expresses.items()},
               noise=dict(c.noise), image_size=c.image_size,
               audio_samples=c.audio_samples, sample_rate=c.sample_rate,
               label_factors=tuple(c.label.factors), label_mode=c.label.mode,
               label_num_classes=c.label.num_classes)

  @property
  def num_classes(self) -> int:
    if self.label_mode == "sum_mod":
      return self.label_num_classes
    return math.prod(len(FACTORS[f]) for f in self.label_factors)

  def label_of(self, factors: Mapping[str, int]) -> int:
    values = [int(factors[f]) for f in self.label_factors]
    if self.label_mode == "sum_mod":
      return sum(values) % self.label_num_classes
    index = 0
    for f, v in zip(self.label_factors, values):
      index = index * len(FACTORS[f]) + v
    return index


def _split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; the world has {SPLITS}")
  return SPLITS.index(split)


class World:
  """Random-access source over one split: `len(world)`, `world[i] -> dict`.

  A record holds one entry per modality in `spec.modalities` (`image` float32 [H,W,3],
  `audio` float32 [T], `text` str), `label` (int), and `factors` (int32 [4], in
  `FACTOR_NAMES` order).
  """

  def __init__(self, spec: WorldSpec, split: str):
    self.spec = spec
    self.split = split
    self._split_id = _split_id(split)
    if split not in spec.sizes:
      raise ValueError(f"split {split!r} has no size in data.sizes {dict(spec.sizes)}")
    self._len = int(spec.sizes[split])
    n = spec.image_size
    self._ys = np.arange(n, dtype=np.float32)[:, None]    # [n, 1]; broadcasting makes
    self._xs = np.arange(n, dtype=np.float32)[None, :]    # the [n, n] masks
    self._t = np.arange(spec.audio_samples, dtype=np.float32) / spec.sample_rate
    self._timbres, self._amplitudes = _audio_tables(self._t)
    self._expr = {m: frozenset(spec.expresses.get(m, ())) for m in MODALITIES}

  def __len__(self) -> int:
    return self._len

  def __repr__(self):
    return f"World(split={self.split!r}, len={self._len}, modalities={tuple(self.spec.modalities)})"

  def factors(self, index: int) -> np.ndarray:
    """The latent factors of sample `index`, int32 [len(FACTOR_NAMES)]."""
    return self._draw(index)[0]

  def _draw(self, index: int):
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range for split {self.split!r} of size {self._len}")
    # One integer seed per (seed, split, index) (a tuple seed costs 4x more), salted in
    # its high bits so that it never equals a small seed a user might pass to numpy.
    key = (_SEED_SALT << 96 | (self.spec.seed * len(SPLITS) + self._split_id) << 40
           | int(index))
    rng = np.random.Generator(np.random.PCG64(key))
    factors = rng.integers(0, _NUM_VALUES).astype(np.int32)
    return factors, rng

  def __getitem__(self, index: int) -> dict:
    factors, rng = self._draw(int(index))
    record = {"factors": factors,
              "label": self.spec.label_of(dict(zip(FACTOR_NAMES, factors)))}
    for m in self.spec.modalities:
      seen = self._seen(m, factors, rng)
      record[m] = getattr(self, f"_render_{m}")(seen, rng)
    return record

  def _seen(self, modality: str, factors: np.ndarray, rng) -> dict[str, int]:
    """Factor values as a modality sees them: unexpressed factors become random nuisance."""
    expressed = self._expr[modality]
    if len(expressed) == len(FACTOR_NAMES):
      return dict(zip(FACTOR_NAMES, factors.tolist()))
    nuisance = rng.integers(0, _NUM_VALUES).tolist()
    return {f: v if f in expressed else r
            for f, v, r in zip(FACTOR_NAMES, factors.tolist(), nuisance)}

  # -- image ---------------------------------------------------------------------------
  def _render_image(self, seen, rng) -> np.ndarray:
    n = self.spec.image_size
    cell = n / 3.0
    row, col = divmod(seen["position"], 3)
    cy = (row + 0.5) * cell + rng.uniform(-1.0, 1.0)
    cx = (col + 0.5) * cell + rng.uniform(-1.0, 1.0)
    radius = _RADII[seen["size"]] * n * rng.uniform(0.92, 1.08)
    dy, dx = (self._ys - cy) / radius, (self._xs - cx) / radius
    ady, adx = np.abs(dy), np.abs(dx)
    shape = seen["shape"]
    if shape == 0:
      inside = dx * dx + dy * dy <= 1.0
    elif shape == 1:
      inside = np.maximum(adx, ady) <= 0.8
    elif shape == 2:
      inside = (dy <= 0.75) & (adx <= (dy + 1.0) * 0.6)
    elif shape == 3:
      r2 = dx * dx + dy * dy
      inside = (r2 <= 1.0) & (r2 >= 0.3)
    else:
      inside = ((adx <= 0.3) & (ady <= 1.0)) | ((ady <= 0.3) & (adx <= 1.0))
    background = rng.uniform(0.25, 0.55)
    colour = np.clip(_RGB[seen["colour"]] + rng.normal(0, 0.04, 3), 0, 1).astype(np.float32)
    image = background + inside[..., None] * (colour - np.float32(background))
    noise = self.spec.noise.get("image", 0.0)
    if noise:
      image += np.float32(noise) * _noise(rng, image.shape)
    return np.clip(image, 0.0, 1.0, out=image)

  # -- audio ---------------------------------------------------------------------------
  def _render_audio(self, seen, rng) -> np.ndarray:
    f0 = 220.0 * 2.0 ** (seen["colour"] * 2 / 12) * rng.uniform(0.99, 1.01)
    phase = rng.uniform(0, 1)      # in periods
    cycles = self._t * np.float32(f0 * _WAVETABLE_SIZE) + np.float32(phase * _WAVETABLE_SIZE)
    wave = self._timbres[seen["shape"]][cycles.astype(np.int32) & (_WAVETABLE_SIZE - 1)]
    wave *= self._amplitudes[seen["position"], seen["size"]]
    noise = self.spec.noise.get("audio", 0.0)
    if noise:
      wave += np.float32(noise) * _noise(rng, wave.shape)
    return wave

  # -- text ----------------------------------------------------------------------------
  def _render_text(self, seen, rng) -> str:
    expressed = self._expr["text"]
    words = {}
    for f in FACTOR_NAMES:
      if f in expressed:
        options = _SYNONYMS[f][seen[f]]
        words[f] = options[rng.integers(len(options))]
      else:
        words[f] = None
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    if words["shape"] is None:
      words["shape"] = _NOUN_FALLBACK[rng.integers(len(_NOUN_FALLBACK))]
    caption = template.format(
        size=words["size"] or "", colour=words["colour"] or "", shape=words["shape"],
        position=words["position"] or "picture", at=_AT[rng.integers(len(_AT))])
    caption = " ".join(caption.split()).replace(" ,", ",")
    caption = _AN_BEFORE_VOWEL.sub(r"\1an \2", caption)
    noise = self.spec.noise.get("text", 0.0)
    if noise:   # character dropout: each character is deleted with probability `noise`
      keep = rng.random(len(caption)) >= noise
      caption = "".join(c for c, k in zip(caption, keep) if k)
    return caption


def oracle_recall_at_1(factors: np.ndarray, used: Sequence[str]) -> float:
  """Expected R@1 of an oracle that knows only the factors `used` of every sample.

  Query i's match is item i; the oracle cannot tell apart items whose `used` factors are
  equal, so it ranks its match first with probability 1 / (size of that group).

  Args:
    factors: int [N, len(FACTOR_NAMES)], the factors of the retrieval set.
    used: names of the factors the oracle sees.
  """
  factors = np.asarray(factors)
  if factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
    raise ValueError(f"factors must be [N, {len(FACTOR_NAMES)}], got {factors.shape}")
  cols = [FACTOR_NAMES.index(f) for f in used]
  if not cols:
    return 1.0 / len(factors)
  keys = factors[:, cols]
  _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
  return float(np.mean(1.0 / counts[inverse.reshape(-1)]))


def num_combinations(factors: Sequence[str]) -> int:
  return math.prod(len(FACTORS[f]) for f in factors)
