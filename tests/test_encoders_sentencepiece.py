"""Tests of the SentencePiece tokenizer (a tiny model trained in a temp dir)."""
import os

import jax
import numpy as np
import pytest
import sentencepiece

from mmjax import experiment
from mmjax.data.sentencepiece_tokenizer import SentencePieceTokenizer
from mmjax.models.registry import build_encoder

CAPTIONS = ['a red circle on a blue square', 'two green triangles',
            'a small yellow star above a large red circle',
            'the blue square is left of the green triangle']


def _train(directory, name, **ids):
  corpus = os.path.join(directory, 'corpus.txt')
  with open(corpus, 'w') as f:
    f.write('\n'.join(CAPTIONS * 20))
  prefix = os.path.join(directory, name)
  sentencepiece.SentencePieceTrainer.train(
      input=corpus, model_prefix=prefix, vocab_size=40, model_type='unigram',
      hard_vocab_limit=False, minloglevel=2, **ids)
  return prefix + '.model'


@pytest.fixture(scope='module')
def default_model(tmp_path_factory):
  """SentencePiece's default ids: unk 0, bos 1, eos 2, no pad."""
  return _train(str(tmp_path_factory.mktemp('spm')), 'default')


@pytest.fixture(scope='module')
def padded_model(tmp_path_factory):
  return _train(str(tmp_path_factory.mktemp('spm')), 'padded', pad_id=0,
                unk_id=1, bos_id=2, eos_id=3)


def test_default_model_shifts_ids_to_free_pad_zero(default_model):
  tok = SentencePieceTokenizer(default_model, max_len=64)
  sp = sentencepiece.SentencePieceProcessor(model_file=default_model)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.vocab_size == sp.vocab_size() + 1
  ids = tok.encode(CAPTIONS[0])
  pieces = sp.encode(CAPTIONS[0], out_type=int)
  assert ids.dtype == np.int32 and ids.shape == (64,)
  np.testing.assert_array_equal(ids[:len(pieces) + 2],
                                [2] + [p + 1 for p in pieces] + [3])
  assert np.all(ids[len(pieces) + 2:] == 0)
  assert tok.decode(ids) == CAPTIONS[0]
  batch = tok.encode_batch(CAPTIONS)
  assert batch.shape == (4, 64)
  assert [tok.decode(row) for row in batch] == CAPTIONS
  assert batch.max() < tok.vocab_size


def test_model_with_pad_keeps_ids(padded_model):
  tok = SentencePieceTokenizer(padded_model, max_len=24, add_bos=False)
  sp = sentencepiece.SentencePieceProcessor(model_file=padded_model)
  assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 3, sp.vocab_size())
  pieces = sp.encode(CAPTIONS[1], out_type=int)
  ids = tok.encode(CAPTIONS[1])
  np.testing.assert_array_equal(ids[:len(pieces) + 1], pieces + [3])
  assert tok.decode(ids) == CAPTIONS[1]


def test_truncation_keeps_eos(default_model):
  tok = SentencePieceTokenizer(default_model, max_len=5)
  ids = tok.encode(CAPTIONS[2])
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode(ids) == tok._sp.decode(  # pylint: disable=protected-access
      [i - 1 for i in ids[1:4]])


def test_text_encoder_consumes_tokenizer_ids(default_model):
  tok = SentencePieceTokenizer(default_model, max_len=24)
  enc = build_encoder('text', 'mu', width=32, num_heads=2,
                      vocab_size=tok.vocab_size, max_len=tok.max_len,
                      pad_id=tok.pad_id, eos_id=tok.eos_id)
  tokens = tok.encode_batch(CAPTIONS[:2])
  shapes = jax.eval_shape(enc.init, jax.random.key(0), tokens)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda s: 0.2 * rng.standard_normal(s.shape).astype(np.float32), shapes)
  # The ids are a closed-over NumPy constant, so they stay concrete (and
  # range-checked) inside the one compiled call.
  feats = jax.jit(lambda v: enc.apply(v, tokens))(variables)
  assert feats.shape == (2, 32) and np.all(np.isfinite(feats))


def test_bad_inputs(default_model, tmp_path):
  with pytest.raises(ValueError, match='no SentencePiece model file'):
    SentencePieceTokenizer(str(tmp_path / 'missing.model'), max_len=8)
  with pytest.raises(ValueError, match='max_len must be >= 3'):
    SentencePieceTokenizer(default_model, max_len=2)
  no_eos = _train(str(tmp_path), 'noeos', eos_id=-1)
  with pytest.raises(ValueError, match='no eos piece'):
    SentencePieceTokenizer(no_eos, max_len=8)
  tok = SentencePieceTokenizer(default_model, max_len=8)
  with pytest.raises(TypeError, match='takes str'):
    tok.encode(b'bytes')
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tok.decode([2, tok.vocab_size, 3])


def test_sentencepiece_from_the_data_config(default_model, mesh8):
  """data.tokenizer='sentencepiece:PATH' tokenises the world's captions with the model;
  a text encoder whose ids do not match is an error naming the fields."""
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(
      os.path.join(os.path.dirname(__file__), 'configs', 'tiny.py'))
  config.data.tokenizer = f'sentencepiece:{default_model}'
  with pytest.raises(ValueError, match=r"model.encoders.text does not match data.tokenizer="
                     r".*vocab_size=259 \(the tokenizer's is \d+\).*eos_id=2 \(the "
                     r"tokenizer's is 3\)"):
    experiment.check_config(config, mesh8)
  tok = SentencePieceTokenizer(default_model, max_len=config.data.text_max_len)
  config.model.encoders.text.vocab_size = tok.vocab_size
  config.model.encoders.text.eos_id = tok.eos_id
  experiment.check_config(config, mesh8)
  featurize = experiment.make_featurize(config)
  source = pipeline.make_source(config.data, 'train')
  row = featurize((0, source[0]))
  np.testing.assert_array_equal(row['text'], tok.encode(source[0]['text']))
  config.data.tokenizer = 'bpe'
  with pytest.raises(ValueError, match=r"data.tokenizer='bpe': expected 'byte' or "
                     r"'sentencepiece:PATH'"):
    experiment.check_config(config, mesh8)
