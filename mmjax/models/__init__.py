"""Encoders, projection heads and the `MultimodalModel` built from config."""

from mmjax.models.model import (ModelOutput, MultimodalModel, build, encoder_fields,
                                l2_normalize)
from mmjax.models.registry import ENCODERS, build_encoder
