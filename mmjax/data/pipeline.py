"""The input pipeline: source -> grain (shuffle, repeat, per-process shard) -> featurize
-> batch -> a global `jax.Array` whose rows are split over every axis of the mesh.

Every process builds the same shuffled stream of examples and takes its own contiguous
part of each global batch: global batch `s` is examples `[s*B, (s+1)*B)` of the stream,
and process `p` of `n` holds `[s*B + p*B/n, s*B + (p+1)*B/n)`. The union over processes
is therefore the single-process global batch, in the same order, for any process count.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.data import missing as missing_lib
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data import world as world_lib
from mmjax.data import world_info
from mmjax.data.info import DataInfo

Batch = dict[str, Any]


def make_source(data_config, split: str):
  """A random-access source for `split` from `config.data` (kind 'world' or 'tfds')."""
  kind = data_config.kind
  if kind == "world":
    return world_lib.World(world_lib.WorldSpec.from_config(data_config), split)
  if kind == "tfds":
    from mmjax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.make_source(data_config, split)
  raise ValueError(f"data.kind: unknown source {kind!r}; valid: 'world', 'tfds'")


def data_info(data_config) -> DataInfo:
  """What the configured source tells the evaluators about itself (`DataInfo`)."""
  if data_config.kind == "world":
    return world_info.data_info(world_lib.WorldSpec.from_config(data_config))
  if data_config.kind == "tfds":
    from mmjax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.data_info(data_config)
  raise ValueError(f"data.kind: unknown source {data_config.kind!r}; valid: 'world', 'tfds'")


def source_modalities(data_config) -> tuple[str, ...]:
  """The modalities the configured source produces."""
  if data_config.kind == "world":
    return tuple(data_config.modalities)
  return tuple(data_config.features.keys())


class Featurize:
  """A record (numpy / str fields) -> fixed-shape arrays, plus the presence `mask`.

  Strings of the `text_modalities` (the modalities whose encoder reads token ids,
  whatever their names: 'text', 'caption', 'transcript') are tokenised; every modality
  gets `mask[m] = True` here; the missingness transform (if configured) then clears
  entries and zero-fills the absent inputs. A record's `length` ({modality: samples
  before padding}) becomes `batch['length'][m]` (int32) for the modalities featurized.
  """

  def __init__(self, modalities: Sequence[str], text_max_len: int,
               missingness: missing_lib.Missingness | None = None,
               tokenizer: str = "byte", text_modalities: Sequence[str] = ("text",)):
    self.modalities = tuple(modalities)
    self.text_modalities = tuple(m for m in text_modalities if m in self.modalities)
    self.tokenizer = tokenizer_lib.make_tokenizer(tokenizer, text_max_len)
    self.missingness = missingness

  @classmethod
  def from_config(cls, data_config, modalities: Sequence[str],
                  missingness: missing_lib.Missingness | None = None, *,
                  text_modalities: Sequence[str] = ("text",)) -> "Featurize":
    """The featurizer `config.data` asks for (text length, tokenizer)."""
    return cls(modalities, data_config.text_max_len, missingness,
               tokenizer=data_config.get("tokenizer", "byte"),
               text_modalities=text_modalities)

  def without_missingness(self) -> "Featurize":
    """The same featurizer with every modality present (no missingness transform)."""
    clean = copy.copy(self)
    clean.missingness = None
    return clean

  def __call__(self, index_and_record) -> Batch:
    index, record = index_and_record
    example: Batch = {}
    for m in self.modalities:
      if m not in record:
        raise KeyError(f"the source produced no {m!r}; it has {sorted(record)}")
      value = record[m]
      if isinstance(value, (str, bytes)):
        if m not in self.text_modalities:
          raise ValueError(f"the source gives strings for modality {m!r}, but its encoder "
                           "does not read text: give it an encoder of kind 'text'")
        value = self.tokenizer.encode(value if isinstance(value, str) else value.decode())
      example[m] = np.asarray(value)
    example["mask"] = {m: np.bool_(True) for m in self.modalities}
    if "label" in record:
      example["label"] = np.int32(record["label"])
    if "factors" in record:
      example["factors"] = np.asarray(record["factors"], np.int32)
    lengths = {m: np.int32(n) for m, n in record.get("length", {}).items()
               if m in self.modalities}
    if lengths:   # true lengths of padded inputs (the TFDS source's cropped audio)
      example["length"] = lengths
    example["index"] = np.int64(index)
    if self.missingness is not None:
      example = self.missingness(example)
    return example


class GroupedIndices:
  """Random access to an endless stream of source indices in groups of `group_size`
  that share a key (e.g. the joint value of some factors): hard negatives.

  Position p belongs to group p // group_size. Each group draws one example uniformly
  from the source, then `group_size` distinct examples with that example's key
  (with repetition if the key has fewer). A pure function of (seed, p), so sharding by
  process and checkpointing the iterator work as for a shuffle.

  `keys` is an int array [N] or a function returning one; a function is called on
  first access, so that grain's prefetch threads compute it while the train step
  compiles.
  """

  def __init__(self, keys, group_size: int, seed: int):
    self._keys_fn = keys if callable(keys) else (lambda: keys)
    self._lock = threading.Lock()
    self._keys = self._members = None
    self._group_size = group_size
    self._seed = seed

  def _index(self):
    with self._lock:
      if self._keys is None:
        keys = np.asarray(self._keys_fn())
        if keys.ndim != 1 or not len(keys):
          raise ValueError(f"keys must be a non-empty 1-D array, got shape {keys.shape}")
        order = np.argsort(keys, kind="stable")
        values, starts = np.unique(keys[order], return_index=True)
        ends = np.append(starts[1:], len(keys))
        self._members = {int(v): order[a:b] for v, a, b in zip(values, starts, ends)}
        self._keys = keys
    return self._keys, self._members

  def __len__(self) -> int:
    return np.iinfo(np.int64).max // 2

  def __getitem__(self, position: int) -> int:
    keys, members = self._index()
    group, slot = divmod(int(position), self._group_size)
    rng = np.random.default_rng([self._seed, group])
    same_key = members[int(keys[rng.integers(len(keys))])]
    chosen = rng.choice(same_key, self._group_size,
                        replace=len(same_key) < self._group_size)
    return int(chosen[slot])


def group_keys(source, share: Sequence[str]) -> Callable[[], np.ndarray]:
  """A function computing [len(source)] ints, the joint value of the world factors
  `share` of every example (checked now, computed when called)."""
  if not hasattr(source, "factors"):
    raise ValueError("data.group_batches needs a source with latent factors (the world); "
                     f"{type(source).__name__} has none")
  names = world_lib.FACTOR_NAMES
  for f in share:
    if f not in names:
      raise ValueError(f"data.group_batches.share: unknown factor {f!r}; valid: {names}")
  cols = [names.index(f) for f in share]
  sizes = [len(world_lib.FACTORS[f]) for f in share]

  def compute() -> np.ndarray:
    if not cols:
      return np.zeros(len(source), np.int64)
    factors = np.stack([source.factors(i) for i in range(len(source))])[:, cols]
    return np.ravel_multi_index(tuple(factors.T), sizes)

  return compute


class WarmupIndices:
  """Random access to a stream whose first `length` positions read `order` (cycled,
  unshuffled) and whose later positions p read `base[p - length]`.

  For a warm-up on a fixed ordering of the training set (Flex-MoE: most observed
  modalities first) before the usual stream. A pure function of the position, as
  `base` is, so process sharding and checkpointing the iterator work unchanged.
  `order` is an int array of source indices or a function returning one, called on
  first access (grain's prefetch threads compute it while the train step compiles).
  """

  def __init__(self, order, length: int, base):
    self._order_fn = order if callable(order) else (lambda: order)
    self._order = None
    self._lock = threading.Lock()
    self._length = int(length)
    self._base = base

  def _get_order(self) -> np.ndarray:
    with self._lock:
      if self._order is None:
        order = np.asarray(self._order_fn())
        if order.ndim != 1 or not len(order):
          raise ValueError(f"the warm-up order must be a non-empty 1-D array of source "
                           f"indices, got shape {order.shape}")
        self._order = order
    return self._order

  def __len__(self) -> int:
    return np.iinfo(np.int64).max // 2

  def __getitem__(self, position: int) -> int:
    position = int(position)
    if position < self._length:
      order = self._get_order()
      return int(order[position % len(order)])
    return int(self._base[position - self._length])


def modality_count_order(source, missingness: missing_lib.Missingness | None
                         ) -> Callable[[], np.ndarray]:
  """A function computing the source indices sorted by number of present modalities
  (as `missingness` masks them), most first; stable, so ties keep index order.

  Only the masks are computed (seeded by example index), not the examples, except for
  'mnar' missingness, which needs each example's label or factors.
  """

  def compute() -> np.ndarray:
    if missingness is None:
      return np.arange(len(source))
    needs_example = missingness.kind == "mnar"
    counts = np.array([
        sum(missingness.present(i, source[i] if needs_example else {}).values())
        for i in range(len(source))])
    return np.argsort(-counts, kind="stable")

  return compute


def training_reader(source, seed: int) -> Callable[[int, int], tuple[int, Any]]:
  """`(position, index) -> (index, record)` for the training stream: the source's
  training form (`source.train_record(index, (seed, position))`: random crops, a random
  caption, ...) where it has one, else `source[index]`. `position` is the example's
  place in the global stream before batching, the same on any process count, so an
  example's augmentation is a pure function of (seed, position), and an iterator
  restored from a checkpoint reads the same records."""
  train_record = getattr(source, "train_record", None)
  if train_record is None:
    return lambda position, i: (int(i), source[int(i)])
  return lambda position, i: (int(i), train_record(int(i), (seed, int(position))))


def audio_sample_rate(data_config) -> int | None:
  """The sample rate of the configured source's audio records (None: unknown)."""
  if data_config.kind == "world":
    return int(data_config.sample_rate)
  from mmjax.data import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.records_sample_rate(data_config)


def check_sample_rates(data_config, encoder_rates: Mapping[str, int]) -> None:
  """Each audio modality's encoder (`{modality: its sample_rate}`) reads audio at the
  rate of the records; an unknown record rate is not checked."""
  if not encoder_rates:
    return
  rate = audio_sample_rate(data_config)
  for m, want in encoder_rates.items():
    if rate is not None and int(want) != rate:
      raise ValueError(f"model.encoders.{m}.sample_rate={want}, but the data's audio is at "
                       f"{rate} Hz; set data.sample_rate={want} to resample it (or the "
                       f"encoder's sample_rate to {rate})")


def train_dataset(source, featurize: Callable, *, seed: int, global_batch_size: int,
                  process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = 2, prefetch: int = 4,
                  group_size: int = 0, group_share: Sequence[str] = (),
                  warmup_steps: int = 0, warmup_order=None) -> grain.IterDataset:
  """Shuffled, repeated, process-sharded batches of the local size `global / processes`.

  With `group_size` > 0, batches are made of groups of that many examples sharing the
  world factors `group_share` (`GroupedIndices`) instead of a shuffle.

  With `warmup_steps` > 0, the first `warmup_steps` global batches are read from
  `warmup_order` (source indices, or a function returning them, e.g.
  `modality_count_order`) in that order, cycling through it if the warm-up is longer
  than the set; the shuffled (or grouped) stream then starts from its beginning.

  Records are read in their training form (`training_reader`): augmentation is drawn
  from (seed, position in the stream), never from global state.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"batch_size {global_batch_size} is not divisible by the number of "
                     f"processes {process_count}")
  local = global_batch_size // process_count
  if warmup_steps < 0 or int(warmup_steps) != warmup_steps:
    raise ValueError(f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}")
  if warmup_steps and warmup_order is None:
    raise ValueError("warmup_steps > 0 needs a warmup_order (source indices, or a "
                     "function returning them)")
  if group_size:
    if local % group_size:
      raise ValueError(f"data.group_batches.size {group_size} must divide the per-process "
                       f"batch {local}")
    ds = grain.MapDataset.source(
        GroupedIndices(group_keys(source, group_share), group_size, seed))
  else:
    ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()
  if warmup_steps:
    ds = grain.MapDataset.source(
        WarmupIndices(warmup_order, int(warmup_steps) * global_batch_size, ds))
  ds = ds.map_with_index(training_reader(source, seed)).map(featurize)
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))


def eval_batches(source, featurize: Callable, *, global_batch_size: int,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> Iterator[tuple[Batch, int]]:
  """The whole split in order, as `(local batch, number of valid rows in the global batch)`.

  The last batch is padded (copies of the final example) to the static shape; the
  caller drops rows past the valid count.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local = global_batch_size // process_count
  n = len(source)
  for start in range(0, n, global_batch_size):
    valid = min(global_batch_size, n - start)
    lo = start + process_index * local
    rows = [featurize((min(i, n - 1), source[min(i, n - 1)])) for i in range(lo, lo + local)]
    yield jax.tree.map(lambda *xs: np.stack(xs), *rows), valid


def data_sharding(mesh) -> NamedSharding:
  """Rows split over every axis of the mesh (each is a batch axis: data, fsdp, expert)."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def to_global(local_batch: Batch, mesh) -> Batch:
  """Place the process-local batch as global `jax.Array`s, rows split over every axis
  of the mesh.

  Works on one host and on many: each process passes only its own rows.
  """
  sharding = data_sharding(mesh)
  num_data = mesh.size
  leaves = jax.tree.leaves(local_batch)
  global_rows = leaves[0].shape[0] * jax.process_count()
  if global_rows % num_data:
    axes = " x ".join(f"{a}={s}" for a, s in dict(mesh.shape).items())
    raise ValueError(f"global batch of {global_rows} rows is not divisible by the "
                     f"{num_data} devices of the mesh axis 'data'" if tuple(
                         mesh.axis_names) == ("data",) else
                     f"global batch of {global_rows} rows is not divisible by the "
                     f"{num_data} devices of the mesh ({axes})")
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
