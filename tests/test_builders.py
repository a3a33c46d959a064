"""The builders of real datasets (mmjax.data.builders): tiny fixtures written here in each
dataset's public format, prepared with mmjax.data.prepare, read back with
`tfds.data_source`; and each kind of bad input."""

import gzip
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import wave
import zlib

import jax
import numpy as np
import PIL.Image
import pytest
import soundfile
import tensorflow_datasets as tfds

from mmjax import config_lib
from mmjax.data import prepare as prepare_lib
from mmjax.data.builders import av_digits
from mmjax.data.builders import coco_captions
from mmjax.data.builders import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEAKERS = ("ann", "bob")
TAKES = (0, 3, 5, 10, 11)        # test, test, validation, train, train


def _wav(path, samples, rate=8000):
  """16-bit mono PCM with the standard `wave` module."""
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(np.asarray(samples, np.int16).tobytes())


def _pcm(key, n=None):
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  return rng.integers(-20000, 20000, n or int(rng.integers(40, 120)), dtype=np.int16)


def _write_idx(path, array):
  header = struct.pack(">4B", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                   *array.shape)
  with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _records(name, data_dir, split):
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  return [source[i] for i in range(len(source))]


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


# --- av_digits ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("fsdd_mnist")
  os.makedirs(root / "recordings")
  for digit in range(10):
    for speaker in SPEAKERS:
      for take in TAKES:
        name = f"{digit}_{speaker}_{take}"
        _wav(root / "recordings" / f"{name}.wav", _pcm(name))
  (root / "recordings" / "README.txt").write_text("not a recording")
  rng = np.random.default_rng(0)
  # t10k gzipped (12 images per digit), train unzipped (3 per digit): a pool of 150.
  for prefix, per_digit, suffix in (("t10k", 12, ".gz"), ("train", 3, "")):
    labels = np.tile(np.arange(10), per_digit)
    rng.shuffle(labels)
    images = rng.integers(0, 256, (len(labels), 28, 28))
    _write_idx(str(root / f"{prefix}-images-idx3-ubyte{suffix}"), images)
    _write_idx(str(root / f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
  return root


def _mnist_pool(digits_dir):
  ids, images, labels = av_digits.read_mnist(str(digits_dir))
  return dict(zip(ids, images)), dict(zip(ids, labels))


@pytest.fixture(scope="module")
def digits_prepared(digits_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_digits"))
  return prepare_lib.prepare("av_digits", str(digits_dir), data_dir)


def test_av_digits_records_equal_the_files(digits_dir, digits_prepared):
  p = digits_prepared
  assert p.name == "mmjax_av_digits/default:1.0.0"
  assert p.counts == {"train": 40, "validation": 20, "test": 40}
  images, image_labels = _mnist_pool(digits_dir)
  seen = {}
  for split in p.counts:
    records = _records(p.name, p.data_dir, split)
    for r in records:
      audio_id = _text(r["audio_id"])
      digit, speaker, take = audio_id.split("_")
      assert av_digits.split_of_take(int(take)) == split
      assert r["label"] == int(digit) and _text(r["speaker"]) == speaker
      assert r["audio"].dtype == np.int16
      np.testing.assert_array_equal(r["audio"], _pcm(audio_id))
      image_id = _text(r["image_id"])
      assert r["image"].shape == (28, 28, 1) and r["image"].dtype == np.uint8
      np.testing.assert_array_equal(r["image"][..., 0], images[image_id])
      assert image_labels[image_id] == int(digit)       # an image of its own digit
      text = _text(r["text"])
      assert av_digits.DIGIT_NAMES[int(digit)] in text or digit in text
      assert text == av_digits.caption(int(digit), audio_id, 0)
    seen[split] = [_text(r["image_id"]) for r in records]
    assert len(set(seen[split])) == len(records)       # no image twice in a split
  assert not set(seen["train"]) & set(seen["validation"])
  assert not set(seen["train"]) & set(seen["test"])
  assert not set(seen["validation"]) & set(seen["test"])
  assert any(i.startswith("train:") for s in seen.values() for i in s)   # both IDX pools
  names = tfds.builder(p.name, data_dir=p.data_dir).info.features["label"].names
  assert names == list(av_digits.DIGIT_NAMES)


def test_av_digits_pairing_is_deterministic(digits_dir, digits_prepared, tmp_path):
  def pairs(p):
    return {_text(r["audio_id"]): (_text(r["image_id"]), _text(r["text"]))
            for s in p.counts for r in _records(p.name, p.data_dir, s)}
  again = prepare_lib.prepare("av_digits", str(digits_dir), str(tmp_path / "again"))
  assert pairs(again) == pairs(digits_prepared)
  # Another seed draws other images from the same per-digit ranges.
  plan = av_digits.assign_images(av_digits.read_recordings(str(digits_dir)),
                                 av_digits.read_mnist(str(digits_dir))[2], seed=1)
  reseeded = {f"{r[0]}_{r[1]}_{r[2]}": i for s in plan.values() for r, i in s}
  ids = av_digits.read_mnist(str(digits_dir))[0]
  assert {k: ids[i] for k, i in reseeded.items()} != {k: v[0] for k, v in
                                                       pairs(again).items()}
  # Reusing a prepared copy says so and writes nothing.
  assert prepare_lib.prepare("av_digits", str(digits_dir),
                             digits_prepared.data_dir).reused


def test_av_digits_reads_through_the_mmjax_pipeline(digits_prepared):
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  p = digits_prepared
  config = config_lib.tfds_data(p.name, p.usage["features"], data_dir=p.data_dir,
                                label_feature="label", audio_samples=8000, num_threads=1)
  source = pipeline.make_source(config, "validation")
  record = source[0]
  assert record["image"].shape == (28, 28, 1) and record["audio"].shape == (8000,)
  assert isinstance(record["text"], str) and 0 <= record["label"] < 10
  featurize = pipeline.Featurize(("audio", "image", "text"), config.text_max_len)
  batch = next(iter(pipeline.train_dataset(source, featurize, seed=0, global_batch_size=4,
                                           process_index=0, process_count=1,
                                           num_threads=1)))
  assert batch["audio"].shape == (4, 8000) and batch["text"].dtype == np.int32


def test_av_digits_bad_input(digits_dir, tmp_path):
  empty = tmp_path / "empty"
  os.makedirs(empty / "recordings")
  _wav(empty / "recordings" / "1_ann_0.wav", _pcm("x"))
  with pytest.raises(FileNotFoundError, match=r"lacks MNIST's IDX files: expected "
                                              r"'t10k-images-idx3-ubyte\[.gz\]'"):
    prepare_lib.prepare("av_digits", str(empty), str(tmp_path / "d0"))
  shutil.copy(digits_dir / "t10k-images-idx3-ubyte.gz", empty)
  with pytest.raises(FileNotFoundError, match=r"not t10k-labels-idx1-ubyte\[.gz\]"):
    prepare_lib.prepare("av_digits", str(empty), str(tmp_path / "d0"))
  shutil.rmtree(empty / "recordings")
  with pytest.raises(FileNotFoundError, match=r"lacks the FSDD recordings .*'recordings' "
                                              r"or 'fsdd/recordings'"):
    prepare_lib.prepare("av_digits", str(empty), str(tmp_path / "d0"))
  # A u-law WAV among the recordings: refused by name, or skipped and counted.
  bad = tmp_path / "ulaw"
  shutil.copytree(digits_dir, bad)
  ulaw = bad / "recordings" / "4_bob_5.wav"
  soundfile.write(str(ulaw), np.zeros(50), 8000, subtype="ULAW")
  with pytest.raises(common.BadFileError, match=r"4_bob_5.wav: its samples are .*U-Law.*"
                                                r"not integer PCM or float.*on_bad_file"):
    prepare_lib.prepare("av_digits", str(bad), str(tmp_path / "d1"))
  p = prepare_lib.prepare("av_digits", str(bad), str(tmp_path / "d2"), on_bad_file="skip")
  assert p.counts["validation"] == 19 and p.skipped == {"validation": [str(ulaw)]}
  assert "skipped 1 unreadable file(s) of validation" in p.summary()
  info = tfds.builder(p.name, data_dir=p.data_dir).info
  assert "{'validation': 1}" in info.description
  (bad / "recordings" / "oops.wav").write_bytes(b"")
  with pytest.raises(ValueError, match=r"oops.wav: not named as FSDD recordings"):
    prepare_lib.prepare("av_digits", str(bad), str(tmp_path / "d3"))
  with pytest.raises(ValueError, match=r"av_digits takes no option \['config'\]"):
    prepare_lib.prepare("av_digits", str(bad), str(tmp_path / "d3"), config="x")
  with pytest.raises(ValueError, match=r"on_bad_file='maybe'"):
    prepare_lib.prepare("av_digits", str(bad), str(tmp_path / "d3"), on_bad_file="maybe")


def test_read_audio_mixes_down_converts_and_resamples(tmp_path):
  left, right = _pcm("l", 400), _pcm("r", 400)
  stereo = str(tmp_path / "stereo.wav")
  soundfile.write(stereo, np.stack([left, right], 1), 8000, subtype="PCM_16")
  mixed = common.read_audio(stereo, 8000)
  want = np.rint((left.astype(float) + right) / 2).astype(np.int16)
  np.testing.assert_array_equal(mixed, want)     # channels averaged, no rescaling
  floats = str(tmp_path / "float.wav")
  soundfile.write(floats, np.array([0.0, 0.5, -0.25, 1.5]), 8000, subtype="FLOAT")
  np.testing.assert_array_equal(common.read_audio(floats, 8000),
                                [0, 16384, -8192, 32767])    # clipped to int16
  tone = str(tmp_path / "tone.wav")
  t = np.arange(16000) / 16000
  _wav(tone, np.rint(8000 * np.sin(2 * np.pi * 440 * t)), rate=16000)
  down = common.read_audio(tone, 8000)
  assert down.dtype == np.int16 and down.shape == (8000,)
  assert np.argmax(np.abs(np.fft.rfft(down))) == 440      # 1 Hz bins: the pitch kept
  garbage = tmp_path / "garbage.wav"
  garbage.write_bytes(b"RIFF0000WAVEjunk")
  with pytest.raises(common.UnreadableFile, match="cannot be read as audio"):
    common.read_audio(str(garbage), 8000)


# --- coco_captions -----------------------------------------------------------------

COCO = {  # split -> image id -> (width, height, mode, captions, category ids)
    "train": {9: (40, 30, "RGB", ["A cat on a mat.", "A grey cat. "], [17]),
              25: (32, 48, "L", ["Two dogs.", "Dogs play", "Some dogs run."], [18, 1, 18]),
              30: (24, 24, "RGB", ["An empty street."], [])},
    "val": {139: (36, 20, "RGB", ["A man and a car.", "A person by a car."], [3, 1]),
            285: (20, 28, "RGB", ["A bear."], [23])},
}
CATEGORY_NAMES = {1: "person", 3: "car", 17: "cat", 18: "dog", 23: "bear"}


def _coco_pixels(image_id, width, height):
  rng = np.random.default_rng(image_id)
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco")
  os.makedirs(root / "annotations")
  caption_id = 100
  for split, images in COCO.items():
    os.makedirs(root / f"{split}2017")
    PIL.Image.new("RGB", (8, 8)).save(root / f"{split}2017" / "000000999999.jpg")  # unlisted
    captions = {"images": [], "annotations": []}
    instances = {"images": [], "annotations": [], "categories": [
        {"id": i, "name": n, "supercategory": "x"} for i, n in CATEGORY_NAMES.items()]}
    for image_id, (width, height, mode, texts, objects) in images.items():
      file_name = f"{image_id:012d}.jpg"
      PIL.Image.fromarray(_coco_pixels(image_id, width, height)).convert(mode).save(
          root / f"{split}2017" / file_name, quality=90)
      entry = {"id": image_id, "file_name": file_name, "width": width, "height": height}
      captions["images"].append(entry)
      instances["images"].append(entry)
      for text in texts:
        caption_id += 1
        captions["annotations"].append({"id": caption_id, "image_id": image_id,
                                        "caption": text})
      for k, category in enumerate(objects):
        instances["annotations"].append({"id": 1000 * image_id + k, "image_id": image_id,
                                         "category_id": category, "bbox": [0, 0, 1, 1]})
    (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(captions))
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(instances))
  return root


@pytest.fixture(scope="module")
def coco_prepared(coco_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_coco"))
  return prepare_lib.prepare("coco_captions", str(coco_dir), data_dir)


def test_coco_captions_records_equal_the_json(coco_dir, coco_prepared):
  p = coco_prepared
  assert p.name == "mmjax_coco_captions/objects:1.0.0"      # instances JSONs are there
  assert p.counts == {"train": 3, "validation": 2}          # unlisted images ignored
  for split, coco in (("train", "train"), ("validation", "val")):
    for r in _records(p.name, p.data_dir, split):
      width, height, mode, texts, objects = COCO[coco][int(r["image_id"])]
      assert (r["width"], r["height"]) == (width, height)
      assert r["image"].shape == (height, width, 3) and r["image"].dtype == np.uint8
      file = coco_dir / f"{coco}2017" / f"{int(r['image_id']):012d}.jpg"
      want = np.asarray(PIL.Image.open(file).convert("RGB"))
      if mode == "RGB":      # stored byte for byte
        np.testing.assert_array_equal(r["image"], want)
      else:                  # grey: converted to RGB and encoded again at quality 95
        assert np.abs(r["image"].astype(int) - want).mean() < 2
      assert [_text(c) for c in r["captions"]] == [t.strip() for t in texts]
      names = [coco_captions.CATEGORIES[i] for i in r["objects"]]
      assert names == sorted({CATEGORY_NAMES[c] for c in objects},
                             key=coco_captions.CATEGORIES.index)


def test_coco_captions_configs(coco_dir, tmp_path):
  plain = tmp_path / "plain"
  shutil.copytree(coco_dir, plain)
  os.remove(plain / "annotations" / "instances_val2017.json")
  with pytest.raises(FileNotFoundError, match=r"instances_\*2017.json are there for "
                                              r"\['train'\] but not for \['val'\]"):
    prepare_lib.prepare("coco_captions", str(plain), str(tmp_path / "d"))
  with pytest.raises(FileNotFoundError, match=r"lacks instances_val2017.json"):
    prepare_lib.prepare("coco_captions", str(plain), str(tmp_path / "d"), config="objects")
  os.remove(plain / "annotations" / "instances_train2017.json")
  shutil.rmtree(plain / "train2017")
  os.remove(plain / "annotations" / "captions_train2017.json")
  p = prepare_lib.prepare("coco_captions", str(plain), str(tmp_path / "d"))
  assert p.name == "mmjax_coco_captions/captions:1.0.0" and p.counts == {"validation": 2}
  features = tfds.builder(p.name, data_dir=p.data_dir).info.features
  assert "objects" not in features and "'test': 'validation'" in p.summary()


def test_coco_captions_bad_input(coco_dir, tmp_path):
  def edit(name, change):
    root = tmp_path / name
    shutil.copytree(coco_dir, root)
    path = root / "annotations" / "captions_train2017.json"
    data = json.loads(path.read_text())
    change(data, root)
    path.write_text(json.dumps(data))
    return str(root)
  stray = edit("stray", lambda d, _: d["annotations"].append(
      {"id": 777, "image_id": 4242, "caption": "nothing"}))
  with pytest.raises(ValueError, match=r"caption id 777 has image_id 4242, which the "
                                       r"JSON's images do not list"):
    prepare_lib.prepare("coco_captions", stray, str(tmp_path / "d"))
  gone = edit("gone", lambda d, root: os.remove(root / "train2017" / "000000000030.jpg"))
  with pytest.raises(FileNotFoundError, match=r"lists image id 30 as .*000000000030.jpg, "
                                              r"which does not exist"):
    prepare_lib.prepare("coco_captions", gone, str(tmp_path / "d"))
  corrupt = edit("corrupt", lambda d, root: (root / "train2017" / "000000000009.jpg")
                 .write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg"))
  with pytest.raises(common.BadFileError, match=r"000000000009.jpg: cannot be decoded as "
                                                r"an image"):
    prepare_lib.prepare("coco_captions", corrupt, str(tmp_path / "d"))
  p = prepare_lib.prepare("coco_captions", corrupt, str(tmp_path / "d"), on_bad_file="skip")
  assert p.counts == {"train": 2, "validation": 2}
  assert p.skipped == {"train": [os.path.join(corrupt, "train2017", "000000000009.jpg")]}
  assert "skipped 1 unreadable file(s) of train" in p.summary()
  assert "{'train': 1}" in tfds.builder(p.name, data_dir=p.data_dir).info.description
  resized = edit("resized", lambda d, _: d["images"][0].update(width=41))
  with pytest.raises(ValueError, match=r"000000000009.jpg: decodes to width x height "
                                       r"40 x 30, but the JSON says 41 x 30"):
    prepare_lib.prepare("coco_captions", resized, str(tmp_path / "d"), config="captions")
  with pytest.raises(FileNotFoundError, match=r"lacks COCO's caption annotations: "
                                              r"expected 'annotations/captions_train2017"):
    prepare_lib.prepare("coco_captions", str(tmp_path), str(tmp_path / "d"))


# --- audio_captions ----------------------------------------------------------------

CLOTHO = {  # CSV split -> file name -> (rate, channels, captions)
    "development": {"rain on a roof.wav": (16000, 1, ["Rain falls.", "Drops hit a roof.",
                                                      "It rains.", "Rain.", "Wet."]),
                    "birds_02.wav": (22050, 2, ["Birds sing.", "Chirping.", "Birds.",
                                                "Tweets.", "Song."])},
    "validation": {"door.wav": (16000, 2, ["A door shuts.", "Slam.", "Door.", "Bang.",
                                           "Shut."])},
    "evaluation": {"car.wav": (16000, 1, ["A car passes.", "Engine.", "Car.", "Vroom.",
                                          "Traffic."])},
}


def _clip(name, rate, channels):
  return np.stack([_pcm(f"{name}{c}", rate // 20) for c in range(channels)], axis=1)


@pytest.fixture(scope="module")
def clotho_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("clotho")
  for split, clips in CLOTHO.items():
    os.makedirs(root / split)
    rows = ["file_name,caption_1,caption_2,caption_3,caption_4,caption_5,sound_id"]
    for name, (rate, channels, captions) in clips.items():
      soundfile.write(str(root / split / name), _clip(name, rate, channels), rate,
                      subtype="PCM_16")
      rows.append(",".join([f'"{name}"'] + [f'"{c}"' for c in captions] + ["7"]))
    (root / f"clotho_captions_{split}.csv").write_text("\n".join(rows) + "\n")
  return root


@pytest.fixture(scope="module")
def clotho_prepared(clotho_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_clotho"))
  return prepare_lib.prepare("audio_captions", str(clotho_dir), data_dir)


def test_audio_captions_clotho(clotho_dir, clotho_prepared, tmp_path):
  p = clotho_prepared
  assert p.name == "mmjax_audio_captions/clotho:1.0.0"
  assert p.counts == {"train": 2, "validation": 1, "test": 1}
  assert not p.skipped                  # several channels are mixed down, not refused
  assert {s: [os.path.basename(f) for f in v] for s, v in p.mixed_down.items()} == {
      "train": ["birds_02.wav"], "validation": ["door.wav"]}             # and named
  assert "mixed down 1 multi-channel audio file(s) of validation to mono" in p.summary()
  for split, csv_split in (("train", "development"), ("validation", "validation"),
                           ("test", "evaluation")):
    for r in _records(p.name, p.data_dir, split):
      name = _text(r["audio_id"])
      rate, channels, captions = CLOTHO[csv_split][name]
      assert [_text(c) for c in r["captions"]] == captions
      assert r["audio"].dtype == np.int16
      if rate == 16000:      # at the config's rate: mono sample for sample, stereo averaged
        mixed = np.rint(_clip(name, rate, channels).astype(np.float64).mean(axis=1))
        np.testing.assert_array_equal(r["audio"], mixed.astype(np.int16))
      else:                  # 22050 Hz stereo: mixed down, resampled to 16000
        assert r["audio"].shape == (-(-(rate // 20) * 320 // 441),)
  resampled = prepare_lib.prepare("audio_captions", str(clotho_dir), str(tmp_path),
                                  sample_rate=8000)
  assert resampled.name == "mmjax_audio_captions/clotho_8000hz:1.0.0"
  record = _records(resampled.name, resampled.data_dir, "validation")[0]
  assert record["audio"].shape == (400,)                   # 0.05 s at 8 kHz
  doc = tfds.builder(resampled.name, data_dir=resampled.data_dir).info.features["audio"]
  assert "8000 Hz" in doc.doc.desc


def test_audio_captions_audiocaps_and_bad_input(clotho_dir, tmp_path):
  root = tmp_path / "audiocaps"
  rows = {"train": [(1, "abc", 30, "A dog barks."), (2, "xyz", 0, "Wind blows."),
                    (3, "abc", 30, "Barking dog.")],
          "test": [(4, "q1", 10, "Music plays."), (5, "gone", 0, "Nobody downloaded me.")]}
  for split, lines in rows.items():
    os.makedirs(root / split)
    text = "audiocap_id,youtube_id,start_time,caption\n" + "".join(
        f"{a},{y},{s},{c}\n" for a, y, s, c in lines)
    (root / f"{split}.csv").write_text(text)
    for youtube_id in {y for _, y, _, _ in lines} - {"gone"}:
      _wav(root / split / f"{youtube_id}.wav", _pcm(youtube_id), rate=16000)
  with pytest.raises(common.BadFileError, match=r"gone.wav: does not exist \(the CSV "
                                                r"lists it\).*on_bad_file='skip'"):
    prepare_lib.prepare("audio_captions", str(root), str(tmp_path / "d"))
  p = prepare_lib.prepare("audio_captions", str(root), str(tmp_path / "d"),
                          on_bad_file="skip")
  assert p.name == "mmjax_audio_captions/audiocaps:1.0.0"
  assert p.counts == {"train": 2, "test": 1} and len(p.skipped["test"]) == 1
  got = {_text(r["audio_id"]): r for r in _records(p.name, p.data_dir, "train")}
  assert [_text(c) for c in got["abc"]["captions"]] == ["A dog barks.", "Barking dog."]
  np.testing.assert_array_equal(got["xyz"]["audio"], _pcm("xyz"))
  with open(root / "train.csv", "a") as f:
    f.write("6,abc,45,Later.\n")
  with pytest.raises(ValueError, match=r"train.csv:5: youtube_id 'abc' has start_time 45"):
    prepare_lib.prepare("audio_captions", str(root), str(tmp_path / "e"), config="audiocaps")
  both = tmp_path / "both"
  shutil.copytree(clotho_dir, both)
  shutil.copy(root / "test.csv", both)
  with pytest.raises(ValueError, match=r"holds the CSVs of both layouts"):
    prepare_lib.prepare("audio_captions", str(both), str(tmp_path / "e"))
  (both / "clotho_captions_validation.csv").write_text("file,caption\nx.wav,y\n")
  with pytest.raises(ValueError, match=r"clotho_captions_validation.csv: no column "
                                       r"\['file_name', 'caption_1'"):
    prepare_lib.prepare("audio_captions", str(both), str(tmp_path / "e"), config="clotho")
  shutil.rmtree(both / "evaluation")
  os.remove(both / "clotho_captions_validation.csv")
  with pytest.raises(FileNotFoundError, match=r"lacks the audio of clotho_captions_"
                                              r"evaluation.csv: expected the folder "
                                              r"'evaluation/'"):
    prepare_lib.prepare("audio_captions", str(both), str(tmp_path / "e"), config="clotho")
  with pytest.raises(FileNotFoundError, match=r"lacks captions CSVs: expected "
                                              r"'clotho_captions_development.csv'"):
    prepare_lib.prepare("audio_captions", str(tmp_path / "d"), str(tmp_path / "e"))


# --- manifest ----------------------------------------------------------------------

def _manifest_dir(root):
  os.makedirs(root / "media")
  lines = {"train": [], "test": []}
  for k in range(5):
    split = "train" if k < 3 else "test"
    pixels = np.random.default_rng(k).integers(0, 256, (6 + k, 9, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels).convert("L" if k == 1 else "RGB")
    image.save(root / "media" / f"{k}.png")
    _wav(root / "media" / f"{k}.wav", _pcm(f"m{k}"), rate=16000)
    lines[split].append({"photo": f"media/{k}.png",
                         "sound": str(root / "media" / f"{k}.wav"),   # absolute
                         "caption": f"example {k}", "label": k % 3})
  for split, entries in lines.items():
    (root / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
  return lines


@pytest.fixture(scope="module")
def manifest_prepared(tmp_path_factory):
  """(manual_dir, its lines, the prepared dataset)."""
  root = tmp_path_factory.mktemp("manifest") / "My Pairs"
  lines = _manifest_dir(root)
  data_dir = str(tmp_path_factory.mktemp("tfds_manifest"))
  return root, lines, prepare_lib.prepare("manifest", str(root), data_dir)


def test_manifest_records_equal_the_lines(manifest_prepared, tmp_path):
  root, lines, p = manifest_prepared
  assert p.name == "mmjax_manifest/my_pairs:1.0.0"
  assert p.counts == {"train": 3, "test": 2}
  info = tfds.builder(p.name, data_dir=p.data_dir).info
  assert info.features["label"].num_classes == 3
  assert info.features["photo"].shape == (None, None, 3)
  for split, entries in lines.items():
    by_caption = {e["caption"]: e for e in entries}
    for r in _records(p.name, p.data_dir, split):
      e = by_caption[_text(r["caption"])]
      want = np.asarray(PIL.Image.open(root / e["photo"]).convert("RGB"))
      np.testing.assert_array_equal(r["photo"], want)     # PNG: lossless, grey -> RGB
      np.testing.assert_array_equal(r["sound"], _pcm(f"m{e['caption'][-1]}"))
      assert r["label"] == e["label"]
  out = subprocess.run(
      [sys.executable, "-m", "mmjax.data.prepare", "manifest", f"--manual_dir={root}",
       f"--data_dir={tmp_path / 'cli'}", "--config=pairs", "--sample_rate=8000"],
      cwd=REPO, capture_output=True, text=True, check=True)
  assert "mmjax_manifest/pairs_8000hz:1.0.0" in out.stdout
  assert "  train              3 examples" in out.stdout
  assert f"data.data_dir='{tmp_path / 'cli'}'" in out.stdout
  assert "label_feature='label'" in out.stdout
  assert "{'image': 'photo', 'audio': 'sound', 'caption': 'caption'}" in out.stdout


def test_manifest_bad_lines(tmp_path):
  root = tmp_path / "m"
  lines = _manifest_dir(root)

  def rewrite(split, k, **changes):   # the manifests as written, but for one line
    for name, entries in lines.items():
      entries = [dict(e) for e in entries]
      if name == split:
        entries[k].update(changes)
        for key in [key for key, v in changes.items() if v is None]:
          del entries[k][key]
      (root / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))

  def fails(error, match):
    with pytest.raises(error, match=match):
      prepare_lib.prepare("manifest", str(root), str(tmp_path / "d"))

  rewrite("test", 1, photo="media/none.png")
  fails(FileNotFoundError, r"test.jsonl:2: key 'photo' names 'media/none.png', and "
                           r".*none.png does not exist")
  rewrite("test", 1, caption=None)
  fails(ValueError, r"test.jsonl:2: no key 'caption', which train.jsonl's first line has")
  rewrite("train", 2, depth="media/2.png")
  fails(ValueError, r"train.jsonl:3: key 'depth', which the other lines lack")
  rewrite("train", 2, label="two")
  fails(ValueError, r"train.jsonl:3: key 'label' is a str here \('two'\) but label")
  rewrite("train", 0, caption=5)
  fails(ValueError, r"train.jsonl:1: key 'caption' has 5; a value is a path")
  rewrite("train", 1)
  (root / "media" / "1.png").write_bytes(b"\x89PNG broken")
  fails(common.BadFileError, r"1.png: cannot be decoded as an image")
  os.remove(root / "train.jsonl")
  fails(FileNotFoundError, r"lacks the manifest: expected 'train.jsonl'")
  with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; expected one of "
                                       r"\['audio_captions', 'av_digits'"):
    prepare_lib.prepare("mnist", str(root), str(tmp_path / "d"))


# --- every builder through the mmjax pipeline, and two training steps --------------
#
# Each case maps a builder's features to modalities. Cases with the same modalities,
# shapes and batch keys compile the same programs, which the session's compilation
# cache (conftest.py) then reuses: coco and the manifest's photos share one, Clotho and
# the manifest's sounds another; av_digits' grey images make a third.

CASES = {  # case -> (prepared fixture, features, label feature, splits, audio Hz)
    "av_digits": ("digits_prepared", {"image": "image", "audio": "audio", "text": "text"},
                  "label", {"train": "train", "test": "test[:16]"}, 8000),
    "coco_captions": ("coco_prepared", {"image": "image", "text": "captions"}, None,
                      {"train": "train", "test": "validation"}, None),
    "manifest_image": ("manifest_prepared", {"image": "photo", "text": "caption"}, None,
                       {"train": "train", "test": "test"}, None),
    "audio_captions": ("clotho_prepared", {"audio": "audio", "text": "captions"}, None,
                       {"train": "train", "test": "validation+test"}, 16000),
    "manifest_audio": ("manifest_prepared", {"audio": "sound", "text": "caption"}, None,
                       {"train": "train", "test": "test"}, 16000),
}


def _prepared(request, case):
  p = request.getfixturevalue(CASES[case][0])
  return p[2] if isinstance(p, tuple) else p      # manifest_prepared: (root, lines, p)


def _case_data(request, case, **fields):
  _, features, label, splits, _ = CASES[case]
  p = _prepared(request, case)
  sizes = {"image_size": 16} if "image" in features else {}
  sizes.update({"audio_samples": 800} if "audio" in features else {})
  return config_lib.tfds_data(p.name, features, data_dir=p.data_dir, label_feature=label,
                              splits=splits, text_max_len=56, num_threads=1,
                              **dict(sizes, **fields))


def _batches(data, seed, steps=2):
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.make_source(data, "train")
  featurize = pipeline.Featurize(tuple(data.features), data.text_max_len)
  batches = iter(pipeline.train_dataset(source, featurize, seed=seed, global_batch_size=8,
                                        process_index=0, process_count=1, num_threads=1))
  return [next(batches) for _ in range(steps)]


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("case", list(CASES))
def test_augmentation_shapes_and_determinism_per_seed(case, request):
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  # Crops of half the area at least, and 32-sample windows of every clip (all longer).
  data = _case_data(request, case, image_augment=True, crop_scale=(0.5, 1.0),
                    audio_samples=32)
  features = CASES[case][1]
  source = pipeline.make_source(data, "train")
  shapes = {"image": (16, 16, 1 if case == "av_digits" else 3), "audio": (32,)}
  texts = source.all_texts("text")       # None unless a Sequence(Text) of captions
  varies = {m: False for m in features}
  for i in range(len(source)):
    first = source[i]                    # the evaluation form
    forms = [source.train_record(i, (7, position)) for position in range(6)]
    for position, form in enumerate(forms):
      assert _same(form, source.train_record(i, (7, position)))   # a function of the key
      for m in features:
        if m == "text":
          assert form[m] in (texts[i] if texts is not None else (first[m],))
        else:
          assert form[m].shape == first[m].shape == shapes[m] and form[m].dtype == np.float32
          if m == "audio":
            assert form["length"]["audio"] == 32
        varies[m] |= not np.array_equal(np.asarray(form[m]), np.asarray(forms[0][m]))
    if texts is not None:
      assert first["text"] == texts[i][0]     # evaluation: the first caption
  # Crops, windows and (of several captions) the caption differ from draw to draw.
  assert all(varies[m] for m in features if m != "text" or texts is not None), varies
  # The stream of batches is a function of the seed.
  batches = _batches(data, seed=3)
  assert _same(batches, _batches(data, seed=3)) and not _same(batches, _batches(data, 4))
  for m in features:
    want = (8, 56) if m == "text" else (8,) + shapes[m]
    assert batches[0][m].shape == want, (m, batches[0][m].shape)
  # The config the prepare command prints reads the dataset as it is.
  p = _prepared(request, case)
  u = p.usage
  printed = config_lib.tfds_data(p.name, u["features"], data_dir=p.data_dir,
                                 label_feature=u.get("label"), **u["fields"])
  record = pipeline.make_source(printed, "train")[0]
  assert set(u["features"]) <= set(record)
  if "captions" in u["features"].values():
    assert isinstance(record["text"], str)


@pytest.mark.parametrize("case", list(CASES))
def test_two_training_steps(case, request, tmp_path):
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(REPO, "tests", "configs", "tiny.py"))
  config.data = _case_data(request, case)
  rate = CASES[case][4]
  # A patch stem: the tiny config's conv stem triples the compile time of every program.
  towers = {"image": config_lib.encoder("vit", "mu", patch_size=8, width=32, depth=1,
                                        channels=1 if case == "av_digits" else 3),
            "text": config.model.encoders.text,
            "audio": config_lib.encoder("audio", "mu", width=32, depth=1, num_heads=2,
                                        sample_rate=rate or 16000, time_masks=0,
                                        freq_masks=0)}
  config.model.encoders = {m: towers[m] for m in config.data.features}
  if len(config.data.features) > 2:     # CLIP pairs two; the others align to the image
    config.objective.kind, config.objective.anchor = "pairwise", "image"
  config.total_steps = config.checkpoint_every_steps = config.eval_every_steps = 2
  config.evals = {"retrieval": config_lib.evaluator_config("retrieval", batch_size=16,
                                                           ks=(1,), plot_max_k=0)}
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["train/loss"]), metrics
  for a, b in itertools.permutations(sorted(config.data.features), 2):
    assert 0 <= metrics[f"eval/retrieval/{a}->{b}/R@1"] <= 1, metrics
  assert os.path.isdir(tmp_path / "checkpoints" / "2")


def test_a_version_config_or_split_not_prepared_lists_those_there(coco_prepared,
                                                                   digits_prepared):
  from mmjax.data import tfds_source  # pylint: disable=g-import-not-at-top
  p = coco_prepared

  def fails(name, split, match):
    with pytest.raises(ValueError, match=match):
      tfds_source.make_source(config_lib.tfds_data(name, {"image": "image"},
                                                   data_dir=p.data_dir,
                                                   splits={split: split}), split)

  fails("mmjax_coco_captions/objects:2.0.0", "train",
        r"'mmjax_coco_captions/objects:2.0.0' is not prepared .*mmjax_coco_captions/ "
        r"holds \['objects'\]; mmjax_coco_captions/objects/ holds \['1.0.0'\]")
  fails("mmjax_coco_captions/captions:1.0.0", "train",
        r"is not prepared .*mmjax_coco_captions/ holds \['objects'\];")
  fails(p.name, "test", r"has no split 'test' \(asked for 'test'\); it has "
                        r"\['train', 'validation'\]")
  fails(digits_prepared.name, "train", r"not prepared .*it holds \['mmjax_coco_captions'\]")
