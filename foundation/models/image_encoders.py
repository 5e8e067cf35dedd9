"""Image encoders by name, so configs choose one with a string: `model.encoder = 'cnn'` plus its config fields."""

from typing import Any, Mapping

import flax.linen as nn

from foundation.models.cnn import CNN, CNNConfig
from foundation.models.heads import LinearClassifier
from foundation.models.vit import ViT, ViTConfig

IMAGE_ENCODERS = {'vit': (ViT, ViTConfig), 'cnn': (CNN, CNNConfig)}


def encoder_config(kind: str, fields: Mapping[str, Any]) -> CNNConfig | ViTConfig:
  if kind not in IMAGE_ENCODERS:
    raise ValueError(f'image encoder {kind!r}; choose one of {sorted(IMAGE_ENCODERS)}.')
  return IMAGE_ENCODERS[kind][1].from_dict(fields)


def image_encoder(kind: str, fields: Mapping[str, Any]) -> nn.Module:
  """images float [B, H, W, C] -> float32 features [B, D]."""
  return IMAGE_ENCODERS[kind][0](encoder_config(kind, fields))


class EncoderWithHead(nn.Module):
  """An image encoder ('backbone') with a head on its features (a projection MLP, a classifier). `features` skips
  the head: it is what probes measure and what later runs restore as 'params/backbone'."""
  encoder: str
  encoder_fields: tuple  # sorted (name, value) pairs: module attributes must be hashable
  head: nn.Module

  def setup(self):
    self.backbone = image_encoder(self.encoder, dict(self.encoder_fields))

  def features(self, x):
    return self.backbone(x)

  def __call__(self, x):
    return self.head(self.backbone(x))


def classifier(kind: str, fields: Mapping[str, Any], num_classes: int) -> EncoderWithHead:
  """An image classifier: encoder `kind` with config `fields`, then a linear head (params 'backbone', 'head')."""
  return EncoderWithHead(kind, tuple(sorted(dict(fields).items())), LinearClassifier(num_classes))
