"""Audio encoder: waveform -> log-mel spectrogram -> patch transformer (AST).

The spectrogram is computed in JAX, so it runs on the accelerator inside
the jitted step:

- framing without padding: frame i covers samples [i * hop, i * hop + n_fft),
  so a clip of T samples has 1 + (T - n_fft) // hop frames;
- a periodic Hann window w[n] = 0.5 - 0.5 cos(2 pi n / n_fft);
- the power spectrum |rFFT|^2 (n_fft // 2 + 1 bins);
- an HTK mel filterbank: mel(f) = 2595 log10(1 + f / 700), n_mels + 2
  points equally spaced on the mel scale between fmin and fmax, triangular
  filters with peak 1 (no area normalisation);
- the natural log of max(mel energy, floor).

The spectrogram [B, frames, mels] is cut into non-overlapping
(time x mel) patches as in AST (Gong et al. 2021, who use overlapping
patches; non-overlapping ones keep the token count low), with a learned 2-D
position table covering `max_frames`.
"""
import math
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers

POOLS = ('cls', 'gap', 'map')


def hz_to_mel(freq):
  """HTK mel scale."""
  return 2595.0 * np.log10(1.0 + np.asarray(freq, np.float64) / 700.0)


def mel_to_hz(mel):
  """Inverse of `hz_to_mel`."""
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int,
                   fmin: float = 0.0, fmax: Optional[float] = None
                   ) -> np.ndarray:
  """HTK triangular mel filterbank.

  Returns:
    float32 [n_fft // 2 + 1, n_mels]; column m rises linearly from 0 at mel
    point m to 1 at point m + 1 and falls back to 0 at point m + 2.
  """
  fmax = sample_rate / 2.0 if fmax is None else float(fmax)
  if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
    raise ValueError(
        f'need 0 <= fmin < fmax <= sample_rate / 2; got fmin={fmin}, '
        f'fmax={fmax}, sample_rate={sample_rate}')
  bin_hz = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
  points_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax),
                                    n_mels + 2))
  lower, center, upper = points_hz[:-2], points_hz[1:-1], points_hz[2:]
  rising = (bin_hz[:, None] - lower) / (center - lower)
  falling = (upper - bin_hz[:, None]) / (upper - center)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel_spectrogram(wave: jax.Array, sample_rate: int = 16000,
                        n_fft: int = 400, hop: int = 160, n_mels: int = 128,
                        fmin: float = 0.0, fmax: Optional[float] = None,
                        floor: float = 1e-10) -> jax.Array:
  """Log-mel spectrogram of waveforms (definition in the module docstring).

  Args:
    wave: float [T] or [B, T] samples.
    sample_rate: samples per second.
    n_fft: frame (and FFT) length in samples.
    hop: samples between frame starts.
    n_mels: mel bands.
    fmin, fmax: frequency range of the filterbank in Hz (fmax None: Nyquist).
    floor: energies below it are clipped to it before the log.

  Returns:
    float32 [frames, n_mels] or [B, frames, n_mels], frames =
    1 + (T - n_fft) // hop.

  Raises:
    ValueError: the clip is shorter than one frame, or bad rank/arguments.
  """
  if wave.ndim not in (1, 2):
    raise ValueError(f'wave must be [T] or [B, T]; got shape {wave.shape}')
  if n_fft <= 0 or hop <= 0 or n_mels <= 0 or floor <= 0:
    raise ValueError(
        f'n_fft, hop, n_mels and floor must be positive; got n_fft={n_fft}, '
        f'hop={hop}, n_mels={n_mels}, floor={floor}')
  length = wave.shape[-1]
  if length < n_fft:
    raise ValueError(
        f'audio of {length} samples is shorter than one frame (n_fft={n_fft})')
  num_frames = 1 + (length - n_fft) // hop
  starts = np.arange(num_frames) * hop
  index = starts[:, None] + np.arange(n_fft)[None, :]
  frames = wave.astype(jnp.float32)[..., index]  # [..., frames, n_fft]
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
  spectrum = jnp.fft.rfft(frames * window.astype(np.float32), axis=-1)
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  filters = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
  mel = jnp.matmul(power, filters, precision=jax.lax.Precision.HIGHEST)
  return jnp.log(jnp.maximum(mel, floor))


def spec_augment(spec: jax.Array, rng: jax.Array, *, time_masks: int,
                 time_mask_max: int, freq_masks: int, freq_mask_max: int,
                 fill: float = 0.0) -> jax.Array:
  """SpecAugment time and frequency masking (Park et al. 2019).

  Each example gets `time_masks` bands of w ~ U{0..time_mask_max} whole
  frames and `freq_masks` bands of U{0..freq_mask_max} mel bins, at uniform
  positions, set to `fill`.

  Args:
    spec: [B, frames, mels].
    rng: PRNG key.

  Returns:
    masked [B, frames, mels].
  """
  batch, num_frames, num_mels = spec.shape

  def band_mask(key, count, max_width, size):
    if count == 0 or max_width == 0:
      return jnp.zeros((batch, size), bool)
    k_width, k_start = jax.random.split(key)
    width = jax.random.randint(k_width, (batch, count), 0,
                               min(max_width, size) + 1)
    start = jnp.floor(jax.random.uniform(k_start, (batch, count)) *
                      (size - width + 1)).astype(jnp.int32)
    pos = jnp.arange(size)[None, None, :]
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return inside.any(axis=1)

  k_time, k_freq = jax.random.split(rng)
  masked = (band_mask(k_time, time_masks, time_mask_max, num_frames)[:, :, None]
            | band_mask(k_freq, freq_masks, freq_mask_max, num_mels)[:, None, :])
  return jnp.where(masked, jnp.asarray(fill, spec.dtype), spec)


def _pair(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(value, int):
    return value, value
  value = tuple(value)
  if len(value) != 2:
    raise ValueError(f'patch_size must be an int or (time, mel); got {value}')
  return int(value[0]), int(value[1])


class AudioTransformer(nn.Module):
  """AST-style audio encoder.

  Input is a waveform [B, T] (turned into a log-mel spectrogram with the
  fields below) or a precomputed log-mel spectrogram [B, frames, n_mels].
  The spectrogram is standardised with (x - spec_mean) / spec_std, padded at
  the end in time with silence (log floor) up to a whole number of patches,
  and cut into patches.

  Attributes:
    sample_rate, n_fft, hop, n_mels, fmin, fmax, floor: log-mel definition.
    spec_mean, spec_std: dataset statistics of the log-mel values.
    patch_size: (time, mel) patch, or an int for square patches.
    max_frames: frames covered by the position table (longest input).
    width, depth, num_heads, mlp_dim: transformer architecture.
    pool: 'cls', 'gap' or 'map' (as in ViT).
    time_masks, time_mask_max, freq_masks, freq_mask_max: SpecAugment when
      train=True (rng stream 'specaug', else 'dropout'); masked values are
      set to 0 after standardisation, i.e. to spec_mean.
    dropout, attn_dropout, drop_path: regularisation rates.
    dtype: compute dtype (params stay float32).
    remat, scan_layers: see `layers.TransformerStack`.
    activation, ln_eps: the blocks' MLP activation and LayerNorm epsilon
      (see `layers`).
  """
  sample_rate: int = 16000
  n_fft: int = 400
  hop: int = 160
  n_mels: int = 64
  fmin: float = 0.0
  fmax: Optional[float] = None
  floor: float = 1e-10
  spec_mean: float = 0.0
  spec_std: float = 1.0
  patch_size: Any = (8, 8)
  max_frames: int = 1024
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: Any = None
  pool: str = 'gap'
  time_masks: int = 2
  time_mask_max: int = 8
  freq_masks: int = 2
  freq_mask_max: int = 8
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  activation: str = 'gelu_tanh'
  ln_eps: float = 1e-6

  @property
  def output_width(self) -> int:
    return self.width

  def spectrogram(self, wave: jax.Array) -> jax.Array:
    """Log-mel spectrogram [B, frames, n_mels] of waveforms [B, T]."""
    return log_mel_spectrogram(wave, self.sample_rate, self.n_fft, self.hop,
                               self.n_mels, self.fmin, self.fmax, self.floor)

  def _check(self, x: jax.Array):
    layers.check_encoder_fields(self, POOLS)
    if x.ndim not in (2, 3):
      raise ValueError(
          f'audio encoder expects a waveform [B, T] or a spectrogram '
          f'[B, frames, n_mels]; got shape {x.shape}')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'audio encoder expects float input; got {x.dtype}')
    if x.ndim == 3 and x.shape[-1] != self.n_mels:
      raise ValueError(
          f'spectrogram has {x.shape[-1]} mel bins; the encoder expects '
          f'n_mels={self.n_mels} (shape {x.shape})')
    if self.n_mels % _pair(self.patch_size)[1]:
      raise ValueError(
          f'n_mels={self.n_mels} is not divisible by the mel patch size '
          f'{_pair(self.patch_size)[1]}')
    if self.spec_std <= 0:
      raise ValueError(f'spec_std={self.spec_std} must be positive')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               return_tokens: bool = False):
    """Encodes audio.

    Args:
      x: float waveform [B, T] or log-mel spectrogram [B, frames, n_mels].
      train: enables SpecAugment, dropout and stochastic depth.
      return_tokens: also return the patch tokens after the blocks.

    Returns:
      float32 features [B, width]; with `return_tokens`, (features, tokens
      float32 [B, N, width], token mask bool [B, N], all True).
    """
    self._check(x)
    spec = self.spectrogram(x) if x.ndim == 2 else x.astype(jnp.float32)
    spec = (spec - self.spec_mean) / self.spec_std
    if train and (self.time_masks or self.freq_masks):
      stream = 'specaug' if self.has_rng('specaug') else 'dropout'
      if not self.has_rng(stream):
        raise ValueError(
            "SpecAugment (train=True) needs an rng stream 'specaug' or "
            "'dropout'; pass rngs={'dropout': key} or set time_masks=0 and "
            'freq_masks=0')
      spec = spec_augment(spec, self.make_rng(stream),
                          time_masks=self.time_masks,
                          time_mask_max=self.time_mask_max,
                          freq_masks=self.freq_masks,
                          freq_mask_max=self.freq_mask_max)

    patch_t, patch_f = _pair(self.patch_size)
    num_frames = spec.shape[1]
    if num_frames > self.max_frames:
      raise ValueError(
          f'audio of {num_frames} frames is longer than the position table '
          f'(max_frames={self.max_frames})')
    time_tokens = math.ceil(num_frames / patch_t)
    silence = (math.log(self.floor) - self.spec_mean) / self.spec_std
    spec = jnp.pad(spec, ((0, 0), (0, time_tokens * patch_t - num_frames),
                          (0, 0)), constant_values=silence)
    x = layers.Conv(self.width, (patch_t, patch_f), strides=(patch_t, patch_f),
                    padding='VALID', dtype=self.dtype, name='embedding')(
                        spec[..., None])  # [B, time_tokens, mel_tokens, width]
    table_rows = math.ceil(self.max_frames / patch_t)
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                     (table_rows, self.n_mels // patch_f, self.width),
                     jnp.float32)
    x = x + pos[:time_tokens].astype(x.dtype)[None]
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width),
                       jnp.float32)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x],
          axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)

    x = layers.encoder_stack(self, x, train=train)
    pooled = layers.pool_tokens(self, x)
    if return_tokens:
      return pooled, x.astype(jnp.float32), jnp.ones(x.shape[:2], bool)
    return pooled
