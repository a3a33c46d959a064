"""Hugging Face BERT-family checkpoints -> `mmjax.models.bert.BertEncoder` params.

A Hugging Face model directory holds `config.json` and the weights, as
`model.safetensors` (or shards listed by `model.safetensors.index.json`) or
`pytorch_model.bin` (read with `torch.load(weights_only=True)`, only when PyTorch is
installed). Nothing is downloaded.

  encoder, params = hf_bert.load(model_dir)            # the encoder its config.json says
  features = encoder.apply({'params': params}, ids)    # [B, width]
  tower = hf_bert.load_tower(model_params['towers_text'], model_dir)   # into a model

The check is strict: every parameter of the encoder must come from exactly one tensor
of the checkpoint with the shape the config implies, and every tensor must be used.
A missing key, an unexpected key or a shape that differs is a `CheckpointMismatch`
(a ValueError) that lists every key at fault with both shapes; nothing is left at its
random initialisation. Two kinds of entries are not weights and are dropped:

  * buffers Hugging Face stores beside the weights: `embeddings.position_ids` (it
    must be 0, 1, ..., as the encoder's positions are) and
    `embeddings.token_type_ids`;
  * `pooler.dense.*` (BERT's pooler), when the encoder does not pool with it
    (`pool='pooler'` reads it): sentence-transformers' mean-pooled models keep it
    unused. `ignore` names other key prefixes to drop on purpose (e.g. `('cls.',)`
    for the masked-LM head of a pre-training checkpoint).

Checkpoints saved from `BertFor...` classes carry a `bert.` prefix; it is removed.
Old TensorFlow-converted files name LayerNorm parameters `gamma` / `beta`; they are
read as `weight` / `bias`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from mmjax.models import bert as bert_lib
from mmjax.models import registry
from mmjax.pretrained import formats
from mmjax.pretrained.convert import CheckpointMismatchError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Hugging Face's hidden_act -> the encoder's activation.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class CheckpointMismatch(CheckpointMismatchError):
  """The checkpoint's tensors do not match the encoder's parameters (keys listed)."""

  def __init__(self, source: str, missing, unexpected, shapes):
    self.missing, self.unexpected, self.shapes = list(missing), list(unexpected), shapes
    parts = []
    if self.missing:
      parts.append(f"missing keys {self.missing}")
    if self.unexpected:
      parts.append(f"unexpected keys {self.unexpected}")
    if shapes:
      parts.append("shapes that differ " + ", ".join(
          f"{k}: checkpoint {tuple(got)}, expected {tuple(want)}"
          for k, (got, want) in shapes.items()))
    super().__init__(f"{source} does not match the BERT encoder: " + "; ".join(parts))


def read_config(model_dir: str) -> dict:
  """The model directory's `config.json` as a dict."""
  path = os.path.join(os.fspath(model_dir), CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"no {CONFIG_FILE} in {model_dir!r}: a Hugging Face model "
                     "directory holds config.json beside its weights")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a JSON file ({e})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
  return config


def encoder_fields(config: Mapping[str, Any], where: str = CONFIG_FILE) -> dict:
  """`BertEncoder` fields from a Hugging Face BERT `config.json` (as a dict).

  Raises:
    ValueError: not a BERT config (`model_type`), relative position embeddings, an
      activation the encoder does not compute, or a missing size field (named).
  """
  model_type = config.get("model_type", "bert")
  if model_type != "bert":
    raise ValueError(f"{where}: model_type={model_type!r}; this loader reads BERT "
                     "checkpoints (model_type 'bert')")
  position = config.get("position_embedding_type", "absolute")
  if position != "absolute":
    raise ValueError(f"{where}: position_embedding_type={position!r}; the encoder has "
                     "learned absolute positions only")
  act = config.get("hidden_act", "gelu")
  if act not in _ACTIVATIONS:
    raise ValueError(f"{where}: hidden_act={act!r} is not one of {sorted(_ACTIVATIONS)}")
  names = {"hidden_size": "width", "num_hidden_layers": "depth",
           "num_attention_heads": "num_heads", "intermediate_size": "mlp_dim",
           "vocab_size": "vocab_size", "max_position_embeddings": "max_len"}
  missing = sorted(k for k in names if k not in config)
  if missing:
    raise ValueError(f"{where}: no {missing}; a BERT config.json has them")
  fields = {field: int(config[key]) for key, field in names.items()}
  fields.update(type_vocab_size=int(config.get("type_vocab_size", 2)),
                ln_eps=float(config.get("layer_norm_eps", 1e-12)),
                activation=_ACTIVATIONS[act],
                pad_id=int(config.get("pad_token_id") or 0))
  return fields


def read_state_dict(model_dir: str) -> dict[str, np.ndarray]:
  """The directory's weights: name -> numpy array (safetensors first), read by
  `mmjax.pretrained.formats` (any dtype; torch files only when torch is installed)."""
  model_dir = os.fspath(model_dir)
  single = os.path.join(model_dir, SAFETENSORS_FILE)
  index = os.path.join(model_dir, SAFETENSORS_INDEX)
  torch_file = os.path.join(model_dir, TORCH_FILE)
  if os.path.isfile(single):
    return formats.read_state_dict(single)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
      state.update(formats.read_state_dict(os.path.join(model_dir, shard)))
    return state
  if os.path.isfile(torch_file):
    return formats.read_state_dict(torch_file)
  listing = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else None
  raise ValueError(f"no weights in {model_dir!r}: expected {SAFETENSORS_FILE}, "
                   f"{SAFETENSORS_INDEX} or {TORCH_FILE}; "
                   + ("the directory does not exist" if listing is None
                      else f"it holds {listing}"))


def _layout(enc: bert_lib.BertEncoder) -> dict[str, tuple[tuple, tuple, str]]:
  """Checkpoint key -> (its shape, the param path in a block or the encoder, how to
  turn the tensor into the param)."""
  d, m, h = enc.width, enc.mlp_dim or 4 * enc.width, enc.num_heads
  out = {
      "embeddings.word_embeddings.weight": ((enc.vocab_size, d), ("token_embedding",
                                                                  "embedding"), "id"),
      "embeddings.position_embeddings.weight": ((enc.max_len, d), ("pos_embedding",), "id"),
      "embeddings.token_type_embeddings.weight": ((enc.type_vocab_size, d),
                                                  ("type_embedding",), "id"),
      "embeddings.LayerNorm.weight": ((d,), ("embed_norm", "scale"), "id"),
      "embeddings.LayerNorm.bias": ((d,), ("embed_norm", "bias"), "id"),
  }
  block = {
      "attention.self.query": ("attn", "query", (d, d), "qkv"),
      "attention.self.key": ("attn", "key", (d, d), "qkv"),
      "attention.self.value": ("attn", "value", (d, d), "qkv"),
      "attention.output.dense": ("attn", "out", (d, d), "out"),
      "intermediate.dense": ("mlp", "fc1", (m, d), "dense"),
      "output.dense": ("mlp", "fc2", (d, m), "dense"),
  }
  for i in range(enc.depth):
    prefix = f"encoder.layer.{i}."
    for key, (a, b, shape, kind) in block.items():
      out[f"{prefix}{key}.weight"] = (shape, (i, a, b, "kernel"), kind)
      out[f"{prefix}{key}.bias"] = ((shape[0],), (i, a, b, "bias"),
                                    "qkv_bias" if kind == "qkv" else "id")
    for key, name in (("attention.output.LayerNorm", "ln_attn"),
                      ("output.LayerNorm", "ln_mlp")):
      out[f"{prefix}{key}.weight"] = ((d,), (i, name, "scale"), "id")
      out[f"{prefix}{key}.bias"] = ((d,), (i, name, "bias"), "id")
  if enc.pool == "pooler":
    out["pooler.dense.weight"] = ((d, d), ("pooler", "kernel"), "dense")
    out["pooler.dense.bias"] = ((d,), ("pooler", "bias"), "id")
  return out


def _convert(value: np.ndarray, kind: str, heads: int) -> np.ndarray:
  """A PyTorch-layout tensor -> the flax param (Dense kernels are [in, out])."""
  if kind == "dense":
    return value.T
  if kind == "qkv":        # [out=H*Dh, in] -> [in, H, Dh]
    return value.T.reshape(value.shape[1], heads, -1)
  if kind == "qkv_bias":
    return value.reshape(heads, -1)
  if kind == "out":        # [out, in=H*Dh] -> [H, Dh, out]
    return value.T.reshape(heads, -1, value.shape[0])
  return value


def _normalise_keys(state: Mapping[str, Any]) -> dict[str, Any]:
  """Drops a `bert.` prefix (BertFor... classes) and reads gamma / beta as
  weight / bias (old TensorFlow-converted checkpoints)."""
  prefixed = any(k.startswith("bert.embeddings.") for k in state)
  out = {}
  for key, value in state.items():
    if prefixed and key.startswith("bert."):
      key = key[len("bert."):]
    if ".LayerNorm." in key or key.startswith("LayerNorm."):
      key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
    out[key] = value
  return out


def convert_state_dict(state: Mapping[str, Any], encoder: bert_lib.BertEncoder, *,
                       ignore: Sequence[str] = (), source: str = "the checkpoint"
                       ) -> dict:
  """A Hugging Face BERT state dict (name -> array) -> the encoder's params (float32),
  in its layout (blocks stacked under 'blocks' when `encoder.scan_layers`).

  Args:
    state: the checkpoint's tensors (numpy arrays or anything `np.asarray` takes).
    encoder: the `BertEncoder` the params are for (its fields give the shapes).
    ignore: key prefixes to drop on purpose (see the module docstring).
    source: names the checkpoint in errors.

  Raises:
    CheckpointMismatch: missing keys, unexpected keys or shapes that differ, all
      listed; `embeddings.position_ids` that are not 0, 1, ....
  """
  state = _normalise_keys(state)
  layout = _layout(encoder)
  ignore = tuple(ignore) + (() if encoder.pool == "pooler" else ("pooler.",))
  dropped = []
  for key in list(state):
    if key in _BUFFERS or key.startswith(ignore):
      dropped.append(key)
  if "embeddings.position_ids" in state:
    ids = np.asarray(state["embeddings.position_ids"]).reshape(-1)
    if not np.array_equal(ids, np.arange(ids.size)):
      raise ValueError(f"{source}: embeddings.position_ids is not 0, 1, ..., "
                       f"{ids.size - 1}; the encoder's positions are")
  present = {k: v for k, v in state.items() if k not in dropped}
  missing = sorted(k for k in layout if k not in present)
  unexpected = sorted(k for k in present if k not in layout)
  shapes = {k: (np.shape(v), layout[k][0]) for k, v in sorted(present.items())
            if k in layout and tuple(np.shape(v)) != layout[k][0]}
  if missing or unexpected or shapes:
    raise CheckpointMismatch(source, missing, unexpected, shapes)
  if dropped:
    logging.info("%s: not read (buffers, or heads the encoder does not use): %s",
                 source, dropped)
  top, blocks = {}, [{} for _ in range(encoder.depth)]
  for key, (_, path, kind) in layout.items():
    value = _convert(np.asarray(present[key], np.float32), kind, encoder.num_heads)
    node = top if not isinstance(path[0], int) else blocks[path[0]]
    path = path if not isinstance(path[0], int) else path[1:]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(value)
  if encoder.scan_layers:
    stacked = jax_tree_stack(blocks) if blocks else {}
    top["encoder"] = {"blocks": stacked}
  else:
    top["encoder"] = {f"block_{i}": b for i, b in enumerate(blocks)}
  return top


def jax_tree_stack(trees: Sequence[dict]) -> dict:
  """Nested dicts of arrays with the same structure -> one, leaves stacked on axis 0."""
  first = trees[0]
  if isinstance(first, dict):
    return {k: jax_tree_stack([t[k] for t in trees]) for k in first}
  return np.stack(trees)


def load(model_dir: str, encoder: bert_lib.BertEncoder | None = None, *,
         ignore: Sequence[str] = (), **overrides):
  """(encoder, params) from a Hugging Face BERT model directory.

  Args:
    model_dir: holds config.json and the weights (module docstring).
    encoder: the `BertEncoder` to load into; None builds the one `config.json` says,
      with the pad and end ids of the directory's tokenizer.json when it has one
      (`overrides`, e.g. `pool='cls'`, `dtype='bfloat16'`, `scan_layers=True`, are
      module fields set on top). A given encoder must agree with config.json on every
      size; those that differ are an error.
    ignore: key prefixes to drop on purpose (module docstring).

  Raises:
    ValueError: no config.json or weights in `model_dir`, a config this encoder
      cannot compute, an encoder whose sizes differ from the config, or a
      `CheckpointMismatch` listing the keys at fault.
  """
  config_fields = encoder_fields(read_config(model_dir),
                                 where=os.path.join(os.fspath(model_dir), CONFIG_FILE))
  if encoder is None:
    if os.path.isfile(os.path.join(os.fspath(model_dir), "tokenizer.json")):
      from mmjax.data import hf_tokenizers  # pylint: disable=g-import-not-at-top
      tok = hf_tokenizers.HfTokenizer(model_dir, config_fields["max_len"])
      config_fields.update(pad_id=tok.pad_id, eos_id=tok.eos_id)
    encoder = registry.build_encoder("bert", "minilm_l6", **{**config_fields, **overrides})
  else:
    if overrides:
      raise ValueError(f"load: pass either an encoder or field overrides, got both "
                       f"({sorted(overrides)})")
    wrong = {k: (getattr(encoder, k), v) for k, v in config_fields.items()
             if getattr(encoder, k) != v}
    if wrong:
      raise ValueError(f"{model_dir}/{CONFIG_FILE} does not describe the given encoder: "
                       + ", ".join(f"{k}: encoder {a}, config {b}"
                                   for k, (a, b) in wrong.items()))
  params = convert_state_dict(read_state_dict(model_dir), encoder, ignore=ignore,
                              source=os.fspath(model_dir))
  return encoder, params


def _flat(tree, prefix=()):
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, prefix + (k,)))
    return out
  return {prefix: tree}


def load_tower(target: Mapping[str, Any], model_dir: str, *, ignore: Sequence[str] = ()
               ) -> dict:
  """The checkpoint in `model_dir` as params shaped like `target`, the params (arrays or
  shape structs) of a `BertEncoder` tower, e.g. a model's `params['towers_text']`.

  The encoder's sizes come from config.json; whether its blocks are scanned and
  whether it has BERT's pooler come from `target`. Every leaf is cast to the dtype of
  the one it replaces.

  Raises:
    CheckpointMismatch: the checkpoint does not fit the encoder config.json describes,
      or `target` is another encoder (its paths and shapes that differ, listed).
  """
  fields = encoder_fields(read_config(model_dir),
                          where=os.path.join(os.fspath(model_dir), CONFIG_FILE))
  encoder = bert_lib.BertEncoder(**fields, scan_layers="blocks" in target.get("encoder", {}),
                                 pool="pooler" if "pooler" in target else "mean")
  params = _flat(convert_state_dict(read_state_dict(model_dir), encoder, ignore=ignore,
                                    source=os.fspath(model_dir)))
  want = _flat(target)
  name = lambda p: "/".join(p)
  missing = sorted(name(p) for p in want if p not in params)
  unexpected = sorted(name(p) for p in params if p not in want)
  shapes = {name(p): (params[p].shape, tuple(want[p].shape)) for p in params
            if p in want and params[p].shape != tuple(want[p].shape)}
  if missing or unexpected or shapes:
    raise CheckpointMismatch(f"{model_dir} (as the tower's params)", missing, unexpected,
                             shapes)
  out = {}
  for path, array in params.items():
    node = out
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = array.astype(want[path].dtype)
  return out
