"""Evaluators end to end through the real data path, with a stand-in model whose
embeddings are a known function of each sample, so every metric has a direct answer.

The stand-in (`_FakeModel`) embeds a sample from its latent factors: the image and the
text of sample i get the same vector `_vector(i)` (so retrieval is perfect and the
modality gap is zero) except that odd samples carry the *next* shape's direction in the
image, which zero-shot then gets wrong. A prompt is embedded by the shape word it
contains. Absent modalities all get one constant vector, so a metric computed over
absent rows would show it.
"""

import json
import os

import jax
import jax.numpy as jnp
import matplotlib.image
import ml_collections
import numpy as np
import pytest

from mmjax import experiment
from mmjax import config_lib
from mmjax.data import pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data import world as world_lib
from mmjax.data import world_info
from mmjax import registry as registry_lib
from mmjax.evals import calibration as calibration_lib
from mmjax.evals import classification as classification_lib
from mmjax.evals import evaluators as ev
from mmjax.models.model import ModelOutput
from mmjax.train import summary as summary_lib
from mmjax.train import trainer

D = 16
SHAPES = world_lib.FACTORS["shape"]
LOGIT_SCALE = 10.0


def _config(**data):
  c = config_lib.base_config()
  c.name = "fake"
  c.data.sizes.train = 500
  c.data.sizes.validation = 24
  c.data.sizes.test = 40          # not a multiple of the batch: the last batch is padded
  c.data.image_size = 16
  c.data.text_max_len = 56
  c.data.num_threads = 1
  for k, v in data.items():
    setattr(c.data, k, v)
  c.evals.retrieval.batch_size = 16
  return c


def _noise(index):
  return np.random.default_rng(1000 + int(index)).normal(size=D)


def _vector(index, shape):
  v = 3.0 * np.eye(D)[shape] + 0.5 * _noise(index)
  return v / np.linalg.norm(v)


def _image_shape(index, shape):
  return shape if index % 2 == 0 else (shape + 1) % len(SHAPES)


ABSENT = np.eye(D)[D - 1]


class _FakeModel:
  """apply(params, batch) -> ModelOutput from factors (data) or decoded text (prompts)."""

  def __init__(self, with_task=False):
    self.with_task = with_task
    self.tokenizer = tokenizer_lib.ByteTokenizer(56)

  def __call__(self, params, batch):
    del params
    mask = {m: np.asarray(v) for m, v in batch["mask"].items()}
    n = mask["image"].shape[0]
    if "factors" in batch:
      index, shape = np.asarray(batch["index"]), np.asarray(batch["factors"])[:, 0]
      image = np.stack([_vector(i, _image_shape(i, s)) for i, s in zip(index, shape)])
      text = np.stack([_vector(i, s) for i, s in zip(index, shape)])
    else:   # prompts: text only
      words = [self.tokenizer.decode(t) for t in np.asarray(batch["text"])]
      text = np.stack([np.eye(D)[[s for s in range(len(SHAPES)) if SHAPES[s] in w][0]]
                       for w in words])
      image = np.zeros((n, D))
    emb = {"image": np.where(mask["image"][:, None], image, ABSENT),
           "text": np.where(mask["text"][:, None], text, ABSENT)}
    features = {m: np.concatenate([e, e[:, :4] * 2], axis=1) for m, e in emb.items()}
    logits = None
    if self.with_task:
      logits = 4.0 * np.stack([e[:len(SHAPES)] for e in emb["image"]])
    return ModelOutput(embeddings=jax.tree.map(jnp.asarray, emb),
                       features=jax.tree.map(jnp.asarray, features),
                       logit_scale=jnp.float32(LOGIT_SCALE),
                       logits=None if logits is None else jnp.asarray(logits))


def _ctx(config, mesh, workdir, with_task=False, name="x"):
  model = _FakeModel(with_task)
  return experiment.eval_context(config, workdir=str(workdir), mesh=mesh,
                                 predict=lambda batch: model(None, batch),
                                 featurize=experiment.make_featurize(config), step=7)


def _direct(config, split, n=None):
  """Embeddings, masks and labels of a split computed directly from the world."""
  featurize = experiment.make_featurize(config)
  source = pipeline.make_source(config.data, split)
  rows = [featurize((i, source[i])) for i in range(n or len(source))]
  batch = jax.tree.map(lambda *xs: np.stack(xs), *rows)
  out = _FakeModel(True)(None, batch)
  return (jax.tree.map(np.asarray, out.embeddings), {m: np.asarray(v) for m, v in
                                                     batch["mask"].items()},
          np.asarray(batch["label"]), jax.tree.map(np.asarray, out.features),
          np.asarray(out.logits))


def _with_evals(config, entries):
  config = ml_collections.ConfigDict(config.to_dict())
  config.evals = ml_collections.ConfigDict(entries)
  return config


def _entry(kind, **fields):
  return config_lib.evaluator_config(kind, batch_size=16, **fields)


def _run(config, mesh, workdir, entries, with_task=False):
  evaluators = ev.build_evaluators(ml_collections.ConfigDict(entries), 10,
                                   data=pipeline.data_info(config.data),
                                   modalities=experiment.model_modalities(config))
  ctx = _ctx(config, mesh, workdir, with_task)
  return ev.run_evaluators(ctx, evaluators, force=True), ctx


def _valid_png(path):
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert image[..., :3].std() > 0.01


def test_retrieval_and_geometry_known_answers(mesh8, tmp_path):
  config = _config()
  metrics, _ = _run(config, mesh8, tmp_path, {"retrieval": _entry("retrieval"),
                                              "geometry": _entry("geometry", k=3)})
  # Image and text differ only on odd samples' shape direction: compute directly.
  emb, _, _, feats, _ = _direct(config, "test")
  x, y = emb["image"], emb["text"]
  sims = x @ y.T
  ranks_it = 1 + np.sum(sims > np.diag(sims)[:, None], axis=1)
  ranks_ti = 1 + np.sum(sims.T > np.diag(sims)[:, None], axis=1)
  for name, ranks in (("image->text", ranks_it), ("text->image", ranks_ti)):
    assert metrics[f"eval/retrieval/{name}/R@1"] == pytest.approx(np.mean(ranks == 1))
    assert metrics[f"eval/retrieval/{name}/R@5"] == pytest.approx(np.mean(ranks <= 5))
    assert metrics[f"eval/retrieval/{name}/mean_rank"] == pytest.approx(ranks.mean())
    assert metrics[f"eval/retrieval/{name}/R@1_ceiling"] <= 1
  gap = np.linalg.norm(x.mean(0) - y.mean(0))
  assert metrics["eval/geometry/image-text/modality_gap"] == pytest.approx(gap, rel=1e-5)
  assert metrics["eval/geometry/image-text/alignment"] == pytest.approx(
      np.mean(np.sum((x - y) ** 2, axis=1)), rel=1e-5)
  xc, yc = x - x.mean(0), y - y.mean(0)
  cka = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
  assert metrics["eval/geometry/image-text/linear_cka"] == pytest.approx(cka, rel=1e-5)
  assert "eval/geometry/image-text/linear_cka_features" in metrics
  sq = np.sum((x[:, None] - x[None]) ** 2, axis=-1)
  off = ~np.eye(len(x), dtype=bool)
  assert metrics["eval/geometry/image/uniformity"] == pytest.approx(
      np.log(np.mean(np.exp(-2 * sq[off]))), rel=1e-5)
  _valid_png(tmp_path / "plots" / "retrieval_recall_at_k.png")
  _valid_png(tmp_path / "plots" / "geometry_pca.png")


def test_identical_modalities_have_perfect_retrieval_and_no_gap(mesh8, tmp_path):
  config = _config()
  ctx = _ctx(config, mesh8, tmp_path)
  # Make the image tower equal to the text tower: every metric has a known value.
  fake = ctx.predict

  def same(batch):
    out = fake(batch)
    return out.replace(embeddings={"image": out.embeddings["text"],
                                   "text": out.embeddings["text"]})
  ctx.predict = same
  evaluators = experiment.build_evaluators(_with_evals(config, {
      "retrieval": _entry("retrieval", plot_max_k=0),
      "geometry": _entry("geometry", k=3, plot=False)}))
  m = ev.run_evaluators(ctx, evaluators, force=True)
  assert m["eval/retrieval/image->text/R@1"] == 1.0
  assert m["eval/retrieval/text->image/median_rank"] == 1.0
  assert m["eval/geometry/image-text/modality_gap"] == pytest.approx(0, abs=1e-6)
  assert m["eval/geometry/image-text/alignment"] == pytest.approx(0, abs=1e-6)
  assert m["eval/geometry/image-text/mutual_knn"] == 1.0
  assert m["eval/geometry/image-text/linear_cka"] == pytest.approx(1.0)
  assert not os.path.exists(tmp_path / "plots")      # plots switched off


def test_absent_rows_are_left_out(mesh8, tmp_path):
  config = _config(missing=config_lib.missing_config("mcar", rates={"text": 0.5}))
  metrics, _ = _run(config, mesh8, tmp_path, {"retrieval": _entry("retrieval")})
  emb, mask, _, _, _ = _direct(config, "test")
  keep = mask["image"] & mask["text"]
  assert 0 < keep.sum() < len(keep)
  x, y = emb["image"][keep], emb["text"][keep]
  sims = x @ y.T
  ranks = 1 + np.sum(sims > np.diag(sims)[:, None], axis=1)
  assert metrics["eval/retrieval/image->text/R@1"] == pytest.approx(np.mean(ranks == 1))
  assert metrics["eval/retrieval/image->text/mean_rank"] == pytest.approx(ranks.mean())


def test_zero_shot_and_its_calibration(mesh8, tmp_path):
  config = _config()
  metrics, ctx = _run(config, mesh8, tmp_path, {
      "zero_shot": _entry("zero_shot", templates=("a {}", "a photo of a {}")),
      "calibration": _entry("calibration", templates=("a {}", "a photo of a {}"))})
  emb, _, labels, _, _ = _direct(config, "test")
  # Class embeddings are the shape axes; the image of an odd sample points at the next
  # shape, so those are exactly the wrong ones.
  logits = LOGIT_SCALE * emb["image"] @ np.eye(D)[:len(SHAPES)].T
  predictions = logits.argmax(1)
  np.testing.assert_array_equal(predictions == labels,
                                np.arange(len(labels)) % 2 == 0)
  assert metrics["eval/zero_shot/accuracy"] == pytest.approx(np.mean(predictions == labels))
  assert metrics["eval/zero_shot/chance"] == pytest.approx(1 / len(SHAPES))
  for c, name in enumerate(SHAPES):
    if np.any(labels == c):
      assert metrics[f"eval/zero_shot/per_class/{name}"] == pytest.approx(
          np.mean(predictions[labels == c] == c))
  # ECE with 15 bins, computed directly.
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  conf, correct = p.max(1), (p.argmax(1) == labels)
  bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
  ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * np.sum(bins == b)
            for b in range(15) if np.any(bins == b)) / len(labels)
  assert metrics["eval/calibration/ece"] == pytest.approx(ece, rel=1e-6)
  assert metrics["eval/calibration/accuracy"] == metrics["eval/zero_shot/accuracy"]
  _valid_png(tmp_path / "plots" / "calibration_reliability.png")
  # Both evaluators shared one set of class embeddings and one embedding of the split.
  assert sum(1 for k in ctx._cache if k[0] == "zero_shot") == 1


def test_world_class_names_follow_label_order():
  c = config_lib.world_data()
  c.label.factors = ("shape", "colour")
  spec = world_lib.WorldSpec.from_config(c)
  names = world_info.class_names(spec)
  assert len(names) == spec.num_classes == 30
  label = spec.label_of({"shape": 3, "colour": 2})
  assert names[label] == "blue ring"
  c.label.factors = ("position",)
  assert world_info.class_names(world_lib.WorldSpec.from_config(c))[0] == (
      "shape at the top left")
  c.label.mode, c.label.num_classes = "sum_mod", 4
  assert world_info.class_names(world_lib.WorldSpec.from_config(c)) is None


def test_linear_probe_and_knn(mesh8, tmp_path):
  config = _config()
  metrics, _ = _run(config, mesh8, tmp_path, {
      "linear_probe": _entry("linear_probe", train_examples=64, l2_grid=(1e-3, 1e-1),
                             steps=100),
      "knn": _entry("knn", train_examples=64, k=1, temperature=0.0,
                    representation="features")})
  train, _, ytr, ftr, _ = _direct(config, "train", 64)
  val, _, yval, _, _ = _direct(config, "validation")
  test, _, yte, fte, _ = _direct(config, "test")
  for m in ("image", "text"):
    probe = classification_lib.linear_probe(train[m], ytr, val[m], yval, test[m], yte,
                                            l2_grid=(1e-3, 1e-1), steps=100, num_classes=5)
    assert metrics[f"eval/linear_probe/{m}/accuracy"] == pytest.approx(probe["test_accuracy"])
    assert metrics[f"eval/linear_probe/{m}/l2"] == probe["l2"]
    # 1-NN by cosine on the features, directly.
    a = fte[m] / np.linalg.norm(fte[m], axis=1, keepdims=True)
    b = ftr[m] / np.linalg.norm(ftr[m], axis=1, keepdims=True)
    nearest = np.argmax(a @ b.T, axis=1)
    assert metrics[f"eval/knn/{m}/accuracy"] == pytest.approx(np.mean(ytr[nearest] == yte))
  # Text embeddings point along their shape's axis: far above chance (0.2).
  assert metrics["eval/linear_probe/text/accuracy"] > 0.8
  assert metrics["eval/knn/chance"] == pytest.approx(0.2)


def test_calibration_of_a_task_head(mesh8, tmp_path):
  config = _config()
  metrics, _ = _run(config, mesh8, tmp_path,
                    {"calibration": _entry("calibration", logits="task", n_bins=15)},
                    with_task=True)
  _, _, labels, _, logits = _direct(config, "test")
  assert metrics["eval/calibration/ece"] == pytest.approx(
      calibration_lib.expected_calibration_error(logits, labels, 15, from_logits=True))
  with pytest.raises(ValueError, match="no task head"):
    _run(config, mesh8, tmp_path, {"calibration": _entry("calibration", logits="task")})


def test_reports_reach_summary_and_every_schedule(mesh8, tmp_path, monkeypatch):
  calls = []

  def reporter(ctx, c):
    calls.append(ctx.step)
    ctx.add_report(f"Report of {ctx.name}", f"| a |\n|---|\n| {c.value} |")
    return {"value": c.value}
  ev._import_evaluator_modules()
  monkeypatch.setitem(ev.EVALUATORS, "reporter", registry_lib.Entry(
      reporter, dict(config_lib.EVALUATOR_COMMON_FIELDS, kind="reporter", value=1.5)))
  config = _config()
  evaluators = ev.build_evaluators(ml_collections.ConfigDict({
      "every3": {"kind": "reporter", "every": 3},
      "default": {"kind": "reporter", "value": 2.5},        # every: -1 -> 10
      "final": {"kind": "reporter", "every": 0}}), 10, data=pipeline.data_info(config.data),
      modalities=("image", "text"))
  assert {n: e[2] for n, e in evaluators.items()} == {"every3": 3, "default": 10, "final": 0}
  reports = {}
  for step in range(1, 11):
    ctx = experiment.eval_context(config, workdir=str(tmp_path), mesh=mesh8, predict=None,
                                  featurize=None, step=step, reports=reports)
    metrics = ev.run_evaluators(ctx, evaluators, force=step == 10)
  assert calls == [3, 6, 9, 10, 10, 10]
  assert metrics == {"eval/every3/value": 1.5, "eval/default/value": 2.5,
                     "eval/final/value": 1.5}
  path = summary_lib.write_summary(str(tmp_path), config, {"train/loss": 0.5, **metrics},
                                   wall_time=1.0, extra_sections=reports)
  text = open(path).read()
  assert "## Report of every3\n\n| a |\n|---|\n| 1.5 |" in text
  assert "## Evaluation: default" in text and "## Training (step 1000)" in text
  with pytest.raises(ValueError, match="title"):
    ctx.add_report("", "x")


def test_summary_tables_group_by_evaluator(tmp_path):
  config = _config()
  metrics = {"train/loss": np.float32(0.25), "train/learning_rate": 1e-3,
             "eval/retrieval/image->text/R@1": 0.5, "eval/retrieval/text->image/R@1": 0.25,
             "eval/retrieval/image->text/mean_rank": 3.0, "eval/zero_shot/accuracy": 0.75,
             "eval/zero_shot/per_class/circle": 1.0}
  text = open(summary_lib.write_summary(str(tmp_path), config, metrics, wall_time=2.0,
                                        start_step=500, step=1000)).read()
  assert "- mode: train, steps: 1000 (resumed from step 500)" in text
  assert "| `loss` | 0.25 |" in text
  # Two directions -> a matrix with one row per direction, blank where absent.
  assert "| | `R@1` | `mean_rank` |" in text
  assert "| `image->text` | 0.5 | 3 |" in text and "| `text->image` | 0.25 |  |" in text
  assert "| `per_class/circle` | 1 |" in text
  assert text.index("## Training") < text.index("## Evaluation: retrieval") < text.index(
      "## Evaluation: zero_shot")


def test_training_curves_leave_out_single_points_and_per_class(tmp_path):
  rows = [{"step": s, "train/loss": 1.0 / s, "train/learning_rate": 0.1 * s,
           "eval/retrieval/image->text/R@1": 0.1 * s} for s in (1, 2, 3)]
  rows.append({"step": 3, "eval/zero_shot/accuracy": 0.5,
               "eval/zero_shot/per_class/circle": 1.0})
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  path = summary_lib.plot_training_curves(str(tmp_path), "run")
  assert path == str(tmp_path / "plots" / "training_curves.png")
  image = matplotlib.image.imread(path)
  # Three panels in one row (loss, learning rate, retrieval R@1): 3 * 4.2 inches wide.
  assert abs(image.shape[1] - 3 * 4.2 * 110) < 2
  assert summary_lib.plot_training_curves(str(tmp_path / "nothing")) is None


def test_evaluator_config_is_complete_and_locked():
  c = config_lib.evaluator_config("knn", every=0, k=5)
  assert (c.kind, c.every, c.k, c.split, c.train_split) == ("knn", 0, 5, "test", "train")
  with pytest.raises(AttributeError, match="kk"):
    c.kk = 3
  with pytest.raises(ValueError, match=r"unknown fields \['kk'\]"):
    config_lib.evaluator_config("knn", kk=3)
  with pytest.raises(ValueError, match=r"unknown evaluator 'knnn'; valid: \[.*'knn'"):
    config_lib.evaluator_config("knnn")


def test_build_evaluators_bad_input(mesh8):
  config = _config()

  def build(**entries):
    return experiment.build_evaluators(_with_evals(config, entries))
  with pytest.raises(ValueError, match=r"config.evals.zero_shto: unknown evaluator "
                                       r"'zero_shto'; valid: \['calibration', .*'zero_shot'"):
    build(zero_shto={"split": "test"})
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['templtes'\] for "
                                       r"evaluator 'zero_shot'"):
    build(zs={"kind": "zero_shot", "templtes": ("a {}",)})
  with pytest.raises(ValueError, match=r"config.evals.r.split: the data \(world\) has no "
                                       r"split 'val'; it has \['test', 'train', 'validation'\]"):
    build(r={"kind": "retrieval", "split": "val"})
  with pytest.raises(ValueError, match=r"config.evals.lp.val_split: .*no split 'dev'"):
    build(lp={"kind": "linear_probe", "val_split": "dev"})
  with pytest.raises(ValueError, match=r"config.evals.zero_shot.modality: the model produces "
                                       r"no 'audio' embeddings; it has \['image', 'text'\]"):
    build(zero_shot={"modality": "audio"})
  with pytest.raises(ValueError, match=r"pairs: the model produces no 'audio'"):
    build(retrieval={"pairs": (("image", "audio"),)})
  with pytest.raises(ValueError, match=r"knn.modalities: the model produces no 'audio'"):
    build(knn={"modalities": ("audio",)})
  with pytest.raises(ValueError, match=r"--evals: no evaluator named \['knn'\] in "
                                       r"config.evals; configured: \['retrieval'\]"):
    experiment.build_evaluators(config, only=["knn"])
  # A split the data lacks, also when the evaluator is called directly.
  ctx = _ctx(config, mesh8, "/nonexistent")
  with pytest.raises(ValueError, match="evaluation split 'dev'"):
    ctx.outputs("dev", 16)
  with pytest.raises(ValueError, match="no 'audio' tower"):
    ctx.embed_texts(["a circle"], 16, modality="audio")
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    ctx.outputs("test", 12)
