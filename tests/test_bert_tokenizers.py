"""Published text towers' parts: the BERT encoder and its Hugging Face loader (against a
direct numpy computation on a tiny config), CLIP's BPE and Hugging Face tokenizers on
tiny vocabularies made here, the CLIP / SigLIP image presets, prompt ensembles, and
the errors for bad inputs."""

import gzip
import json
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest

from mmjax import experiment
from mmjax.data import augment
from mmjax.data import hf_tokenizers
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evals import prompts
from mmjax.evals.evaluators import zero_shot
from mmjax.models import registry
from mmjax.pretrained import hf_bert

# ---------------------------------------------------------------------------------------
# BERT.
# ---------------------------------------------------------------------------------------

TINY = dict(model_type="bert", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=16, vocab_size=40, max_position_embeddings=12,
            type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)


def _tiny_state(seed=0):
  rng = np.random.default_rng(seed)
  d, m = TINY["hidden_size"], TINY["intermediate_size"]
  w = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
  state = {"embeddings.word_embeddings.weight": w(TINY["vocab_size"], d),
           "embeddings.position_embeddings.weight": w(TINY["max_position_embeddings"], d),
           "embeddings.token_type_embeddings.weight": w(2, d),
           "embeddings.LayerNorm.weight": 1 + w(d), "embeddings.LayerNorm.bias": w(d),
           "embeddings.position_ids": np.arange(12)[None].astype(np.int64),
           "pooler.dense.weight": w(d, d), "pooler.dense.bias": w(d)}
  for i in range(TINY["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
      state[p + name + ".weight"], state[p + name + ".bias"] = w(d, d), w(d)
    state[p + "intermediate.dense.weight"], state[p + "intermediate.dense.bias"] = (
        w(m, d), w(m))
    state[p + "output.dense.weight"], state[p + "output.dense.bias"] = w(d, m), w(d)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      state[p + name + ".weight"], state[p + name + ".bias"] = 1 + w(d), w(d)
  return state


def _numpy_bert(state, ids, heads=2, eps=1e-12):
  """BertModel's last hidden state, written out in numpy (float64), and the mask."""
  s = {k: v.astype(np.float64) for k, v in state.items()}
  erf = np.vectorize(math.erf)

  def ln(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * s[name + ".weight"] + s[name + ".bias"]

  def dense(x, name):
    return x @ s[name + ".weight"].T + s[name + ".bias"]

  mask = ids != 0
  x = (s["embeddings.word_embeddings.weight"][ids]
       + s["embeddings.position_embeddings.weight"][:ids.shape[1]][None]
       + s["embeddings.token_type_embeddings.weight"][0])
  x = ln(x, "embeddings.LayerNorm")
  b, n, d = x.shape
  for i in range(TINY["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (dense(x, p + f"attention.self.{t}").reshape(b, n, heads, -1)
               for t in ("query", "key", "value"))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
    logits = np.where(mask[:, None, None, :], logits, -1e30)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d)
    x = ln(x + dense(y, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    h = dense(x, p + "intermediate.dense")
    h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
    x = ln(x + dense(h, p + "output.dense"), p + "output.LayerNorm")
  return x, mask


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
  from safetensors.numpy import save_file
  path = tmp_path_factory.mktemp("tiny_bert")
  (path / "config.json").write_text(json.dumps(TINY))
  save_file(_tiny_state(), str(path / "model.safetensors"))
  _wordpiece_file(path / "tokenizer.json")     # [SEP] is 3
  return path


IDS = np.array([[5, 7, 9, 3, 0, 0], [5, 11, 12, 13, 14, 3]], np.int32)


def test_bert_loader_matches_numpy_mean_pooling_and_pooler(tiny_bert_dir):
  encoder, params = hf_bert.load(tiny_bert_dir)
  assert (encoder.width, encoder.depth, encoder.mlp_dim, encoder.max_len) == (8, 2, 16, 12)
  assert (encoder.pad_id, encoder.eos_id) == (0, 3)      # the tokenizer.json's
  hidden, mask = _numpy_bert(_tiny_state(), IDS)
  want = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  got = jax.jit(encoder.apply)({"params": params}, jnp.asarray(IDS))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # Into a tower's params (e.g. a model's towers_text): the same arrays; a tower of
  # another shape is an error naming the path.
  tower = hf_bert.load_tower(params, tiny_bert_dir)
  assert jax.tree.all(jax.tree.map(np.array_equal, tower, params))
  other = jax.tree.map(lambda x: x, params)
  other["embed_norm"]["scale"] = np.zeros(9, np.float32)
  with pytest.raises(hf_bert.CheckpointMismatch,
                     match=r"embed_norm/scale: checkpoint \(8,\), expected \(9,\)"):
    hf_bert.load_tower(other, tiny_bert_dir)
  # Scanned blocks read the same checkpoint, stacked; BERT's pooler reads its weights.
  scanned, scanned_params = hf_bert.load(tiny_bert_dir, scan_layers=True, pool="pooler")
  assert scanned_params["encoder"]["blocks"]["attn"]["query"]["kernel"].shape == (2, 8, 2, 4)
  s = _tiny_state()
  pooled = np.tanh(hidden[:, 0] @ s["pooler.dense.weight"].T.astype(np.float64)
                   + s["pooler.dense.bias"])
  np.testing.assert_allclose(
      np.asarray(jax.jit(scanned.apply)({"params": scanned_params}, jnp.asarray(IDS))), pooled,
      atol=1e-5)


def test_bert_state_dict_mismatches_list_every_key_and_shape():
  encoder = registry.build_encoder("bert", **hf_bert.encoder_fields(TINY))
  state = _tiny_state()
  del state["encoder.layer.1.output.dense.bias"]
  state["encoder.layer.2.output.dense.bias"] = np.zeros(8, np.float32)
  state["embeddings.word_embeddings.weight"] = np.zeros((41, 8), np.float32)
  with pytest.raises(hf_bert.CheckpointMismatch) as err:
    hf_bert.convert_state_dict(state, encoder, source="ckpt")
  message = str(err.value)
  assert "missing keys ['encoder.layer.1.output.dense.bias']" in message
  assert "unexpected keys ['encoder.layer.2.output.dense.bias']" in message
  assert ("embeddings.word_embeddings.weight: checkpoint (41, 8), expected (40, 8)"
          in message)
  # BertFor... prefixes are removed; a head named in `ignore` is dropped on purpose.
  state = {"bert." + k: v for k, v in _tiny_state().items()}
  state["cls.predictions.bias"] = np.zeros(40, np.float32)
  with pytest.raises(hf_bert.CheckpointMismatch, match=r"unexpected keys \['cls"):
    hf_bert.convert_state_dict(state, encoder)
  params = hf_bert.convert_state_dict(state, encoder, ignore=("cls.",))
  assert params["encoder"]["block_1"]["mlp"]["fc1"]["kernel"].shape == (8, 16)
  state = _tiny_state()
  state["embeddings.position_ids"] = state["embeddings.position_ids"][:, ::-1]
  with pytest.raises(ValueError, match="position_ids is not 0, 1"):
    hf_bert.convert_state_dict(state, encoder)


def test_bert_model_directory_errors(tmp_path, tiny_bert_dir):
  with pytest.raises(ValueError, match="no config.json in"):
    hf_bert.load(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json: not a JSON file"):
    hf_bert.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(TINY))
  with pytest.raises(ValueError, match=r"no weights in .*it holds \['config.json'\]"):
    hf_bert.load(tmp_path)
  with pytest.raises(ValueError, match="model_type='roberta'"):
    hf_bert.encoder_fields(dict(TINY, model_type="roberta"))
  with pytest.raises(ValueError, match=r"given encoder: width: encoder 384, config 8"):
    hf_bert.load(tiny_bert_dir, registry.build_encoder("bert"))


def test_bert_registry_and_text_kinds():
  fields = registry.encoder_fields("bert", "minilm_l6")
  assert {k: fields[k] for k in ("width", "depth", "num_heads", "mlp_dim", "vocab_size",
                                 "max_len", "ln_eps", "activation", "pool")} == dict(
      width=384, depth=6, num_heads=12, mlp_dim=1536, vocab_size=30522, max_len=512,
      ln_eps=1e-12, activation="gelu", pool="mean")
  config = ml_collections.ConfigDict({"model": {"encoders": {
      "caption": {"kind": "bert"}, "image": {"kind": "vit"}}}})
  assert experiment.text_modalities(config) == ("caption",)
  with pytest.raises(ValueError, match="token ids must lie in"):
    registry.build_encoder("bert", eos_id=3, **hf_bert.encoder_fields(TINY)).init(
        jax.random.PRNGKey(0), jnp.full((1, 4), 40, jnp.int32))


# ---------------------------------------------------------------------------------------
# Tokenizers.
# ---------------------------------------------------------------------------------------

MERGES = ["t h", "th e</w>", "c a", "ca t</w>"]


def _merges_file(path, lines=None, header="#version: 0.2", gz=True):
  text = "\n".join([header] + (MERGES if lines is None else lines)) + "\n"
  path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
  return str(path)


def test_clip_bpe_ids_by_hand(tmp_path):
  tok = tokenizer_lib.make_tokenizer(f"clip_bpe:{_merges_file(tmp_path / 'm.txt.gz')}", 8)
  # 512 byte symbols, 4 merges (ids 512-515), then <start_of_text> 516, <end_of_text> 517.
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (518, 516, 517, 0)
  # Lower-cased; '!' is id 0 ('!</w>' 256), as in CLIP's vocabulary.
  np.testing.assert_array_equal(tok.encode("The CAT!"), [516, 513, 515, 256, 517, 0, 0, 0])
  # 'é' is bytes c3 a9: symbols 127 ('Ã') and 358 ('©</w>').
  assert tok.encode("é").tolist()[:4] == [516, 127, 358, 517]
  # HTML entities and whitespace are cleaned; contractions and digits split.
  a, amp, t_ = 64 + 256, 5 + 256, 83 + 256     # 'a</w>', '&</w>', 't</w>'
  assert tok.encode("  a&amp;a\n\t").tolist()[:5] == [516, a, amp, a, 517]
  assert tok.encode("a't")[:4].tolist() == [516, a, 6, t_]      # "'" then 't</w>'
  # Too long: cut to max_len with the end token kept last.
  long = tok.encode("the " * 20)
  assert long.tolist() == [516] + [513] * 6 + [517]
  assert tok.decode(tok.encode("The cat!")) == "the cat !"
  np.testing.assert_array_equal(tok.encode_batch(["the", "cat"])[:, 1], [513, 515])
  with pytest.raises(TypeError, match="takes str"):
    tok.encode(b"the")


def test_clip_bpe_bad_merges_files(tmp_path):
  with pytest.raises(ValueError, match="no CLIP BPE merges file at"):
    hf_tokenizers.ClipBpeTokenizer(str(tmp_path / "missing.txt.gz"))
  bad = tmp_path / "bad.gz"
  bad.write_bytes(b"\x1f\x8b\x08garbage")
  with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
    hf_tokenizers.ClipBpeTokenizer(str(bad))
  with pytest.raises(ValueError, match="'#version: ...' header"):
    hf_tokenizers.ClipBpeTokenizer(_merges_file(tmp_path / "h.gz", header="t h"))
  with pytest.raises(ValueError, match=r"line 3: 'a b c' is not a merge"):
    hf_tokenizers.ClipBpeTokenizer(_merges_file(tmp_path / "l.gz", ["t h", "a b c"]))
  with pytest.raises(ValueError, match="holds no merges"):
    hf_tokenizers.ClipBpeTokenizer(_merges_file(tmp_path / "e.txt", [], gz=False))
  with pytest.raises(ValueError, match=r"expected 'byte' or .*'clip_bpe:PATH'"):
    tokenizer_lib.make_tokenizer("clip_bpe", 77)


def _wordpiece_file(path):
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  vocab = {t: i for i, t in enumerate(
      ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "!", "wo", "##rld", "cafe"])}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.save(str(path))
  return str(path)


def test_hf_tokenizer_json_wordpiece(tmp_path):
  tok = tokenizer_lib.make_tokenizer(f"hf:{_wordpiece_file(tmp_path / 'tokenizer.json')}", 6)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (10, 0, 2, 3)
  np.testing.assert_array_equal(tok.encode("Hello World!"), [2, 4, 5, 6, 3, 0])
  np.testing.assert_array_equal(tok.encode("Café zzz"), [2, 9, 1, 3, 0, 0])   # accents
  # Truncated keeping [SEP]; a directory holding tokenizer.json reads it.
  long = tokenizer_lib.make_tokenizer(f"hf:{tmp_path}", 4).encode_batch(["hello " * 9])
  np.testing.assert_array_equal(long, [[2, 4, 4, 3]])
  assert tok.decode(tok.encode("hello world")) == "hello world"
  with pytest.raises(ValueError, match="no Hugging Face tokenizer file at"):
    hf_tokenizers.HfTokenizer(str(tmp_path / "nope.json"), 8)
  (tmp_path / "broken.json").write_text('{"model": 3')
  with pytest.raises(ValueError, match="broken.json: not a Hugging Face tokenizer.json"):
    hf_tokenizers.HfTokenizer(str(tmp_path / "broken.json"), 8)


# ---------------------------------------------------------------------------------------
# Image presets.
# ---------------------------------------------------------------------------------------


def test_clip_and_siglip_presets_against_pil():
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)   # H 30, W 40
  clip = augment.pixel_transform(16, image_preset="clip")
  # The short side to 16 (W: int(16 * 40 / 30) = 21), bicubic; crop offset round(2.5) = 2.
  pil = PIL.Image.fromarray(image).resize((21, 16), PIL.Image.BICUBIC).crop((2, 0, 18, 16))
  mean, std = (np.float32(v) for v in augment.NORM_PRESETS["clip"])
  np.testing.assert_allclose(clip(image), (np.asarray(pil) / np.float32(255) - mean) / std,
                             rtol=1e-6, atol=1e-6)
  siglip = augment.pixel_transform(0, image_preset="siglip")     # 0: the preset's 224
  pil = PIL.Image.fromarray(image).resize((224, 224), PIL.Image.BICUBIC)
  np.testing.assert_allclose(siglip(image), np.asarray(pil) / np.float32(127.5) - 1,
                             atol=1e-6)
  tall = np.zeros((50, 20, 3), np.uint8)
  assert clip(tall).shape == (16, 16, 3) and clip(np.stack([tall] * 2)).shape[:2] == (2, 16)
  with pytest.raises(ValueError, match=r"unknown preset 'openai'; valid: \['clip', 'siglip'\]"):
    augment.pixel_transform(224, image_preset="openai")
  with pytest.raises(ValueError, match="image_preset='siglip' normalises with 'siglip'"):
    augment.pixel_transform(224, image_norm="clip", image_preset="siglip")


# ---------------------------------------------------------------------------------------
# Prompt ensembles.
# ---------------------------------------------------------------------------------------


def test_prompt_ensemble_presets_average_normalised_embeddings():
  assert len(prompts.PRESETS["imagenet_clip"]) == 80
  assert len(set(prompts.IMAGENET_CLIP)) == 80
  texts = zero_shot.class_prompts(["apple"], ["imagenet_clip", "a sketch of a {}."])
  assert len(texts) == 81 and "a photo of a apple." in texts     # presets verbatim
  assert texts[-1] == "a sketch of an apple."

  rng = np.random.default_rng(0)
  table = {}

  def embed(batch, batch_size, modality):
    return np.stack([table.setdefault(t, rng.normal(size=4) * rng.uniform(0.5, 3))
                     for t in batch])

  ctx = types.SimpleNamespace(_cache={}, where="config.evals.zs", embed_texts=embed,
                              data=types.SimpleNamespace(class_names=("cat", "dog"),
                                                         prompt_templates=None))
  c = types.SimpleNamespace(class_names=(), templates=("imagenet_clip_7",),
                            text_modality="text", batch_size=8)
  names, classes = zero_shot.class_embeddings(ctx, c)
  assert names == ["cat", "dog"] and classes.shape == (2, 4)
  for i, name in enumerate(names):
    rows = np.stack([table[t.format(name)] for t in prompts.IMAGENET_CLIP_7])
    mean = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(classes[i], mean / np.linalg.norm(mean), rtol=1e-5)
  entry = types.SimpleNamespace(class_names=("a",), templates=("imagenet",), kind="zero_shot")
  with pytest.raises(ValueError, match=r"'imagenet' is neither a template .* nor a preset "
                                       r"\(\['imagenet_clip', 'imagenet_clip_7'\]\)"):
    zero_shot.check_class_names(entry, None, "config.evals.zs")


def test_image_preset_through_a_tfds_source(tmp_path):
  import tensorflow_datasets as tfds
  from mmjax import config_lib
  from mmjax.data import pipeline
  photo = np.random.default_rng(1).integers(0, 256, (30, 40, 3), np.uint8)

  class MmjaxPresetPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(None, None, 3))}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      yield 0, {"image": PIL.Image.fromarray(photo)}

  MmjaxPresetPhotos(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = config_lib.tfds_data("mmjax_preset_photos:1.0.0", {"image": "image"},
                                data_dir=str(tmp_path), splits={"test": "test"},
                                image_preset="clip", image_size=16)
  np.testing.assert_array_equal(pipeline.make_source(config, "test")[0]["image"],
                                augment.pixel_transform(16, image_preset="clip")(photo))
  config.image_size = 0      # the preset's side
  assert pipeline.make_source(config, "test")[0]["image"].shape == (224, 224, 3)


def test_init_from_reads_a_bert_directory_into_the_text_tower(tiny_bert_dir):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mmjax import pretrained  # pylint: disable=g-import-not-at-top
  _, tower = hf_bert.load(tiny_bert_dir)
  params = {"towers_text": jax.tree.map(np.zeros_like, tower),
            "heads_text": {"proj": {"kernel": np.ones((8, 4), np.float32)}},
            "logit_scale": np.float32(2.0)}
  init_from = ml_collections.ConfigDict(
      {"path": str(tiny_bert_dir), "format": "auto", "towers": {}, "scalars": True})
  loaded, report = pretrained.load_from_config(params, init_from)
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded["towers_text"], tower))
  assert loaded["heads_text"] is params["heads_text"] and report.source == "hf_bert"
  assert "heads_text" in report.kept and "logit_scale" in report.kept
  init_from.towers = {"text": "image"}
  with pytest.raises(ValueError, match="a BERT checkpoint has one tower, text"):
    pretrained.load_from_config(params, init_from)
