"""Small heads on top of an encoder's pooled features [batch, features]."""

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _dense(features: int, names: tuple[str, str], dtype: str, param_dtype: str, name: str,
           kernel_init=nn.initializers.lecun_normal()) -> nn.Dense:
  return nn.Dense(features, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                  kernel_init=nn.with_logical_partitioning(kernel_init, names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]), name=name)


class ProjectionHead(nn.Module):
  """SimCLR's projection MLP g(h): (num_layers - 1) x [Linear -> ReLU], then Linear to out_dim.

  No normalisation: SimCLR v2 puts BatchNorm after each hidden Linear, but batch statistics would make the loss
  depend on how the batch is split over devices and add a mutable collection to the training loop; v1's plain
  Linear-ReLU-Linear (the form written in the SimCLR paper, eq. 2) reaches comparable quality at the small scale
  this codebase targets. num_layers=1 is a single Linear.
  """
  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.num_layers < 1:
      raise ValueError(f'num_layers={self.num_layers}; a projection head needs at least one Linear.')
    for i in range(self.num_layers - 1):
      x = nn.relu(_dense(self.hidden_dim, ('embed', 'mlp'), self.dtype, self.param_dtype, f'hidden_{i}')(x))
    in_name = 'mlp' if self.num_layers > 1 else 'embed'
    x = _dense(self.out_dim, (in_name, 'projection'), self.dtype, self.param_dtype, 'output')(x)
    return x.astype(jnp.float32)


class LinearClassifier(nn.Module):
  """features -> float32 logits [batch, num_classes]. Zero-initialised (as big_vision's heads): the first logits
  are uniform, the loss starts at log(num_classes), and a linear probe's convex problem needs no random start."""
  num_classes: int
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _dense(self.num_classes, ('embed', 'classes'), self.dtype, self.param_dtype, 'classifier',
                  kernel_init=nn.initializers.zeros)(x).astype(jnp.float32)
