"""CLIP image <-> caption on COCO 2017 captions (`mmjax_coco_captions`, docs/data.md,
"Real datasets"), with COCO's retrieval protocol: every one of an image's captions
takes part (image->text is a hit when any of them ranks in the top k; text->image has
one query per caption).

  python -m mmjax.data.prepare coco_captions --config=captions --manual_dir=RAW \\
      --data_dir=DIR   # once; RAW holds annotations/, train2017/, val2017/
  python -m mmjax.main --config=configs/coco_clip.py --workdir=runs/coco_clip \\
      --config.data.data_dir=DIR
  python -m mmjax.main --config=configs/coco_clip.py:runlocal --workdir=/tmp/coco \\
      --config.data.data_dir=DIR

Splits: train2017 trains, val2017 is the test split (COCO's 5k images in the full
dataset). Training images are CLIP's random resized crop (50-100% of the area) with a
horizontal flip; every image is normalised with CLIP's mean and std ('clip'), the
input a pretrained CLIP tower expects. The towers here are micro ones trained from
scratch, sized for a CPU: on a subset of a few dozen images the run checks the path
end to end (R@k near chance is what it should show); a run from a pretrained
checkpoint replaces `model.encoders` and `data.image_size`.
"""

import ml_collections

from mmjax import config_lib

NAME = "mmjax_coco_captions/captions:1.0.0"


def get_config(arg=None):
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"unknown config variant {arg!r}; valid: 'runlocal'")
  c = config_lib.base_config()
  c.name = "coco_clip"
  c.total_steps = 60
  c.batch_size = 32
  c.log_every_steps = 10
  c.checkpoint_every_steps = 60
  c.eval_every_steps = 30
  c.data = config_lib.tfds_data(
      NAME, {"image": "image", "text": "captions"},
      splits={"train": "train", "validation": "validation", "test": "validation"},
      image_size=64, image_norm="clip", image_augment=True, crop_scale=(0.5, 1.0),
      text_max_len=80)
  c.model.embed_dim = 128
  c.model.encoders = ml_collections.ConfigDict({
      "image": config_lib.encoder("vit", "mu", patch_size=8, stem="conv", width=128,
                                  depth=2),
      "text": config_lib.encoder("text", "mu", width=128, depth=2, max_len=80),
  })
  c.model.encoders.unlock()
  c.objective.kind = "clip"
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 10
  c.evals.retrieval = config_lib.evaluator_config("retrieval", all_captions=True,
                                                  batch_size=64)
  if arg == "runlocal":
    c.total_steps = 4
    c.batch_size = 8
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.eval_every_steps = 4
    c.data.image_size = 16
    c.data.num_threads = 1
    c.optimizer.warmup_steps = 1
    c.model.embed_dim = 16
    c.model.encoders.image = config_lib.encoder("vit", "mu", patch_size=8, width=16,
                                                depth=0)
    c.model.encoders.text = config_lib.encoder("text", "mu", width=16, depth=0,
                                               max_len=80)
    c.evals.retrieval.ks = (1,)
    c.evals.retrieval.plot_max_k = 0
    c.evals.retrieval.batch_size = 8
  return c
