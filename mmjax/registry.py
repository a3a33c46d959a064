"""One registry shape for the parts a config picks by name: encoders, fusion modules,
objectives and evaluators.

Each part keeps a `Registry` (a dict: name -> `Entry`). An entry is the registered
object and the config fields it takes, with their defaults. The same three rules hold
for all four parts:

  * register by name (`REGISTRY.register(name, obj, fields)` or as a decorator);
  * an unknown name is an error listing the valid ones (`REGISTRY.lookup`);
  * an unknown field in that part's config is an error naming it and listing the
    valid ones (`REGISTRY.check_fields`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered part: the object (a module class, a function) and its config fields
  (name -> default; `dataclasses.MISSING` for a required field)."""
  obj: Any
  fields: Mapping[str, Any]


def dataclass_fields(cls, exclude: Iterable[str] = ("parent", "name")) -> dict[str, Any]:
  """A (flax) dataclass's init fields and defaults: what a config may set."""
  out = {}
  for f in dataclasses.fields(cls):
    if not f.init or f.name in exclude:
      continue
    if f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
    else:
      out[f.name] = dataclasses.MISSING
  return out


class Registry(dict):
  """name -> `Entry` for one part of the library (`part`: 'encoder', 'fusion', ...)."""

  def __init__(self, part: str):
    super().__init__()
    self.part = part

  def register(self, name: str, obj: Any = None, fields: Mapping[str, Any] | None = None):
    """Registers `obj` under `name` with its config `fields` (default: a dataclass's own
    fields). Without `obj`, returns a decorator."""
    if obj is None:
      return lambda o: self.register(name, o, fields)
    if name in self:
      raise ValueError(f"{self.part} {name!r} is registered twice")
    if fields is None:
      fields = dataclass_fields(obj) if dataclasses.is_dataclass(obj) else {}
    self[name] = Entry(obj=obj, fields=dict(fields))
    return obj

  def lookup(self, name: str, where: str = "") -> Entry:
    """The entry of `name`; an unknown name is a ValueError listing the valid ones."""
    if not isinstance(name, str) or name not in self:
      prefix = f"{where}: " if where else ""
      raise ValueError(f"{prefix}unknown {self.part} {name!r}; valid: {sorted(self)}")
    return self[name]

  def check_fields(self, name: str, given: Iterable[str], where: str = "",
                   extra: Iterable[str] = ()) -> None:
    """Raises a ValueError naming the fields of `given` that `name` does not take (nor
    `extra`, fields the caller handles itself), and the required fields it lacks."""
    entry = self.lookup(name, where)
    given = set(given)
    valid = set(entry.fields) | set(extra)
    prefix = f"{where}: " if where else ""
    unknown = sorted(given - valid)
    if unknown:
      raise ValueError(f"{prefix}unknown field(s) {unknown} for {self.part} {name!r}; "
                       f"valid fields: {sorted(valid)}")
    required = sorted(k for k, v in entry.fields.items()
                      if v is dataclasses.MISSING and k not in given)
    if required:
      raise ValueError(f"{prefix}{self.part} {name!r} needs field(s) {required}")
