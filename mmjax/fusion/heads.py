"""Task heads on top of a fused representation, and their losses.

`TaskHead(num_classes, kind)` maps [B, D] -> [B, num_classes]. With
`num_modalities=M` it instead maps [B, M, D] -> [B, M, num_classes] with an
independent set of weights per modality (one einsum over stacked kernels, no
Python loop); `late` fusion uses this to get one head per modality.

Kinds and what the outputs mean:
  classification  logits of a softmax over num_classes (targets int [B])
  multilabel      one sigmoid logit per label (targets {0,1} [B, num_classes])
  regression      predicted values (targets float [B, num_classes])
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array

TASK_KINDS = ("classification", "multilabel", "regression")


class StackedDense(nn.Module):
  """A separate dense layer per slot of axis 1: [B, S, D] -> [B, S, features].

  features=None keeps the input width D.
  """
  features: int | None
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal(
      in_axis=-2, out_axis=-1, batch_axis=(0,))

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _, slots, width = x.shape
    features = width if self.features is None else self.features
    kernel = self.param("kernel", self.kernel_init, (slots, width, features))
    bias = self.param("bias", nn.initializers.zeros, (slots, features))
    return jnp.einsum("bsd,sdf->bsf", x, kernel.astype(x.dtype)) + bias.astype(x.dtype)


class TaskHead(nn.Module):
  """Linear (or one-hidden-layer) task head.

  Attributes:
    num_classes: number of outputs (classes, labels or regression targets).
    kind: 'classification' | 'multilabel' | 'regression' (see module doc).
    hidden_dim: None for a linear head, else the width of one GELU layer.
    dropout_rate: dropout before the output layer (training only).
    num_modalities: None: input [B, D]. M: input [B, M, D] and one independent
      head per modality (output [B, M, num_classes]).
  """
  num_classes: int
  kind: str = "classification"
  hidden_dim: int | None = None
  dropout_rate: float = 0.0
  num_modalities: int | None = None

  def __post_init__(self):
    if self.kind not in TASK_KINDS:
      raise ValueError(f"TaskHead kind must be one of {TASK_KINDS}, got {self.kind!r}")
    if self.num_classes < 1:
      raise ValueError(f"TaskHead num_classes must be >= 1, got {self.num_classes}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"TaskHead dropout_rate must be in [0, 1), got {self.dropout_rate}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [B, D] (or [B, M, D] with num_modalities=M) -> [..., num_classes]."""
    if self.num_modalities is None:
      if x.ndim != 2:
        raise ValueError(f"TaskHead expects [B, D] input, got shape {x.shape}")
      dense = lambda n, name: nn.Dense(n, name=name)
    else:
      if x.ndim != 3 or x.shape[1] != self.num_modalities:
        raise ValueError(f"per-modality TaskHead expects [B, {self.num_modalities}, D] "
                         f"input, got shape {x.shape}")
      dense = lambda n, name: StackedDense(n, name=name)
    if self.hidden_dim is not None:
      x = nn.gelu(dense(self.hidden_dim, "hidden")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return dense(self.num_classes, "out")(x)


def task_loss(outputs: Array, targets: Array, kind: str = "classification") -> Array:
  """Mean task loss of head outputs.

  Args:
    outputs: [B, C] head outputs (logits for classification/multilabel).
    targets: int [B] labels (classification), {0,1} [B, C] (multilabel) or
      float [B, C] (regression).
    kind: the head kind.

  Returns:
    Scalar: softmax cross-entropy, mean sigmoid binary cross-entropy over labels,
    or mean squared error.
  """
  if kind not in TASK_KINDS:
    raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
  if outputs.ndim != 2:
    raise ValueError(f"outputs must be [B, C], got shape {outputs.shape}")
  if kind == "classification":
    if targets.shape != outputs.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
      raise ValueError(f"classification targets must be int [{outputs.shape[0]}], got "
                       f"{targets.dtype} {targets.shape}")
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean()
  if targets.shape != outputs.shape:
    raise ValueError(f"{kind} targets must have the outputs' shape {outputs.shape}, "
                     f"got {targets.shape}")
  targets = targets.astype(outputs.dtype)
  if kind == "multilabel":
    return optax.sigmoid_binary_cross_entropy(outputs, targets).mean()
  return jnp.mean((outputs - targets) ** 2)
