"""Tests of the log-mel front end, SpecAugment and the audio transformer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import audio
from mmjax.models.registry import build_encoder

KEY = jax.random.key(0)
SR, N_FFT, HOP, N_MELS = 8000, 128, 64, 16


def numpy_log_mel(wave, sample_rate, n_fft, hop, n_mels, fmin, fmax, floor):
  """Float64 reference, written loop by loop from the stated definition."""
  wave = np.asarray(wave, np.float64)
  num_frames = 1 + (len(wave) - n_fft) // hop
  n = np.arange(n_fft)
  window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann

  def mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)

  def hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

  edges = [hz(m) for m in np.linspace(mel(fmin), mel(fmax), n_mels + 2)]
  out = np.zeros((num_frames, n_mels))
  for t in range(num_frames):
    frame = wave[t * hop: t * hop + n_fft] * window
    # Direct DFT of the first n_fft // 2 + 1 bins.
    k = np.arange(n_fft // 2 + 1)[:, None]
    dft = (frame[None, :] * np.exp(-2j * np.pi * k * n[None, :] / n_fft)).sum(1)
    power = np.abs(dft) ** 2
    for m in range(n_mels):
      lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
      energy = 0.0
      for b in range(n_fft // 2 + 1):
        f = b * sample_rate / n_fft
        if lo < f < hi:
          weight = (f - lo) / (mid - lo) if f <= mid else (hi - f) / (hi - mid)
          energy += weight * power[b]
      out[t, m] = np.log(max(energy, floor))
  return out


def _wave(batch=2, length=1024, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(length) / SR
  tones = np.sin(2 * np.pi * rng.uniform(100, 3000, (batch, 1)) * t)
  return (tones + 0.1 * rng.standard_normal((batch, length))).astype(
      np.float32)


def _init(module, x, seed=0):
  """NumPy-filled variables with the module's own structure (no compile)."""
  shapes = jax.eval_shape(module.init, KEY, x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape)
    if getattr(path[-1], 'key', None) == 'scale':
      return jnp.asarray(1.0 + 0.1 * noise, leaf.dtype)
    return jnp.asarray(0.2 * noise, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize('fmin,fmax', [(0.0, None), (200.0, 3000.0)])
def test_log_mel_matches_numpy_reference(fmin, fmax):
  wave = _wave(batch=2, length=600)
  got = np.asarray(audio.log_mel_spectrogram(
      jnp.asarray(wave), SR, N_FFT, HOP, N_MELS, fmin, fmax, 1e-10))
  assert got.shape == (2, 1 + (600 - N_FFT) // HOP, N_MELS)
  for b in range(2):
    want = numpy_log_mel(wave[b], SR, N_FFT, HOP, N_MELS, fmin,
                         SR / 2 if fmax is None else fmax, 1e-10)
    # 1e-4 relative on the mel energies, i.e. 1e-4 absolute on their log
    # (a relative bound on log values near 0 would be meaningless).
    np.testing.assert_allclose(np.exp(got[b]), np.exp(want), rtol=1e-4)
    np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-4)
  # A single waveform [T] gives the [frames, mels] of that row.
  single = audio.log_mel_spectrogram(jnp.asarray(wave[1]), SR, N_FFT, HOP,
                                     N_MELS, fmin, fmax, 1e-10)
  np.testing.assert_allclose(single, got[1], rtol=1e-5)


def test_log_mel_floor_applies_to_silence():
  silent = jnp.zeros((1, 300))
  got = audio.log_mel_spectrogram(silent, SR, N_FFT, HOP, N_MELS, floor=1e-6)
  np.testing.assert_allclose(got, np.log(1e-6), rtol=1e-6)


def test_mel_filterbank_triangles():
  filters = audio.mel_filterbank(SR, N_FFT, N_MELS)
  assert filters.shape == (N_FFT // 2 + 1, N_MELS)
  assert filters.min() >= 0 and filters.max() <= 1 + 1e-6
  # Every filter has support, and the peaks move up in frequency.
  assert np.all(filters.max(axis=0) > 0)
  assert np.all(np.diff(filters.argmax(axis=0)) >= 0)


def test_spec_augment_masks_whole_bands():
  spec = jnp.asarray(np.random.default_rng(1).uniform(1, 2, (4, 40, 16)),
                     jnp.float32)
  augment = jax.jit(functools.partial(
      audio.spec_augment, time_masks=2, time_mask_max=6, freq_masks=1,
      freq_mask_max=4, fill=0.0))
  out = np.asarray(augment(spec, jax.random.key(3)))
  masked = out == 0.0
  unchanged = out == np.asarray(spec)
  assert np.all(masked | unchanged)
  for b in range(4):
    rows = masked[b].all(axis=1)  # fully masked frames
    cols = masked[b].all(axis=0)  # fully masked mel bins
    # Every masked cell lies in a masked frame or a masked bin.
    assert np.all(masked[b] == (rows[:, None] | cols[None, :]))
    assert rows.sum() <= 12 and cols.sum() <= 4
  assert masked.any()
  # No masks requested: identity.
  same = audio.spec_augment(spec, jax.random.key(3), time_masks=0,
                            time_mask_max=6, freq_masks=0, freq_mask_max=4)
  np.testing.assert_array_equal(same, spec)


@pytest.mark.parametrize('pool', ['cls', 'gap', 'map'])
def test_audio_encoder_wave_and_spectrogram_agree(pool):
  enc = build_encoder('audio', 'mu', width=32, num_heads=2, sample_rate=SR,
                      n_fft=N_FFT, hop=HOP, n_mels=N_MELS, patch_size=(4, 8),
                      max_frames=32, pool=pool, spec_mean=-2.0, spec_std=3.0)
  wave = jnp.asarray(_wave(length=1024))  # 15 frames: padded to 16
  variables = _init(enc, wave)
  # One compile for both entry points.
  feats, from_spec = jax.jit(lambda v, w: (
      enc.apply(v, w), enc.apply(v, enc.spectrogram(w))))(variables, wave)
  assert feats.shape == (2, 32) and feats.dtype == jnp.float32
  assert np.all(np.isfinite(feats))
  np.testing.assert_allclose(from_spec, feats, atol=1e-5)
  # (time, mel) patches: 32 frames / 4 x 16 mels / 8 rows of the table.
  assert variables['params']['pos_embedding'].shape == (8, 2, 32)
  assert variables['params']['embedding']['kernel'].shape == (4, 8, 1, 32)


def test_audio_specaugment_only_in_train_and_needs_rng():
  enc = build_encoder('audio', 'mu', width=32, num_heads=2, sample_rate=SR,
                      n_fft=N_FFT, hop=HOP, n_mels=N_MELS, patch_size=(4, 8),
                      max_frames=32, time_mask_max=4, freq_mask_max=4)
  wave = jnp.asarray(_wave(length=1024))
  variables = _init(enc, wave)

  @jax.jit  # one compile for the three calls
  def run(v, key_a, key_b):
    return (enc.apply(v, wave),
            enc.apply(v, wave, train=True, rngs={'specaug': key_a}),
            enc.apply(v, wave, train=True, rngs={'dropout': key_b}))

  eval_out, a, b = run(variables, jax.random.key(1), jax.random.key(2))
  assert not np.allclose(a, eval_out) and not np.allclose(a, b)
  with pytest.raises(ValueError, match="rng stream 'specaug' or 'dropout'"):
    jax.eval_shape(lambda v: enc.apply(v, wave, train=True), variables)


def test_audio_bf16_keeps_f32_params():
  enc = build_encoder('audio', 'mu', width=32, num_heads=2, sample_rate=SR,
                      n_fft=N_FFT, hop=HOP, n_mels=N_MELS, patch_size=(4, 8),
                      max_frames=32, dtype=jnp.bfloat16)
  wave = jnp.asarray(_wave(length=1024))
  shapes = jax.eval_shape(enc.init, KEY, wave)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  feats = jax.jit(enc.apply)(_init(enc, wave), wave)
  assert feats.dtype == jnp.float32 and np.all(np.isfinite(feats))


def test_audio_bad_inputs():
  enc = build_encoder('audio', 'mu', width=32, num_heads=2, sample_rate=SR,
                      n_fft=N_FFT, hop=HOP, n_mels=N_MELS, patch_size=(4, 8),
                      max_frames=32)
  with pytest.raises(ValueError, match='shorter than one frame'):
    enc.init(KEY, jnp.zeros((2, N_FFT - 1)))
  with pytest.raises(ValueError, match='shorter than one frame'):
    audio.log_mel_spectrogram(jnp.zeros(10), n_fft=16, hop=4, n_mels=4,
                              sample_rate=SR)
  with pytest.raises(ValueError, match='longer than the position table'):
    enc.init(KEY, jnp.zeros((1, 33, N_MELS)))
  with pytest.raises(ValueError, match='n_mels=16'):
    enc.init(KEY, jnp.zeros((1, 8, 12)))
  with pytest.raises(ValueError, match=r'waveform \[B, T\]'):
    enc.init(KEY, jnp.zeros((1, 2, 8, 16)))
  with pytest.raises(ValueError, match='float'):
    enc.init(KEY, jnp.zeros((1, 400), jnp.int16))
  with pytest.raises(ValueError, match='not divisible by the mel patch'):
    build_encoder('audio', 'mu', n_mels=20).init(KEY, jnp.zeros((1, 8, 20)))
  with pytest.raises(ValueError, match='fmin < fmax'):
    audio.mel_filterbank(SR, N_FFT, N_MELS, fmin=100.0, fmax=SR)
