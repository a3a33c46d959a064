"""Evaluators on real-data layouts: several captions per image (COCO's protocol) and
class-level retrieval against a brute-force computation with ties; the retrieval,
zero-shot and robustness evaluators on a tiny TFDS dataset with a Sequence of captions,
through a stand-in model whose embeddings are a known function of the inputs."""

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from mmjax import config_lib
from mmjax import evals
from mmjax import experiment
from mmjax.data import pipeline
from mmjax.evals import evaluators as ev
from mmjax.evals import grouped_retrieval as gr
from mmjax.models.model import ModelOutput

KS = (1, 2, 5)


def _brute(q, t, query_groups, target_groups, ks):
  """Per query: rank of the first relevant target, hits in the top k, average precision,
  from the targets sorted by score with the irrelevant ones first among equal scores."""
  scores = np.round(q.astype(np.float64) @ t.T.astype(np.float64), 6)
  ranks, hits, aps = [], [], []
  for i in range(len(q)):
    relevant = target_groups == query_groups[i]
    order = sorted(range(len(t)), key=lambda j: (-scores[i, j], bool(relevant[j])))
    found = np.cumsum(relevant[order])
    ranks.append(int(np.argmax(relevant[order])) + 1)
    hits.append([found[k - 1] for k in ks])
    aps.append(np.mean([found[p] / (p + 1) for p in range(len(t)) if relevant[order][p]]))
  return np.array(ranks), np.array(hits), np.array(aps)


def _pool_vectors(rng, n, pool=7, d=6):
  """`n` unit vectors drawn from `pool` distinct ones: many exact ties."""
  vectors = rng.normal(size=(pool, d))
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors[rng.integers(pool, size=n)].astype(np.float32)


def test_the_coco_protocol_on_a_known_example():
  images = np.float32([[1, 0], [0, 1]])
  captions = np.float32([[0, 1], [1, 0], [1, 0]])   # two of image 0, one of image 1
  owner = gr.caption_groups([2, 1])
  np.testing.assert_array_equal(owner, [0, 0, 1])
  # Image 0: its caption 1 ties with image 1's caption 2 (counted against it): rank 2.
  # Image 1: its caption scores 0, below caption 0 and tied with caption 1: rank 3.
  np.testing.assert_array_equal(gr.grouped_ranks(images, captions, [0, 1], owner), [2, 3])
  np.testing.assert_array_equal(gr.grouped_ranks(captions, images, owner, [0, 1]),
                                [2, 1, 2])
  m = gr.grouped_retrieval_metrics(images, captions, [0, 1], owner, ks=(1, 2, 3))
  assert (m["R@1"], m["R@2"], m["R@3"], m["median_rank"]) == (0.0, 0.5, 1.0, 2.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_several_captions_per_image_match_brute_force(seed, mesh8):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 6, size=40)                        # 1 to 5 captions per image
  images = _pool_vectors(rng, 40)
  captions = _pool_vectors(rng, int(counts.sum()))
  owner = gr.caption_groups(counts)
  ids = np.arange(40)
  want, hits, _ = _brute(images, captions, ids, owner, KS)
  got = gr.grouped_ranks(images, captions, ids, owner, block_size=16)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(gr.grouped_ranks(images, captions, ids, owner,
                                                 block_size=16, mesh=mesh8), want)
  metrics = gr.grouped_retrieval_metrics(images, captions, ids, owner, ks=KS)
  for j, k in enumerate(KS):
    # A hit when ANY of the image's captions is in the top k (ties against the image).
    assert metrics[f"R@{k}"] == pytest.approx(np.mean(hits[:, j] > 0))
  want_t, _, _ = _brute(captions, images, owner, ids, KS)
  np.testing.assert_array_equal(gr.grouped_ranks(captions, images, owner, ids), want_t)
  scores = captions @ images.T
  own = scores[np.arange(len(owner)), owner][:, None]
  # One relevant image: the rank is #{images scoring at least the caption's own}.
  np.testing.assert_array_equal(want_t, np.sum(np.round(scores, 6) >= np.round(own, 6),
                                               axis=1))


def test_class_level_retrieval_matches_brute_force(mesh8):
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 4, size=30)
  q, t = _pool_vectors(rng, 30), _pool_vectors(rng, 30)
  ranks, hits, aps = _brute(q, t, labels, labels, KS)
  stats = gr.grouped_stats(q, t, labels, labels, KS, block_size=8)
  np.testing.assert_array_equal(stats["rank"], ranks)
  np.testing.assert_array_equal(stats["hits"], hits)
  np.testing.assert_allclose(stats["ap"], aps, rtol=1e-5)
  metrics = gr.grouped_retrieval_metrics(q, t, labels, labels, KS, precision=True,
                                         mesh=mesh8, block_size=8)
  for j, k in enumerate(KS):
    assert metrics[f"R@{k}"] == pytest.approx(np.mean(hits[:, j] > 0))
    assert metrics[f"P@{k}"] == pytest.approx(np.mean(hits[:, j] / k))
  assert metrics["mAP"] == pytest.approx(aps.mean(), rel=1e-5)
  assert metrics["mean_rank"] == pytest.approx(ranks.mean())
  # Identity groups are 1:1 retrieval.
  np.testing.assert_array_equal(gr.grouped_ranks(q, t, np.arange(30), np.arange(30)),
                                evals.retrieval_ranks(q, t))


def test_grouped_retrieval_bad_input():
  x = np.eye(3, dtype=np.float32)
  with pytest.raises(ValueError, match=r"no target is relevant to query 2"):
    gr.grouped_ranks(x, x, [0, 1, 5], [0, 1, 2])
  with pytest.raises(ValueError, match=r"`query_groups` must have shape \[3\]"):
    gr.grouped_ranks(x, x, [0, 1], [0, 1, 2])
  with pytest.raises(ValueError, match=r"`target_groups` has a negative id"):
    gr.grouped_ranks(x, x, [0, 1, 2], [0, -1, 2])
  with pytest.raises(ValueError, match=r"k=4 in `ks` is larger than the number of targets"):
    gr.grouped_retrieval_metrics(x, x, [0, 1, 2], [0, 1, 2], ks=(4,))


# ---------------------------------------------------------------------------------------
# The evaluators on a tiny TFDS dataset.
# ---------------------------------------------------------------------------------------

NAME = "mmjax_tiny_captions"
SIZES = {"train": 8, "test": 12}
CLASSES = ("zero", "one", "two")
TEMPLATES = ("the digit {}", "{} spoken")
D = 12


class MmjaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
  """Images of varying size, 1 to 4 captions each, audio, a named label; metadata with
  prompt templates."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
        "label": tfds.features.ClassLabel(names=CLASSES),
    }), metadata=tfds.core.MetadataDict(sample_rate=8000, prompt_templates=TEMPLATES))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in SIZES.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      rng = np.random.default_rng([len(split), i])
      png = io.BytesIO()
      PIL.Image.fromarray(rng.integers(0, 256, (8 + i % 3, 9, 3), dtype=np.uint8)).save(
          png, format="PNG")
      yield i, {"image": png.getvalue(), "label": i % 3,
                "captions": [f"{CLASSES[i % 3]} {split} {i}.{k}" for k in range(1 + i % 4)],
                "audio": rng.integers(-9000, 9000, (30 + i,), dtype=np.int16)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  MmjaxTinyCaptions(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def _config(data_dir):
  c = config_lib.base_config()
  c.data = config_lib.tfds_data(f"{NAME}:1.0.0", {"image": "image", "text": "captions",
                                                  "audio": "audio"},
                                data_dir=data_dir, label_feature="label",
                                splits={"train": "train", "test": "test"}, image_size=8,
                                audio_samples=32, text_max_len=32, num_threads=1)
  c.model.encoders = {"image": config_lib.encoder("vit", "mu"),
                      "text": config_lib.encoder("text", "mu", max_len=32),
                      "audio": config_lib.encoder("audio", "mu")}
  return c


_W = {m: np.random.default_rng(k).normal(size=(n, D)).astype(np.float32)
      for k, (m, n) in enumerate((("image", 8 * 8 * 3), ("text", 260), ("audio", 32)))}


def _embed(modality, x):
  x = np.asarray(x)
  if modality == "text":     # a bag of token ids
    x = np.stack([np.bincount(row, minlength=260) for row in x]).astype(np.float32)
  e = x.reshape(len(x), -1) @ _W[modality]
  return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-9)   # zero-filled rows


def _predict(batch):
  mask = {m: np.asarray(v) for m, v in batch["mask"].items()}
  emb = {m: np.where(mask[m][:, None], _embed(m, batch[m]), np.eye(D)[0])
         for m in ("image", "text", "audio")}
  logits = sum(np.where(mask[m][:, None], emb[m][:, :3], 0) for m in emb)
  return ModelOutput(embeddings=jax.tree.map(jnp.asarray, emb),
                     features=jax.tree.map(jnp.asarray, emb),
                     logit_scale=jnp.float32(10.0), logits=jnp.asarray(logits))


def _run(config, mesh, workdir, entries):
  evaluators = ev.build_evaluators(ml_collections.ConfigDict(entries), 10,
                                   data=pipeline.data_info(config.data),
                                   modalities=experiment.model_modalities(config))
  ctx = experiment.eval_context(config, workdir=str(workdir), mesh=mesh, predict=_predict,
                                featurize=experiment.make_featurize(config), step=1)
  return ev.run_evaluators(ctx, evaluators, force=True)


def test_retrieval_evaluator_uses_every_caption_and_labels(data_dir, mesh8, tmp_path):
  config = _config(data_dir)
  entry = lambda **f: config_lib.evaluator_config("retrieval", batch_size=8, ks=(1, 5),
                                                  plot_max_k=5, **f)
  metrics = _run(config, mesh8, tmp_path, {
      "coco": entry(pairs=(("image", "text"),)),
      "first": entry(pairs=(("image", "text"),), all_captions=False),
      "by_class": entry(relevance="class")})
  source = pipeline.make_source(config.data, "test")
  featurize = experiment.make_featurize(config)
  rows = [featurize((i, source[i])) for i in range(len(source))]
  emb = {m: _embed(m, np.stack([r[m] for r in rows])) for m in ("image", "audio", "text")}
  labels = np.array([r["label"] for r in rows])
  captions = source.all_texts("text")
  owner = gr.caption_groups([len(c) for c in captions])
  texts = _embed("text", np.stack([featurize.tokenizer.encode(t) for c in captions
                                   for t in c]))
  ids = np.arange(len(source))
  for name, (q, t, qg, tg) in {"image->text": (emb["image"], texts, ids, owner),
                               "text->image": (texts, emb["image"], owner, ids)}.items():
    ranks, hits, _ = _brute(q, t, qg, tg, (1, 5))
    assert metrics[f"eval/coco/{name}/R@1"] == pytest.approx(np.mean(hits[:, 0] > 0)), name
    assert metrics[f"eval/coco/{name}/R@5"] == pytest.approx(np.mean(hits[:, 1] > 0)), name
    assert metrics[f"eval/coco/{name}/mean_rank"] == pytest.approx(ranks.mean()), name
  first = evals.retrieval_metrics(emb["image"], emb["text"], ks=(1, 5))
  assert metrics["eval/first/image->text/R@5"] == pytest.approx(first["R@5"])
  for a, b in (("audio", "image"), ("audio", "text"), ("image", "text")):
    for name, (q, t) in {f"{a}->{b}": (a, b), f"{b}->{a}": (b, a)}.items():
      qe, qg = (texts, labels[owner]) if q == "text" else (emb[q], labels)
      te, tg = (texts, labels[owner]) if t == "text" else (emb[t], labels)
      ranks, hits, aps = _brute(qe, te, qg, tg, (1, 5))
      assert metrics[f"eval/by_class/{name}/R@5"] == pytest.approx(np.mean(hits[:, 1] > 0))
      assert metrics[f"eval/by_class/{name}/P@5"] == pytest.approx(np.mean(hits[:, 1] / 5))
      assert metrics[f"eval/by_class/{name}/mAP"] == pytest.approx(aps.mean(), rel=1e-5)
  assert not any(k.endswith("_ceiling") for k in metrics)
  with pytest.raises(ValueError, match=r"config.evals.r.relevance: unknown 'label'"):
    ev.build_evaluators(ml_collections.ConfigDict({"r": entry(relevance="label")}), 10,
                        data=pipeline.data_info(config.data),
                        modalities=experiment.model_modalities(config))


def test_zero_shot_and_robustness_on_a_tfds_dataset(data_dir, mesh8, tmp_path):
  config = _config(data_dir)
  info = pipeline.data_info(config.data)
  # Class names from the ClassLabel, prompt templates from the builder's metadata.
  assert (info.class_names, info.prompt_templates) == (CLASSES, TEMPLATES)
  metrics = _run(config, mesh8, tmp_path, {
      "zero_shot": config_lib.evaluator_config("zero_shot", batch_size=8),
      "robustness": config_lib.evaluator_config("robustness", batch_size=8,
                                                rates=(0.0, 0.5), plot=False)})
  source = pipeline.make_source(config.data, "test")
  featurize = experiment.make_featurize(config)
  rows = [featurize((i, source[i])) for i in range(len(source))]
  image = _embed("image", np.stack([r["image"] for r in rows]))
  labels = np.array([r["label"] for r in rows])
  prompts = _embed("text", np.stack([featurize.tokenizer.encode(t.format(n))
                                     for n in CLASSES for t in TEMPLATES]))
  classes = evals.zero_shot_classifier(prompts.reshape(3, len(TEMPLATES), D))
  accuracy = np.mean(np.argmax(image @ classes.T, axis=1) == labels)
  assert metrics["eval/zero_shot/accuracy"] == pytest.approx(accuracy)
  assert metrics["eval/zero_shot/chance"] == pytest.approx(1 / 3)
  for combination in ("audio", "image", "text", "audio+image", "audio+text", "image+text",
                      "audio+image+text", "missing_0.5"):
    assert 0 <= metrics[f"eval/robustness/{combination}/accuracy"] <= 1, combination
  assert metrics["eval/robustness/chance"] == pytest.approx(4 / 12)
