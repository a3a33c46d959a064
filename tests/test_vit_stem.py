"""ViT's convolutional stem (stem='conv')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
