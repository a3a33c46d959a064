"""The procedural world, the byte tokenizer, missingness and the grain pipeline."""

import numpy as np
import pytest

from mmjax import config_lib
from mmjax.data import missing as missing_lib
from mmjax.data import pipeline
from mmjax.data import tokenizer as tok_lib
from mmjax.data import world as world_lib


def small_spec(**kw):
  base = dict(sizes={"train": 200, "test": 64, "validation": 32})
  base.update(kw)
  return world_lib.WorldSpec(**base)


def test_world_is_deterministic_and_splits_differ():
  spec = small_spec()
  a, b = world_lib.World(spec, "train"), world_lib.World(spec, "train")
  for i in (0, 7, 199):
    ra, rb = a[i], b[i]
    np.testing.assert_array_equal(ra["image"], rb["image"])
    np.testing.assert_array_equal(ra["audio"], rb["audio"])
    assert ra["text"] == rb["text"] and ra["label"] == rb["label"]
  test = world_lib.World(spec, "test")
  assert not np.array_equal(a[0]["image"], test[0]["image"])
  other_seed = world_lib.World(small_spec(seed=1), "train")
  assert not np.array_equal(a[0]["image"], other_seed[0]["image"])


def test_world_shapes_ranges_and_factor_coverage():
  spec = small_spec()
  w = world_lib.World(spec, "train")
  r = w[3]
  assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.float32
  assert 0.0 <= r["image"].min() and r["image"].max() <= 1.0
  assert r["audio"].shape == (spec.audio_samples,) and r["audio"].dtype == np.float32
  assert isinstance(r["text"], str) and len(r["text"]) > 10
  factors = np.stack([w.factors(i) for i in range(len(w))])
  for k, name in enumerate(world_lib.FACTOR_NAMES):
    assert set(factors[:, k]) == set(range(len(world_lib.FACTORS[name]))), name
  assert world_lib.num_combinations(world_lib.FACTOR_NAMES) >= 500


def test_caption_describes_expressed_factors_only():
  spec = small_spec(expresses={"image": world_lib.FACTOR_NAMES, "audio": (),
                               "text": ("colour", "size")})
  w = world_lib.World(spec, "train")
  for i in range(20):
    r = w[i]
    colour_words = world_lib._SYNONYMS["colour"][r["factors"][1]]
    assert any(word in r["text"] for word in colour_words), r["text"]
    for shape_words in world_lib._SYNONYMS["shape"]:
      assert shape_words[0] not in r["text"], r["text"]


def test_unexpressed_factor_carries_no_information():
  # Audio expresses only colour: two samples with the same colour but different shapes
  # must not be told apart by a fixed harmonic recipe tied to shape.
  spec = small_spec(expresses={"image": world_lib.FACTOR_NAMES, "audio": ("colour",),
                               "text": world_lib.FACTOR_NAMES}, noise={"audio": 0.0})
  w = world_lib.World(spec, "train")
  seen = [w._seen("audio", w.factors(i), np.random.default_rng(i)) for i in range(200)]
  shapes = np.array([s["shape"] for s in seen])
  true_shapes = np.array([w.factors(i)[0] for i in range(200)])
  assert np.mean(shapes == true_shapes) < 0.4   # chance is 0.2
  assert all(s["colour"] == w.factors(i)[1] for i, s in enumerate(seen))


def test_labels_single_product_and_sum_mod():
  w = world_lib.World(small_spec(label_factors=("shape", "colour")), "train")
  for i in range(10):
    f = w.factors(i)
    assert w[i]["label"] == f[0] * 6 + f[1]
  spec = small_spec(label_factors=("shape", "size"), label_mode="sum_mod",
                    label_num_classes=3)
  w = world_lib.World(spec, "train")
  assert spec.num_classes == 3
  for i in range(10):
    f = w.factors(i)
    assert w[i]["label"] == (f[0] + f[2]) % 3


@pytest.mark.parametrize("kw, match", [
    (dict(modalities=("image", "smell")), "smell"),
    (dict(expresses={"image": ("shape", "texture")}), "texture"),
    (dict(label_factors=("weight",)), "weight"),
    (dict(label_mode="sum_mod"), "num_classes"),
])
def test_world_spec_rejects_bad_fields(kw, match):
  with pytest.raises(ValueError, match=match):
    small_spec(**kw)


def test_world_bad_split_and_index():
  with pytest.raises(ValueError, match="split"):
    world_lib.World(small_spec(), "dev")
  with pytest.raises(IndexError, match="out of range"):
    world_lib.World(small_spec(), "test")[64]


def test_oracle_recall_at_1_direct():
  factors = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 2, 0, 0]])
  # Groups by (shape,): sizes 2, 2, 2, 2 -> 0.5; by (shape, colour): 2, 2, 1, 1.
  assert world_lib.oracle_recall_at_1(factors, ("shape",)) == pytest.approx(0.5)
  assert world_lib.oracle_recall_at_1(factors, ("shape", "colour")) == pytest.approx(0.75)
  assert world_lib.oracle_recall_at_1(factors, ()) == pytest.approx(0.25)


def test_tokenizer_round_trip_and_layout():
  tok = tok_lib.ByteTokenizer(24)
  for text in ("a small red circle", "ünïcödé ok", ""):
    ids = tok.encode(text)
    assert ids.shape == (24,) and ids.dtype == np.int32
    assert ids[0] == tok_lib.BOS_ID
    n = len(text.encode())
    assert ids[1 + n] == tok_lib.EOS_ID and np.all(ids[2 + n:] == tok_lib.PAD_ID)
    assert tok.decode(ids) == text
  long = tok.encode("x" * 100)
  assert long[-1] == tok_lib.EOS_ID and tok.decode(long) == "x" * 22
  assert tok.encode_batch(["a", "bb"]).shape == (2, 24)
  with pytest.raises(ValueError, match="outside"):
    tok.decode([1, 400, 2])
  with pytest.raises(ValueError, match="max_len"):
    tok_lib.ByteTokenizer(2)


def _example(i, label=0, factors=(0, 0, 0, 0)):
  return {"index": np.int64(i), "label": np.int32(label), "factors": np.array(factors),
          "image": np.ones((4, 4, 3), np.float32), "text": np.ones(8, np.int32),
          "mask": {"image": np.bool_(True), "text": np.bool_(True)}}


def test_mcar_rates_seeded_per_example_and_never_empty():
  miss = missing_lib.Missingness(("image", "text"), kind="mcar",
                                 rates={"image": 0.5, "text": 0.5}, seed=3)
  present = [miss.present(i, _example(i)) for i in range(4000)]
  assert present[17] == miss.present(17, _example(17))
  img = np.mean([p["image"] for p in present])
  # P(image present) = 1 - 0.5 + P(both dropped) * P(image put back) = 0.625
  assert abs(img - 0.625) < 0.03
  assert all(any(p.values()) for p in present)
  out = miss(_example(5))
  for m in ("image", "text"):
    if not out["mask"][m]:
      assert not out[m].any()


def test_combination_and_mnar():
  miss = missing_lib.Missingness(("image", "text"), kind="combination",
                                 combinations=(("image",), ("image", "text")),
                                 weights=(3, 1))
  present = [miss.present(i, _example(i)) for i in range(2000)]
  assert all(p["image"] for p in present)
  assert abs(np.mean([p["text"] for p in present]) - 0.25) < 0.04
  mnar = missing_lib.Missingness(("image", "text"), kind="mnar", mnar_on="label",
                                 mnar_rates={"text": (0.0, 1.0)})
  for i in range(50):
    assert mnar.present(i, _example(i, label=0))["text"]
    assert not mnar.present(i, _example(i, label=1))["text"]


@pytest.mark.parametrize("kw, match", [
    (dict(kind="sometimes"), "kind"),
    (dict(kind="mcar", rates={"audio": 0.1}), "audio"),
    (dict(kind="mcar", rates={"image": 1.5}), r"\[0, 1\]"),
    (dict(kind="combination", combinations=((),)), "allow_none"),
    (dict(kind="combination", combinations=(("image",),), weights=(1, 2)), "weights"),
    (dict(kind="mnar", mnar_on="mood"), "mnar_on"),
])
def test_missingness_rejects_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    missing_lib.Missingness(("image", "text"), **kw)


def test_all_combinations_and_names():
  combos = missing_lib.all_combinations(["text", "image", "audio"])
  assert len(combos) == 7 and combos[0] == ("audio",) and combos[-1] == ("audio", "image", "text")
  assert missing_lib.combination_name(["text", "audio"]) == "audio+text"


def _featurize(modalities=("image", "text")):
  return pipeline.Featurize(modalities, text_max_len=32)


def test_pipeline_is_deterministic_static_and_resumable():
  source = world_lib.World(small_spec(), "train")
  make = lambda: iter(pipeline.train_dataset(source, _featurize(), seed=0,
                                             global_batch_size=16, num_threads=1))
  it1, it2 = make(), make()
  b1 = [next(it1) for _ in range(3)]
  b2 = [next(it2) for _ in range(3)]
  for x, y in zip(b1, b2):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])
  first = b1[0]
  assert first["image"].shape == (16, 32, 32, 3) and first["text"].shape == (16, 32)
  assert first["text"].dtype == np.int32 and first["mask"]["image"].dtype == np.bool_
  assert first["mask"]["text"].all()
  # A restored iterator continues with the exact next batch.
  state = it1.get_state()
  expected = next(it1)
  it3 = make()
  it3.set_state(state)
  np.testing.assert_array_equal(next(it3)["index"], expected["index"])
  # Two epochs are shuffled differently but cover the split.
  seen = np.concatenate([b["index"] for b in b1] + [next(it2)["index"] for _ in range(10)])
  assert len(set(seen[:192].tolist())) > 150


def test_processes_read_disjoint_parts_of_the_same_global_batch():
  source = world_lib.World(small_spec(), "train")
  single = iter(pipeline.train_dataset(source, _featurize(), seed=5, global_batch_size=16,
                                       process_index=0, process_count=1, num_threads=1))
  parts = [iter(pipeline.train_dataset(source, _featurize(), seed=5, global_batch_size=16,
                                       process_index=p, process_count=4, num_threads=1))
           for p in range(4)]
  for _ in range(3):
    whole = next(single)["index"]
    union = np.concatenate([next(it)["index"] for it in parts])
    np.testing.assert_array_equal(whole, union)
  with pytest.raises(ValueError, match="not divisible by the number of processes"):
    pipeline.train_dataset(source, _featurize(), seed=0, global_batch_size=10,
                           process_index=0, process_count=4)


def test_grouped_batches_share_factors_and_shard_like_a_shuffle():
  source = world_lib.World(small_spec(sizes={"train": 4000, "test": 64}), "train")
  share = ("colour", "size", "position")

  def stream(seed, process_index=0, process_count=1):
    return iter(pipeline.train_dataset(
        source, _featurize(), seed=seed, global_batch_size=16, num_threads=1,
        process_index=process_index, process_count=process_count,
        group_size=4, group_share=share))

  cols = [world_lib.FACTOR_NAMES.index(f) for f in share]
  batches = [b for b, _ in zip(stream(0), range(4))]
  for batch in batches:
    factors = np.stack([source.factors(int(i)) for i in batch["index"]])
    groups = factors.reshape(4, 4, -1)
    # Within a group the shared factors agree; the shape (not shared) varies.
    assert (groups[:, :, cols] == groups[:, :1, cols]).all()
    assert len({tuple(g[0, cols]) for g in groups}) > 1
    assert len(set(batch["index"].tolist())) >= 12
  shape_differs = sum(len(set(g[:, 0].tolist())) > 1 for b in batches
                      for g in np.stack([source.factors(int(i)) for i in b["index"]]
                                        ).reshape(4, 4, -1))
  assert shape_differs >= 12
  # Deterministic, seeded, and the union over processes is the one-process batch.
  np.testing.assert_array_equal(next(stream(0))["index"], batches[0]["index"])
  assert not np.array_equal(next(stream(1))["index"], batches[0]["index"])
  whole = next(stream(0))["index"]
  parts = np.concatenate([next(stream(0, p, 2))["index"] for p in range(2)])
  np.testing.assert_array_equal(whole, parts)


def test_grouped_batches_bad_input():
  source = world_lib.World(small_spec(), "train")
  with pytest.raises(ValueError, match="unknown factor 'hue'"):
    pipeline.train_dataset(source, _featurize(), seed=0, global_batch_size=16,
                           group_size=4, group_share=("hue",))
  with pytest.raises(ValueError, match="size 3 must divide the per-process batch 16"):
    pipeline.train_dataset(source, _featurize(), seed=0, global_batch_size=16,
                           group_size=3, group_share=("colour",))
  with pytest.raises(ValueError, match="needs a source with latent factors"):
    pipeline.train_dataset([{"text": "a"}] * 16, _featurize(), seed=0,
                           global_batch_size=16, group_size=4, group_share=("colour",))


def test_global_batch_is_sharded_over_data(mesh8):
  source = world_lib.World(small_spec(), "train")
  local = next(iter(pipeline.train_dataset(source, _featurize(), seed=0,
                                           global_batch_size=16, num_threads=1)))
  batch = pipeline.to_global(local, mesh8)
  assert batch["image"].shape == (16, 32, 32, 3)
  assert len(batch["image"].sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(batch["text"]), local["text"])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.to_global({"x": np.zeros((12, 2))}, mesh8)


def test_eval_batches_cover_split_once_with_padding():
  source = world_lib.World(small_spec(), "validation")   # 32 examples
  seen = []
  for batch, valid in pipeline.eval_batches(source, _featurize(), global_batch_size=24):
    assert batch["image"].shape[0] == 24
    seen.extend(batch["index"][:valid].tolist())
  assert seen == list(range(32))


def test_make_source_rejects_unknown_kind():
  data = config_lib.world_data()
  data.kind = "csv"
  with pytest.raises(ValueError, match="csv"):
    pipeline.make_source(data, "train")
