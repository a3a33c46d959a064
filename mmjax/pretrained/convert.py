"""The machinery every converter shares: name rules, strict checking, layer layouts.

A converter describes a checkpoint as a list of `Rule`s: which checkpoint names make
which mmjax parameters, and the exact (invertible) array transform between them. The
same rules load (`apply_rules`) and export (`invert_rules`), so a round trip returns
the same bits.

mmjax paths are tuples starting with a root: 'tower' (the encoder's own params),
'head' (the model's projection head of that modality, `heads_<modality>`) or
'model' (top-level params: logit_scale, logit_bias). Blocks are named in the
unrolled layout (`encoder/block_<i>`); `to_unrolled` / `to_scanned` move between it
and `scan_layers=True`'s stacked `encoder/blocks`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

Path = tuple  # of str


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model: keys missing or unexpected, shapes differ,
  or another architecture. The message lists every key and shape at fault."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """Checkpoint names `keys` <-> mmjax paths `paths`, through `load` and its inverse
  `save` (each takes and returns a list of arrays, in the order of its names)."""
  keys: tuple
  paths: tuple
  load: Callable[[list], list]
  save: Callable[[list], list]


def same(key: str, path: Path) -> Rule:
  """An array copied as it is."""
  return Rule((key,), (path,), lambda a: a, lambda a: a)


def reshape_rule(key: str, path: Path, checkpoint_shape: Sequence[int],
                 mmjax_shape: Sequence[int]) -> Rule:
  """An array reshaped between the checkpoint's shape and mmjax's (e.g. [N, D] vs
  [1, N, D])."""
  checkpoint_shape, mmjax_shape = tuple(checkpoint_shape), tuple(mmjax_shape)
  return Rule((key,), (path,), lambda a: [a[0].reshape(mmjax_shape)],
              lambda a: [a[0].reshape(checkpoint_shape)])


def transposed(key: str, path: Path, axes: Sequence[int]) -> Rule:
  """An array transposed by `axes` (and back by the inverse permutation)."""
  axes = tuple(axes)
  inverse = tuple(int(i) for i in np.argsort(axes))
  return Rule((key,), (path,), lambda a: [a[0].transpose(axes)],
              lambda a: [a[0].transpose(inverse)])


def torch_linear(prefix: str, path: Path, bias: bool = True) -> list[Rule]:
  """A PyTorch Linear (`weight` [out, in], `bias`) as a flax Dense (`kernel` [in, out])."""
  rules = [transposed(prefix + 'weight', path + ('kernel',), (1, 0))]
  if bias:
    rules.append(same(prefix + 'bias', path + ('bias',)))
  return rules


def torch_layernorm(prefix: str, path: Path) -> list[Rule]:
  """A PyTorch LayerNorm (`weight`, `bias`) as flax's (`scale`, `bias`)."""
  return [same(prefix + 'weight', path + ('scale',)), same(prefix + 'bias', path + ('bias',))]


def flax_dense(prefix: str, path: Path, bias: bool = True) -> list[Rule]:
  rules = [same(prefix + 'kernel', path + ('kernel',))]
  if bias:
    rules.append(same(prefix + 'bias', path + ('bias',)))
  return rules


def flax_layernorm(prefix: str, path: Path) -> list[Rule]:
  return [same(prefix + 'scale', path + ('scale',)), same(prefix + 'bias', path + ('bias',))]


def _split_heads_in(num_heads: int):
  """torch rows [n * D, D] (x @ W.T) <-> n flax kernels [D, H, D/H]."""

  def load(arrays):
    weight, = arrays
    width = weight.shape[1]
    parts = np.split(weight, weight.shape[0] // width, axis=0)
    return [p.T.reshape(width, num_heads, width // num_heads) for p in parts]

  def save(arrays):
    return [np.concatenate([k.reshape(k.shape[0], -1).T for k in arrays], axis=0)]

  return load, save


def _split_heads_bias(num_heads: int, count: int):

  def load(arrays):
    bias, = arrays
    return [p.reshape(num_heads, -1) for p in np.split(bias, count)]

  def save(arrays):
    return [np.concatenate([b.reshape(-1) for b in arrays])]

  return load, save


def torch_attention(qkv_weight: str, qkv_bias: str, out_prefix: str, path: Path,
                    num_heads: int, names: Sequence[str] = ('query', 'key', 'value')
                    ) -> list[Rule]:
  """PyTorch attention with fused input projections (rows of `qkv_weight` stacked in
  the order of `names`) and an output Linear, as flax's MultiHeadDotProductAttention
  (query/key/value kernel [D, H, D/H], bias [H, D/H]; out kernel [H, D/H, D])."""
  return (torch_in_proj(qkv_weight, qkv_bias, path, num_heads, names)
          + torch_out_proj(out_prefix, path + ('out',), num_heads))


def torch_in_proj(weight: str, bias: str, path: Path, num_heads: int,
                  names: Sequence[str]) -> list[Rule]:
  """Fused PyTorch input projections (rows in the order of `names`) as flax's
  per-name attention kernels [D, H, D/H] and biases [H, D/H] under `path`."""
  load_w, save_w = _split_heads_in(num_heads)
  load_b, save_b = _split_heads_bias(num_heads, len(names))
  return [Rule((weight,), tuple(path + (n, 'kernel') for n in names), load_w, save_w),
          Rule((bias,), tuple(path + (n, 'bias') for n in names), load_b, save_b)]


def torch_out_proj(prefix: str, path: Path, num_heads: int) -> list[Rule]:
  """An attention output Linear as flax's out kernel [H, D/H, D] and bias."""

  def load_out(arrays):
    weight, = arrays
    return [weight.T.reshape(num_heads, weight.shape[1] // num_heads, weight.shape[0])]

  def save_out(arrays):
    kernel, = arrays
    return [kernel.reshape(-1, kernel.shape[-1]).T]

  return [Rule((prefix + 'weight',), (path + ('kernel',),), load_out, save_out),
          same(prefix + 'bias', path + ('bias',))]


def flax_attention(prefix: str, path: Path) -> list[Rule]:
  """flax's own attention params (big_vision, Google ViT): copied as they are."""
  rules = []
  for name in ('query', 'key', 'value', 'out'):
    rules += flax_dense(f'{prefix}{name}/', path + (name,))
  return rules


# ---------------------------------------------------------------------------------
# Flat trees, layouts.

def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """{path tuple: leaf} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _scanned_index(path: Path) -> int | None:
  for i in range(len(path) - 1):
    if path[i] == 'encoder' and path[i + 1] == 'blocks':
      return i + 1
  return None


@dataclasses.dataclass(frozen=True)
class Spec:
  """The shape and dtype of a target parameter."""
  shape: tuple
  dtype: Any


def spec_of(leaf) -> Spec:
  return Spec(tuple(leaf.shape), np.dtype(leaf.dtype))


def to_unrolled(flat: Mapping[Path, Any]) -> tuple[dict[Path, Any], dict[Path, int]]:
  """`encoder/blocks/...` leaves (arrays or `Spec`s) with a leading depth axis ->
  `encoder/block_<i>/...`. Returns (unrolled, {stack prefix: depth}) so that
  `to_scanned` can stack them back."""
  out, stacks = {}, {}
  for path, leaf in flat.items():
    i = _scanned_index(path)
    if i is None:
      out[path] = leaf
      continue
    depth = leaf.shape[0]
    stacks[path[:i + 1]] = depth
    for layer in range(depth):
      new = path[:i] + (f'block_{layer}',) + path[i + 1:]
      out[new] = (Spec(leaf.shape[1:], leaf.dtype) if isinstance(leaf, Spec)
                  else np.asarray(leaf)[layer])
  return out, stacks


def to_scanned(flat: Mapping[Path, Any], stacks: Mapping[Path, int]) -> dict[Path, Any]:
  """The inverse of `to_unrolled` for arrays: block_<i> leaves stacked under the
  `encoder/blocks` prefixes of `stacks`."""
  out = dict(flat)
  for prefix, depth in stacks.items():
    parent = prefix[:-1]
    groups: dict[Path, list] = {}
    for path in list(out):
      if path[:len(parent)] == parent and len(path) > len(parent):
        match = re.fullmatch(r'block_(\d+)', path[len(parent)])
        if match:
          rest = path[len(parent) + 1:]
          groups.setdefault(rest, [None] * depth)[int(match.group(1))] = out.pop(path)
    for rest, leaves in groups.items():
      out[prefix + rest] = np.stack(leaves)
  return out


# ---------------------------------------------------------------------------------
# Loading and exporting through rules.

def _listing(title: str, items: Sequence[str], limit: int = 40) -> str:
  shown = list(items)[:limit]
  more = f'\n    ... and {len(items) - limit} more' if len(items) > limit else ''
  return f'  {title} ({len(items)}):\n' + '\n'.join(f'    {s}' for s in shown) + more


def _name(path: Path) -> str:
  return '/'.join(path)


def apply_rules(state: Mapping[str, np.ndarray], rules: Iterable[Rule], *, where: str
                ) -> tuple[dict[Path, np.ndarray], set[str]]:
  """{mmjax path: array} from the checkpoint `state` through `rules`.

  Raises:
    CheckpointMismatchError: names the rules need that `state` lacks (all listed).
  """
  rules = list(rules)
  missing = sorted({k for r in rules for k in r.keys if k not in state})
  if missing:
    raise CheckpointMismatchError(
        f'{where}: the checkpoint lacks keys the model needs:\n'
        + _listing('missing keys', missing))
  out, used = {}, set()
  for rule in rules:
    arrays = rule.load([np.asarray(state[k]) for k in rule.keys])
    for path, array in zip(rule.paths, arrays):
      out[path] = array
    used.update(rule.keys)
  return out, used


def invert_rules(flat: Mapping[Path, np.ndarray], rules: Iterable[Rule], *, where: str
                 ) -> dict[str, np.ndarray]:
  """The checkpoint state dict of mmjax params `flat` through `rules`' inverses."""
  rules = list(rules)
  missing = sorted({_name(p) for r in rules for p in r.paths if p not in flat})
  if missing:
    raise CheckpointMismatchError(
        f'{where}: the params lack what the checkpoint layout needs:\n'
        + _listing('missing params', missing))
  out = {}
  for rule in rules:
    arrays = rule.save([np.asarray(flat[p]) for p in rule.paths])
    for key, array in zip(rule.keys, arrays):
      out[key] = array
  return out


def check_unexpected(state_keys: Iterable[str], used: set[str], *, where: str,
                     ignored: Iterable[str] = ()) -> None:
  """Raises naming the checkpoint keys that no rule read and that are not `ignored`."""
  unexpected = sorted(set(state_keys) - used - set(ignored))
  if unexpected:
    raise CheckpointMismatchError(
        f'{where}: the checkpoint has keys the model has no place for:\n'
        + _listing('unexpected keys', unexpected))


def fit(converted: Mapping[Path, np.ndarray], target: Mapping[Path, Any], *, where: str
        ) -> dict[Path, np.ndarray]:
  """Checks converted arrays against the target's leaves (arrays or shape structs),
  path for path and shape for shape, and casts each to the target's dtype.

  Raises:
    CheckpointMismatchError: listing params the checkpoint does not provide, params it
      provides that the model has not, and every shape that differs.
  """
  missing = sorted(_name(p) for p in target if p not in converted)
  extra = sorted(_name(p) for p in converted if p not in target)
  shapes = sorted(
      f'{_name(p)}: checkpoint {tuple(a.shape)}, model {tuple(target[p].shape)}'
      for p, a in converted.items() if p in target and tuple(a.shape) != tuple(
          target[p].shape))
  if missing or extra or shapes:
    parts = []
    if missing:
      parts.append(_listing('model params the checkpoint does not provide', missing))
    if extra:
      parts.append(_listing('checkpoint params the model does not have', extra))
    if shapes:
      parts.append(_listing('shapes that differ', shapes))
    raise CheckpointMismatchError(f'{where}: the checkpoint does not fit the model:\n'
                                  + '\n'.join(parts))
  return {p: np.asarray(converted[p]).astype(target[p].dtype) for p in target}


def block_count(keys: Iterable[str], pattern: str) -> int:
  """1 + the largest block index a regex with one group finds in `keys` (0: none)."""
  found = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
  return max(found) + 1 if found else 0


def heads_of(target: Mapping[Path, Any], root: Path) -> int:
  """Attention heads of the target's first block under `root` (query kernel [D, H, hd])."""
  for path, leaf in target.items():
    if path[:len(root)] == root and path[-2:] == ('query', 'kernel'):
      return int(leaf.shape[1])
  raise CheckpointMismatchError(f'no attention block under {_name(root)} in the model')
