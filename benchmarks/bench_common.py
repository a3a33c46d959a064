"""What the training benchmarks share: a config from `configs/` with dotted-field
overrides, a line naming the machine's load before each measured part, and the CLIP
ViT-B/16 + text-B model of the scaling benchmarks (`bench_fsdp.py`, `bench_mfu.py`)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=None, **fields):
  """`configs/<name>.py:<arg>` with `fields` ({'data.data_dir': ...}) set; a field
  the config lacks is an error (the config is locked)."""
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), arg)
  config.update_from_flattened_dict(fields)
  return config


def note_load(part):
  """Prints the load average before `part` (flagging a busy machine); returns the
  1-minute figure, for the tables."""
  load1, load5, _ = os.getloadavg()
  flag = "  (busy machine: re-measure alone)" if load1 > 1.5 else ""
  print(f"\n== {part}: load average {load1:.2f} (1 min), {load5:.2f} (5 min){flag}",
        flush=True)
  return round(load1, 2)


def b16_config(**encoder_fields):
  """The base config with CLIP ViT-B/16 + CLIP text-B towers, embed 512; `encoder_fields`
  (e.g. `dtype='bfloat16'`, `remat=True`) are set on both towers."""
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.embed_dim = 512
  c.model.encoders.image = config_lib.encoder("vit", "clip_vit_b16", **encoder_fields)
  c.model.encoders.text = config_lib.encoder("text", "clip_text_b", **encoder_fields)
  return c


def b16_batch(size, image_size=224, text_len=77):
  """Shape structs of a B/16 batch of `size` rows: images, token ids, presence masks."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return {"image": jax.ShapeDtypeStruct((size, image_size, image_size, 3), jnp.float32),
          "text": jax.ShapeDtypeStruct((size, text_len), jnp.int32),
          "mask": {m: jax.ShapeDtypeStruct((size,), jnp.bool_) for m in ("image", "text")}}
