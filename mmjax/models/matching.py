"""The matching head: a small cross-attention block that scores (anchor, tuple) pairs.

GRAM's data-anchor matching asks whether an anchor (e.g. a caption) and a tuple
of the other modalities (image, audio) belong to one sample. `MatchingHead`
turns each modality's pooled features into a few tokens; the anchor's tokens
cross-attend to the tokens of the tuple's present modalities, and the pooled
result gives one logit.

The objective scores re-paired inputs (a sample's anchor with a hard negative
tuple drawn from the global batch, see `mmjax.align.matching`), which the model
cannot form: it sees one device's block and knows no mesh. So the model hands
the objective its head as a `Matcher`: the unbound module, its parameters (still
inside the differentiated function, so gradients reach them) and an rng for the
draw.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers


class MatchingHead(nn.Module):
  """Logit that a tuple of modalities belongs with an anchor.

  Each modality m's features [N, F_m] become `tokens` tokens of width `width`
  (one Dense per modality, shared by its anchor and tuple roles). The anchor's
  tokens are the queries of `depth` pre-LN blocks (cross-attention to the
  tokens of the present tuple modalities, then an MLP); their mean, after a
  LayerNorm, goes through Dense(1).

  Attributes:
    width: token width.
    tokens: tokens per modality.
    num_heads: attention heads (width must be divisible by it).
    depth: cross-attention blocks.
    mlp_ratio: MLP hidden width / width.
  """
  width: int = 64
  tokens: int = 4
  num_heads: int = 4
  depth: int = 1
  mlp_ratio: int = 2

  def _tokens(self, name: str, features: jax.Array) -> jax.Array:
    x = nn.Dense(self.tokens * self.width, kernel_init=layers.DENSE_INIT,
                 bias_init=layers.BIAS_INIT, name=f"tokens_{name}")(
                     features.astype(jnp.float32))
    return x.reshape(features.shape[0], self.tokens, self.width)

  @nn.compact
  def __call__(self, anchor: str, anchor_features: jax.Array,
               other_features: Mapping[str, jax.Array],
               present: Optional[Mapping[str, jax.Array]] = None) -> jax.Array:
    """Scores N pairs.

    Args:
      anchor: the anchor modality's name.
      anchor_features: [N, F_anchor], the anchor of each pair.
      other_features: modality name -> [N, F_m], the tuple of each pair
        (every modality but the anchor, at least one).
      present: optional modality name -> [N] bool; an absent tuple modality
        is not attended to. Modalities left out are present.

    Returns:
      [N] float32 logits (> 0: the pair matches).

    Raises:
      ValueError: the anchor among the others, no other modality, features
        that are not [N, F] or differ in N, presence of the wrong shape or for
        an unknown modality, width not divisible by num_heads.
    """
    if self.width % self.num_heads:
      raise ValueError(f"model.matching: width {self.width} is not divisible by "
                       f"num_heads {self.num_heads}.")
    if anchor in other_features:
      raise ValueError(f"the anchor {anchor!r} is also among the tuple modalities "
                       f"{sorted(other_features)}.")
    if not other_features:
      raise ValueError("MatchingHead needs at least one tuple modality besides the "
                       f"anchor {anchor!r}.")
    named = {anchor: anchor_features, **other_features}
    for name, x in named.items():
      if getattr(x, "ndim", None) != 2:
        raise ValueError(f"features of {name!r} must be [N, F], got shape "
                         f"{getattr(x, 'shape', type(x))}.")
    sizes = {name: x.shape[0] for name, x in named.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"features must have the same N for every modality, got {sizes}.")
    n = anchor_features.shape[0]
    present = {} if present is None else dict(present)
    for name, p in present.items():
      if name not in other_features:
        raise ValueError(f"present[{name!r}]: not a tuple modality "
                         f"{sorted(other_features)}.")
      if getattr(p, "shape", None) != (n,) or p.dtype != jnp.bool_:
        raise ValueError(f"present[{name!r}] must be bool [N] = ({n},), got "
                         f"{getattr(p, 'dtype', type(p))} {getattr(p, 'shape', '')}.")

    names = sorted(other_features)
    queries = self._tokens(anchor, anchor_features)
    keys = jnp.concatenate([self._tokens(m, other_features[m]) for m in names], axis=1)
    key_present = jnp.concatenate(
        [jnp.repeat(present.get(m, jnp.ones((n,), bool))[:, None], self.tokens, axis=1)
         for m in names], axis=1)                                   # [N, K * tokens]
    mask = jnp.broadcast_to(key_present[:, None, None, :],
                            (n, 1, self.tokens, key_present.shape[1]))
    keys = nn.LayerNorm(name="ln_keys")(keys)
    for i in range(self.depth):
      y = nn.LayerNorm(name=f"ln_query_{i}")(queries)
      y = nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, kernel_init=layers.DENSE_INIT,
          name=f"cross_attention_{i}")(y, keys, mask=mask, deterministic=True)
      queries = queries + y
      y = nn.LayerNorm(name=f"ln_mlp_{i}")(queries)
      queries = queries + layers.MlpBlock(self.mlp_ratio * self.width,
                                          name=f"mlp_{i}")(y, deterministic=True)
    pooled = nn.LayerNorm(name="ln_out")(jnp.mean(queries, axis=1))
    return nn.Dense(1, kernel_init=nn.initializers.zeros, name="logit")(pooled)[:, 0]


@flax.struct.dataclass
class Matcher:
  """A model's matching head, detached so that an objective can score new pairs.

  params: the head's parameters, taken from inside `model.apply` (gradients of
    whatever the objective computes with them reach the model's params).
  rng: a key for drawing negatives (from the model's 'dropout' stream when
    `train=True`), or None.
  head: the unbound `MatchingHead` (static).
  """
  params: Any
  rng: Optional[jax.Array]
  head: MatchingHead = flax.struct.field(pytree_node=False)

  def __call__(self, anchor: str, anchor_features, other_features, present=None):
    """`MatchingHead.__call__` with these params: [N] logits."""
    return self.head.apply({"params": self.params}, anchor, anchor_features,
                           other_features, present)
