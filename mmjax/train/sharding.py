"""A `PartitionSpec` for every parameter, and the optimizer state's that follow them.

Each parameter takes the first of these that applies (docs/scaling.md):

  1. `config.sharding.rules`: pairs `(pattern, spec)`. `pattern` is a Python regular
     expression over the parameter's '/'-joined path, naming a subtree as
     `config.optimizer.rules` do (it matches the whole path or the path up to a '/');
     `spec` is a tuple with one entry per leading dimension: None, a mesh axis name
     or a tuple of them (`()` replicates). A rule that takes no parameter is an error.
  2. `DEFAULT_RULES`, the same pairs, written by the modules whose parameters have a
     layout of their own (stacked experts on the 'expert' axis). Axes the mesh lacks are
     dropped from them, so they hold on any mesh.
  3. The fsdp rule (big_vision's fsdp strategy): with an 'fsdp' axis of size n > 1, an
     array of at least `config.sharding.fsdp_min_size` elements is sharded over it along
     its largest dimension that n divides (ties: the later dimension); smaller arrays,
     and arrays no dimension of which n divides, are replicated.

Parameters are never sharded over 'data' (its devices are replicas). Inside the train
step's `shard_map` the dimensions sharded over 'fsdp' are all-gathered before the model
runs (`gather`); dimensions over any other axis stay local shards, which the module that
owns them handles. The optimizer state follows the parameters (AdamW's moments take
their parameter's spec; counts and other small leaves are replicated).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import collectives
from mmjax.fusion import moe
from mmjax.train import mesh as mesh_lib
from mmjax.train import optimizer as opt_lib

# Module default rules, (pattern, spec) pairs in the format of `config.sharding.rules`.
# Modules append theirs here; they apply after the config's rules.
DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    # moe / flexmoe fusion: the experts' stacked weights, one block of E / n experts
    # per device of the 'expert' axis (expert parallelism, mmjax.fusion.moe).
    (moe.EXPERT_PARAM_PATTERN, (mesh_lib.EXPERT,)),
)

# Arrays below this many elements stay replicated under the fsdp rule (64 Ki elements:
# 256 KiB in float32). Gathering a small array costs a collective's latency for little
# memory; every weight matrix of a ViT-B/16 is above it, its biases and norms below.
FSDP_MIN_SIZE = 2 ** 16


class _Rule:

  def __init__(self, pattern, spec, where: str, required: bool):
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"{where}: the pattern must be a non-empty string (a regular "
                       f"expression over '/'-joined parameter paths), got {pattern!r}")
    try:
      self.regex = re.compile(f"(?:{pattern})(?:/.*)?", re.DOTALL)
    except re.error as e:
      raise ValueError(f"{where}: pattern {pattern!r} is not a regular expression ({e})"
                       ) from None
    if isinstance(spec, (str, bytes)) or not isinstance(spec, (tuple, list)):
      raise ValueError(f"{where} ({pattern!r}): the spec must be a tuple of None, mesh "
                       f"axis names or tuples of them, got {spec!r}")
    entries = []
    for entry in spec:
      names = entry if isinstance(entry, (tuple, list)) else (entry,)
      if entry is not None and not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where} ({pattern!r}): spec entry {entry!r} is neither None, "
                         "a mesh axis name nor a tuple of them")
      entries.append(None if entry is None else tuple(names))
    self.pattern, self.spec, self.where, self.required = pattern, entries, where, required
    self.given = tuple(tuple(e) if isinstance(e, list) else e for e in spec)


def parse_rules(rules, where: str, required: bool = True) -> list[_Rule]:
  if rules is None:
    return []
  if isinstance(rules, (str, bytes)) or not isinstance(rules, (tuple, list)):
    raise ValueError(f"{where} must be a tuple of (pattern, spec) pairs, got {rules!r}")
  parsed = []
  for i, rule in enumerate(rules):
    if isinstance(rule, (str, bytes)) or not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f"{where}[{i}] must be a pair (pattern, spec), got {rule!r}")
    parsed.append(_Rule(rule[0], rule[1], f"{where}[{i}]", required))
  return parsed


def fsdp_spec(shape: Sequence[int], size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """The fsdp rule: shard the largest dimension `size` divides (ties: the later one),
  for arrays of at least `min_size` elements; P() otherwise."""
  if size <= 1 or math.prod(shape) < min_size:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= size]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], d))
  return P(*([None] * dim), mesh_lib.FSDP)


def _checked_spec(rule: _Rule, path: str, shape, mesh, drop_missing: bool) -> P:
  sizes = dict(mesh.shape)
  if len(rule.spec) > len(shape):
    raise ValueError(f"{rule.where} ({rule.pattern!r}): spec {rule.given} has "
                     f"{len(rule.spec)} entries, but parameter {path!r} has shape "
                     f"{tuple(shape)}")
  entries, used = [], []
  for dim, names in enumerate(rule.spec):
    if names is None:
      entries.append(None)
      continue
    if drop_missing:
      names = tuple(n for n in names if n in sizes)
    for n in names:
      if n not in sizes:
        raise ValueError(f"{rule.where} ({rule.pattern!r}): mesh axis {n!r} is not in the "
                         f"mesh ({mesh_lib.describe(mesh)})")
      if n == mesh_lib.DATA:
        raise ValueError(f"{rule.where} ({rule.pattern!r}): parameters are not sharded over "
                         f"'{mesh_lib.DATA}' (its devices hold replicas); use "
                         f"'{mesh_lib.FSDP}' (gathered for the forward pass)")
      if n in used:
        raise ValueError(f"{rule.where} ({rule.pattern!r}): mesh axis {n!r} appears twice "
                         f"in spec {rule.given}")
      used.append(n)
    if mesh_lib.FSDP in names and len(names) > 1:
      raise ValueError(f"{rule.where} ({rule.pattern!r}): a dimension sharded over "
                       f"'{mesh_lib.FSDP}' takes no other axis, got {names}")
    ways = math.prod(sizes[n] for n in names)
    if shape[dim] % ways:
      raise ValueError(f"{rule.where} ({rule.pattern!r}): parameter {path!r} of shape "
                       f"{tuple(shape)} cannot be sharded as {rule.given}: dimension "
                       f"{dim} ({shape[dim]}) is not divisible by {ways} "
                       f"({' x '.join(f'{n}={sizes[n]}' for n in names)})")
    entries.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*entries)


def param_specs(params, mesh, rules=(), *, fsdp_min_size: int = FSDP_MIN_SIZE,
                where: str = "sharding.rules"):
  """A `PartitionSpec` for every leaf of `params` (arrays or `jax.ShapeDtypeStruct`s),
  by the config's `rules`, then `DEFAULT_RULES`, then the fsdp rule (module doc).

  Raises:
    ValueError: a malformed rule, a rule that takes no parameter, an axis the mesh
      lacks, a dimension its axes do not divide (each naming the rule and parameter).
  """
  if isinstance(fsdp_min_size, bool) or not isinstance(fsdp_min_size, int) or fsdp_min_size < 0:
    raise ValueError(f"sharding.fsdp_min_size must be an int >= 0 (elements), got "
                     f"{fsdp_min_size!r}")
  config_rules = parse_rules(rules, where)
  module_rules = parse_rules(DEFAULT_RULES, "sharding.DEFAULT_RULES", required=False)
  fsdp = mesh_lib.axis_size(mesh, mesh_lib.FSDP)
  taken = set()

  def spec_of(path, leaf):
    path = opt_lib.param_path(path)
    for rule in config_rules + module_rules:
      if rule.regex.fullmatch(path):
        taken.add(id(rule))
        return _checked_spec(rule, path, leaf.shape, mesh, drop_missing=not rule.required)
    return fsdp_spec(leaf.shape, fsdp, fsdp_min_size)

  specs = jax.tree_util.tree_map_with_path(spec_of, params)
  for rule in config_rules:
    if id(rule) not in taken:
      paths = [opt_lib.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
      raise ValueError(f"{rule.where}: pattern {rule.pattern!r} takes no parameter (it "
                       "matches no path, or only paths an earlier rule took); parameters "
                       f"are named like {opt_lib._example_paths(paths)}")   # pylint: disable=protected-access
  return specs


def specs_from_config(params, mesh, sharding_config) -> Any:
  """`param_specs` with `config.sharding`'s rules and fsdp_min_size."""
  c = sharding_config
  return param_specs(params, mesh, c.get("rules", ()),
                     fsdp_min_size=c.get("fsdp_min_size", FSDP_MIN_SIZE))


def replicated_specs(params):
  return jax.tree.map(lambda _: P(), params)


# Inside the train step's shard_map ----------------------------------------------------

def gathered_dims(spec: P) -> tuple[int, ...]:
  """The dimensions of `spec` sharded over 'fsdp' (gathered before the forward pass)."""
  return tuple(d for d, e in enumerate(spec) if e == mesh_lib.FSDP)


def spec_axes(spec: P) -> set[str]:
  axes = set()
  for e in spec:
    if e is not None:
      axes.update(e if isinstance(e, tuple) else (e,))
  return axes


def gather(x, spec: P):
  """The local shard `x` (inside `shard_map`) gathered over 'fsdp' along the dims
  `spec` shards over it; the other dims stay local. Its gradient is the reduce-scatter
  of the gathered array's (in device order within `collectives.fixed_order()`)."""
  for dim in gathered_dims(spec):
    x = collectives.all_gather(x, mesh_lib.FSDP, axis=dim)
  return x


# The whole train state ---------------------------------------------------------------

def _dict_suffix(path) -> str | None:
  """The '/'-joined trailing dict keys of a key path (an optimizer-state leaf's path
  ends with its parameter's)."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(str(entry.key))
  return "/".join(reversed(keys)) if keys else None


def state_specs(state, param_specs_tree):
  """Specs for a `TrainState` (arrays or shape structs): params take `param_specs_tree`;
  an optimizer-state leaf whose path ends with a parameter's path and that has its
  shape takes its spec; everything else (step, counts) is replicated."""
  by_path = {}
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                jax.tree.leaves(param_specs_tree,
                                                is_leaf=lambda x: isinstance(x, P))):
    by_path[opt_lib.param_path(path)] = (tuple(leaf.shape), spec)

  def opt_spec(path, leaf):
    found = by_path.get(_dict_suffix(path))
    if found is not None and tuple(getattr(leaf, "shape", ())) == found[0]:
      return found[1]
    return P()

  return state.replace(
      step=P(), params=param_specs_tree,
      opt_state=jax.tree_util.tree_map_with_path(opt_spec, state.opt_state))


def named(mesh, specs):
  """A tree of `PartitionSpec`s -> `NamedSharding`s on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of `tree`'s arrays (arrays or shape structs with
  shardings), from their shard shapes (the largest shard where they differ)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def check_holds(abstract_tree, where: str = "the target") -> None:
  """Every array of `abstract_tree` can be laid out as its `NamedSharding` says: each
  sharded dimension divisible by its axes' sizes. Names the first that cannot."""
  for path, x in jax.tree_util.tree_leaves_with_path(abstract_tree):
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
      continue
    sizes = dict(sharding.mesh.shape)
    for dim, entry in enumerate(sharding.spec):
      if entry is None:
        continue
      names = entry if isinstance(entry, tuple) else (entry,)
      ways = math.prod(sizes[n] for n in names)
      if dim >= len(x.shape) or x.shape[dim] % ways:
        raise ValueError(
            f"{where}: array {opt_lib.param_path(path)!r} of shape {tuple(x.shape)} cannot "
            f"be laid out as {sharding.spec} on the mesh "
            f"({' x '.join(f'{a}={s}' for a, s in sizes.items())}): dimension {dim} is not "
            f"divisible by {ways}")
