"""What the TFDS source does to decoded features: images cropped, resized and normalised,
waveforms resampled and cropped or padded, one caption of several picked.

Each transform has an evaluation form (deterministic) and a training form that draws
from a `numpy.random.Generator`. The training stream (`pipeline.train_dataset`) makes
that generator with `example_rng((seed, position), stream)`: a pure function of the run's
seed, the example's position in the global stream (epoch * N + slot for a shuffle; the
position is the same on any process count) and the stream's name (a modality), so an
example's augmentation does not depend on threads, process count or how the run was
resumed, and each modality draws independently of which others are configured.

  images  [H, W, C] or video [T, H, W, C], any size:
            eval   the largest centred square, resized to `size` x `size` in one step
                   (bilinear); with a preset (`IMAGE_PRESETS`, `data.image_preset`)
                   as the published model's own transform: 'clip' resizes the
                   shorter side to `size` (bicubic) and crops the centre, 'siglip'
                   resizes the whole image to `size` x `size` (bicubic)
            train  a random resized crop (area fraction in `scale`, aspect ratio in
                   `ratio`, log-uniform) resized to `size` x `size` (with a preset's
                   interpolation), then a horizontal flip with probability
                   `flip_prob`; a video takes one crop and flip for all its frames
          then float32 in [0, 1] (uint8 / 255, uint16 / 65535) and, with a
          normalisation, (x - mean) / std per channel ('siglip': [-1, 1])
  audio   [T] waveform: resampled from the stored rate to the wanted one
          (`scipy.signal.resample_poly`), then cut to `samples` (eval: the centred
          window; train: a random one) or zero-padded at the end; the true length is
          returned beside it
  text    several captions: eval takes the first, train one at random
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np

# name -> (mean, std) per RGB channel, applied to pixels in [0, 1]; None: no normalisation.
NORM_PRESETS = {
    "none": None,
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),     # [0, 1] -> [-1, 1]
}
# name -> the evaluation resize (`PixelTransform.resize`), the interpolation, the
# normalisation and the side used when `data.image_size` is 0: the published
# models' own transforms (open_clip's for OpenAI CLIP and for SigLIP).
IMAGE_PRESETS = {
    "clip": dict(resize="shortest", interpolation="bicubic", norm="clip", size=224),
    "siglip": dict(resize="squash", interpolation="bicubic", norm="siglip", size=224),
}
RESIZES = ("centre_square", "shortest", "squash")
_INTERPOLATIONS = ("bilinear", "bicubic")
_SALT = 0x6D6D6A61   # separates augmentation draws from the shuffle seeded by the same seed
_MAX_TRIES = 10


def normalization(name: str, mean: Sequence[float] = (), std: Sequence[float] = (),
                  where: str = "data.image_norm"):
  """`(mean, std)` float32 arrays of preset `name`, or of `mean` / `std` for 'custom';
  None for 'none'."""
  mean, std = tuple(mean or ()), tuple(std or ())
  if name == "custom":
    if not mean or len(mean) != len(std):
      raise ValueError(f"{where}='custom' needs data.image_mean and data.image_std, one "
                       f"value per channel each; got mean={mean}, std={std}")
    if min(std) <= 0:
      raise ValueError(f"data.image_std must be positive, got {std}")
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if name not in NORM_PRESETS:
    raise ValueError(f"{where}: unknown normalisation {name!r}; valid: "
                     f"{sorted(NORM_PRESETS) + ['custom']}")
  if mean or std:
    raise ValueError(f"data.image_mean / data.image_std are read only with "
                     f"{where}='custom', but it is {name!r}")
  preset = NORM_PRESETS[name]
  return None if preset is None else tuple(np.asarray(v, np.float32) for v in preset)


def pixel_transform(image_size: int = 0, image_norm: str = "none", image_mean=(),
                    image_std=(), image_preset: str = "", **kwargs) -> "PixelTransform":
  """The `PixelTransform` of `config.data`'s fields: `image_preset` ('' or a name of
  `IMAGE_PRESETS`) sets the resize, interpolation and normalisation (`image_norm` may
  then only be 'none' or the preset's own) and the side when `image_size` is 0;
  `kwargs` are the training crop's (`augment`, `scale`, `ratio`, `flip_prob`)."""
  if not image_preset:
    return PixelTransform(image_size, normalization(image_norm, image_mean, image_std),
                          **kwargs)
  if image_preset not in IMAGE_PRESETS:
    raise ValueError(f"data.image_preset: unknown preset {image_preset!r}; valid: "
                     f"{sorted(IMAGE_PRESETS)} (or '' for none)")
  preset = IMAGE_PRESETS[image_preset]
  if image_norm not in ("none", preset["norm"]) or image_mean or image_std:
    raise ValueError(f"data.image_norm={image_norm!r}: data.image_preset="
                     f"{image_preset!r} normalises with {preset['norm']!r}; leave "
                     "image_norm 'none' (and image_mean / image_std empty)")
  return PixelTransform(image_size or preset["size"], normalization(preset["norm"]),
                        resize=preset["resize"], interpolation=preset["interpolation"],
                        **kwargs)


def example_rng(key: tuple[int, int], stream: str) -> np.random.Generator:
  """The generator of one example's `stream` (a modality), from `key = (seed, position)`."""
  seed, position = key
  return np.random.default_rng([_SALT, int(seed) % 2**64, int(position),
                                zlib.crc32(stream.encode())])


# ---------------------------------------------------------------------------------------
# Pixels.
# ---------------------------------------------------------------------------------------


def centre_box(height: int, width: int) -> tuple[float, float, float, float]:
  """(left, top, right, bottom) of the largest centred square."""
  side = min(height, width)
  left, top = (width - side) / 2, (height - side) / 2
  return left, top, left + side, top + side


def random_box(height: int, width: int, rng: np.random.Generator,
               scale: Sequence[float] = (0.9, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """A random crop (left, top, right, bottom) covering a fraction in `scale` of the area
  with a width / height in `ratio` (log-uniform); after `_MAX_TRIES` draws that do not
  fit, the centred crop of the largest area with the ratio clamped into `ratio`."""
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(_MAX_TRIES):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  aspect = min(max(width / height, ratio[0]), ratio[1])
  w, h = (width, int(round(width / aspect))) if width / height <= aspect else (
      int(round(height * aspect)), height)
  w, h = min(w, width), min(h, height)
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def shortest_side(height: int, width: int, size: int) -> tuple[tuple[int, int], tuple]:
  """([h, w] with the shorter side `size` and the longer one scaled and truncated to
  an integer, (left, top, right, bottom) of the centred `size` x `size` crop of it,
  offsets rounded): the resize-then-centre-crop torchvision's Resize(size) and
  CenterCrop(size) do, which open_clip's CLIP transform is."""
  if width <= height:
    new = (int(size * height / width), size)
  else:
    new = (size, int(size * width / height))
  top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
  return new, (left, top, left + size, top + size)


def resize_box(image: np.ndarray, box, shape: tuple[int, int],
               interpolation: str = "bilinear") -> np.ndarray:
  """The `box` (left, top, right, bottom) of [H, W, C] resized to `shape` [h, w] with
  PIL's antialiased `interpolation` ('bilinear' or 'bicubic'), in the image's dtype
  (uint8 grey or RGB natively, others channel by channel in float, integers rounded
  back)."""
  import PIL.Image  # pylint: disable=g-import-not-at-top  (TFDS decodes images with PIL)
  box = tuple(float(b) for b in box)
  size = (int(shape[1]), int(shape[0]))   # PIL: (width, height)
  resample = {"bilinear": PIL.Image.BILINEAR, "bicubic": PIL.Image.BICUBIC}[interpolation]
  if image.dtype == np.uint8 and image.shape[-1] in (1, 3):
    pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize(size, resample, box=box))
    return out.reshape(*shape, image.shape[-1])
  channels = [np.asarray(PIL.Image.fromarray(image[..., c].astype(np.float32), mode="F")
                         .resize(size, resample, box=box))
              for c in range(image.shape[-1])]
  resized = np.stack(channels, axis=-1)
  if image.dtype.kind in "ui":
    info = np.iinfo(image.dtype)
    resized = np.clip(np.rint(resized), info.min, info.max)
  return resized.astype(image.dtype)


def to_unit(image: np.ndarray) -> np.ndarray:
  """float32 in [0, 1]: uint8 / 255, uint16 / 65535, floats as they are."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) / np.float32(255)
  if image.dtype == np.uint16:
    return image.astype(np.float32) / np.float32(65535)
  return image.astype(np.float32)


class PixelTransform:
  """Images [H, W, C] and videos [T, H, W, C] -> float32 [..., size, size, C] (module doc).

  Args:
    size: output side; 0 keeps the stored size (no crop in evaluation; the training
      crop is resized back to it).
    norm: `(mean, std)` arrays from `normalization`, or None.
    augment: the training form crops and flips (otherwise it is the evaluation form).
    scale, ratio, flip_prob: the random resized crop and flip.
    resize: the evaluation form's resize (`RESIZES`): 'centre_square' (the largest
      centred square resized to `size`), 'shortest' (the shorter side resized to
      `size`, then the centred `size` x `size` crop, `shortest_side`) or 'squash'
      (the whole image resized to `size` x `size`).
    interpolation: 'bilinear' or 'bicubic' (PIL's, antialiased), for every resize.
  """

  def __init__(self, size: int = 0, norm=None, *, augment: bool = False,
               scale: Sequence[float] = (0.9, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3), flip_prob: float = 0.5,
               resize: str = "centre_square", interpolation: str = "bilinear"):
    scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
      raise ValueError(f"data.crop_scale must be (low, high) with 0 < low <= high <= 1, "
                       f"got {scale}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
      raise ValueError(f"data.crop_ratio must be (low, high) with 0 < low <= high, "
                       f"got {ratio}")
    if not 0 <= flip_prob <= 1:
      raise ValueError(f"data.flip_prob must be in [0, 1], got {flip_prob}")
    if resize not in RESIZES or interpolation not in _INTERPOLATIONS:
      raise ValueError(f"PixelTransform: resize={resize!r} must be one of {RESIZES} and "
                       f"interpolation={interpolation!r} one of {_INTERPOLATIONS}")
    self.size, self.norm, self.augment = int(size), norm, bool(augment)
    self.resize, self.interpolation = resize, interpolation
    self.scale, self.ratio, self.flip_prob = scale, ratio, float(flip_prob)

  def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None
               ) -> np.ndarray:
    """Evaluation form when `rng` is None (or augmentation is off), else training."""
    height, width = image.shape[-3:-1]
    # Without a size the crop is resized back to the stored size.
    shape = (self.size, self.size) if self.size else (height, width)
    flip, box, crop = False, None, None
    if rng is not None and self.augment:
      box = random_box(height, width, rng, self.scale, self.ratio)
      flip = bool(rng.random() < self.flip_prob)
    elif (height, width) != shape:
      box = centre_box(height, width) if self.resize == "centre_square" else (
          0, 0, width, height)
      if self.resize == "shortest":
        shape, crop = shortest_side(height, width, self.size)
    if box is not None:
      frames = image if image.ndim == 4 else image[None]
      frames = [resize_box(f, box, shape, self.interpolation) for f in frames]
      if crop is not None:
        left, top, right, bottom = crop
        frames = [f[top:bottom, left:right] for f in frames]
      image = np.stack(frames) if image.ndim == 4 else frames[0]
    if flip:
      image = image[..., ::-1, :]
    image = to_unit(image)
    if self.norm is not None:
      mean, std = self.norm
      if image.shape[-1] != mean.shape[0]:
        raise ValueError(f"data.image_norm has {mean.shape[0]} channels' constants but the "
                         f"images have {image.shape[-1]} channels ({image.shape})")
      image = (image - mean) / std
    return np.ascontiguousarray(image, np.float32)


# ---------------------------------------------------------------------------------------
# Waveforms and captions.
# ---------------------------------------------------------------------------------------


def resample(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
  """`wave` [T] at `source_rate` Hz resampled to `target_rate` Hz (polyphase filtering,
  `scipy.signal.resample_poly`): ceil(T * target / source) samples, float32."""
  if source_rate == target_rate:
    return wave
  from scipy import signal  # pylint: disable=g-import-not-at-top  (only when resampling)
  g = math.gcd(int(source_rate), int(target_rate))
  return signal.resample_poly(wave, int(target_rate) // g, int(source_rate) // g
                              ).astype(np.float32)


class WaveTransform:
  """Waveforms [T] (float, or integers as 16-bit PCM) -> (float32 [samples], true length).

  Args:
    samples: output length; 0 keeps every sample (no crop or pad).
    source_rate, target_rate: resample from the one to the other (None or equal: not).
  """

  def __init__(self, samples: int = 0, source_rate: int | None = None,
               target_rate: int | None = None):
    self.samples = int(samples)
    self.source_rate, self.target_rate = source_rate, target_rate

  def __call__(self, wave: np.ndarray, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, int]:
    wave = (wave.astype(np.float32) / np.float32(32768) if wave.dtype.kind == "i"
            else wave.astype(np.float32))
    if self.target_rate and self.source_rate and wave.ndim == 1:
      wave = resample(wave, self.source_rate, self.target_rate)
    n, length = self.samples, wave.shape[0]
    if not n or length == n:
      return wave, length
    if length < n:
      return np.pad(wave, (0, n - length)), length
    start = (length - n) // 2 if rng is None else int(rng.integers(0, length - n + 1))
    return wave[start:start + n], n


def pick_caption(captions: Sequence[str], rng: np.random.Generator | None = None) -> str:
  """The first caption (evaluation) or one at random (training); '' if there is none."""
  if not len(captions):
    return ""
  return captions[0] if rng is None else captions[int(rng.integers(len(captions)))]
