"""Sparse mixture-of-experts feed-forward layers and the `moe` fusion module.

Routing math (pure functions, used by `moe` and `flexmoe`):

  probs        = softmax(router logits)                        [N, E]
  expert_index = top-k experts per token                       [N, k]
  weights      = their probabilities, renormalised to sum to 1 over the k
                 choices when top_k > 1; for top_k = 1 the raw probability
                 (as in Switch), so the router still gets a gradient
  capacity     = ceil(capacity_factor * k * N / E) slots per expert, at most N
  dispatch     = one-hot [N, E, C]: token n sits in slot c of expert e
  combine      = dispatch * weight                              [N, E, C]

Slots are filled in priority order: every token's first choice before any
token's second choice, then by token order. An assignment that finds its
expert full is dropped; a token dropped from all its experts gets a zero MoE
output, so in a residual block it passes through unchanged.

Experts run on [E, C, D] buffers built and read back with einsums over the
dispatch/combine tensors; there is no Python loop over experts.

Expert parallelism (`expert_axis`, e.g. 'expert'). Inside a `shard_map` body where
that mesh axis (of size n) is bound, each device holds E / n experts, the slice
[j E/n, (j+1) E/n) of the expert-stacked params (`w_in`, `b_in`, `w_out`, `b_out`,
sharded `P('expert')` on their leading axis by `EXPERT_PARAM_PATTERN`; the router is
replicated). Every device routes its own tokens exactly as the replicated layer does
(same router, same priority order), and the capacity is that of its own routing
group: C = ceil(capacity_factor * k * N_local / E) with N_local the device's tokens,
so a device's dispatch tensor is the replicated layer's on the same tokens. The
[E, C, D] buffer goes out with one `all_to_all` over the axis (device j receives the
[E/n, C, D] blocks of its experts from all n devices of its group, so each local
expert sees n * C slots), the local experts run on [E/n, n * C, D], and a second
`all_to_all` brings the outputs back for the combine. Outputs and gradients are the
replicated layer's on the same per-device batches (tests/test_expert_parallel.py).
Outside such a body (init, eval under plain `jit`) the axis is not bound and the
layer runs every expert itself: the same function. E must be divisible by n.

Auxiliary losses:
  load balancing (Switch Transformer): E * sum_e f_e * P_e, with f_e the
    fraction of (token, choice) assignments routed to e before capacity drops
    and P_e the mean router probability of e; 1 when uniform.
  router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
"""
from __future__ import annotations

import math
from typing import ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.fusion import common
from mmjax.fusion.expert_parallel import (  # noqa: F401  (re-exported)
    EXPERT_PARAM_PATTERN, check_expert_mesh, expert_param_specs, expert_parallel_size)
from mmjax.fusion.attention import (FeedForward, MaskedSelfAttention,
                                    ModalityEmbedding, _check_transformer_config)

Array = jax.Array

def check_routing_config(num_experts: int, top_k: int,
                         capacity_factor: float | None) -> None:
  """Raises ValueError for an impossible routing configuration."""
  if num_experts < 1:
    raise ValueError(f"num_experts must be >= 1, got {num_experts}")
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  if top_k > num_experts:
    raise ValueError(f"top_k={top_k} is larger than the number of experts "
                     f"num_experts={num_experts}")
  if capacity_factor is not None and not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be > 0 (or None for no capacity "
                     f"limit), got {capacity_factor}")


def top_k_routing(logits: Array, top_k: int, *, forced_expert: Array | None = None,
                  renormalize: bool | None = None) -> tuple[Array, Array, Array]:
  """Chooses top-k experts per token.

  Args:
    logits: [N, E] router logits (noisy ones when noisy gating is on).
    top_k: experts per token.
    forced_expert: optional int [N]; where >= 0 that expert is taken as the
      token's first choice and the other k - 1 come from the router (Flex-MoE's
      specialised routing); -1 leaves the token to the router.
    renormalize: renormalise the k weights to sum to 1 (default: top_k > 1).

  Returns:
    (expert_index int32 [N, k], weights [N, k], probs float32 [N, E]).
  """
  num_experts = logits.shape[-1]
  check_routing_config(num_experts, top_k, None)
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  scores = logits
  if forced_expert is not None:
    forced = jax.nn.one_hot(forced_expert, num_experts, dtype=jnp.bool_)
    scores = jnp.where(forced, jnp.inf, logits)
  _, expert_index = jax.lax.top_k(scores, top_k)
  weights = jnp.take_along_axis(probs, expert_index, axis=-1)
  if renormalize if renormalize is not None else top_k > 1:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return expert_index.astype(jnp.int32), weights, probs


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: float | None) -> int:
  """Slots per expert: ceil(capacity_factor * top_k * N / E), in [1, N].

  capacity_factor=None means no limit (N slots; nothing is ever dropped).
  """
  check_routing_config(num_experts, top_k, capacity_factor)
  if capacity_factor is None:
    return num_tokens
  capacity = math.ceil(capacity_factor * top_k * num_tokens / num_experts)
  return max(1, min(num_tokens, capacity))


def dispatch_and_combine(expert_index: Array, weights: Array, valid: Array | None,
                         num_experts: int, capacity: int
                         ) -> tuple[Array, Array, Array]:
  """One-hot dispatch and weighted combine tensors with capacity drops.

  Args:
    expert_index: int [N, k] chosen experts (distinct per token).
    weights: [N, k] their combine weights.
    valid: bool [N] tokens to route (None: all); invalid tokens take no slot.
    num_experts: E.
    capacity: slots per expert C.

  Returns:
    (dispatch float32 [N, E, C], combine float32 [N, E, C], kept bool [N, k])
    where kept[n, j] says whether choice j of token n got a slot.
  """
  num_tokens, top_k = expert_index.shape
  assign = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [N, k, E]
  if valid is not None:
    assign = assign * valid.astype(jnp.int32)[:, None, None]
  # Choice-major order: all first choices claim slots before second choices.
  choice_major = assign.transpose(1, 0, 2).reshape(top_k * num_tokens, num_experts)
  position = jnp.cumsum(choice_major, axis=0) - 1
  position = position.reshape(top_k, num_tokens, num_experts).transpose(1, 0, 2)
  slot = jnp.sum(position * assign, axis=-1)  # [N, k]
  kept = (jnp.sum(assign, axis=-1) > 0) & (slot < capacity)
  slot_onehot = jax.nn.one_hot(jnp.where(kept, slot, -1), capacity,
                               dtype=jnp.float32)  # all-zero row when dropped
  assign = assign.astype(jnp.float32)
  dispatch = jnp.einsum("nke,nkc->nec", assign, slot_onehot)
  combine = jnp.einsum("nke,nkc,nk->nec", assign, slot_onehot,
                       weights.astype(jnp.float32))
  return dispatch, combine, kept


def load_balancing_loss(probs: Array, expert_index: Array,
                        valid: Array | None = None) -> Array:
  """Switch-style balance loss E * sum_e f_e * P_e over valid tokens.

  Args:
    probs: [N, E] router probabilities.
    expert_index: int [N, k] routing choices.
    valid: bool [N] tokens that count (None: all).

  Returns:
    Scalar; 1.0 for perfectly uniform routing, E for full collapse on one expert.
  """
  num_experts = probs.shape[-1]
  top_k = expert_index.shape[-1]
  w = jnp.ones(probs.shape[:1]) if valid is None else valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w), 1.0)
  assigned = jnp.sum(jax.nn.one_hot(expert_index, num_experts), axis=1)  # [N, E]
  fraction = jnp.sum(w[:, None] * assigned, axis=0) / (count * top_k)
  mean_prob = jnp.sum(w[:, None] * probs, axis=0) / count
  return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(logits: Array, valid: Array | None = None) -> Array:
  """Mean over valid tokens of logsumexp(logits)^2 (ST-MoE router z-loss)."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  w = jnp.ones_like(lse) if valid is None else valid.astype(jnp.float32)
  return jnp.sum(w * lse ** 2) / jnp.maximum(jnp.sum(w), 1.0)


class SparseMoE(nn.Module):
  """Top-k routed mixture of GELU MLP experts: [N, D] -> [N, D].

  Attributes:
    num_experts: E.
    top_k: experts per token.
    mlp_dim: hidden width of each expert.
    capacity_factor: slots per expert relative to an even split (see
      `expert_capacity`); None for no limit.
    noisy_gating: during training add Gaussian noise with a learned,
      input-dependent scale softplus(x W_noise) + 0.01 to the router logits
      (Shazeer et al., 2017); draws from the 'dropout' rng stream.
    renormalize: renormalise the top-k weights (default: top_k > 1).
    dropout_rate: dropout on the expert hidden layer (training only).
    expert_axis: mesh axis the experts are sharded over where it is bound (see
      the module doc; 'expert', the train step's mesh axis), or None: every
      device runs every expert.
  """
  num_experts: int
  top_k: int
  mlp_dim: int
  capacity_factor: float | None = 1.25
  noisy_gating: bool = False
  renormalize: bool | None = None
  dropout_rate: float = 0.0
  expert_axis: str | None = "expert"

  def __post_init__(self):
    check_routing_config(self.num_experts, self.top_k, self.capacity_factor)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, valid: Array | None = None, *, train: bool = False,
               forced_expert: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Routes tokens through the experts.

    Args:
      x: [N, D] tokens.
      valid: bool [N]; invalid tokens are not routed (zero output, no slot,
        excluded from the statistics).
      train: training mode (router noise, dropout).
      forced_expert: optional int [N] first-choice override (see top_k_routing).

    Returns:
      (y [N, D], routing) where routing holds 'logits' (clean, [N, E]),
      'routing_logits' (noisy in training), 'noise_std' ([N, E] or None),
      'probs', 'expert_index', 'weights', 'kept', 'capacity', and the
      statistics 'expert_load' ([E], share of kept assignments per expert)
      and 'dropped_fraction' (share of valid assignments without a slot).
    """
    num_tokens, width = x.shape
    num_experts = self.num_experts
    router_init = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
    logits = nn.Dense(num_experts, use_bias=False, dtype=jnp.float32,
                      kernel_init=router_init, name="router")(x)
    noise_std = None
    routing_logits = logits
    if self.noisy_gating:
      # Created in eval too, so train and eval share one parameter tree.
      # The floor keeps the smooth load estimate of Flex-MoE finite.
      noise_std = jax.nn.softplus(nn.Dense(
          num_experts, use_bias=False, dtype=jnp.float32,
          kernel_init=nn.initializers.zeros, name="router_noise")(x)) + 1e-2
      if train:
        noise = jax.random.normal(self.make_rng("dropout"), logits.shape)
        routing_logits = logits + noise * noise_std
    expert_index, weights, probs = top_k_routing(
        routing_logits, self.top_k, forced_expert=forced_expert,
        renormalize=self.renormalize)
    capacity = expert_capacity(num_tokens, num_experts, self.top_k,
                               self.capacity_factor)
    dispatch, combine, kept = dispatch_and_combine(
        expert_index, weights, valid, num_experts, capacity)

    # With expert parallelism these are this device's E / n experts.
    groups = expert_parallel_size(num_experts, self.expert_axis)
    local = num_experts // groups
    if groups > 1 and self.has_variable("params", "w_in"):
      held = self.get_variable("params", "w_in").shape[0]
      if held != local:
        raise ValueError(
            f"{self.name}: the expert params hold {held} experts on this device, but "
            f"mesh axis {self.expert_axis!r} of size {groups} gives each device "
            f"{num_experts} / {groups} = {local}: shard them on their leading axis "
            f"with P({self.expert_axis!r}) (moe.EXPERT_PARAM_PATTERN, the train "
            f"step's default rule) or set expert_axis=None")
    kernel_init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1,
                                               batch_axis=(0,))
    w_in = self.param("w_in", kernel_init, (local, width, self.mlp_dim))
    b_in = self.param("b_in", nn.initializers.zeros, (local, self.mlp_dim))
    w_out = self.param("w_out", kernel_init, (local, self.mlp_dim, width))
    b_out = self.param("b_out", nn.initializers.zeros, (local, width))
    dtype = x.dtype
    expert_in = jnp.einsum("nec,nd->ecd", dispatch.astype(dtype), x)  # [E, C, D]
    if groups > 1:
      # Block j of the experts goes to device j; from each of the n devices
      # arrive its C slots of every local expert: [E/n, n * C, D].
      expert_in = jax.lax.all_to_all(
          expert_in.reshape(groups, local, capacity, width), self.expert_axis, 0, 0)
      expert_in = expert_in.transpose(1, 0, 2, 3).reshape(local, groups * capacity,
                                                          width)
    hidden = nn.gelu(jnp.einsum("ecd,edh->ech", expert_in, w_in.astype(dtype))
                     + b_in.astype(dtype)[:, None])
    hidden = nn.Dropout(self.dropout_rate, deterministic=not train)(hidden)
    expert_out = (jnp.einsum("ech,ehd->ecd", hidden, w_out.astype(dtype))
                  + b_out.astype(dtype)[:, None])
    if groups > 1:
      expert_out = expert_out.reshape(local, groups, capacity, width)
      expert_out = jax.lax.all_to_all(expert_out.transpose(1, 0, 2, 3),
                                      self.expert_axis, 0, 0)
      expert_out = expert_out.reshape(num_experts, capacity, width)
    y = jnp.einsum("nec,ecd->nd", combine.astype(dtype), expert_out)

    valid_f = (jnp.ones((num_tokens,)) if valid is None
               else valid.astype(jnp.float32))
    num_assignments = jnp.maximum(jnp.sum(valid_f) * self.top_k, 1.0)
    kept_per_expert = jnp.sum(dispatch, axis=(0, 2))
    routing = {
        "logits": logits, "routing_logits": routing_logits, "noise_std": noise_std,
        "probs": probs, "expert_index": expert_index, "weights": weights,
        "kept": kept, "capacity": capacity,
        "expert_load": kept_per_expert / jnp.maximum(jnp.sum(kept_per_expert), 1.0),
        "dropped_fraction": 1.0 - jnp.sum(kept_per_expert) / num_assignments,
    }
    return y, routing


class MoEFusion(nn.Module):
  """Fusion transformer over modality tokens with sparse MoE feed-forward layers.

  Like `attention` fusion (type embeddings, masked self-attention, pooling
  over present tokens), but the MLP of every `moe_every`-th block is a
  `SparseMoE`. The routing group is the local batch's B * M tokens; absent
  tokens are not routed (they take no capacity and do not enter the losses).

  aux (losses already weighted; the trainer adds every 'loss/*' entry):
    loss/moe_balance   balance_loss_weight * mean over MoE layers of the
                       Switch balance loss (on the routing probabilities,
                       i.e. after router noise in training)
    loss/moe_router_z  z_loss_weight * mean over layers of the router z-loss
                       (on the clean router logits)
    stats/moe_balance, stats/moe_router_z   the unweighted values
    stats/moe_expert_load      [E] share of kept assignments per expert
    stats/moe_dropped_fraction share of assignments dropped for capacity

  Attributes:
    num_experts, top_k, capacity_factor, noisy_gating, renormalize: routing
      (see SparseMoE).
    num_layers, num_heads, mlp_dim, dropout_rate: transformer shape; mlp_dim
      (default 2 * D) is also each expert's hidden width.
    moe_every: MoE in blocks moe_every-1, 2*moe_every-1, ... (1: every block).
    balance_loss_weight, z_loss_weight: weights of the auxiliary losses.
    out_dim: output width (default: D).
    modalities: expected modality names, or None to accept any.
    expert_axis: mesh axis the experts are sharded over (expert parallelism,
      see the module doc): 'expert', the train step's axis (`config.mesh.expert`;
      size 1, the default mesh, runs every expert on every device), or None.
  """
  produces_task_output: ClassVar[bool] = False
  num_experts: int = 4
  top_k: int = 2
  capacity_factor: float | None = 1.25
  noisy_gating: bool = False
  renormalize: bool | None = None
  num_layers: int = 2
  num_heads: int = 2
  mlp_dim: int | None = None
  moe_every: int = 1
  dropout_rate: float = 0.0
  balance_loss_weight: float = 0.01
  z_loss_weight: float = 0.001
  out_dim: int | None = None
  modalities: Sequence[str] | None = None
  expert_axis: str | None = "expert"

  def __post_init__(self):
    check_routing_config(self.num_experts, self.top_k, self.capacity_factor)
    _check_transformer_config("moe", self.num_layers, self.num_heads,
                              self.dropout_rate)
    if not 1 <= self.moe_every <= self.num_layers:
      raise ValueError(f"moe_every must be in [1, num_layers={self.num_layers}], "
                       f"got {self.moe_every}")
    super().__post_init__()

  @nn.compact
  def __call__(self, features: Mapping[str, Array], mask: Mapping[str, Array],
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Returns joint [B, out_dim or D] and aux (see class doc)."""
    _, x, present = common.stack_modalities(features, mask, self.modalities)
    batch, num_modalities, width = x.shape
    mlp_dim = self.mlp_dim or 2 * width
    tokens = ModalityEmbedding(name="modality_embedding")(x)
    valid = present.reshape(-1)
    balance, z_loss, load, dropped = [], [], [], []
    for i in range(self.num_layers):
      tokens = MaskedSelfAttention(self.num_heads, self.dropout_rate,
                                   name=f"attention_{i}")(tokens, present, train)
      if (i + 1) % self.moe_every:
        tokens = FeedForward(mlp_dim, self.dropout_rate, name=f"mlp_{i}")(tokens, train)
        continue
      h = nn.LayerNorm(name=f"moe_norm_{i}")(tokens).reshape(-1, width)
      y, routing = SparseMoE(
          self.num_experts, self.top_k, mlp_dim,
          capacity_factor=self.capacity_factor, noisy_gating=self.noisy_gating,
          renormalize=self.renormalize, dropout_rate=self.dropout_rate,
          expert_axis=self.expert_axis, name=f"moe_{i}")(h, valid, train=train)
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
      tokens = tokens + y.reshape(batch, num_modalities, width)
      balance.append(load_balancing_loss(routing["probs"], routing["expert_index"],
                                         valid))
      z_loss.append(router_z_loss(routing["logits"], valid))
      load.append(routing["expert_load"])
      dropped.append(routing["dropped_fraction"])
    tokens = nn.LayerNorm(name="final_norm")(tokens)
    joint = common.masked_mean(tokens, present)
    if self.out_dim is not None:
      joint = nn.Dense(self.out_dim, name="out")(joint)
    balance = jnp.mean(jnp.stack(balance))
    z_loss = jnp.mean(jnp.stack(z_loss))
    aux = {
        "loss/moe_balance": self.balance_loss_weight * balance,
        "loss/moe_router_z": self.z_loss_weight * z_loss,
        "stats/moe_balance": balance,
        "stats/moe_router_z": z_loss,
        "stats/moe_expert_load": jnp.mean(jnp.stack(load), axis=0),
        "stats/moe_dropped_fraction": jnp.mean(jnp.stack(dropped)),
        "stats/num_present": jnp.mean(jnp.sum(present, 1).astype(jnp.float32)),
    }
    return joint, aux
