"""Checkpoint files -> a flat state dict {name: numpy array}, and back.

- `.safetensors`: the `safetensors` library (open_clip / Hugging Face and timm files);
  any dtype, bfloat16 through `ml_dtypes`.
- `.bin`, `.pt`, `.pth`: `torch.load(weights_only=True)`, only when torch is installed
  (PyTorch state dicts). OpenAI's `.pt` files are TorchScript archives, which
  `weights_only=True` refuses: their tensors are read here, torch or not, by an
  unpickler that admits nothing but module objects (as attribute holders), ordered
  dicts and tensor storages (`read_torchscript`).
- `.npz`: `numpy.load(allow_pickle=False)` (big_vision and timm / Google ViT files).

Nothing is ever unpickled beyond tensors and plain containers; a `.npz` holding Python
objects is refused by NumPy.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Mapping, Optional

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors)
import numpy as np

# file type -> the extensions it is chosen by.
FILE_TYPES = {
    'safetensors': ('.safetensors',),
    'torch': ('.bin', '.pt', '.pth'),
    'npz': ('.npz',),
}

_TORCH_MISSING = (
    '{path} is a PyTorch file, and reading it needs torch, which is not installed. '
    'Convert it once where torch is installed, e.g.\n'
    '  python -c "import torch, safetensors.torch as st; sd = torch.load(\'{path}\', '
    'map_location=\'cpu\', weights_only=True); st.save_file({{k: v.contiguous() for k, v '
    'in sd.items()}}, \'{stem}.safetensors\')"\n'
    'then load the .safetensors file.')


def file_type(path: str) -> str:
  """The file type of `path` by its extension ('safetensors', 'torch', 'npz')."""
  lower = path.lower()
  for name, extensions in FILE_TYPES.items():
    if lower.endswith(extensions):
      return name
  known = ', '.join(e for exts in FILE_TYPES.values() for e in exts)
  raise ValueError(f'{path}: not a checkpoint file type mmjax reads (by its extension: '
                   f'{known})')


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a checkpoint file, by name, as NumPy arrays in their own dtype.

  Raises:
    FileNotFoundError: no such file.
    ValueError: an extension mmjax does not read, or a file that is not of its type.
    ImportError: a PyTorch file when torch is not installed (the message says how to
      convert it to `.safetensors`).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file {path} does not exist')
  kind = file_type(path)
  try:
    if kind == 'safetensors':
      return _read_safetensors(path)
    if kind == 'npz':
      with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not a readable {kind} file: {e}') from None
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f'{path} is not a readable {kind} file: {type(e).__name__}: {e}'
                     ) from None
  return _read_torch(path)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  return dict(st_numpy.load_file(path))


def _read_torch(path: str) -> dict[str, np.ndarray]:
  if zipfile.is_zipfile(path) and _is_torchscript(path):
    try:
      return read_torchscript(path)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
      raise ValueError(f'{path} is not a readable TorchScript archive: {e}') from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    stem = os.path.splitext(path)[0]
    raise ImportError(_TORCH_MISSING.format(path=path, stem=stem)) from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ...
    raise ValueError(f'{path} is not a PyTorch state dict that loads with '
                     f'weights_only=True: {type(e).__name__}: {e}') from None
  if isinstance(state, Mapping) and 'state_dict' in state and isinstance(
      state['state_dict'], Mapping):
    state = state['state_dict']     # training checkpoints wrap the state dict
  if not isinstance(state, Mapping):
    raise ValueError(f'{path} holds a {type(state).__name__}, not a state dict')
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor')
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      out[key] = value.float().numpy().astype(ml_dtypes.bfloat16)
    else:
      out[key] = value.numpy()
  return out


def _is_torchscript(path: str) -> bool:
  with zipfile.ZipFile(path) as z:
    return any(n.endswith('constants.pkl') or '/code/' in n for n in z.namelist())


# TorchScript's storage classes -> NumPy dtypes.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'DoubleStorage': np.float64,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_}


# TorchScript's typed containers and type tags, kept as their plain values; a tensor
# stored among the archive's constants is not a weight (None).
_SCRIPT_LISTS = {
    'build_intlist': list, 'build_doublelist': list, 'build_boollist': list,
    'build_tensorlist': list, 'build_stringlist': list,
    'restore_type_tag': lambda value, type_tag: value,
    'build_tensor_from_id': lambda index: None}


class _ScriptObject:
  """A TorchScript module of an archive: only its attributes are kept."""

  def __setstate__(self, state):
    self.attributes = state


class _ScriptUnpickler(pickle.Unpickler):
  """Reads a TorchScript archive's `data.pkl` allowing nothing but its module objects
  (as attribute holders), ordered dicts and tensors (rebuilt as NumPy arrays from the
  archive's storages); any other global is an error. No code of the archive runs."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self.archive, self.prefix, self.path = archive, prefix, path

  def find_class(self, module, name):
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return self.rebuild_tensor
    if module == 'torch' and name in _STORAGE_DTYPES:
      return name
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch.jit._pickle' and name in _SCRIPT_LISTS:
      return _SCRIPT_LISTS[name]
    if module.startswith('__torch__.'):
      return _ScriptObject
    raise pickle.UnpicklingError(
        f'{self.path}: the TorchScript archive names {module}.{name}, which is not a '
        'module, a tensor or a storage; not read')

  def persistent_load(self, pid):
    _, storage, key, _, _ = pid
    return np.frombuffer(self.archive.read(f'{self.prefix}data/{key}'),
                         _STORAGE_DTYPES[storage])

  @staticmethod
  def rebuild_tensor(storage, offset, size, stride, *unused):
    del unused
    strides = [s * storage.itemsize for s in stride]
    return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), strides).copy()


def read_torchscript(path: str) -> dict[str, np.ndarray]:
  """The tensors of a TorchScript archive (OpenAI's CLIP `.pt` files) by their
  state-dict names, read without torch and without running any of its code."""
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
    if not pickles:
      raise ValueError(f'{path}: a TorchScript archive without data.pkl')
    prefix = pickles[0][:-len('data.pkl')]
    with archive.open(pickles[0]) as f:
      root = _ScriptUnpickler(f, archive, prefix, path).load()
  out: dict[str, np.ndarray] = {}

  def collect(obj, name):
    for key, value in getattr(obj, 'attributes', {}).items():
      if isinstance(value, np.ndarray):
        out[name + key] = value
      elif isinstance(value, _ScriptObject):
        collect(value, f'{name}{key}.')

  collect(root, '')
  return out


def write_safetensors(path: str, state: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes a flat state dict as `.safetensors` (contiguous arrays, their own dtype)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
  st_numpy.save_file(arrays, path, metadata=dict(metadata) if metadata else None)
