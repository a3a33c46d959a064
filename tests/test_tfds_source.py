"""The TFDS source: a tiny dataset prepared in array_record format here, read back through
`pipeline.make_source` and the grain pipeline, a 2-step training run on it, bad input."""

import json
import os
import shutil

import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from mmjax import config_lib
from mmjax.data import pipeline
from mmjax import experiment
from mmjax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "mmjax_tiny_pairs:1.0.0"
IMAGE = 32
WAVE = 24
SIZES = {"train": 40, "test": 16}


def _example(split: str, i: int) -> dict:
  """What example `i` of `split` holds, a pure function of both."""
  rng = np.random.default_rng([len(split), i])
  return {
      "id": i,
      "image": rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8),
      "meta": {"caption": f"{split} example {i}: a {'red green blue'.split()[i % 3]} thing",
               "pcm": rng.integers(-32768, 32767, (WAVE,), dtype=np.int16)},
      "frames": rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
      "label": i % 5,
  }


class MmjaxTinyPairs(tfds.core.GeneratorBasedBuilder):
  """Images, nested captions, 16-bit PCM waveforms and short videos, with a class label."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Scalar(dtype=np.int64),
        "image": tfds.features.Image(shape=(IMAGE, IMAGE, 3)),
        "meta": {"caption": tfds.features.Text(),
                 "pcm": tfds.features.Tensor(shape=(WAVE,), dtype=np.int16)},
        "frames": tfds.features.Tensor(shape=(2, 8, 8, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=5),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in SIZES.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      example = _example(split, i)
      # PNG bytes through PIL: TFDS encodes numpy images with TensorFlow.
      example["image"] = PIL.Image.fromarray(example["image"])
      yield i, example


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  MmjaxTinyPairs(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def _data_config(data_dir, **overrides):
  fields = dict(splits={"train": "train", "test": "test"}, text_max_len=56, num_threads=1)
  fields.update(overrides)
  return config_lib.tfds_data(
      NAME, {"image": "image", "text": "meta/caption", "audio": "meta/pcm"},
      data_dir=data_dir, label_feature="label", **fields)


def _ids(data_dir, split):
  """The generator index of every stored record (TFDS shuffles records when writing)."""
  raw = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)
  return [int(raw[i]["id"]) for i in range(len(raw))]


def test_records_equal_what_was_written(data_dir):
  config = _data_config(data_dir)
  for split, n in SIZES.items():
    source = pipeline.make_source(config, split)
    assert len(source) == n
    ids = _ids(data_dir, split)
    assert sorted(ids) == list(range(n))
    for index in (0, n - 1):
      record, want = source[index], _example(split, ids[index])
      assert set(record) == {"image", "text", "audio", "label"}
      assert record["image"].dtype == np.float32 and record["image"].shape == (IMAGE, IMAGE, 3)
      np.testing.assert_array_equal(record["image"], want["image"].astype(np.float32) / 255)
      assert record["text"] == want["meta"]["caption"]
      assert record["audio"].dtype == np.float32
      np.testing.assert_array_equal(record["audio"], want["meta"]["pcm"] / 32768.0)
      assert record["label"] == want["label"]
  assert source.num_classes == 5
  with pytest.raises(IndexError, match="out of range"):
    source[SIZES["test"]]


def test_train_dataset_batches_equal_the_records(data_dir):
  config = _data_config(data_dir)
  source = pipeline.make_source(config, "train")
  ids = _ids(data_dir, "train")
  featurize = pipeline.Featurize(("audio", "image", "text"), config.text_max_len)
  batches = iter(pipeline.train_dataset(source, featurize, seed=0, global_batch_size=8,
                                        process_index=0, process_count=1, num_threads=1))
  seen = []
  for _ in range(2):
    batch = next(batches)
    assert batch["image"].shape == (8, IMAGE, IMAGE, 3)
    assert batch["text"].shape == (8, 56) and batch["text"].dtype == np.int32
    for row, index in enumerate(batch["index"]):
      want = _example("train", ids[int(index)])
      np.testing.assert_array_equal(batch["image"][row], want["image"] / np.float32(255))
      np.testing.assert_array_equal(batch["audio"][row], want["meta"]["pcm"] / 32768.0)
      np.testing.assert_array_equal(
          batch["text"][row], featurize.tokenizer.encode(want["meta"]["caption"]))
      assert batch["label"][row] == want["label"]
      assert all(bool(batch["mask"][m][row]) for m in ("image", "text", "audio"))
      seen.append(int(index))
  assert len(set(seen)) == 16   # one pass of a shuffled epoch: no repeats


def test_resize_and_crop(data_dir):
  config = _data_config(data_dir, image_size=16, audio_samples=30)
  record = pipeline.make_source(config, "test")[0]
  want = _example("test", _ids(data_dir, "test")[0])
  assert record["image"].shape == (16, 16, 3)
  # Bilinear halving stays within the range of the pixels it averages.
  assert 0 <= record["image"].min() and record["image"].max() <= 1
  np.testing.assert_allclose(record["image"].mean(), want["image"].mean() / 255, atol=0.02)
  assert record["audio"].shape == (30,)
  np.testing.assert_array_equal(record["audio"][:WAVE], want["meta"]["pcm"] / 32768.0)
  np.testing.assert_array_equal(record["audio"][WAVE:], 0)
  config = _data_config(data_dir, audio_samples=10)   # evaluation: the centred window
  np.testing.assert_array_equal(pipeline.make_source(config, "test")[0]["audio"],
                                want["meta"]["pcm"][7:17] / 32768.0)
  # Videos: frames scaled like images, and resized frame by frame.
  video = config_lib.tfds_data(NAME, {"video": "frames"}, data_dir=data_dir,
                               splits={"test": "test"})
  frames = pipeline.make_source(video, "test")[0]["video"]
  assert frames.dtype == np.float32
  np.testing.assert_array_equal(frames, want["frames"] / np.float32(255))
  video.image_size = 4
  frames = pipeline.make_source(video, "test")[0]["video"]
  assert frames.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)),
                             want["frames"].mean(axis=(1, 2, 3)) / 255, atol=0.03)


def test_train_and_evaluate_two_steps(data_dir, tmp_path):
  config = config_lib.load_config(os.path.join(REPO, "tests", "configs", "tiny.py"))
  config.data = _data_config(data_dir)
  config.total_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 2
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["train/loss"]), metrics
  assert 0 <= metrics["eval/retrieval/image->text/R@1"] <= 1, metrics
  assert os.path.isdir(tmp_path / "checkpoints" / "2")


def test_bad_input_is_named(data_dir, tmp_path):
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  with pytest.raises(ValueError, match=r"not prepared in data.data_dir .*empty.*"
                                       r"file_format=array_record"):
    pipeline.make_source(_data_config(empty), "train")
  with pytest.raises(ValueError, match=r"not prepared .*mmjax_tiny_pairs/ holds \['1.0.0'\]"):
    pipeline.make_source(config_lib.tfds_data("mmjax_tiny_pairs:9.0.0", {"image": "image"},
                                              data_dir=data_dir), "train")
  # A dataset prepared as TFRecord (its info says so) has no random access.
  tfrecord_dir = str(tmp_path / "tfrecord")
  shutil.copytree(data_dir, tfrecord_dir)
  info_path = os.path.join(tfrecord_dir, "mmjax_tiny_pairs", "1.0.0", "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  assert info["fileFormat"] == "array_record"
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(ValueError, match=r"is prepared as tfrecord, which has no random access"):
    pipeline.make_source(_data_config(tfrecord_dir), "train")
  with pytest.raises(ValueError, match=r"data.features.text: .*no feature 'caption'; "
                                       r"its features are \['frames', 'id', 'image', 'label', "
                                       r"'meta/caption', 'meta/pcm'\]"):
    pipeline.make_source(config_lib.tfds_data(NAME, {"text": "caption"}, data_dir=data_dir),
                         "train")
  with pytest.raises(ValueError, match=r"data.label_feature: .*no feature 'class'"):
    pipeline.make_source(config_lib.tfds_data(NAME, {"image": "image"}, data_dir=data_dir,
                                              label_feature="class"), "train")
  with pytest.raises(ValueError, match=r"has no split 'validation' .*\['train', 'test'\]"):
    pipeline.make_source(_data_config(data_dir, splits={"train": "train+validation"}),
                         "train")
  with pytest.raises(ValueError, match=r"data.splits has no entry for split 'validation'"):
    pipeline.make_source(_data_config(data_dir), "validation")
  with pytest.raises(ValueError, match=r"modality 'text' needs one string"):
    pipeline.make_source(config_lib.tfds_data(NAME, {"text": "image"}, data_dir=data_dir),
                         "train")
  # Strings may feed any modality, but only a text encoder reads them.
  strings = pipeline.make_source(config_lib.tfds_data(NAME, {"caption": "meta/caption"},
                                                      data_dir=data_dir), "train")
  featurize = pipeline.Featurize(("caption",), 56, text_modalities=())
  with pytest.raises(ValueError, match=r"strings for modality 'caption', but its encoder "
                                       r"does not read text"):
    featurize((0, strings[0]))
  with pytest.raises(ValueError, match=r"modality 'image' needs \[H, W, C\]"):
    pipeline.make_source(config_lib.tfds_data(NAME, {"image": "meta/pcm"}, data_dir=data_dir),
                         "train")
  with pytest.raises(ValueError, match=r"'label' is not a modality name"):
    pipeline.make_source(config_lib.tfds_data(NAME, {"label": "label"}, data_dir=data_dir),
                         "train")
  with pytest.raises(ValueError, match=r"data.label_feature: 'image' must be an integer"):
    pipeline.make_source(config_lib.tfds_data(NAME, {"text": "meta/caption"},
                                              data_dir=data_dir, label_feature="image"),
                         "train")
  with pytest.raises(AttributeError, match="image_sise"):
    _data_config(data_dir, image_sise=8)   # a typo in a locked config is an error


def _eval_config(data_dir, tmp_path, **data):
  """The tiny config on the TFDS dataset, its text modality named 'caption'."""
  config = config_lib.load_config(os.path.join(REPO, "tests", "configs", "tiny.py"))
  config.data = config_lib.tfds_data(
      NAME, {"image": "image", "caption": "meta/caption"}, data_dir=data_dir,
      label_feature="label", splits={"train": "train", "test": "test"}, text_max_len=56,
      num_threads=1, **data)
  config.model.encoders = {"image": config.model.encoders.image,
                           "caption": config.model.encoders.text}
  config.total_steps = config.checkpoint_every_steps = config.eval_every_steps = 2
  return config


def test_every_evaluator_runs_on_a_tfds_dataset_with_any_text_modality(data_dir, tmp_path):
  config = _eval_config(data_dir, tmp_path,
                        class_names=("red", "green", "blue", "cyan", "grey"),
                        prompt_templates=("a {} thing",))
  entry = lambda kind, **f: config_lib.evaluator_config(kind, batch_size=16, **f)
  config.evals = {
      "retrieval": entry("retrieval"),
      "zero_shot": entry("zero_shot", text_modality="caption"),
      "linear_probe": entry("linear_probe", val_split="test", steps=20),
      "knn": entry("knn", k=3),
      "calibration": entry("calibration", text_modality="caption"),
      "geometry": entry("geometry", k=3),
  }
  # 'caption' is read as text because its encoder's kind is 'text', not by its name.
  featurize = experiment.make_featurize(config)
  row = featurize((0, pipeline.make_source(config.data, "test")[0]))
  assert row["caption"].dtype == np.int32 and row["caption"].shape == (56,)
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  for key in ("retrieval/image->caption/R@1", "zero_shot/accuracy",
              "linear_probe/image/accuracy", "knn/caption/accuracy", "calibration/ece",
              "geometry/caption-image/modality_gap"):
    assert np.isfinite(metrics[f"eval/{key}"]), key
  assert metrics["eval/zero_shot/chance"] == pytest.approx(1 / 5)
  assert metrics["eval/linear_probe/chance"] == pytest.approx(1 / 5)   # the ClassLabel's
  # A recorded dataset knows no oracle ceiling.
  assert not any(k.endswith("_ceiling") for k in metrics)


def test_robustness_runs_on_a_tfds_dataset(data_dir, tmp_path):
  config = _eval_config(data_dir, tmp_path)
  config.model.fusion = ml_collections.ConfigDict({"kind": "concat", "width": 32})
  config.model.task = ml_collections.ConfigDict({"num_classes": 5})
  config.objective.kind = "task"
  config.evals = {"robustness": config_lib.evaluator_config(
      "robustness", batch_size=16, rates=(0.0, 0.5), plot=False)}
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  for key in ("caption/accuracy", "image/accuracy", "caption+image/accuracy",
              "missing_0.5/accuracy", "missing_0/ece"):
    assert 0.0 <= metrics[f"eval/robustness/{key}"] <= 1.0, key
  labels = [pipeline.make_source(config.data, "test")[i]["label"] for i in range(16)]
  assert metrics["eval/robustness/chance"] == pytest.approx(
      np.max(np.bincount(labels)) / len(labels))       # the split's majority class


def test_evaluators_say_what_the_source_lacks(data_dir, tmp_path):
  config = _eval_config(data_dir, tmp_path)
  info = pipeline.data_info(config.data)
  assert (info.name, info.num_classes, info.class_names) == (f"tfds:{NAME}", 5, None)
  config.evals = {"zero_shot": config_lib.evaluator_config("zero_shot",
                                                           text_modality="caption")}
  with pytest.raises(ValueError, match=r"config.evals.zero_shot: evaluator 'zero_shot' "
                                       r"needs class names, but the data source "
                                       rf"tfds:{NAME} has none"):
    experiment.build_evaluators(config)
  config.evals = {"calibration": config_lib.evaluator_config("calibration",
                                                             text_modality="caption")}
  with pytest.raises(ValueError, match="evaluator 'calibration' needs class names"):
    experiment.build_evaluators(config)
  config.evals.calibration.logits = "task"      # the task head's logits need no names
  assert "calibration" in experiment.build_evaluators(config)
