"""A small ResNet encoder for small images (28x28 Fashion-MNIST and the like; any size works).

conv stem (3x3, stride 1) -> stages of basic residual blocks (two 3x3 convs; the first block of every stage but the
first halves the resolution with stride 2 and a 1x1 projection shortcut) -> average pool over a pool_grid x pool_grid
grid of cells, flattened -> [batch, widths[-1] * pool_grid**2]. pool_grid=1 is the usual global average pool;
pool_grid=2 keeps where in the image a feature fired (top/bottom, left/right), which matters for centred, aligned
images such as Fashion-MNIST's (see configs/contrastive/simclr_fashion_mnist.py).

Normalisation never uses batch statistics (GroupNorm, per-pixel LayerNorm, or none): the model is a pure function
of its params and one example, so there is no mutable 'batch_stats' collection, no train/eval switch, and no
cross-device reduction -- the generic training loop and any sharding of the batch work unchanged.
"""

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from foundation.models import config_from_dict

Array = jax.Array

CONV_AXES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')
MAX_GROUPS = 32  # GroupNorm's default from Wu & He (2018), reduced where a width has fewer channels


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  widths: tuple[int, ...] = (32, 64, 128)  # channels per stage; every stage after the first halves H and W
  blocks_per_stage: int = 1
  stem_stride: int = 1  # 2 halves the resolution at once: the full-resolution first stage dominates the cost
  pool_grid: int = 1  # features = average over each cell of a pool_grid x pool_grid grid, concatenated
  norm: str = 'group'  # 'group' (GroupNorm, gcd(32, width) groups) | 'layer' (LayerNorm over channels) | 'none'
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    object.__setattr__(self, 'widths', tuple(int(w) for w in self.widths))  # lists from a ConfigDict: hashable
    if self.pool_grid < 1:
      raise ValueError(f'pool_grid={self.pool_grid}; it must be >= 1 (1 = global average pool).')
    if not self.widths or self.blocks_per_stage < 1:
      raise ValueError(f'widths={self.widths}, blocks_per_stage={self.blocks_per_stage}: need at least one of each.')
    if self.norm not in ('group', 'layer', 'none'):
      raise ValueError(f"norm={self.norm!r}; expected 'group', 'layer' or 'none'.")
    for name in ('dtype', 'param_dtype'):
      jnp.dtype(getattr(self, name))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'CNNConfig':
    return config_from_dict(cls, d)


class _Norm(nn.Module):
  config: CNNConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    kwargs = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))
    if cfg.norm == 'group':
      return nn.GroupNorm(num_groups=math.gcd(MAX_GROUPS, x.shape[-1]), **kwargs)(x)
    if cfg.norm == 'layer':
      return nn.LayerNorm(**kwargs)(x)  # per pixel, over channels (as in ConvNeXt)
    return x


def _conv(cfg: CNNConfig, features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding='SAME',
                 use_bias=cfg.norm == 'none',  # a norm's own bias makes a conv bias redundant
                 dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                 kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)), name=name)


class ResidualBlock(nn.Module):
  config: CNNConfig
  features: int
  stride: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _Norm(cfg, name='shortcut_norm')(_conv(cfg, self.features, 1, self.stride, 'shortcut')(x))
    y = nn.relu(_Norm(cfg, name='norm1')(_conv(cfg, self.features, 3, self.stride, 'conv1')(x)))
    y = _Norm(cfg, name='norm2')(_conv(cfg, self.features, 3, 1, 'conv2')(y))
    return nn.relu(shortcut + y)


class CNN(nn.Module):
  config: CNNConfig

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images float [batch, H, W, C] -> float32 features [batch, widths[-1] * pool_grid**2]."""
    cfg = self.config
    x = images.astype(jnp.dtype(cfg.dtype))
    x = nn.relu(_Norm(cfg, name='stem_norm')(_conv(cfg, cfg.widths[0], 3, cfg.stem_stride, 'stem')(x)))
    for stage, width in enumerate(cfg.widths):
      for i in range(cfg.blocks_per_stage):
        stride = 2 if stage > 0 and i == 0 else 1
        x = ResidualBlock(cfg, width, stride, name=f'stage{stage}_block{i}')(x)
    return grid_average_pool(x.astype(jnp.float32), cfg.pool_grid)


def grid_average_pool(x: Array, grid: int) -> Array:
  """[B, H, W, C] -> [B, grid * grid * C]: the mean of each cell of a grid x grid partition (rows, then columns).

  Cell i spans rows floor(i H / grid) to ceil((i + 1) H / grid), so cells of a map that grid does not divide
  overlap by one row or column rather than dropping any; grid=1 is the global average pool.
  """
  height, width = x.shape[1:3]
  if grid > min(height, width):
    raise ValueError(f'pool_grid={grid} is finer than the final {height}x{width} feature map; use at most '
                     f'{min(height, width)}.')
  bounds = lambda size: [(i * size // grid, -(-(i + 1) * size // grid)) for i in range(grid)]
  cells = [jnp.mean(x[:, r0:r1, c0:c1], axis=(1, 2)) for r0, r1 in bounds(height) for c0, c1 in bounds(width)]
  return jnp.concatenate(cells, axis=-1)
