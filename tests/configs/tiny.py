"""A seconds-long config for CLI tests."""

from mmjax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.name = "tiny"
  c.total_steps = 20
  c.batch_size = 16
  c.log_every_steps = 1
  c.checkpoint_every_steps = 10
  c.eval_every_steps = 20
  c.data.sizes.train = 2000
  c.data.sizes.test = 32
  c.data.text_max_len = 56
  c.data.num_threads = 1
  c.evals.retrieval.batch_size = 16
  c.model.embed_dim = 32
  c.model.encoders.image = config_lib.encoder("vit", "mu", patch_size=8, width=32, depth=1,
                                             stem="conv")
  c.model.encoders.text = config_lib.encoder("text", "mu", width=32, depth=1, max_len=56)
  return c
