"""A Vision Transformer built from the decoder's own `transformer.Block`, run bidirectionally (`causal=False`).

Images [batch, height, width, channels] are cut into non-overlapping patches in raster order (row by row, left to
right), each flattened as (row in patch, column in patch, channel) -- the layout of a stride-`patch_size` conv kernel
[p, p, C, D] reshaped to [p*p*C, D] -- and projected to `embed_dim`. Positions are learned embeddings added to the
tokens; the blocks get position 0 everywhere, and rotary embedding at position 0 is the identity, so RoPE is off
(1-D rotary positions over a raster scan would be a poor fit for a 2-D grid anyway). The blocks therefore differ from
the original ViT in using RMSNorm and SwiGLU (Llama's choices) instead of LayerNorm and a GELU MLP.

Visual prompt tuning (Jia et al. 2022) passes `prompts`: P extra tokens placed after the class token (first when
pool='mean') and before the patches, without position embeddings. Shallow ([P, embed_dim]): inserted at the input
and carried through every layer like the other tokens. Deep ([num_layers, P, embed_dim]): layer i's input has its P
prompt tokens replaced by prompts[i], so each layer gets its own. Pooling ignores them: the class token, or the mean
over the patch tokens.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from foundation.models import config_from_dict
from foundation.models.transformer import RMSNorm, TransformerConfig, run_blocks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int | tuple[int, int]  # (height, width), or one int for square images
  patch_size: int
  num_channels: int
  embed_dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int  # SwiGLU hidden width
  pool: str = 'cls'  # 'cls': a learned token prepended to the patches | 'mean': average over the patch tokens
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  scan_layers: bool = False
  init_std: float = 0.02

  def __post_init__(self):
    height, width = self.image_hw
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size {self.patch_size}.')
    if self.pool not in ('cls', 'mean'):
      raise ValueError(f"pool={self.pool!r}; expected 'cls' or 'mean'.")
    _ = self.block_config  # validates heads, dtypes and remat now rather than at the first trace

  @property
  def image_hw(self) -> tuple[int, int]:
    size = self.image_size
    return (size, size) if isinstance(size, int) else tuple(size)

  @property
  def num_patches(self) -> int:
    height, width = self.image_hw
    return (height // self.patch_size) * (width // self.patch_size)

  @property
  def num_tokens(self) -> int:
    return self.num_patches + (self.pool == 'cls')

  @property
  def block_config(self) -> TransformerConfig:
    """The TransformerConfig the shared blocks read; vocab_size and max_len are unused by a non-decoding Block."""
    return TransformerConfig(vocab_size=1, num_layers=self.num_layers, embed_dim=self.embed_dim,
                             num_heads=self.num_heads, num_kv_heads=self.num_heads, mlp_dim=self.mlp_dim,
                             max_len=self.num_tokens, causal=False, dtype=self.dtype, param_dtype=self.param_dtype,
                             scan_layers=self.scan_layers, remat=self.remat, init_std=self.init_std)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ViTConfig':
    return config_from_dict(cls, d)


def patchify(images: Array, patch_size: int) -> Array:
  """[batch, H, W, C] -> [batch, (H/p) * (W/p), p * p * C]: raster order, each patch flattened as (row, col, channel)."""
  batch, height, width, channels = images.shape
  p = patch_size
  x = images.reshape(batch, height // p, p, width // p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [batch, rows, cols, p, p, C]
  return x.reshape(batch, (height // p) * (width // p), p * p * channels)


class ViT(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, images: Array, *, return_tokens: bool = False, prompts: Array | None = None) -> Array:
    """images float [batch, H, W, C] -> float32 pooled features [batch, embed_dim] after the final norm.

    return_tokens: return every final-normed token instead, [batch, num_tokens, embed_dim] (the class token first
      when pool='cls'; prompt tokens left out).
    prompts: visual prompt tokens, [P, embed_dim] (shallow) or [num_layers, P, embed_dim] (deep); see the module
      docstring.
    """
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if images.shape[1:] != (*cfg.image_hw, cfg.num_channels):
      raise ValueError(f'images of shape {images.shape}; config expects [batch, {cfg.image_hw[0]}, '
                       f'{cfg.image_hw[1]}, {cfg.num_channels}].')
    patch_dim = cfg.patch_size**2 * cfg.num_channels
    kernel = self.param('patch_embedding', nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                        ('patch', 'embed')),
                        (patch_dim, cfg.embed_dim), pdtype)
    bias = self.param('patch_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                      (cfg.embed_dim,), pdtype)
    x = patchify(images.astype(dtype), cfg.patch_size) @ kernel.astype(dtype) + bias.astype(dtype)
    batch = x.shape[0]
    if cfg.pool == 'cls':
      cls = self.param('cls_token', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                       (cfg.embed_dim,), pdtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (batch, 1, cfg.embed_dim)), x], axis=1)
    position_embedding = self.param(
        'position_embedding', nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                           ('position', 'embed')),
        (cfg.num_tokens, cfg.embed_dim), pdtype)
    x = x + position_embedding.astype(dtype)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))

    start, before_layer = int(cfg.pool == 'cls'), None
    if prompts is not None:
      prompts = _check_prompts(prompts, cfg).astype(dtype)
      length = prompts.shape[-2]
      tokens = lambda layer: jnp.broadcast_to(prompts[layer] if prompts.ndim == 3 else prompts,
                                              (batch, length, cfg.embed_dim))
      x = jnp.concatenate([x[:, :start], tokens(0), x[:, start:]], axis=1)
      if prompts.ndim == 3:
        before_layer = lambda i, h: h.at[:, start:start + length].set(tokens(i))

    # Rotary position 0 rotates by angle 0 (the identity): the learned table above carries the positions.
    positions = jnp.zeros(x.shape[:2], jnp.int32)
    block_cfg = cfg.block_config
    x = run_blocks(block_cfg, x, positions, jnp.zeros((), jnp.int32), before_layer=before_layer)
    x = RMSNorm(block_cfg, name='final_norm')(x).astype(jnp.float32)
    if prompts is not None:
      x = jnp.concatenate([x[:, :start], x[:, start + prompts.shape[-2]:]], axis=1)
    if return_tokens:
      return x
    return x[:, 0] if cfg.pool == 'cls' else jnp.mean(x, axis=1)


def _check_prompts(prompts: Array, cfg: ViTConfig) -> Array:
  shallow = prompts.ndim == 2 and prompts.shape[1] == cfg.embed_dim
  deep = prompts.ndim == 3 and prompts.shape[0] == cfg.num_layers and prompts.shape[2] == cfg.embed_dim
  if not (shallow or deep):
    raise ValueError(f'prompts of shape {prompts.shape}; expected [P, {cfg.embed_dim}] (shallow) or '
                     f'[{cfg.num_layers}, P, {cfg.embed_dim}] (deep).')
  return prompts
