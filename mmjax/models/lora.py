"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a
reparametrisation of the params: no encoder module changes.

A chosen kernel W of a transformer block becomes W + (alpha / r) * A @ B, with A
[in, r] drawn from N(0, 1/in) and B [r, out] zero, so that a fresh adapter leaves the
function unchanged (the paper's initialisation and scale). The params of a
`LoraModel` are the model's own, at their usual paths, plus the adapters under the
top-level key `ADAPTERS`, which mirror the path of the kernel they adapt:

    params['towers_image']['encoder']['block_0']['attn']['query']['kernel']  [D, H, hd]
    params['lora']['towers_image']['encoder']['block_0']['attn']['query']
        = {'a': [D, r], 'b': [r, H * hd]}

`LoraModel.apply` merges the adapters into the kernels (`merge`) and runs the model,
so the train step differentiates through the merged kernels; the optimizer trains the
adapters only (`mmjax.train.optimizer`, `adapters=ADAPTERS`). `merge` gives plain
params of the model for export; `LoraModel.apply_unmerged` computes the same function
with the adapters beside the kernels (x W + s (x A) B), as a check of the merge.

Kernels as matrices. A kernel's leading axes are its inputs, the rest its outputs:

    kernel      shape             in axes   matrix
    attn/query  [D, heads, hd]    1         [D, heads * hd]   (also key, value)
    attn/out    [heads, hd, D]    2         [heads * hd, D]
    mlp/fc1     [D, mlp_dim]      1         [D, mlp_dim]      (also fc2)

Scanned stacks (`scan_layers=True`, params under 'blocks') carry a leading depth axis
on every kernel, and so do their adapters ([depth, in, r], [depth, r, out]).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

ADAPTERS = "lora"

# Kernel name (its path inside a block) -> how many leading axes are inputs.
KERNELS = {"attn/query": 1, "attn/key": 1, "attn/value": 1, "attn/out": 2,
           "mlp/fc1": 1, "mlp/fc2": 1}

_SITE = re.compile(r"towers_(?P<tower>[^/]+)/encoder/(?P<block>block_\d+|blocks)/"
                   r"(?P<name>.+)/kernel")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which kernels get adapters and how they are scaled.

  rank: r, the adapters' inner width (> 0).
  alpha: the update is scaled by alpha / r (0: alpha = r, scale 1).
  targets: regular expressions over kernel names (`KERNELS`), matched in full.
  towers: modalities whose transformer encoders get adapters; (): every one.
  """
  rank: int
  alpha: float = 0.0
  targets: tuple[str, ...] = tuple(KERNELS)
  towers: tuple[str, ...] = ()

  @property
  def scale(self) -> float:
    return (self.alpha or self.rank) / self.rank


def spec_from_config(lora_config, modalities=None, where: str = "model.lora"
                     ) -> Optional[LoraSpec]:
  """`config.model.lora` -> a checked `LoraSpec`, or None when `rank` is 0 (off).

  `modalities`: the model's (`config.model.encoders`), to check `towers` against.
  Which kernels the targets match is checked when the params exist (`sites`).
  """
  if lora_config is None:
    return None
  rank = lora_config.get("rank", 0)
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise ValueError(f"{where}.rank must be a whole number >= 0 (0: no LoRA), got "
                     f"{rank!r}")
  if not rank:
    return None
  alpha = lora_config.get("alpha", 0.0)
  if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
      or not math.isfinite(alpha) or alpha < 0):
    raise ValueError(f"{where}.alpha must be a finite number >= 0 (0: alpha = rank), "
                     f"got {alpha!r}")
  targets = lora_config.get("targets", tuple(KERNELS))
  if isinstance(targets, str) or not targets:
    raise ValueError(f"{where}.targets must be a non-empty tuple of kernel-name "
                     f"patterns (kernel names: {list(KERNELS)}), got {targets!r}")
  for t in targets:
    if not isinstance(t, str):
      raise ValueError(f"{where}.targets: {t!r} is not a string (a pattern over kernel "
                       f"names {list(KERNELS)})")
    try:
      re.compile(t)
    except re.error as e:
      raise ValueError(f"{where}.targets: {t!r} is not a regular expression ({e})"
                       ) from None
  towers = lora_config.get("towers", ())
  if isinstance(towers, str):
    raise ValueError(f"{where}.towers must be a tuple of modality names, got {towers!r}")
  if modalities is not None:
    unknown = [t for t in towers if t not in modalities]
    if unknown:
      raise ValueError(f"{where}.towers: {unknown} not among the model's towers "
                       f"(model.encoders: {sorted(modalities)})")
  return LoraSpec(rank=rank, alpha=float(alpha), targets=tuple(targets),
                  towers=tuple(towers))


@dataclasses.dataclass(frozen=True)
class Site:
  """One adapted kernel: its path in the params (the module's, without 'kernel'),
  tower, kernel name, number of leading stacked axes and of input axes, and its
  matrix shape (d_in, d_out)."""
  path: tuple[str, ...]
  tower: str
  name: str
  lead: int
  in_axes: int
  d_in: int
  d_out: int


def _kernel_sites(params) -> list[Site]:
  """Every kernel of every transformer block of every tower."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    found = _SITE.fullmatch("/".join(keys))
    if found is None:
      continue
    name = found["name"]
    lead = 1 if found["block"] == "blocks" else 0
    in_axes = KERNELS.get(name, 1)
    shape = tuple(leaf.shape)
    if len(shape) < lead + in_axes + 1:
      continue
    out.append(Site(path=keys[:-1], tower=found["tower"], name=name, lead=lead,
                    in_axes=in_axes, d_in=math.prod(shape[lead:lead + in_axes]),
                    d_out=math.prod(shape[lead + in_axes:])))
  return out


def sites(params, spec: LoraSpec, where: str = "model.lora") -> list[Site]:
  """The kernels of `params` that `spec` adapts.

  Raises:
    ValueError: a tower in `spec.towers` without transformer blocks, a model with none,
      or a target that matches no kernel name (the message lists the names there are).
  """
  if ADAPTERS in params:
    raise ValueError(f"{where}: the model has a top-level parameter {ADAPTERS!r}, the "
                     "key LoRA keeps its adapters under")
  every = _kernel_sites(params)
  towers = sorted({s.tower for s in every})
  if not towers:
    raise ValueError(f"{where}: the model has no transformer tower to adapt (towers: "
                     f"{sorted(k[len('towers_'):] for k in params if k.startswith('towers_'))})")
  for t in spec.towers:
    if t not in towers:
      raise ValueError(f"{where}.towers: tower {t!r} has no transformer blocks; towers "
                       f"with blocks: {towers}")
  chosen = [s for s in every if not spec.towers or s.tower in spec.towers]
  names = sorted({s.name for s in chosen})
  for target in spec.targets:
    if not any(re.fullmatch(target, n) for n in names):
      raise ValueError(f"{where}.targets: {target!r} matches no kernel of the towers "
                       f"{list(spec.towers) or towers}; their kernel names: {names}")
  return [s for s in chosen if any(re.fullmatch(t, s.name) for t in spec.targets)]


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: Mapping, path, value) -> dict:
  """A copy of nested dict `tree` with `path` set to `value` (the rest shared)."""
  head, *rest = path
  out = dict(tree)
  out[head] = _set(tree.get(head, {}), rest, value) if rest else value
  return out


def init_adapters(rng, params, spec: LoraSpec) -> dict:
  """Fresh adapters for the sites of `spec`: A ~ N(0, 1/d_in), B = 0 (float32)."""
  adapters: dict = {}
  for i, s in enumerate(sites(params, spec)):
    lead = _get(params, s.path)["kernel"].shape[:s.lead]
    a = jax.random.normal(jax.random.fold_in(rng, i), lead + (s.d_in, spec.rank),
                          jnp.float32) / math.sqrt(s.d_in)
    b = jnp.zeros(lead + (spec.rank, s.d_out), jnp.float32)
    adapters = _set(adapters, s.path, {"a": a, "b": b})
  return adapters


def _adapter_paths(adapters, prefix=()) -> list[tuple[str, ...]]:
  """The module paths of the adapters: the nodes holding 'a' and 'b'."""
  if isinstance(adapters, Mapping) and set(adapters) == {"a", "b"}:
    return [prefix]
  out = []
  for k, v in adapters.items():
    out += _adapter_paths(v, prefix + (k,))
  return out


def merge(params, adapters, scale: float) -> dict:
  """Plain params of the model: every adapted kernel W replaced by W + scale * A @ B
  (reshaped to W's shape); the other params are `params`' own."""
  for path in _adapter_paths(adapters):
    node = _get(params, path)
    kernel = node["kernel"]
    a, b = adapters_at(adapters, path)
    delta = jnp.einsum("...ir,...ro->...io", a, b) * scale
    merged = kernel + delta.reshape(kernel.shape).astype(kernel.dtype)
    params = _set(params, path, dict(node, kernel=merged))
  return params


def adapters_at(adapters, path) -> tuple[jax.Array, jax.Array]:
  node = _get(adapters, path)
  return node["a"], node["b"]


def split(params) -> tuple[dict, dict]:
  """(the model's params, the adapters) of a `LoraModel`'s params."""
  if ADAPTERS not in params:
    raise ValueError(f"these params have no LoRA adapters (no top-level {ADAPTERS!r}; "
                     f"top level: {sorted(params)})")
  return {k: v for k, v in params.items() if k != ADAPTERS}, params[ADAPTERS]


def count(tree) -> int:
  """The number of scalars in a tree of arrays (or of shapes)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


class LoraModel:
  """A linen model whose chosen kernels carry LoRA adapters: `init` and `apply` as the
  model's, with the adapters in `params[ADAPTERS]`; other attributes are the model's.

  `apply` computes the model with merged kernels; `merge(params)` gives the model's
  plain params for export (`model.apply` on them is the same function).
  """

  def __init__(self, model: nn.Module, spec: LoraSpec):
    self.model = model
    self.spec = spec

  def __getattr__(self, name: str) -> Any:
    if name in ("model", "spec"):      # not set yet (copy, pickle)
      raise AttributeError(name)
    return getattr(self.model, name)

  def init(self, rngs, *args, **kwargs) -> dict:
    variables = dict(self.model.init(rngs, *args, **kwargs))
    params = variables["params"]
    rng = rngs["params"] if isinstance(rngs, Mapping) else rngs
    adapters = init_adapters(jax.random.fold_in(rng, 0x10_4A), params, self.spec)
    variables["params"] = {**params, ADAPTERS: adapters}
    return variables

  def merge(self, params) -> dict:
    """The model's plain params: the adapters merged into their kernels."""
    base, adapters = split(params)
    return merge(base, adapters, self.spec.scale)

  def apply(self, variables, *args, **kwargs):
    variables = dict(variables, params=self.merge(variables["params"]))
    return self.model.apply(variables, *args, **kwargs)

  def apply_unmerged(self, variables, *args, **kwargs):
    """`apply` with every adapted layer computing x W + scale * (x A) B: the LoRA
    function before the merge (a flax method interceptor; unscanned stacks only)."""
    base, adapters = split(variables["params"])
    paths = {}
    for path in _adapter_paths(adapters):
      a, b = adapters_at(adapters, path)
      if a.ndim != 2:
        raise ValueError(f"apply_unmerged: the adapter at {'/'.join(path)} is stacked "
                         "(scan_layers=True); use apply, or scan_layers=False")
      name = "/".join(path[-2:])
      paths[path] = (a, b, KERNELS.get(name, 1))
    scale = self.spec.scale

    def beside(next_fun, call_args, call_kwargs, context):
      y = next_fun(*call_args, **call_kwargs)
      found = paths.get(tuple(context.module.path))
      if context.method_name != "__call__" or found is None:
        return y
      a, b, in_axes = found
      x = call_args[0]
      x = x.reshape(x.shape[:x.ndim - in_axes] + (-1,))
      delta = (x @ a.astype(x.dtype)) @ b.astype(x.dtype) * scale
      return y + delta.reshape(y.shape).astype(y.dtype)

    with nn.intercept_methods(beside):
      return self.model.apply(dict(variables, params=base), *args, **kwargs)


def wrap(model: nn.Module, spec: Optional[LoraSpec]):
  """`model` with LoRA adapters as `spec` says, or `model` itself when `spec` is None."""
  return model if spec is None else LoraModel(model, spec)
