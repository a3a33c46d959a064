"""Flex-MoE fusion (Yun et al., "Flex-MoE: Modeling Arbitrary Modality
Combination via the Flexible Mixture-of-Experts", NeurIPS 2024).

What the paper does, and how it maps here:

* Missing-modality bank. For every observed combination b (bitmask of the
  present modalities, 1 .. 2**M - 1) and every modality m there is a learned
  embedding bank[b - 1, m]. An absent modality m of a sample whose observed
  combination is b is replaced by bank[b - 1, m] (entries with m observed in
  b exist but are never read). `MissingModalityBank`.
* A transformer over the M modality tokens whose feed-forward layer is a
  sparse MoE with noisy top-k gating. All M tokens are routed (absent ones
  now hold bank embeddings).
* G-Router: samples with every modality present are routed top-k by the
  router and train it with the importance + load balance loss of noisy top-k
  gating, cv^2(importance) + cv^2(load), computed over full-modality tokens
  only.
* S-Router: samples with fewer modalities have their top-1 expert fixed to
  the expert of their observed combination (expert b - 1, so there must be at
  least 2**M - 1 experts); the other k - 1 come from the router. The router
  is trained towards that expert with a cross-entropy on its logits. As in
  the reference implementation one router network plays both roles.
* The outputs of all M tokens are concatenated and projected.
* Training order: during warm-up the paper sorts the training samples by
  their number of present modalities, most first; `warmup_order` gives that
  permutation; the data pipeline applies it for the first
  `data.modality_warmup_steps` steps (`mmjax.data.pipeline.train_dataset`).

`s_router` chooses between the paper's reading above ('paper') and the
routing of the authors' released code ('code'):
* plain noisy top-k for every token, no forced expert (clean top-k at
  inference);
* the S-Router cross-entropy on the *noisy* logits (clean in eval);
* besides the balance loss over full-modality tokens, a second one over the
  tokens of samples with missing modalities, on every expert but the
  full-modality combination's (expert 2**M - 2 here; the code numbers it 0
  and drops column 0);
* cv^2 with the unbiased variance (torch's default);
* each modality's tokens are a routing call of their own in the code, so
  the losses are per modality, summed over modalities and layers (the
  paper reading averages over layers, all tokens at once).

aux (losses already weighted; the trainer adds every 'loss/*' entry):
  loss/flexmoe_balance         balance_loss_weight * mean over layers of
                               cv^2(importance) + cv^2(load) ('code': the sum
                               over layers of `code_router_losses`' balance)
  loss/flexmoe_specialization  specialization_loss_weight * mean over layers
                               of the S-Router cross-entropy ('code': summed
                               over modalities and layers, noisy logits)
  stats/flexmoe_balance, stats/flexmoe_specialization   unweighted values
  stats/flexmoe_expert_load    [E] share of kept assignments per expert
  stats/flexmoe_router_agreement  share of fewer-modality tokens whose router
                               argmax already is their combination's expert
  stats/flexmoe_full_fraction  share of samples with every modality present
"""
from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from mmjax.fusion import common
from mmjax.fusion.attention import (MaskedSelfAttention, ModalityEmbedding,
                                    _check_transformer_config)
from mmjax.fusion.moe import SparseMoE, check_routing_config

Array = jax.Array


def num_combinations(num_modalities: int) -> int:
  """Number of non-empty modality combinations, 2**M - 1."""
  return 2 ** num_modalities - 1


def check_combination(combination: Array, num_modalities: int) -> None:
  """Raises ValueError if a (concrete) combination index is outside 1..2**M-1."""
  if not common.is_concrete(combination):
    return
  values = np.asarray(combination)
  bad = (values < 1) | (values > num_combinations(num_modalities))
  if bad.any():
    raise ValueError(
        f"combination index {sorted(set(values[bad].tolist()))[:8]} is not known "
        f"to the missing-modality bank: it holds combinations 1.."
        f"{num_combinations(num_modalities)} of {num_modalities} modalities "
        f"(0 would mean no modality present)")


class MissingModalityBank(nn.Module):
  """Learned embedding per (observed combination, missing modality).

  Attributes:
    num_modalities: M.
    dim: embedding width D.
    init_stddev: stddev of the normal initialisation (the paper uses 1).
  """
  num_modalities: int
  dim: int
  init_stddev: float = 1.0

  @nn.compact
  def __call__(self, combination: Array) -> Array:
    """Bank rows for each sample's combination.

    Args:
      combination: int [B] observed-combination bitmasks in 1..2**M - 1.

    Returns:
      [B, M, D]: out[i, m] = bank[combination[i] - 1, m], the embedding that
      stands in for modality m when it is missing from combination[i].

    Raises:
      ValueError: for an index the bank does not know (concrete inputs; under
        jit indices are clipped into range, the trainer checks masks).
    """
    check_combination(combination, self.num_modalities)
    table = self.param("embedding", nn.initializers.normal(self.init_stddev),
                       (num_combinations(self.num_modalities), self.num_modalities,
                        self.dim))
    index = jnp.clip(combination - 1, 0, table.shape[0] - 1)
    return table[index]


def cv_squared(x: Array, eps: float = 1e-10, ddof: int = 0) -> Array:
  """Squared coefficient of variation var(x) / mean(x)^2 of a 1-D vector.

  ddof=1 is the unbiased variance (the Flex-MoE authors' code, via torch).
  """
  x = x.astype(jnp.float32)
  return jnp.var(x, ddof=ddof) / (jnp.mean(x) ** 2 + eps)


def smooth_top_k_load(clean_logits: Array, noisy_logits: Array, noise_std: Array,
                      top_k: int) -> Array:
  """Probability that each expert is in a token's top-k under resampled noise.

  The differentiable load estimate of noisy top-k gating (Shazeer et al., 2017):
  P(e in top-k) = Phi((clean_e - threshold_e) / std_e), where threshold_e is
  the k-th largest noisy logit among the other experts.

  Args:
    clean_logits, noisy_logits, noise_std: [N, E]; requires top_k < E.
    top_k: k.

  Returns:
    [N, E] probabilities.
  """
  num_experts = clean_logits.shape[-1]
  if not top_k < num_experts:
    raise ValueError(f"the smooth load needs top_k < num_experts, got "
                     f"top_k={top_k}, num_experts={num_experts}")
  top_values, _ = jax.lax.top_k(noisy_logits, top_k + 1)
  threshold_if_in = top_values[:, top_k:top_k + 1]   # (k+1)-th largest
  threshold_if_out = top_values[:, top_k - 1:top_k]  # k-th largest
  is_in = noisy_logits > threshold_if_in
  prob_if_in = norm.cdf((clean_logits - threshold_if_in) / noise_std)
  prob_if_out = norm.cdf((clean_logits - threshold_if_out) / noise_std)
  return jnp.where(is_in, prob_if_in, prob_if_out)


def importance_load_loss(gates: Array, load: Array, weight: Array) -> Array:
  """G-Router balance: cv^2(sum of gates) + cv^2(sum of load) over weighted tokens.

  Args:
    gates: [N, E] sparse gate values (routing weight where chosen, else 0).
    load: [N, E] (smooth) indicator of each expert being chosen.
    weight: [N] token weights (1 for full-modality tokens, 0 otherwise).
  """
  weight = weight.astype(jnp.float32)[:, None]
  return (cv_squared(jnp.sum(weight * gates, axis=0))
          + cv_squared(jnp.sum(weight * load, axis=0)))


def specialization_loss(logits: Array, target_expert: Array, weight: Array) -> Array:
  """S-Router loss: weighted mean cross-entropy of router logits vs expert.

  Args:
    logits: [N, E] router logits.
    target_expert: int [N] the expert of each token's observed combination.
    weight: [N] token weights (1 for fewer-modality tokens, 0 otherwise).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, target_expert[:, None], axis=-1)[:, 0]
  weight = weight.astype(jnp.float32)
  return jnp.sum(weight * nll) / jnp.maximum(jnp.sum(weight), 1.0)


S_ROUTERS = ("paper", "code")


def code_router_losses(gates: Array, load: Array, logits: Array, target_expert: Array,
                       full: Array, num_modalities: int, full_expert: int
                       ) -> tuple[Array, Array]:
  """Balance and S-Router losses of one MoE layer as the authors' code has them.

  Tokens are sample-major (token b * M + m is modality m of sample b). Per
  modality m, over the B tokens of that modality:

    balance_m = cv2(sum_{b full} gates) + cv2(sum_{b full} load)
              + cv2(sum_{b not full} gates[:, -f]) + cv2(sum_{b not full} load[:, -f])
    special_m = mean_{b not full} CE(logits[b], target_expert[b])

  with cv2 the unbiased squared coefficient of variation and [:, -f] every
  expert but `full_expert`. Returns (sum_m balance_m, sum_m special_m).

  Args:
    gates: [B*M, E] sparse gate values; load: [B*M, E] (smooth) top-k indicator.
    logits: [B*M, E] router logits the cross-entropy sees (noisy in training).
    target_expert: int [B*M] each token's combination expert.
    full: bool [B*M] whether the token's sample has every modality.
    num_modalities: M.  full_expert: expert of the full combination.
  """
  num_experts = gates.shape[-1]

  def per_modality(a):
    return a.reshape(-1, num_modalities, *a.shape[1:]).swapaxes(0, 1)

  gates, load, logits = per_modality(gates), per_modality(load), per_modality(logits)
  target, full = per_modality(target_expert), per_modality(full)
  others = np.array([e for e in range(num_experts) if e != full_expert])
  balance, special = 0.0, 0.0
  for m in range(num_modalities):
    w_full = full[m].astype(jnp.float32)[:, None]
    w_few = 1.0 - w_full
    balance = balance + (cv_squared(jnp.sum(w_full * gates[m], 0), ddof=1)
                         + cv_squared(jnp.sum(w_full * load[m], 0), ddof=1)
                         + cv_squared(jnp.sum(w_few * gates[m][:, others], 0), ddof=1)
                         + cv_squared(jnp.sum(w_few * load[m][:, others], 0), ddof=1))
    special = special + specialization_loss(logits[m], target[m], ~full[m])
  return balance, special


def warmup_order(num_present: np.ndarray) -> np.ndarray:
  """Indices that sort samples by number of present modalities, most first.

  Stable, so samples with equal counts keep their order. For the data
  pipeline's warm-up epochs (the paper trains first on full-modality samples).
  """
  num_present = np.asarray(num_present)
  if num_present.ndim != 1:
    raise ValueError(f"num_present must be 1-D, got shape {num_present.shape}")
  return np.argsort(-num_present, kind="stable")


class FlexMoEFusion(nn.Module):
  """Flex-MoE fusion: missing-modality bank + G-/S-routed sparse MoE transformer.

  Attributes:
    num_experts: E >= 2**M - 1 (default: exactly 2**M - 1, one per combination).
    top_k: experts per token (<= E).
    capacity_factor: expert capacity (see moe.expert_capacity); None (the
      paper's setting) never drops a token.
    noisy_gating: noisy top-k gating in training (the paper's gate).
    num_layers, num_heads, mlp_dim, dropout_rate: transformer shape; every
      block's feed-forward layer is the sparse MoE; mlp_dim defaults to 2 * D.
    balance_loss_weight: weight of the G-Router importance + load loss.
    specialization_loss_weight: weight of the S-Router cross-entropy.
    bank_init_stddev: init stddev of the missing-modality bank.
    force_combination_expert: with s_router='paper', fix fewer-modality samples'
      top-1 expert to their combination's expert (the S-Router); False routes
      every sample top-k. Not read with s_router='code' (which never forces).
    s_router: 'code' (the authors' code: see the module doc; the default, it
      kept slightly more accuracy under missing modalities in benchmarks/README.md)
      or 'paper' (the reading above).
    out_dim: output width (default: D).
    modalities: expected modality names, or None to accept any.
    expert_axis: mesh axis the experts are sharded over (expert parallelism,
      `mmjax.fusion.moe`; 'expert', the train step's), or None.
  """
  produces_task_output: ClassVar[bool] = False
  num_experts: int | None = None
  top_k: int = 2
  capacity_factor: float | None = None
  noisy_gating: bool = True
  num_layers: int = 1
  num_heads: int = 2
  mlp_dim: int | None = None
  dropout_rate: float = 0.0
  balance_loss_weight: float = 0.01
  specialization_loss_weight: float = 0.01
  bank_init_stddev: float = 1.0
  force_combination_expert: bool = True
  s_router: str = "code"
  out_dim: int | None = None
  modalities: Sequence[str] | None = None
  expert_axis: str | None = "expert"

  def __post_init__(self):
    if self.s_router not in S_ROUTERS:
      raise ValueError(f"flexmoe s_router must be one of {list(S_ROUTERS)} ('paper': "
                       f"forced combination expert; 'code': the authors' code), got "
                       f"{self.s_router!r}")
    check_routing_config(self.top_k if self.num_experts is None else self.num_experts,
                         self.top_k, self.capacity_factor)
    _check_transformer_config("flexmoe", self.num_layers, self.num_heads,
                              self.dropout_rate)
    if self.modalities is not None:
      self._check_num_experts(len(self.modalities))
    super().__post_init__()

  def _check_num_experts(self, num_modalities: int) -> int:
    needed = num_combinations(num_modalities)
    num_experts = needed if self.num_experts is None else self.num_experts
    if num_experts < needed:
      raise ValueError(
          f"flexmoe needs one expert per modality combination: num_experts="
          f"{num_experts} < 2**{num_modalities} - 1 = {needed}")
    check_routing_config(num_experts, self.top_k, self.capacity_factor)
    return num_experts

  @nn.compact
  def __call__(self, features: Mapping[str, Array], mask: Mapping[str, Array],
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Returns joint [B, out_dim or D] and aux (see module doc).

    The bank-filled tokens are sown as intermediates 'filled_tokens' [B, M, D],
    and per layer i 'routing_i': {'gates', 'load', 'logits', 'routing_logits',
    'expert_index'} ([B*M, E], expert_index [B*M, k]; tokens sample-major).
    """
    _, x, present = common.stack_modalities(features, mask, self.modalities)
    batch, num_modalities, width = x.shape
    num_experts = self._check_num_experts(num_modalities)
    combination = common.combination_index(present)
    bank = MissingModalityBank(num_modalities, width, self.bank_init_stddev,
                               name="bank")(combination)
    tokens = jnp.where(present[..., None], x, bank.astype(x.dtype))
    self.sow("intermediates", "filled_tokens", tokens)
    tokens = ModalityEmbedding(name="modality_embedding")(tokens)

    full = combination == num_combinations(num_modalities)
    full_tokens = jnp.repeat(full, num_modalities)
    target_expert = jnp.repeat(combination - 1, num_modalities)
    code = self.s_router == "code"
    forced = (jnp.where(full_tokens, -1, target_expert)
              if self.force_combination_expert and not code else None)
    all_present = jnp.ones((batch, num_modalities), bool)
    balance, special, load, agreement = [], [], [], []
    for i in range(self.num_layers):
      tokens = MaskedSelfAttention(self.num_heads, self.dropout_rate,
                                   name=f"attention_{i}")(tokens, all_present, train)
      h = nn.LayerNorm(name=f"moe_norm_{i}")(tokens).reshape(-1, width)
      y, routing = SparseMoE(
          num_experts, self.top_k, self.mlp_dim or 2 * width,
          capacity_factor=self.capacity_factor, noisy_gating=self.noisy_gating,
          dropout_rate=self.dropout_rate, expert_axis=self.expert_axis,
          name=f"moe_{i}")(
              h, train=train, forced_expert=forced)
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
      tokens = tokens + y.reshape(batch, num_modalities, width)

      gates = jnp.sum(jax.nn.one_hot(routing["expert_index"], num_experts)
                      * routing["weights"][..., None], axis=1)
      if self.noisy_gating and train and self.top_k < num_experts:
        chosen = smooth_top_k_load(routing["logits"], routing["routing_logits"],
                                   routing["noise_std"], self.top_k)
      else:
        chosen = (gates > 0).astype(jnp.float32)
      self.sow("intermediates", f"routing_{i}", {
          "gates": gates, "load": chosen, "logits": routing["logits"],
          "routing_logits": routing["routing_logits"],
          "expert_index": routing["expert_index"]})
      if code:
        b, s = code_router_losses(gates, chosen, routing["routing_logits"],
                                  target_expert, full_tokens, num_modalities,
                                  num_combinations(num_modalities) - 1)
        balance.append(b)
        special.append(s)
      else:
        balance.append(importance_load_loss(gates, chosen, full_tokens))
        special.append(specialization_loss(routing["logits"], target_expert,
                                           ~full_tokens))
      load.append(routing["expert_load"])
      fewer = (~full_tokens).astype(jnp.float32)
      agree = jnp.argmax(routing["logits"], axis=-1) == target_expert
      agreement.append(jnp.sum(fewer * agree) / jnp.maximum(jnp.sum(fewer), 1.0))

    tokens = nn.LayerNorm(name="final_norm")(tokens)
    joint = nn.Dense(self.out_dim or width, name="out")(
        tokens.reshape(batch, num_modalities * width))
    reduce = jnp.sum if code else jnp.mean
    balance = reduce(jnp.stack(balance))
    special = reduce(jnp.stack(special))
    aux = {
        "loss/flexmoe_balance": self.balance_loss_weight * balance,
        "loss/flexmoe_specialization": self.specialization_loss_weight * special,
        "stats/flexmoe_balance": balance,
        "stats/flexmoe_specialization": special,
        "stats/flexmoe_expert_load": jnp.mean(jnp.stack(load), axis=0),
        "stats/flexmoe_router_agreement": jnp.mean(jnp.stack(agreement)),
        "stats/flexmoe_full_fraction": jnp.mean(full.astype(jnp.float32)),
        "stats/num_present": jnp.mean(jnp.sum(present, 1).astype(jnp.float32)),
    }
    return joint, aux
