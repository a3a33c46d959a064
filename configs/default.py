"""CLIP-style image <-> text alignment on the procedural world (the Quickstart run).

  python -m mmjax.main --config=configs/default.py --workdir=runs/default
  python -m mmjax.main --config=configs/default.py:runlocal --workdir=/tmp/tiny
"""

from mmjax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.name = "default"
  c.total_steps = 1500
  c.batch_size = 256
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 500
  c.data.modalities = ("image", "text")
  c.model.embed_dim = 128
  c.model.encoders.image = config_lib.encoder("vit", "mu", patch_size=8, width=128, depth=2)
  c.model.encoders.text = config_lib.encoder("text", "mu", width=128, depth=2, max_len=72)
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  if arg == "runlocal":     # seconds, for tests and a first look
    c.total_steps = 20
    c.batch_size = 32
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    c.eval_every_steps = 10
    c.data.sizes.test = 64
    c.evals.retrieval.batch_size = 32
  return c
