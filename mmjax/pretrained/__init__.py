"""Published checkpoints: reading them from local files into mmjax params, and back.

Nothing here downloads: every loader takes the path of a file the user already has
(docs/pretrained.md).

  params, report = pretrained.load_model(variables['params'], 'open_clip_model.safetensors')
  params, report = pretrained.load_encoder(vit_params, 'vit_base.npz', source='timm')
  pretrained.export_open_clip(params, 'finetuned.safetensors')
"""

from mmjax.pretrained.convert import CheckpointMismatchError
from mmjax.pretrained.formats import read_state_dict, write_safetensors
from mmjax.pretrained.loader import (SOURCES, LoadReport, detect_source, export_open_clip,
                                     load_encoder, load_from_config, load_model,
                                     read_checkpoint)
