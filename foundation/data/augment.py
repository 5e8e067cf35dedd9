"""Image augmentations on the accelerator, inside the jitted train step: pure jax, one PRNG key per example.

Key each example by its global position in the training stream (images.py's batch['index']):

  keys = example_keys(rng, batch['index'])   # = vmap(lambda i: jax.random.fold_in(rng, i))(index)
  views = augment(batch['image'], keys, out_size=24)

so an example's augmentation depends only on (rng, its position), not on the batch it sits in or how that batch is
sharded. For two views, fold a view number into rng first (`jax.random.fold_in(rng, view)`).

Per example, in this order (SimCLR / torchvision conventions; jitter ops in a fixed order rather than a random one):
random resized crop (area fraction ~ U(crop_scale), log aspect ratio ~ U(log crop_ratio), box clipped to the image,
bilinear resize with antialiasing when shrinking), horizontal flip with probability 1/2, brightness x*b and contrast
c*x + (1-c)*mean(gray(x)) with factors ~ U(1-s, 1+s) (clipped to [0, 1] after each, like torchvision), saturation and
random grayscale (3-channel images only), Gaussian blur with probability blur_prob (separable, sigma ~ U(blur_sigma)
pixels, odd kernel ~10% of the side, reflected edges), additive Gaussian noise, clip to [0, 1].
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL and torchvision convert RGB to grayscale


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]; float images are taken to be in [0, 1] already."""
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def example_keys(rng: jax.Array, index: jax.Array) -> jax.Array:
  """One key per example from its global position: results do not depend on batch composition or sharding."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def grayscale(image: jax.Array) -> jax.Array:
  """[H, W, C] -> [H, W, 1]: luma for RGB, the image itself for one channel."""
  if image.shape[-1] == 1:
    return image
  if image.shape[-1] != 3:
    raise ValueError(f'grayscale needs 1 or 3 channels, got {image.shape[-1]}.')
  return jnp.tensordot(image, jnp.asarray(_LUMA, image.dtype), axes=[[-1], [0]])[..., None]


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blend with the mean gray level of the whole image (torchvision's adjust_contrast)."""
  mean = jnp.mean(grayscale(image))
  return jnp.clip(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(factor * image + (1.0 - factor) * grayscale(image), 0.0, 1.0)


def blur_kernel_size(side: int) -> int:
  """Odd, about 10% of the side, at least 3 (28 -> 3, 32 -> 3, 96 -> 9, 224 -> 23 as in SimCLR)."""
  return 2 * max(1, int(0.1 * side) // 2) + 1


def gaussian_blur(image: jax.Array, sigma: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
  """Separable Gaussian blur of an [H, W, C] image with reflected edges; sigma in pixels (traced is fine)."""
  for axis, size in ((0, kernel_size[0]), (1, kernel_size[1])):
    radius = size // 2
    if radius == 0 or image.shape[axis] <= radius:  # reflect padding needs radius < side
      continue
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / jnp.sum(weights)
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad, mode='reflect')
    n = image.shape[axis]
    image = sum(weights[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(size))
  return image


def random_resized_crop(image: jax.Array, key: jax.Array, *, out_shape: tuple[int, int],
                        scale: tuple[float, float], ratio: tuple[float, float]) -> jax.Array:
  """A box of area fraction ~ U(scale) and width/height ~ log-U(ratio) (each side clipped to the image), at a uniform
  position, resized bilinearly to out_shape. Boxes have fractional corners: no rounding bias on small images."""
  height, width = image.shape[:2]
  area_key, ratio_key, y_key, x_key = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(area_key, minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  box_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
  box_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
  y0 = jax.random.uniform(y_key) * (height - box_h)
  x0 = jax.random.uniform(x_key) * (width - box_w)
  zoom = jnp.array(out_shape, jnp.float32) / jnp.stack([box_h, box_w])
  return jax.image.scale_and_translate(image, (*out_shape, image.shape[2]), spatial_dims=(0, 1), scale=zoom,
                                       translation=-jnp.stack([y0, x0]) * zoom, method='linear', antialias=True)


def _factor(key: jax.Array, strength: float) -> jax.Array:
  return jax.random.uniform(key, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)


def _augment_one(image, key, *, out_shape, crop_scale, crop_ratio, flip, brightness, contrast, saturation,
                 grayscale_prob, blur_prob, blur_sigma, noise_std):
  keys = iter(jax.random.split(key, 9))
  image = random_resized_crop(image, next(keys), out_shape=out_shape, scale=crop_scale, ratio=crop_ratio)
  flip_key, brightness_key, contrast_key, saturation_key, gray_key, blur_key, sigma_key, noise_key = keys
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
  if brightness:
    image = adjust_brightness(image, _factor(brightness_key, brightness))
  if contrast:
    image = adjust_contrast(image, _factor(contrast_key, contrast))
  if image.shape[-1] == 3:
    if saturation:
      image = adjust_saturation(image, _factor(saturation_key, saturation))
    if grayscale_prob:
      gray = jnp.broadcast_to(grayscale(image), image.shape)
      image = jnp.where(jax.random.bernoulli(gray_key, grayscale_prob), gray, image)
  if blur_prob:
    sigma = jax.random.uniform(sigma_key, minval=blur_sigma[0], maxval=blur_sigma[1])
    blurred = gaussian_blur(image, sigma, (blur_kernel_size(out_shape[0]), blur_kernel_size(out_shape[1])))
    image = jnp.where(jax.random.bernoulli(blur_key, blur_prob), blurred, image)
  if noise_std:
    image = image + noise_std * jax.random.normal(noise_key, image.shape)
  return jnp.clip(image, 0.0, 1.0)


def check_options(options: dict) -> dict:
  """A config's `augment` section, checked before anything runs: known names, pairs that are ordered ranges,
  strengths and probabilities in range. Returns it as a plain dict."""
  options = dict(options)
  # out_size is for callers of augment(); the tasks build their models and evaluate at config.data.image_shape.
  known = set(inspect.signature(augment).parameters) - {'images', 'keys', 'out_size'}
  if set(options) - known:
    raise ValueError(f'config.augment has unknown options {sorted(set(options) - known)}; known: {sorted(known)}.')
  for name in ('crop_scale', 'crop_ratio', 'blur_sigma'):
    if name in options:
      pair = options[name]
      if (not isinstance(pair, (tuple, list)) or len(pair) != 2
          or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
          or not 0 < pair[0] <= pair[1] or (name == 'crop_scale' and pair[1] > 1)):
        raise ValueError(f'config.augment.{name}={pair!r} must be a pair (low, high) with 0 < low <= high'
                         + (' <= 1.' if name == 'crop_scale' else '.'))
  for name in ('brightness', 'contrast', 'saturation', 'noise_std', 'grayscale_prob', 'blur_prob'):
    value = options.get(name, 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float('inf') or (
        name.endswith('_prob') and value > 1):
      raise ValueError(f'config.augment.{name}={value!r} must be a number '
                       + ('in [0, 1].' if name.endswith('_prob') else 'of at least 0.'))
  if 'flip' in options and not isinstance(options['flip'], bool):
    raise ValueError(f'config.augment.flip={options["flip"]!r} must be True or False.')
  return options


def augment(images: jax.Array, keys: jax.Array, *, crop_scale: tuple[float, float] = (0.08, 1.0),
            crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, brightness: float = 0.4,
            contrast: float = 0.4, saturation: float = 0.0, grayscale_prob: float = 0.0, blur_prob: float = 0.5,
            blur_sigma: tuple[float, float] = (0.1, 2.0), noise_std: float = 0.0,
            out_size: int | tuple[int, int] | None = None) -> jax.Array:
  """Augments uint8 or [0, 1]-float images [B, H, W, C] with keys [B] (one per example): float32
  [B, out_h, out_w, C] in [0, 1] (out_size: int for square, (h, w), or None for the input size). The config is
  static Python; a zero strength or probability skips its op. saturation and grayscale_prob act on 3 channels only."""
  images = to_float(images)
  if images.ndim != 4:
    raise ValueError(f'augment needs images [B, H, W, C], got shape {images.shape}.')
  if out_size is None:
    out_shape = images.shape[1:3]
  elif isinstance(out_size, int):
    out_shape = (out_size, out_size)
  else:
    out_shape = tuple(out_size)
  one = functools.partial(
      _augment_one, out_shape=tuple(int(s) for s in out_shape), crop_scale=tuple(crop_scale),
      crop_ratio=tuple(crop_ratio), flip=flip, brightness=brightness, contrast=contrast, saturation=saturation,
      grayscale_prob=grayscale_prob, blur_prob=blur_prob, blur_sigma=tuple(blur_sigma), noise_std=noise_std)
  return jax.vmap(one)(images, keys)
