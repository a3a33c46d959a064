"""mmjax.align: alignment losses, pure functions of arrays.

Contrastive (CLIP softmax, SigLIP sigmoid) losses between pairs of modalities
and the Gramian volume (GRAM) of all modalities at once, with GRAM's
volume-guided hard negatives for a matching objective. With `axis_name`
(inside `jax.shard_map`), negatives come from the global batch and every device
returns the same global loss; see `mmjax.align.contrastive` for the gradient
convention.
"""

from mmjax.align.contrastive import CLIP_INIT_LOGIT_SCALE
from mmjax.align.contrastive import clip_loss
from mmjax.align.contrastive import MAX_LOGIT_SCALE
from mmjax.align.contrastive import pairwise_loss
from mmjax.align.contrastive import SIGLIP_INIT_LOGIT_BIAS
from mmjax.align.contrastive import SIGLIP_INIT_LOGIT_SCALE
from mmjax.align.contrastive import siglip_init
from mmjax.align.contrastive import siglip_loss
from mmjax.align.contrastive import siglip_loss_all_gather
from mmjax.align.gram import gram_loss
from mmjax.align.gram import gram_loss_all_gather
from mmjax.align.gram import gram_volume
from mmjax.align.matching import matching_loss
from mmjax.align.matching import matching_negatives
from mmjax.align.matching import sample_excluding

__all__ = [
    "CLIP_INIT_LOGIT_SCALE",
    "MAX_LOGIT_SCALE",
    "SIGLIP_INIT_LOGIT_BIAS",
    "SIGLIP_INIT_LOGIT_SCALE",
    "clip_loss",
    "gram_loss",
    "gram_loss_all_gather",
    "gram_volume",
    "matching_loss",
    "matching_negatives",
    "pairwise_loss",
    "sample_excluding",
    "siglip_init",
    "siglip_loss",
    "siglip_loss_all_gather",
]
