"""The real-data configs (configs/av_digits_*.py, configs/coco_clip.py): each one's
`runlocal` variant trains two steps through the trainer and runs its evaluators on tiny
av_digits and coco_captions fixtures (the fixture writers of tests/test_builders.py),
prepared once for the module; a dataset that is not prepared names its prepare command."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import experiment
from mmjax.data import pipeline
from mmjax.data import prepare as prepare_lib
from mmjax.train import trainer
from test_builders import coco_dir, digits_dir  # noqa: F401  (module fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def rbg_keys():
  """rbg keys: threefry's kernels take most of the compile time of tiny models on CPU."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


@pytest.fixture(scope="module")
def data_dir(digits_dir, coco_dir, tmp_path_factory):  # noqa: F811
  out = str(tmp_path_factory.mktemp("tfds_real"))
  prepare_lib.prepare("av_digits", str(digits_dir), out)
  prepare_lib.prepare("coco_captions", str(coco_dir), out, config="captions")
  return out


def _config(name, arg, data_dir):
  config = config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), arg)
  config.data.data_dir = data_dir
  config.total_steps = 2
  config.log_every_steps = config.checkpoint_every_steps = config.eval_every_steps = 2
  return config


def _train(name, arg, data_dir, workdir):
  metrics = trainer.train_and_evaluate(_config(name, arg, data_dir), str(workdir))
  assert np.isfinite(metrics["train/loss"])
  return metrics


def test_av_digits_clip_runlocal(data_dir, tmp_path):
  m = _train("av_digits_clip", "runlocal", data_dir, tmp_path)
  for direction in ("audio->image", "image->audio"):
    assert 0 <= m[f"eval/retrieval/{direction}/R@1"] <= 1
    assert 0 <= m[f"eval/retrieval/{direction}/mAP"] <= 1     # class-level relevance
  for modality in ("image", "audio"):
    assert m[f"eval/zero_shot_{modality}/chance"] == pytest.approx(0.1)
    assert f"eval/zero_shot_{modality}/per_class/seven" in m


# concat trains here; flexmoe and gated are checked as configs against the prepared
# data (their fusion modules train in tests/test_fusion_train.py, and their full runs
# are in benchmarks/bench_real_data.py), to keep the suite inside its time budget.
@pytest.mark.parametrize("method", ["flexmoe", "gated"])
def test_av_digits_fusion_configs_check_against_the_data(method, data_dir, mesh8):
  config = _config(f"av_digits_fusion_{method}", "runlocal", data_dir)
  experiment.check_config(config, mesh8)
  assert set(experiment.build_evaluators(config)) >= {"robustness"}
  source = pipeline.make_source(config.data, "train")
  batch = experiment.sample_batch(source, experiment.make_featurize(config), size=2)
  assert set(batch["mask"]) == {"audio", "image"} and batch["label"].shape == (2,)


def test_av_digits_fusion_runlocal(data_dir, tmp_path):
  m = _train("av_digits_fusion_concat", "runlocal", data_dir, tmp_path)
  prefix = "eval/robustness/"
  assert m[prefix + "chance"] == pytest.approx(0.1)
  for condition in ("audio", "image", "audio+image", "missing_0", "missing_0.3",
                    "missing_0.5", "missing_0.7"):
    assert 0 <= m[f"{prefix}{condition}/accuracy"] <= 1, condition


def test_av_digits_unimodal_variants():
  # The unimodal classifiers: concat's towers, projection, MLP and budget on one modality.
  both = _config("av_digits_fusion_concat", None, None)
  for m, other in (("image", "audio"), ("audio", "image")):
    alone = _config("av_digits_fusion_concat", f"{m}_only", None)
    assert tuple(alone.model.encoders) == (m,) and tuple(alone.data.features) == (m,)
    assert alone.model.encoders[m] == both.model.encoders[m]
    fusion = both.model.fusion.to_dict()
    assert fusion.pop("modality_dropout") == 0.5           # ModDrop: nothing to drop alone
    assert alone.model.fusion.to_dict() == fusion
    assert (alone.total_steps, alone.batch_size) == (both.total_steps, both.batch_size)
    assert other not in alone.model.encoders
  with pytest.raises(ValueError, match=r"variants of configs/av_digits_fusion_concat.py"):
    _config("av_digits_fusion_gated", "image_only", None)


def test_coco_clip_runlocal(data_dir, tmp_path):
  config = _config("coco_clip", "runlocal", data_dir)
  assert pipeline.make_source(config.data, "test").all_texts("text") is not None
  m = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(m["train/loss"])
  for direction in ("image->text", "text->image"):
    assert 0 <= m[f"eval/retrieval/{direction}/R@1"] <= 1


@pytest.mark.parametrize("name,command", [
    ("av_digits_clip", "python -m mmjax.data.prepare av_digits --manual_dir=DIR"),
    ("coco_clip", "python -m mmjax.data.prepare coco_captions --manual_dir=DIR"),
])
def test_a_dataset_not_prepared_names_its_prepare_command(name, command, tmp_path):
  config = _config(name, "runlocal", str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="is not prepared in data.data_dir") as e:
    pipeline.make_source(config.data, "train")
  assert command in str(e.value) and f"--data_dir={tmp_path / 'empty'}" in str(e.value)
  assert "--config.data.data_dir" in str(e.value)


def test_lit_locks_the_image_tower_and_its_head_only(data_dir, mesh8):
  from mmjax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  full = _config("lit", None, data_dir)
  assert (full.model.encoders.image.variant, full.model.encoders.text.variant) == (
      "clip_vit_b16", "clip_text_b")
  assert dict(full.init_from.towers) == {"image": "image"} and not full.init_from.scalars
  config = _config("lit", "runlocal", data_dir)
  experiment.check_config(config, mesh8)
  model = experiment.build_model(config)
  batch = {"image": jnp.zeros((2, 16, 16, 3)), "text": jnp.zeros((2, 80), jnp.int32),
           "mask": {"image": jnp.ones(2, bool), "text": jnp.ones(2, bool)}}
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
  mask = optimizer_lib.frozen_mask(config.optimizer, params)
  for path, frozen in jax.tree_util.tree_leaves_with_path(mask):
    top = path[0].key
    assert frozen == (top in ("towers_image", "heads_image")), (top, frozen)
