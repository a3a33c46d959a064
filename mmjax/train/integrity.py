"""Checksums of checkpoint steps: what was written is what is read back.

Orbax commits a step by renaming its temporary directory once every file is written,
so a step directory that exists was complete when it was written. What can still go
wrong afterwards (a file deleted, a disk that truncates, a copy that stops halfway, an
edit by hand) is caught by a manifest of every file's size and CRC-32 that
`write_checksums` stores in the step directory before orbax commits it, and that
`verify` compares with the files before anything is restored. A step without a
manifest (written before this existed, or on a filesystem without atomic rename whose
commit raced the manifest) is checked by the restore attempt alone.

The manifest is written on process 0 in orbax's background save thread, after the
arrays are on disk and before the commit, so the training loop never waits for it.
"""

from __future__ import annotations

import json
import zlib

from etils import epath

MANIFEST = "mmjax_checksums.json"
# Orbax rewrites the step's own metadata when it commits (the commit time), after the
# manifest is written: it is checked to parse, not against a checksum.
STEP_METADATA = "_CHECKPOINT_METADATA"
_CHUNK = 1 << 22


def _crc32(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(directory: epath.Path) -> list[epath.Path]:
  """Every file below `directory` but the manifest (epath has no recursive glob on
  cloud storage, so the tree is walked)."""
  files = []
  for path in directory.iterdir():
    if path.is_dir():
      files.extend(_files(path))
    elif not path.name.startswith(MANIFEST) and path.name != STEP_METADATA:
      files.append(path)
  return sorted(files)


def write_checksums(step_dir) -> dict[str, dict[str, int]]:
  """Writes `step_dir/MANIFEST`: {relative path: {'size', 'crc32'}} of every file
  below `step_dir`, atomically (a temporary file renamed). Returns the manifest."""
  step_dir = epath.Path(step_dir)
  manifest = {}
  for path in _files(step_dir):
    manifest[str(path.relative_to(step_dir))] = {"size": path.stat().length,
                                                 "crc32": _crc32(path)}
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"version": 1, "files": manifest}, indent=0))
  tmp.replace(step_dir / MANIFEST)
  return manifest


def verify(step_dir) -> str | None:
  """None when every file the manifest lists is there with its size and CRC-32 (or
  when the step has no manifest); otherwise what is wrong, naming the file."""
  step_dir = epath.Path(step_dir)
  path = step_dir / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())["files"]
  except (ValueError, KeyError, TypeError) as e:
    return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
  try:
    json.loads((step_dir / STEP_METADATA).read_text())
  except (OSError, ValueError) as e:
    return f"file {STEP_METADATA} does not parse ({type(e).__name__}: {e})"
  for name, want in sorted(manifest.items()):
    file = step_dir / name
    if not file.exists():
      return f"file {name} is missing"
    size = file.stat().length
    if size != want["size"]:
      return f"file {name} has {size} bytes, {want['size']} were written"
    if _crc32(file) != want["crc32"]:
      return f"file {name} differs from what was written (CRC-32 mismatch)"
  return None


def describe(error: BaseException, limit: int = 300) -> str:
  """One line for a library's exception: its type and first line, shortened (a
  TensorStore error is a page of JSON; its first line names the array)."""
  first = (str(error).strip().splitlines() or [""])[0]
  first = first.split(" See full TensorStore details")[0]
  if len(first) > limit:
    first = first[:limit] + "..."
  return f"{type(error).__name__}: {first}" if first else type(error).__name__
