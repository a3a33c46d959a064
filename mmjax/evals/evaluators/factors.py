"""The `factor_probe` evaluator: linear probes for latent factors of the procedural
world, and for combinations of them, from a model's representation.

`targets` are pairs (name, spec): spec a factor ('shape') or the sum of factors modulo
k ('colour+size%3': (colour + size) mod 3, which neither factor alone predicts, a
synergistic target when two modalities express one each). `representation`: 'joint'
(the fused representation) or 'embeddings' (every modality's embedding, concatenated,
for models without fusion). Each probe is `classification.linear_probe`, fit on the
first `train_examples` of `train_split`, its l2 chosen on `val_split`, scored on
`split`, with every modality present.

Metrics per target name t: `t/accuracy` and `t/chance` (the test split's most frequent
class); and a markdown table for summary.md.
"""

from __future__ import annotations

import numpy as np

from mmjax.data import world as world_lib
from mmjax.evals import classification as classification_lib
from mmjax.evals.evaluators import EvalContext, _Head, register


def parse_target(spec: str, where: str = "factor_probe") -> tuple[tuple[int, ...], int]:
  """'shape' -> ((index of shape,), 0); 'colour+size%3' -> ((1, 2), 3)."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"{where}.targets: a target is a factor or 'f1+f2%k', got {spec!r}")
  body, _, modulus = spec.partition("%")
  names = body.split("+")
  for f in names:
    if f not in world_lib.FACTOR_NAMES:
      raise ValueError(f"{where}.targets: {spec!r} names no factor {f!r}; valid: "
                       f"{world_lib.FACTOR_NAMES}")
  if modulus and (not modulus.isdigit() or int(modulus) < 2):
    raise ValueError(f"{where}.targets: {spec!r}: the modulus must be a whole number >= 2")
  if len(names) > 1 and not modulus:
    raise ValueError(f"{where}.targets: {spec!r} sums factors; give a modulus ('%k')")
  return tuple(world_lib.FACTOR_NAMES.index(f) for f in names), int(modulus or 0)


def target_values(factors: np.ndarray, spec: str) -> np.ndarray:
  cols, modulus = parse_target(spec)
  values = np.asarray(factors)[:, list(cols)].sum(1)
  return values % modulus if modulus else values


def _check(c, data, where: str) -> None:
  del data
  if c.representation not in ("joint", "embeddings"):
    raise ValueError(f"{where}.representation must be 'joint' or 'embeddings', got "
                     f"{c.representation!r}")
  if not c.targets:
    raise ValueError(f"{where}.targets: name at least one (name, factor spec) pair")
  for pair in c.targets:
    if len(pair) != 2:
      raise ValueError(f"{where}.targets: each entry is (name, spec), got {pair!r}")
    parse_target(pair[1], where)


@register("factor_probe", check=_check)
def factor_probe(ctx: EvalContext, c) -> dict[str, float]:
  """Probe accuracy and chance for each target of `c.targets`."""
  featurize = ctx.featurize.without_missingness()
  key = "joint" if c.representation == "joint" else "embeddings"
  reps, factors = [], []
  for split, n in ((c.train_split, c.train_examples), (c.val_split, None), (c.split, None)):
    source = ctx.source(split)
    out = ctx.run(_Head(source, n) if n else source, featurize, c.batch_size,
                  (key, "factors"))
    if out["factors"] is None:
      raise ValueError(f"{ctx.where}: factor probes need the world's latent factors; the "
                       f"data ({ctx.data.name}) has none")
    if key == "joint":
      if out["joint"] is None:
        raise ValueError(f"{ctx.where}.representation='joint' needs a fusion module "
                         "(model.fusion); use 'embeddings' for a model without one")
      reps.append(np.asarray(out["joint"], np.float32))
    else:
      reps.append(np.concatenate([np.asarray(out["embeddings"][m], np.float32)
                                  for m in sorted(out["embeddings"])], 1))
    factors.append(out["factors"])
  metrics, lines = {}, ["| target | factors | probe accuracy | chance |", "|---|---|---|---|"]
  for name, spec in c.targets:
    ys = [target_values(f, spec) for f in factors]
    k = int(max(int(y.max()) for y in ys)) + 1
    arrays = [a for rep, y in zip(reps, ys) for a in (rep, y)]
    acc = classification_lib.linear_probe(*arrays, l2_grid=tuple(c.l2_grid), steps=c.steps,
                                          num_classes=k)["test_accuracy"]
    chance = float(np.max(np.bincount(ys[2], minlength=k)) / len(ys[2]))
    metrics[f"{name}/accuracy"], metrics[f"{name}/chance"] = float(acc), chance
    lines.append(f"| {name} | `{spec}` | {acc:.3f} | {chance:.3f} |")
  ctx.add_report(f"Factor probes ({ctx.name or 'factor_probe'})",
                 f"Split `{c.split}`, step {ctx.step}; linear probes on the "
                 f"{c.representation}.\n\n" + "\n".join(lines))
  return metrics
