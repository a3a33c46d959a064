"""Loading a published checkpoint into mmjax params, strictly; exporting them back.

`load_model` fills the towers (and their projection heads, logit scale and bias) of a
`MultimodalModel`'s params; `load_encoder` one encoder's. Each checks every name and
shape: a key of a loaded tower that finds no place, a parameter the checkpoint does not
provide, a shape that differs or another architecture (a ViT-B/32 into a ViT-B/16) is a
`CheckpointMismatchError` listing them; nothing is left at its initialisation without
the returned `LoadReport` saying so. Scanned (`scan_layers=True`) and unrolled blocks
alike; every array is cast to the dtype of the parameter it replaces.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from mmjax.pretrained import big_vision
from mmjax.pretrained import convert as c
from mmjax.pretrained import formats
from mmjax.pretrained import open_clip
from mmjax.pretrained import timm_vit

# The modality name `load_encoder` gives the one encoder it loads.
_ENCODER = '<encoder>'

# Checkpoint sources (`init_from.format`) and the towers each has.
SOURCES = {'open_clip': ('image', 'text'), 'timm': ('image',),
           'big_vision': ('image', 'text')}


@dataclasses.dataclass
class LoadReport:
  """What a load did: the model params it replaced (path prefixes with their count of
  arrays), the checkpoint keys it did not read on purpose (towers not asked for, a
  classifier) and the model params left as they were."""
  path: str
  source: str
  loaded: dict = dataclasses.field(default_factory=dict)
  skipped: list = dataclasses.field(default_factory=list)
  kept: list = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    lines = [f'loaded {self.path} ({self.source}):']
    lines += [f'  {name}: {n} arrays' for name, n in self.loaded.items()]
    if self.skipped:
      lines.append(f'  checkpoint keys not loaded ({len(self.skipped)}): '
                   + _short(self.skipped))
    if self.kept:
      lines.append('  model params kept as initialised: ' + ', '.join(self.kept))
    return '\n'.join(lines)


def _short(items, limit=6):
  items = sorted(items)
  return ', '.join(items[:limit]) + (f', ... ({len(items) - limit} more)'
                                     if len(items) > limit else '')


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """The checkpoint's flat state dict (big_vision's scanned blocks split into layers)."""
  state = formats.read_state_dict(path)
  if any('/' in k for k in state):
    state = timm_vit.split_scanned(state)
  return state


def detect_source(state: Mapping[str, Any], where: str = '') -> str:
  """'open_clip', 'timm' or 'big_vision', from the checkpoint's names."""
  keys = list(state)
  if any(k.startswith('visual.') or k in ('token_embedding.weight', 'logit_scale')
         or k.startswith('text.token_embedding') for k in keys):
    return 'open_clip'
  if any(k.startswith(('params/img/', 'img/', 'params/txt/', 'txt/')) for k in keys):
    return 'big_vision'
  if 'patch_embed.proj.weight' in state or any(k.endswith('embedding/kernel') for k in keys):
    return 'timm'
  raise ValueError(f'{where or "checkpoint"}: cannot tell its layout from its names '
                   f'(first: {sorted(keys)[:5]}); set the format: one of {sorted(SOURCES)}')


def _classify(state: Mapping, source: str):
  """key -> 'image' | 'text' | 'scalar' | 'classifier' | None (unknown)."""
  if source == 'open_clip':
    prefix = open_clip._text_prefix(state)  # pylint: disable=protected-access
    return lambda k: open_clip.tower_of(k, prefix)
  if source == 'big_vision':
    prefix = big_vision.root(state)
    return lambda k: big_vision.tower_of(k, prefix)

  def timm_tower(key):
    if key in timm_vit.CLASSIFIER_KEYS or timm_vit.FLAX_CLASSIFIER.search(key):
      return 'classifier'
    return 'image'
  return timm_tower


def _tower_rules(state, source, tower, target, where):
  if tower not in SOURCES[source]:
    raise ValueError(f'{where}: {source} checkpoints have towers {SOURCES[source]}, '
                     f'not {tower!r}')
  if source == 'open_clip':
    return open_clip.rules_for(state, tower, target, where=where)
  if source == 'big_vision':
    return big_vision.rules_for(state, tower, target, where=where)
  if any('/' in k for k in state):
    return timm_vit.flax_rules(state, target, prefix=timm_vit.flax_prefix(state),
                               where=where)
  return timm_vit.torch_rules(state, target, where=where)


def _scalar_rules(state, source) -> dict[str, c.Rule]:
  if source == 'open_clip':
    return {name: c.same(name, path) for name, path in open_clip.SCALARS.items()
            if name in state}
  if source == 'big_vision':
    rules = big_vision.scalar_rules(big_vision.root(state))
    return {name: r for name, r in rules.items() if r.keys[0] in state}
  return {}


def _check_source(source: Optional[str], state, where) -> str:
  if source in (None, '', 'auto'):
    return detect_source(state, where)
  if source not in SOURCES:
    raise ValueError(f'{where}: unknown checkpoint format {source!r}; valid: '
                     f"{sorted(SOURCES)} or 'auto'")
  return source


def _as_state(checkpoint) -> tuple[dict, str]:
  if isinstance(checkpoint, Mapping):
    state = dict(checkpoint)
    if any('/' in k for k in state):
      state = timm_vit.split_scanned(state)
    return state, '<state dict>'
  return read_checkpoint(str(checkpoint)), str(checkpoint)


def _load_towers(flat_params, state, source, towers, heads, where):
  """Fills `flat_params` ({path: leaf}) for modality -> checkpoint tower `towers`;
  `heads`: modality -> the root of its projection head (None: not loaded). Returns
  (loaded {root: count}, keys read, kept [roots])."""
  loaded, used, kept = {}, set(), []
  for modality, tower in towers.items():
    tower_root = (f'towers_{modality}',) if heads is not None else ()
    head_root = (heads or {}).get(modality)
    here = (f'{where}: checkpoint tower {tower!r} -> '
            + (f'modality {modality!r}' if heads is not None and modality != _ENCODER
               else 'the encoder'))
    target = {('tower',) + p[len(tower_root):]: c.spec_of(v) for p, v in flat_params.items()
              if p[:len(tower_root)] == tower_root}
    if not target:
      raise ValueError(f'{here}: the model has no encoder for {modality!r} (params have '
                       f'{sorted({p[0] for p in flat_params})})')
    head = {}
    if head_root is not None:
      head = {('head',) + p[1:]: c.spec_of(v) for p, v in flat_params.items()
              if p[0] == head_root}
    unrolled, stacks = c.to_unrolled({**target, **head})
    rules = _tower_rules(state, source, tower, unrolled, here)
    if head_root is None:   # an encoder alone: the model's projection is not loaded
      rules = [r for r in rules if all(p[0] == 'tower' for p in r.paths)]
    converted, keys = c.apply_rules(state, rules, where=here)
    has_head = any(p[0] == 'head' for p in converted)
    fit_target = {p: s for p, s in unrolled.items() if p[0] == 'tower' or has_head}
    fitted = c.to_scanned(c.fit(converted, fit_target, where=here), stacks)
    for path, array in fitted.items():
      root = tower_root if path[0] == 'tower' else (head_root,)
      flat_params[root + path[1:]] = array
    used |= keys
    loaded[('/'.join(tower_root) or 'encoder')] = sum(1 for p in fitted if p[0] == 'tower')
    if has_head:
      loaded[head_root] = sum(1 for p in fitted if p[0] == 'head')
    elif head:
      kept.append(f'{head_root} (the checkpoint\'s {tower} tower has no projection)')
  return loaded, used, kept


def load_model(params: Mapping[str, Any], checkpoint, *, source: Optional[str] = 'auto',
               towers: Optional[Mapping[str, str]] = None, scalars: bool = True
               ) -> tuple[dict, LoadReport]:
  """A `MultimodalModel`'s params with towers, heads and scalars from a checkpoint.

  Args:
    params: the model's params (`variables['params']`: towers_<m>, heads_<m>,
      logit_scale, ...), arrays or shape structs.
    checkpoint: a file path (see `mmjax.pretrained.formats`) or a flat state dict.
    source: 'open_clip', 'timm', 'big_vision' or 'auto' (told from the names).
    towers: modality -> checkpoint tower ('image' or 'text'); default: each of the
      checkpoint's towers into the modality of the same name that the model has.
    scalars: also load logit_scale and logit_bias where both have them.

  Returns:
    (params: a nested dict with the structure of `params`, whose loaded leaves are
    NumPy arrays in their parameter's dtype and whose other leaves are those given
    (the report names them); a `LoadReport`).

  Raises:
    FileNotFoundError, ValueError, ImportError: see `formats.read_state_dict`.
    CheckpointMismatchError: keys, shapes or architecture that do not fit.
  """
  state, where = _as_state(checkpoint)
  source = _check_source(source, state, where)
  flat = c.flatten(params)
  models_modalities = sorted({p[0][len('towers_'):] for p in flat
                              if p[0].startswith('towers_')})
  if towers is None:
    towers = {m: m for m in SOURCES[source] if m in models_modalities}
  towers = dict(towers)
  heads = {m: f'heads_{m}' for m in towers if any(p[0] == f'heads_{m}' for p in flat)}
  for m in towers:
    heads.setdefault(m, None)
  loaded, used, kept = _load_towers(flat, state, source, towers, heads, where)
  report = LoadReport(where, source, loaded=loaded, kept=kept)
  scalar = _scalar_rules(state, source)
  for name in ('logit_scale', 'logit_bias'):
    rule = scalar.get(name)
    in_model = (name,) in flat
    if rule is not None and scalars and in_model:
      array = rule.load([np.asarray(state[k]) for k in rule.keys])[0].reshape(())
      flat[(name,)] = array.astype(c.spec_of(flat[(name,)]).dtype)
      used |= set(rule.keys)
      report.loaded[name] = 1
    elif in_model:
      report.kept.append(name)
  classify = _classify(state, source)
  loaded_towers = set(towers.values())
  unexpected, skipped = [], []
  for key in state:
    if key in used:
      continue
    kind = classify(key)
    if kind is None or kind in loaded_towers:
      unexpected.append(key)
    else:
      skipped.append(key)
  c.check_unexpected(unexpected, set(), where=where)
  report.skipped = skipped
  return c.unflatten(flat), report


def load_from_config(params: Mapping[str, Any], init_from) -> tuple[dict, LoadReport]:
  """`load_model` with the fields of `config.init_from` (path, format, towers,
  scalars); errors name the field."""
  path = init_from.path
  if not path:
    raise ValueError('init_from.path is empty: nothing to load')
  towers = dict(init_from.towers) if init_from.get('towers') else None
  for modality, tower in (towers or {}).items():
    if tower not in ('image', 'text'):
      raise ValueError(f"init_from.towers.{modality}={tower!r}: a checkpoint tower is "
                       f"'image' or 'text'")
  try:
    if init_from.format == 'hf_bert' or (init_from.format in ('', 'auto')
                                         and _is_hf_bert_dir(path)):
      return _load_hf_bert(params, path, towers)
    return load_model(params, path, source=init_from.format, towers=towers,
                      scalars=init_from.scalars)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'init_from.path: {e}') from None
  except (ValueError, ImportError) as e:
    raise type(e)(f'init_from: {e}') from None


def _is_hf_bert_dir(path: str) -> bool:
  """A Hugging Face model directory whose config.json says model_type 'bert'."""
  config = os.path.join(path, 'config.json')
  if not os.path.isfile(config):
    return False
  with open(config) as f:
    try:
      return json.load(f).get('model_type') == 'bert'
    except (json.JSONDecodeError, AttributeError):
      return False


def _load_hf_bert(params, path, towers) -> tuple[dict, LoadReport]:
  """The text towers `towers` names (default: 'text') from a Hugging Face BERT
  directory (`hf_bert.load_tower`); the projection heads and scalars stay as
  initialised: the checkpoint has none."""
  from mmjax.pretrained import hf_bert  # pylint: disable=g-import-not-at-top
  towers = towers or {'text': 'text'}
  bad = {m: t for m, t in towers.items() if t != 'text'}
  if bad:
    raise ValueError(f'init_from.towers {bad}: a BERT checkpoint has one tower, text')
  out = dict(params)
  report = LoadReport(path, 'hf_bert')
  for modality in towers:
    name = f'towers_{modality}'
    if name not in params:
      raise ValueError(f'init_from.towers.{modality}: the model has no encoder '
                       f'{modality!r}; its towers: '
                       f'{sorted(k for k in params if k.startswith("towers_"))}')
    out[name] = hf_bert.load_tower(params[name], path)
    report.loaded[name] = len(c.flatten(out[name]))
  report.kept = sorted(k for k in params if k not in {f'towers_{m}' for m in towers})
  return out, report


def load_encoder(params: Mapping[str, Any], checkpoint, *, source: Optional[str] = 'auto',
                 tower: str = 'image') -> tuple[dict, LoadReport]:
  """One encoder's params (`encoder.init(...)['params']`) from a checkpoint's `tower`.

  The rest of the checkpoint (other towers, projections, scalars, a classifier) is
  not loaded; the report lists it. Raises as `load_model`.
  """
  state, where = _as_state(checkpoint)
  source = _check_source(source, state, where)
  flat = {(f'towers_{_ENCODER}',) + p: v for p, v in c.flatten(params).items()}
  loaded, used, _ = _load_towers(flat, state, source, {_ENCODER: tower}, {_ENCODER: None},
                                 where)
  classify = _classify(state, source)
  unexpected = [k for k in state if k not in used and classify(k) in (None, tower)
                and not _is_projection(k, source)]
  c.check_unexpected(unexpected, set(), where=where)
  report = LoadReport(where, source, loaded={'encoder': loaded[f'towers_{_ENCODER}']},
                      skipped=sorted(set(state) - used))
  return c.unflatten({p[1:]: np.asarray(v) for p, v in flat.items()}), report


def _is_projection(key: str, source: str) -> bool:
  return source == 'open_clip' and key.endswith(('visual.proj', 'text_projection'))


def export_open_clip(params: Mapping[str, Any], path: Optional[str] = None, *,
                     towers: Optional[Mapping[str, str]] = None,
                     text_prefix: Optional[str] = None) -> dict[str, np.ndarray]:
  """A `MultimodalModel`'s params as an open_clip state dict; written to `path`
  (`.safetensors`) when given.

  Args:
    params: the model's params (towers_<m>, heads_<m>, logit_scale[, logit_bias]).
    path: a `.safetensors` file to write, or None.
    towers: checkpoint tower -> modality; default {'image': 'image', 'text': 'text'}
      for the modalities the model has.
    text_prefix: '' (CLIP's layout) or 'text.' (open_clip's CustomTextCLIP, SigLIP);
      None: 'text.' when the image tower is MAP-pooled or the text tower has its own
      projection, else ''.

  Returns:
    The state dict (name -> NumPy array, float32 as the params are), which open_clip's
    model of the same architecture loads with `strict=True`. Loading it with
    `load_model(source='open_clip')` gives back the same params, bit for bit.
  """
  flat = c.flatten(params)
  have = {p[0][len('towers_'):] for p in flat if p[0].startswith('towers_')}
  if towers is None:
    towers = {t: t for t in ('image', 'text') if t in have}
  out: dict[str, np.ndarray] = {}
  tower_flat = {}
  for tower, modality in towers.items():
    if tower not in ('image', 'text'):
      raise ValueError(f"open_clip has towers 'image' and 'text', not {tower!r}")
    sub = {('tower',) + p[1:]: np.asarray(v) for p, v in flat.items()
           if p[0] == f'towers_{modality}'}
    if not sub:
      raise ValueError(f'export: the params have no tower for modality {modality!r} '
                       f'(towers: {sorted(have)})')
    sub.update({('head',) + p[1:]: np.asarray(v) for p, v in flat.items()
                if p[0] == f'heads_{modality}'})
    tower_flat[tower] = c.to_unrolled(sub)[0]
  if text_prefix is None:
    image, text = tower_flat.get('image', {}), tower_flat.get('text', {})
    text_prefix = 'text.' if (('tower', 'map_head', 'probe') in image
                              or ('tower', 'head', 'kernel') in text) else ''
  for tower, sub in tower_flat.items():
    rules = open_clip.export_rules(sub, tower, text_prefix=text_prefix)
    used = {p for r in rules for p in r.paths}
    left = sorted('/'.join(p) for p in sub if p not in used)
    if left:
      raise c.CheckpointMismatchError(
          f"export: open_clip's {tower} tower has no place for these params:\n"
          + c._listing('params', left))  # pylint: disable=protected-access
    out.update(c.invert_rules(sub, rules, where=f'export of the {tower} tower'))
  for name in ('logit_scale', 'logit_bias'):
    if (name,) in flat:
      out[name] = np.asarray(flat[(name,)]).reshape(())
  if path is not None:
    if formats.file_type(path) != 'safetensors':
      raise ValueError(f'export writes .safetensors files; got {path}')
    formats.write_safetensors(path, out, metadata={'format': 'pt'})
  return out
