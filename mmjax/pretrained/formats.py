"""Checkpoint files -> a flat state dict {name: numpy array}, and back.

- `.safetensors`: the `safetensors` library (open_clip / Hugging Face and timm files);
  any dtype, bfloat16 through `ml_dtypes`.
- `.bin`, `.pt`, `.pth`: `torch.load(weights_only=True)`, only when torch is installed
  (PyTorch state dicts); OpenAI's TorchScript `.pt` archives through `torch.jit.load`.
- `.npz`: `numpy.load(allow_pickle=False)` (big_vision and timm / Google ViT files).

Nothing is ever unpickled beyond what `torch.load(weights_only=True)` allows (tensors
and plain containers); a `.npz` holding Python objects is refused by NumPy.
"""

from __future__ import annotations

import os
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
    "(OpenAI's TorchScript .pt: torch.jit.load('{path}', map_location='cpu')"
    '.state_dict() instead of torch.load), then load the .safetensors file.')


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
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    stem = os.path.splitext(path)[0]
    raise ImportError(_TORCH_MISSING.format(path=path, stem=stem)) from None
  import zipfile  # pylint: disable=g-import-not-at-top
  if zipfile.is_zipfile(path) and _is_torchscript(path):
    # OpenAI's CLIP .pt files are TorchScript archives: their weights are read by
    # TorchScript's own loader, which runs no Python pickles.
    state = torch.jit.load(path, map_location='cpu').state_dict()
  else:
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
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path) as z:
    return any(n.endswith('constants.pkl') or '/code/' in n for n in z.namelist())


def write_safetensors(path: str, state: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes a flat state dict as `.safetensors` (contiguous arrays, their own dtype)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
  st_numpy.save_file(arrays, path, metadata=dict(metadata) if metadata else None)
