"""LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"): a
pretrained image tower locked, a text tower trained to match it, on COCO captions
(`mmjax_coco_captions`, docs/data.md, "Real datasets") with COCO's retrieval protocol.

The image tower is CLIP's ViT-B/16 (`clip_vit_b16`) read from an open_clip or OpenAI
checkpoint file you already have (docs/pretrained.md): its tower and its projection
(`visual.proj`, the model's image head) are loaded and frozen, so they carry no optimizer
state and stay bit for bit as loaded. The text tower is CLIP's text-B architecture
(`clip_text_b`) trained from its initialisation, with CLIP's BPE tokenizer read from its
merges file (`bpe_simple_vocab_16e6.txt.gz`, shipped with open_clip). Images get CLIP's
own preprocessing (`data.image_preset='clip'`); data, objective and the COCO evaluator
are configs/coco_clip.py's. LiT's "Lu" setting: locked, from a
pretrained image model; the text side and the temperature learn.

  python -m mmjax.data.prepare coco_captions --config=captions --manual_dir=RAW \\
      --data_dir=DIR   # once
  python -m mmjax.main --config=configs/lit.py --workdir=runs/lit \\
      --config.data.data_dir=DIR --config.init_from.path=ViT-B-16.safetensors \\
      --config.data.tokenizer=clip_bpe:bpe_simple_vocab_16e6.txt.gz

The run prints what it loaded and what it left at initialisation (the text tower, the
text head). `init_from.towers` loads only the image tower: a checkpoint's text tower is
not read, as LiT starts the text side afresh (to fine-tune both towers from CLIP
instead, set `towers` to {'image': 'image', 'text': 'text'} and `optimizer.rules` to ()). With an
ImageNet classifier as the image tower (timm's ViT-B/16: `timm_vit_b16`, no projection),
the image head is new: unlock it with `optimizer.rules = (('towers_image', 'frozen'),)`.

`:runlocal` is a seconds-long run with micro towers and no checkpoint (the image tower
is locked at its random initialisation), to check the path.
"""

import os

import ml_collections

from mmjax import config_lib

LOCKED = (("towers_image", "frozen"), ("heads_image", "frozen"))


def _coco_clip(arg):
  return config_lib.load_config_module(os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "coco_clip.py")).get_config(arg)


def get_config(arg=None):
  """configs/coco_clip.py's data, objective and evaluator (its `:runlocal` too), with
  the published towers, CLIP's preprocessing and the locking rules."""
  c = _coco_clip(arg)
  c.name = "lit"
  c.optimizer.rules = LOCKED
  c.init_from.towers = ml_collections.ConfigDict({"image": "image"})
  c.init_from.scalars = False     # the temperature learns with the text side
  if arg == "runlocal":
    c.model.encoders.image.depth = 1    # a locked block, not only the patch embedding
    return c
  c.total_steps = 5000
  c.batch_size = 256
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.eval_every_steps = 1000
  c.data.image_preset = "clip"    # CLIP's own resize and centre crop, mean and std
  c.data.image_norm = "none"
  c.data.image_augment = False
  c.data.image_size = 224
  c.data.text_max_len = 77
  c.model.embed_dim = 512
  c.model.encoders = ml_collections.ConfigDict({
      "image": config_lib.encoder("vit", "clip_vit_b16"),
      "text": config_lib.encoder("text", "clip_text_b"),
  })
  c.model.encoders.unlock()
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 1e-4
  c.evals.retrieval.batch_size = 256
  return c
