"""The modality-ordered warm-up of the training stream (Flex-MoE's warm-up epochs)."""

import ml_collections
import numpy as np
import pytest

from mmjax import experiment
from mmjax.data import missing as missing_lib
from mmjax.data import pipeline
from mmjax.data import world as world_lib

MODALITIES = ("image", "text")


def _source(n=64):
  return world_lib.World(world_lib.WorldSpec(sizes={"train": n, "test": 16}), "train")


def _missingness():
  return missing_lib.Missingness(MODALITIES, kind="mcar",
                                 rates={"image": 0.5, "text": 0.5}, seed=3)


def _stream(source, miss, *, warmup_steps, process_index=0, process_count=1, batch=8):
  featurize = pipeline.Featurize(MODALITIES, text_max_len=32, missingness=miss)
  return iter(pipeline.train_dataset(
      source, featurize, seed=0, global_batch_size=batch, num_threads=1,
      process_index=process_index, process_count=process_count,
      warmup_steps=warmup_steps,
      warmup_order=pipeline.modality_count_order(source, miss)))


def test_warmup_reads_full_modality_samples_first_then_the_shuffle():
  source, miss = _source(), _missingness()
  counts = np.array([sum(miss.present(i, {}).values()) for i in range(len(source))])
  expected_order = np.concatenate([np.flatnonzero(counts == 2), np.flatnonzero(counts == 1)])
  it = _stream(source, miss, warmup_steps=10)   # 80 positions: 1.25 passes of 64
  warm = np.concatenate([next(it)["index"] for _ in range(10)])
  np.testing.assert_array_equal(warm[:64], expected_order)
  np.testing.assert_array_equal(warm[64:], expected_order[:16])   # cycled, unshuffled
  # The batch masks agree with the order: full-modality rows come first.
  first = _stream(source, miss, warmup_steps=10)
  b = next(first)
  assert (counts == 2).sum() >= 8 and (b["mask"]["image"] & b["mask"]["text"]).all()
  # After the warm-up: the plain shuffled stream from its beginning.
  plain = _stream(source, miss, warmup_steps=0)
  for _ in range(3):
    np.testing.assert_array_equal(next(it)["index"], next(plain)["index"])


def test_warmup_resumes_exactly_and_shards_over_processes():
  source, miss = _source(), _missingness()
  it = _stream(source, miss, warmup_steps=4)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["index"] for _ in range(3)]   # crosses the end of the warm-up
  resumed = _stream(source, miss, warmup_steps=4)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["index"], want)
  whole = _stream(source, miss, warmup_steps=4)
  parts = [_stream(source, miss, warmup_steps=4, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(6):
    np.testing.assert_array_equal(
        next(whole)["index"], np.concatenate([next(p)["index"] for p in parts]))


def test_warmup_bad_input():
  source = _source()
  featurize = pipeline.Featurize(MODALITIES, text_max_len=32)
  with pytest.raises(ValueError, match="warmup_steps > 0 needs a warmup_order"):
    pipeline.train_dataset(source, featurize, seed=0, global_batch_size=8,
                           process_index=0, process_count=1, warmup_steps=2)
  with pytest.raises(ValueError, match=r"warmup_steps must be a whole number >= 0, got -1"):
    pipeline.train_dataset(source, featurize, seed=0, global_batch_size=8,
                           process_index=0, process_count=1, warmup_steps=-1,
                           warmup_order=np.arange(4))
  data = ml_collections.ConfigDict({"modality_warmup_steps": -5})
  with pytest.raises(ValueError, match=r"data.modality_warmup_steps must be a whole "
                     r"number of steps >= 0, got -5"):
    experiment.modality_warmup(data, source, featurize)
  assert experiment.modality_warmup(ml_collections.ConfigDict({}), source, featurize) == {}
  args = experiment.modality_warmup(
      ml_collections.ConfigDict({"modality_warmup_steps": 3}), source, featurize)
  assert args["warmup_steps"] == 3
  np.testing.assert_array_equal(args["warmup_order"](), np.arange(len(source)))
