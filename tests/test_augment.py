"""Decoding and augmentation of the TFDS source (`mmjax.data.augment`): image crops,
flips and normalisation, waveform resampling and cropping, caption choice; determinism
per (seed, position) through the grain pipeline, exact resume; bad input named."""

import io

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from scipy import signal

from mmjax import config_lib
from mmjax.data import augment
from mmjax.data import pipeline

NAME = "mmjax_tiny_real"
SIZES = {"train": 12, "test": 6}
RATE = 8000


def _example(split, i):
  rng = np.random.default_rng([len(split), i])
  height, width = 20 + 2 * (i % 3), 30 - 2 * (i % 4)          # variable sizes
  return {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
          "audio": rng.integers(-30000, 30000, (40 + 7 * i,), dtype=np.int16),
          "captions": [f"{split} {i} caption {k}" for k in range(1 + i % 4)],
          "label": i % 3}


class MmjaxTinyReal(tfds.core.GeneratorBasedBuilder):
  """Variable-size PNG images, variable-length 16-bit PCM, several captions."""

  VERSION = tfds.core.Version("1.0.0")
  METADATA = {"sample_rate": RATE}
  AUDIO_DOC = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16, doc=self.AUDIO_DOC),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "label": tfds.features.ClassLabel(names=["zero", "one", "two"]),
    }), metadata=tfds.core.MetadataDict(**self.METADATA) if self.METADATA else None)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in SIZES.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      example = _example(split, i)
      png = io.BytesIO()
      PIL.Image.fromarray(example["image"]).save(png, format="PNG")
      yield i, dict(example, image=png.getvalue())


class MmjaxTinyRealNoRate(MmjaxTinyReal):
  """The same data without a sample rate in its metadata."""

  METADATA = {}


class MmjaxTinyRealDocRate(MmjaxTinyRealNoRate):
  """The rate in the audio feature's doc, as `mmjax.data.builders` write it."""

  AUDIO_DOC = "mono 16-bit PCM waveform at 8000 Hz"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  for builder in (MmjaxTinyReal, MmjaxTinyRealNoRate, MmjaxTinyRealDocRate):
    builder(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def _data(data_dir, name=NAME, **fields):
  """`config.data` on the tiny dataset; the decoding fields set whether or not
  `config_lib.tfds_data` declares them yet."""
  c = config_lib.tfds_data(f"{name}:1.0.0", {"image": "image", "audio": "audio",
                                             "text": "captions"},
                           data_dir=data_dir, label_feature="label",
                           splits={"train": "train", "test": "test"}, image_size=16,
                           audio_samples=100, text_max_len=40, num_threads=1)
  with c.unlocked():
    for k, v in fields.items():
      setattr(c, k, v)
  return c


def test_normalisation_presets_and_bad_names():
  mean, std = augment.normalization("clip")
  np.testing.assert_array_equal(mean, np.float32([0.48145466, 0.4578275, 0.40821073]))
  np.testing.assert_array_equal(std, np.float32([0.26862954, 0.26130258, 0.27577711]))
  assert augment.normalization("none") is None
  mean, std = augment.normalization("custom", (0.5,), (0.25,))
  assert mean.tolist() == [0.5] and std.tolist() == [0.25]
  with pytest.raises(ValueError, match=r"unknown normalisation 'clipp'; valid: \['clip', "
                                       r"'imagenet', 'none', 'siglip', 'custom'\]"):
    augment.normalization("clipp")
  with pytest.raises(ValueError, match="needs data.image_mean and data.image_std"):
    augment.normalization("custom", (0.5, 0.5), (0.2,))
  with pytest.raises(ValueError, match="image_std must be positive"):
    augment.normalization("custom", (0.5,), (0.0,))
  with pytest.raises(ValueError, match="read only with data.image_norm='custom'"):
    augment.normalization("clip", (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
  image = np.full((4, 4, 3), 255, np.uint8)
  clip = augment.PixelTransform(0, augment.normalization("clip"))
  mean, std = (np.float32(v) for v in augment.NORM_PRESETS["clip"])
  np.testing.assert_allclose(clip(image)[0, 0], (1 - mean) / std, rtol=1e-6)
  np.testing.assert_allclose(clip(image * 0)[0, 0], -mean / std, rtol=1e-6)
  with pytest.raises(ValueError, match="3 channels' constants but the images have 1"):
    clip(image[..., :1])


def test_eval_crop_is_the_centred_square():
  image = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  out = augment.PixelTransform(12)(image)
  # Resized at scale 1, the centred square is the crop itself.
  np.testing.assert_array_equal(out, image[:, 4:16] / np.float32(255))
  np.testing.assert_array_equal(augment.PixelTransform(12)(image), out)
  tall = np.transpose(image, (1, 0, 2))
  np.testing.assert_array_equal(augment.PixelTransform(12)(tall),
                                tall[4:16] / np.float32(255))
  assert augment.PixelTransform(6)(image).shape == (6, 6, 3)
  video = np.stack([image, image[::-1]])
  np.testing.assert_array_equal(augment.PixelTransform(12)(video)[1],
                                image[::-1, 4:16] / np.float32(255))


def test_train_crops_are_random_in_range_and_deterministic_per_key():
  rng = np.random.default_rng(1)
  for _ in range(200):
    left, top, right, bottom = augment.random_box(30, 50, rng, (0.3, 1.0), (0.5, 2.0))
    assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
    w, h = right - left, bottom - top
    assert 0.3 * 1500 * 0.8 <= w * h <= 1500 and 0.4 <= w / h <= 2.5
  image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
  transform = augment.PixelTransform(16, augment=True, scale=(0.2, 1.0))
  crop = lambda seed, position: transform(image,
                                          augment.example_rng((seed, position), "image"))
  first = crop(0, 5)
  assert first.shape == (16, 16, 3) and first.dtype == np.float32
  assert 0 <= first.min() and first.max() <= 1
  np.testing.assert_array_equal(crop(0, 5), first)          # same seed and position
  assert not np.array_equal(crop(1, 5), first)              # another seed
  assert not np.array_equal(crop(0, 6), first)              # another position (epoch)
  # Streams are independent: the image's draws do not depend on other modalities'.
  assert (augment.example_rng((0, 5), "image").random()
          != augment.example_rng((0, 5), "audio").random())
  # A full-size crop with certain flip is the mirror image; without augmentation the
  # training form is the evaluation form.
  square = image[:, :24]
  flip = augment.PixelTransform(24, augment=True, scale=(1, 1), ratio=(1, 1), flip_prob=1)
  np.testing.assert_array_equal(flip(square, np.random.default_rng(0)),
                                square[:, ::-1] / np.float32(255))
  plain = augment.PixelTransform(16)
  np.testing.assert_array_equal(plain(image, np.random.default_rng(0)), plain(image))
  with pytest.raises(ValueError, match="crop_scale must be"):
    augment.PixelTransform(16, augment=True, scale=(0.5, 1.5))
  with pytest.raises(ValueError, match="flip_prob must be in"):
    augment.PixelTransform(16, augment=True, flip_prob=2)


def test_resampling_cropping_and_padding_of_waveforms():
  wave = np.random.default_rng(0).integers(-32768, 32767, (1000,), dtype=np.int16)
  out, length = augment.WaveTransform(0, 8000, 16000)(wave)
  assert out.shape == (2000,) and length == 2000                    # 8 kHz -> 16 kHz
  np.testing.assert_allclose(out, signal.resample_poly(wave / 32768.0, 2, 1), atol=1e-6)
  out, _ = augment.WaveTransform(0, 16000, 8000)(wave)
  assert out.shape == (500,)
  np.testing.assert_allclose(augment.WaveTransform(0, 22050, 16000)(wave)[0],
                             signal.resample_poly(wave / 32768.0, 320, 441), atol=1e-6)
  pcm = wave / np.float32(32768)
  centred, n = augment.WaveTransform(100)(wave)
  np.testing.assert_array_equal(centred, pcm[450:550])
  assert n == 100
  padded, n = augment.WaveTransform(1500)(wave)
  np.testing.assert_array_equal(padded[:1000], pcm)
  assert n == 1000 and not padded[1000:].any()
  starts = set()
  for position in range(20):
    window, _ = augment.WaveTransform(100)(wave, augment.example_rng((0, position), "audio"))
    start = int(np.flatnonzero(np.isclose(pcm, window[0]))[0])
    np.testing.assert_array_equal(window, pcm[start:start + 100])
    starts.add(start)
  assert len(starts) > 10
  assert augment.pick_caption(["a", "b", "c"]) == "a"
  picks = {augment.pick_caption(["a", "b", "c"], np.random.default_rng(s))
           for s in range(30)}
  assert picks == {"a", "b", "c"} and augment.pick_caption([]) == ""


def test_source_decodes_and_augments_the_train_split(data_dir):
  config = _data(data_dir, image_augment=True, crop_scale=(0.3, 1.0), sample_rate=16000,
                 image_norm="clip")
  source = pipeline.make_source(config, "train")
  raw = tfds.data_source(f"{NAME}:1.0.0", split="train", data_dir=data_dir, download=False)
  assert raw[0]["image"].dtype == np.uint8          # TFDS decodes the PNG with PIL
  for i in range(len(source)):
    record, stored = source[i], raw[i]
    captions = [c.decode() for c in stored["captions"]]
    assert record["image"].shape == (16, 16, 3) and record["text"] == captions[0]
    resampled = len(stored["audio"]) * 2                 # 80 to 234 samples at 16 kHz
    assert record["audio"].shape == (100,)
    assert record["length"] == {"audio": min(resampled, 100)}
    assert not record["audio"][resampled:].any()
    np.testing.assert_array_equal(source[i]["image"], record["image"])   # deterministic
    train = source.train_record(i, (3, 100 + i))
    assert train["image"].shape == (16, 16, 3) and train["text"] in captions
    assert train["length"] == record["length"]
    for k, v in source.train_record(i, (3, 100 + i)).items():
      np.testing.assert_equal(v, train[k])
  assert not np.array_equal(source.train_record(0, (3, 0))["image"],
                            source.train_record(0, (4, 0))["image"])
  assert source.sample_rate == 16000
  assert source.all_texts("text")[1] == tuple(c.decode() for c in raw[1]["captions"])
  assert source.all_texts("image") is None


def _stream(source, featurize, seed, **kw):
  return pipeline.train_dataset(source, featurize, seed=seed, global_batch_size=4,
                                process_index=kw.get("p", 0), process_count=kw.get("n", 1),
                                num_threads=1)


def test_train_stream_is_deterministic_and_resumes_exactly(data_dir):
  config = _data(data_dir, image_augment=True, crop_scale=(0.3, 1.0))
  source = pipeline.make_source(config, "train")
  featurize = pipeline.Featurize(("audio", "image", "text"), 40)
  it = iter(_stream(source, featurize, seed=0))
  batches = [next(it) for _ in range(6)]                # two epochs of 12
  assert batches[0]["length"]["audio"].dtype == np.int32
  it = iter(_stream(source, featurize, seed=0))
  next(it)
  state = it.get_state()
  resumed = iter(_stream(source, featurize, seed=0))
  resumed.set_state(state)
  for want in batches[1:3]:
    got = next(resumed)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  other = next(iter(_stream(source, featurize, seed=1)))
  assert not np.array_equal(other["image"], batches[0]["image"])
  # The same example in another epoch gets another crop.
  first = {int(i): batches[0]["image"][r] for r, i in enumerate(batches[0]["index"])}
  later = [(int(i), b["image"][r]) for b in batches[3:] for r, i in enumerate(b["index"])]
  assert all(not np.array_equal(first[i], x) for i, x in later if i in first)
  # Two processes hold the rows of the one-process batch: augmentation follows the
  # global position.
  halves = [next(iter(_stream(source, featurize, seed=0, p=p, n=2))) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]),
                                batches[0]["image"])


def test_bad_decoding_input_is_named(data_dir):
  with pytest.raises(ValueError, match=r"data.source_sample_rate=16000, but the dataset "
                                       r"says its audio is at 8000 Hz"):
    pipeline.make_source(_data(data_dir, source_sample_rate=16000), "train")
  no_rate = "mmjax_tiny_real_no_rate"
  with pytest.raises(ValueError, match=r"data.sample_rate=16000: the dataset's audio rate "
                                       r"is unknown .*set data.source_sample_rate"):
    pipeline.make_source(_data(data_dir, no_rate, sample_rate=16000), "train")
  source = pipeline.make_source(_data(data_dir, no_rate, sample_rate=16000,
                                      source_sample_rate=8000), "train")
  raw = tfds.data_source(f"{no_rate}:1.0.0", split="train", data_dir=data_dir,
                         download=False)
  assert source[0]["length"]["audio"] == min(2 * len(raw[0]["audio"]), 100)
  # The encoder must read audio at the records' rate: resample or say so.
  with pytest.raises(ValueError, match=r"model.encoders.audio.sample_rate=16000, but the "
                                       r"data's audio is at 8000 Hz; set "
                                       r"data.sample_rate=16000"):
    pipeline.check_sample_rates(_data(data_dir), {"audio": 16000})
  pipeline.check_sample_rates(_data(data_dir, sample_rate=16000), {"audio": 16000})
  pipeline.check_sample_rates(_data(data_dir, no_rate), {"audio": 16000})   # unknown
  assert pipeline.audio_sample_rate(_data(data_dir, "mmjax_tiny_real_doc_rate")) == RATE
  assert pipeline.make_source(_data(data_dir, "mmjax_tiny_real_doc_rate", sample_rate=16000),
                              "test").sample_rate == 16000
  with pytest.raises(ValueError, match=r"unknown normalisation 'clip2'"):
    pipeline.make_source(_data(data_dir, image_norm="clip2"), "train")
  with pytest.raises(ValueError, match=r"data.crop_ratio must be"):
    pipeline.make_source(_data(data_dir, image_augment=True, crop_ratio=(2.0, 1.0)), "train")
