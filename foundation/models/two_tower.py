"""Two towers for image-text contrastive pretraining (CLIP, SigLIP, LiT): an image encoder and a text encoder, each
projected linearly to a shared `embed_dim` (the image's features themselves without `image_head`, as in LiT) and
L2-normalised, plus the learnable logit scale (and SigLIP's bias).

Text is encoded by the decoder of `transformer.py` (`return_hidden=True`) and pooled at each sequence's last real
token, as CLIP pools at EOS. Padding must come after the real tokens (right padding). The text mask keeps the padding
out of every real token's state, so the text encoder may be causal (CLIP's choice) or bidirectional.

`logit_scale` is the log of the multiplier of the cosine similarities (= -log temperature): the losses take
scale = exp(logit_scale). Initial values follow the papers: CLIP log(1/0.07) (temperature 0.07); SigLIP log(10) and
bias -10, so that the many negatives start with a small loss.
"""

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from foundation.models import config_from_dict
from foundation.models.cnn import CNNConfig
from foundation.models.image_encoders import IMAGE_ENCODERS
from foundation.models.transformer import Transformer, TransformerConfig
from foundation.models.vit import ViTConfig

Array = jax.Array

INITIAL_LOGITS = {  # loss -> (logit_scale, logit_bias or None)
    'clip': (math.log(1 / 0.07), None),
    'siglip': (math.log(10.0), -10.0),
}


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
  image_encoder: str  # 'vit' | 'cnn'
  image: ViTConfig | CNNConfig
  text: TransformerConfig
  embed_dim: int  # the shared embedding space
  loss: str = 'clip'  # 'clip' | 'siglip': decides the initial logit scale and whether there is a bias
  # A linear projection of the image features to embed_dim. LiT's locked tower has none: its features are the
  # embedding space (embed_dim must be their size), and only the text side learns to reach them.
  image_head: bool = True

  def __post_init__(self):
    if self.image_encoder not in IMAGE_ENCODERS:
      raise ValueError(f'image_encoder={self.image_encoder!r}; expected one of {sorted(IMAGE_ENCODERS)}.')
    expected = IMAGE_ENCODERS[self.image_encoder][1]
    if not isinstance(self.image, expected):
      raise ValueError(f'image_encoder={self.image_encoder!r} needs a {expected.__name__}, got '
                       f'{type(self.image).__name__}.')
    if self.loss not in INITIAL_LOGITS:
      raise ValueError(f'loss={self.loss!r}; expected one of {sorted(INITIAL_LOGITS)}.')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'TwoTowerConfig':
    """From a dict or ConfigDict whose 'image' and 'text' are dicts of the encoders' config fields."""
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    if d.get('image_encoder') not in IMAGE_ENCODERS:
      raise ValueError(f"image_encoder={d.get('image_encoder')!r}; expected one of {sorted(IMAGE_ENCODERS)}.")
    d['image'] = IMAGE_ENCODERS[d['image_encoder']][1].from_dict(d.get('image', {}))
    d['text'] = TransformerConfig.from_dict(d.get('text', {}))
    return config_from_dict(cls, d)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def last_token(hidden: Array, mask: Array) -> Array:
  """hidden [batch, length, dim], mask [batch, length] (1 = real, right-padded) -> hidden at sum(mask) - 1."""
  index = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)  # an all-padding row reads position 0
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class TwoTower(nn.Module):
  config: TwoTowerConfig

  def setup(self):
    cfg = self.config
    self.image_encoder = IMAGE_ENCODERS[cfg.image_encoder][0](cfg.image)
    self.text_encoder = Transformer(cfg.text)
    projection = lambda: nn.Dense(cfg.embed_dim, use_bias=False, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ('embed', 'projection')))
    self.image_projection = projection() if cfg.image_head else None
    self.text_projection = projection()
    scale, bias = INITIAL_LOGITS[cfg.loss]
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(scale), (), jnp.float32)
    self.logit_bias = None if bias is None else self.param('logit_bias', nn.initializers.constant(bias), (),
                                                           jnp.float32)

  def encode_image(self, images: Array) -> Array:
    """images float [batch, H, W, C] -> unit-norm float32 [batch, embed_dim]."""
    features = self.image_encoder(images)
    return l2_normalize(features if self.image_projection is None else self.image_projection(features))

  def encode_text(self, text: Array, text_mask: Array) -> Array:
    """text int [batch, length] (right-padded), text_mask [batch, length] 1 for real tokens -> unit-norm float32
    [batch, embed_dim], read at each row's last real token."""
    hidden = self.text_encoder(text, return_hidden=True, mask=text_mask.astype(bool))
    return l2_normalize(self.text_projection(last_token(hidden, text_mask)))

  def __call__(self, images: Array, text: Array, text_mask: Array) -> tuple[Array, Array, Array, Array]:
    """-> (image_emb, text_emb, logit_scale, logit_bias); logit_bias is 0 (not a parameter) for CLIP."""
    bias = jnp.zeros((), jnp.float32) if self.logit_bias is None else self.logit_bias
    return self.encode_image(images), self.encode_text(text, text_mask), self.logit_scale, bias
