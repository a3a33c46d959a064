"""Cross-modal proxy tokens (CMPT; Reza et al. 2025, "Robust Multimodal Learning via
Cross-Modal Proxy Tokens").

Every modality m is summarised by a class token: a learned query of m attending
over m's tokens. Beside it, for every other modality j, a learned proxy query
attends over the same tokens of m, through the same attention, and its output
approximates j's class token; so a present modality can stand in for an absent
one's class token from its own tokens alone, with no generation of the absent
input. Where j is absent, its class token is replaced by the mean of the proxies
that the present modalities give for it. An alignment loss pulls each proxy towards
the true class token wherever both modalities are present, and a gate combines the
class tokens (true or proxy) into the joint vector.

  class_m   = LN(attend(q_m,     tokens_m))
  proxy_m→j = LN(attend(q_{m→j}, tokens_m))        same attention as class_m
  ĉ_j       = class_j if j present, else mean over present m of proxy_m→j
  gated     = Σ_j sigmoid(W_j [ĉ_1; ...; ĉ_M]) ⊙ ĉ_j
  joint     = MLP(gated)                            Dense, GELU, Dense
  loss      = weight · mean over pairs (m present, j present, m ≠ j) of
              1 − cos(proxy_m→j, stop_gradient(class_j))
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.fusion import common
from mmjax.fusion.tokens import stack_token_inputs

Array = jax.Array


class QueryPool(nn.Module):
  """Learned queries attending over one modality's tokens: [B, T, D] -> [B, Q, D]."""
  num_queries: int
  num_heads: int

  @nn.compact
  def __call__(self, tokens: Array, valid: Array) -> Array:
    batch, _, width = tokens.shape
    if width % self.num_heads:
      raise ValueError(f"token width D={width} is not divisible by "
                       f"num_heads={self.num_heads}")
    queries = self.param("queries", nn.initializers.normal(0.02),
                         (1, self.num_queries, width))
    keys = nn.LayerNorm(name="norm")(tokens)
    out = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(
        jnp.broadcast_to(queries, (batch, self.num_queries, width)).astype(keys.dtype),
        keys, mask=valid[:, None, None, :])
    return nn.LayerNorm(name="out_norm")(out)


class ProxyTokenFusion(nn.Module):
  """Class tokens, cross-modal proxy tokens for absent modalities, gated fusion.

  Attributes:
    modalities: the model's modalities (required).
    num_heads: attention heads of the class/proxy attention (must divide D).
    mask_rate: in training, each present modality is masked with this probability
      (at least one kept; rng 'dropout'), so the proxies are used in training too.
    alignment_weight: weight of `loss/proxy_alignment` (the paper's λ = 0.2).
    hidden_dim: hidden width of the MLP after the gate (default 2 * D).
    out_dim: output width (default D).
  """
  produces_task_output: ClassVar[bool] = False
  needs_tokens: ClassVar[bool] = True
  modalities: Sequence[str] | None = None
  num_heads: int = 2
  mask_rate: float = 0.3
  alignment_weight: float = 0.2
  hidden_dim: int | None = None
  out_dim: int | None = None

  def __post_init__(self):
    if self.modalities is None or len(self.modalities) < 2:
      raise ValueError(f"proxy needs two modalities or more (a proxy approximates one "
                       f"modality from another), got {self.modalities}")
    if not 0.0 <= self.mask_rate < 1.0:
      raise ValueError(f"proxy mask_rate must be in [0, 1), got {self.mask_rate}")
    if not self.alignment_weight >= 0:
      raise ValueError(f"proxy alignment_weight must be >= 0, got "
                       f"{self.alignment_weight}")
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, token_mask, mask, train: bool = False):
    """Returns joint [B, out_dim or D] and aux with `loss/proxy_alignment`."""
    names, x, valid, present = stack_token_inputs(tokens, token_mask, mask,
                                                  self.modalities)
    kept = present
    if train and self.mask_rate > 0:
      kept = common.modality_dropout(present, self.mask_rate, self.make_rng("dropout"))
    num = len(names)
    # pooled[m][:, 0] is m's class token, pooled[m][:, 1 + k] its proxy for others[k];
    # all from m's real tokens: a modality masked in training still gives the true
    # class token its proxies align to, and only `kept` decides what the gate sees.
    pooled = {m: QueryPool(num, self.num_heads, name=f"{m}_pool")(x[m], valid[m])
              for m in names}
    classes, total, pairs = [], 0.0, 0.0
    for j, target in enumerate(names):
      proxies, sources = [], []
      for i, source in enumerate(names):
        if source == target:
          continue
        k = [m for m in names if m != source].index(target)
        proxies.append(pooled[source][:, 1 + k])
        sources.append(kept[:, i])
      proxies, sources = jnp.stack(proxies, 1), jnp.stack(sources, 1)   # [B, S, D]
      true_class = pooled[target][:, 0]
      proxy_class = common.masked_mean(proxies, sources)
      classes.append(jnp.where(kept[:, j, None], true_class, proxy_class))
      # Alignment wherever the target's true tokens are there (present in the data).
      both = sources & present[:, j, None]
      target_sg = jax.lax.stop_gradient(true_class)[:, None]
      # A safe norm: an absent modality's pooled token may be exactly 0 (the gradient
      # of |x| there is NaN, and `where` would not stop it).
      unit = lambda v: v * jax.lax.rsqrt(jnp.sum(v * v, -1, keepdims=True) + 1e-12)
      cosine = jnp.sum(unit(proxies) * unit(target_sg), -1)
      total = total + jnp.sum(jnp.where(both, 1.0 - cosine, 0.0))
      pairs = pairs + jnp.sum(both)
    classes = jnp.stack(classes, 1)                                      # [B, M, D]
    batch, _, width = classes.shape
    flat = classes.reshape(batch, num * width)
    gates = jnp.stack([jax.nn.sigmoid(nn.Dense(width, name=f"{m}_gate")(flat))
                       for m in names], 1)
    gated = jnp.sum(gates * classes, axis=1)
    hidden = nn.gelu(nn.Dense(self.hidden_dim or 2 * width, name="hidden")(gated))
    joint = nn.Dense(self.out_dim or width, name="out")(hidden)
    alignment = total / jnp.maximum(pairs, 1)
    aux = {"loss/proxy_alignment": self.alignment_weight * alignment,
           "stats/proxy_alignment": alignment,
           "stats/num_present": jnp.mean(jnp.sum(present, 1).astype(jnp.float32))}
    return joint, aux
