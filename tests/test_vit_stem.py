"""ViT's convolutional stem (stem='conv') and the convolution layer of every stem."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import layers
from mmjax.models.registry import build_encoder

KEY = jax.random.key(0)


def test_conv_stem_shapes_and_layers():
  enc = build_encoder("vit", "mu", patch_size=8, width=64, depth=1, stem="conv")
  x = jax.random.uniform(KEY, (2, 32, 32, 3))
  variables = enc.init(KEY, x)
  out = enc.apply(variables, x)
  assert out.shape == (2, 64) and out.dtype == jnp.float32
  params = variables["params"]
  # log2(8) = 3 stride-2 convs with channels doubling up to the width, then a 1x1.
  assert [params[f"stem_conv{i}"]["kernel"].shape for i in range(3)] == [
      (3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 32)]
  assert params["embedding"]["kernel"].shape == (1, 1, 32, 64)
  assert params["pos_embedding"].shape == (1, 16, 64)     # a 4 x 4 token grid


def test_conv_stem_tokens_see_only_their_neighbourhood():
  # Changing one pixel changes the output; the stem is not the identity on patches.
  enc = build_encoder("vit", "mu", patch_size=4, width=16, depth=1, stem="conv",
                      pool="gap")
  x = jax.random.uniform(KEY, (1, 16, 16, 3))
  variables = enc.init(KEY, x)
  y = x.at[0, 5, 5, 0].add(1.0)
  assert not np.allclose(enc.apply(variables, x), enc.apply(variables, y))


def test_conv_stem_bad_inputs():
  x = jnp.zeros((1, 24, 24, 3))
  with pytest.raises(ValueError, match="power-of-two patch_size; got 6"):
    build_encoder("vit", "mu", patch_size=6, stem="conv").init(KEY, x)
  with pytest.raises(ValueError, match=r"stem='conv' takes images \[B,H,W,C\]"):
    build_encoder("vit", "mu", patch_size=4, stem="conv").init(KEY, jnp.zeros((1, 2, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"stem='convs' is not one of \('patch', 'conv'\)"):
    build_encoder("vit", "mu", stem="convs").init(KEY, jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 16, 16, 3), (3, 3), (2, 2), "SAME"),        # the conv stem
    ((2, 15, 17, 3), (3, 3), (2, 2), "SAME"),        # odd sizes: asymmetric SAME padding
    ((2, 16, 16, 3), (8, 8), (8, 8), "VALID"),       # ViT patches
    ((2, 18, 20, 3), (8, 8), (8, 8), "VALID"),       # ... dropping the remainder
    ((2, 4, 16, 16, 3), (2, 8, 8), (2, 8, 8), "VALID"),   # video tubelets
    ((2, 8, 8, 4), (1, 1), (1, 1), "SAME"),          # the stem's 1x1 embedding
    ((2, 17, 5), (4,), (2,), "SAME"),                # time series
])
def test_conv_layer_is_flax_conv(shape, kernel, strides, padding):
  """layers.Conv (patches + einsum) has nn.Conv's parameters, initialisation, outputs
  and gradients."""
  x = jax.random.normal(KEY, shape)
  ref = nn.Conv(6, kernel, strides=strides, padding=padding)
  ours = layers.Conv(6, kernel, strides=strides, padding=padding)
  variables = ref.init(KEY, x)
  assert jax.tree.map(jnp.shape, ours.init(KEY, x)) == jax.tree.map(jnp.shape, variables)
  np.testing.assert_array_equal(ours.init(KEY, x)["params"]["kernel"],
                                variables["params"]["kernel"])
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x),
                             atol=2e-6, rtol=1e-5)

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

  grads_ours = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
  grads_ref = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(grads_ours), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_conv_layer_rejects_unknown_padding():
  with pytest.raises(ValueError, match="padding must be 'SAME' or 'VALID'"):
    layers.Conv(4, (3, 3), padding="CIRCULAR").init(KEY, jnp.zeros((1, 8, 8, 3)))
