"""CoMM (Dufumier et al., ICLR 2025): contrastive multimodal learning of the *fused*
representation, so that it can hold what the modalities share, what one of them holds
alone and what only their combination determines.

Two augmented views of each multimodal example are fused, each into one vector, and
the two fused vectors are aligned by InfoNCE against the other examples of the batch.
Cross-modal alignment (CLIP, pairwise, GRAM) only rewards what the modalities share;
a fused view's partner is the same example seen again, so any factor that survives the
augmentations is worth keeping, whichever modality carries it.

The views. A batch for CoMM is made of consecutive pairs, rows (2j, 2j + 1) two views
of one example: in the procedural world, two renderings of the same latent factors
with fresh nuisance (noise, jitter, background, pitch drift, ...), which
`data.group_batches = {size: 2, share: every factor}` gives (`check_views`). CoMM's
terms that align each modality's fused view alone with the full one are drawn
stochastically: with `model.fusion.modality_dropout`, a view's fusion sees a random
non-empty subset of its modalities (docs/balance.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.align import contrastive


def l2_normalize(x, eps: float = 1e-6):
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def comm_loss(joint, *, logit_scale, label_smoothing: float = 0.0, axis_name=None):
  """InfoNCE between the two fused views of each example.

  Args:
    joint: [b, D] fused representations, rows (2j, 2j + 1) the two views of example j
      (b even: the local block).
    logit_scale: 1 / temperature.
    label_smoothing: as `contrastive.clip_loss`.
    axis_name: the data-parallel axis; negatives come from every device.

  Returns:
    (loss, metrics), `contrastive.clip_loss` of (first views, second views) on the
    unit-normalised representations: each view against the other views of the
    global batch, both directions.
  """
  b = joint.shape[0]
  if joint.ndim != 2 or b % 2:
    raise ValueError(f"comm_loss: joint must be [b, D] with b even (pairs of views), got "
                     f"{joint.shape}")
  z = l2_normalize(joint.astype(jnp.float32)).reshape(b // 2, 2, -1)
  return contrastive.clip_loss(z[:, 0], z[:, 1], logit_scale=logit_scale,
                               label_smoothing=label_smoothing, axis_name=axis_name)


def check_views(data_config, factor_names) -> None:
  """CoMM needs its augmented views configured: pairs of world renderings that share
  every latent factor (`data.group_batches`). Raises, saying what to set."""
  groups = data_config.get("group_batches")
  size = 0 if groups is None else int(groups.size)
  share = () if groups is None else tuple(groups.share)
  if data_config.kind != "world" or size != 2 or set(share) != set(factor_names):
    raise ValueError(
        "objective 'comm' aligns two augmented views of each example, and none are "
        f"configured (data.kind={data_config.kind!r}, data.group_batches.size={size}, "
        f"share={share}): with the procedural world set data.group_batches.size = 2 and "
        f"data.group_batches.share = {tuple(factor_names)}, so that each pair of rows "
        "renders the same latent factors with fresh nuisance")


def check_config(config, factor_names) -> None:
  """For objective 'comm': a fusion module (its `joint` is the fused representation)
  and the augmented views (`check_views`)."""
  if "comm" not in str(config.objective.kind).split("+"):
    return
  if config.model.get("fusion") is None:
    raise ValueError("objective 'comm' aligns fused representations: set model.fusion "
                     "(e.g. {'kind': 'concat', 'hidden_dim': 128})")
  check_views(config.data, factor_names)


def mean_positive_similarity(joint) -> jax.Array:
  z = l2_normalize(joint.astype(jnp.float32))
  return jnp.mean(jnp.sum(z[0::2] * z[1::2], -1))
