"""Visual prompts: a frozen image model of another run adapted to a new task by learning part of its input.

`config.prompt.method`:
  vpt_shallow, vpt_deep  visual prompt tuning (Jia et al. 2022) of a frozen ViT encoder: P learned tokens at the
      input (shallow) or at every layer (deep), models/vit.py; a new linear head on the pooled features. The prompts
      and the head train.
  padding  a learned border `width` pixels wide (Bahng et al. 2022, "visual prompting"), added to the image (floats
      in [0, 1], after augmentation); the pixels inside the border get nothing. The frozen model's own classifier
      is the head: CLIP's zero-shot classifier, or a supervised run's linear head. Only the border trains.
  patch    the same with a learned `patch_size` x `patch_size` square at `patch_at` (row, column of its top-left
      corner): Bahng et al.'s fixed-patch prompt (patch_size=1 is their single pixel).

The frozen model is `config.prompt.source`, the workdir of a classify, SimCLR or CLIP run, restored at the step that
run selected (early stopping) or its newest; its architecture and classes are read from its config.json, so this
config repeats nothing of it. Its params are `Task.frozen`: no optimizer state, never in this run's checkpoints (those
hold the prompt and, for VPT, the head: kilobytes), pinned by content hash in config.json.

Heads of padding and patch: for a CLIP run, its source classes' names under the held-out zero-shot templates through
its frozen text tower, ensembled, times its logit scale; for a classify run, its trained linear head. New class i is
scored by source class `class_map[i]` (default: i). For digits from a Fashion-MNIST source that is the i-th
Fashion-MNIST class: 0 t-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag,
9 ankle boot -- an arbitrary assignment the prompt has to learn to serve, as in adversarial reprogramming.

Data, label budget and the validation / test protocol are classify's (`classify.labelled_images`).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from foundation import checkpoint, config_base, metrics
from foundation.data import augment, captions, images
from foundation.data.tokenizers import get_tokenizer
from foundation.evaluate import zero_shot
from foundation.models.heads import LinearClassifier
from foundation.models.image_encoders import classifier, image_encoder
from foundation.models.two_tower import TwoTower, TwoTowerConfig
from foundation.tasks import Task, classify

VPT = ('vpt_shallow', 'vpt_deep')
PIXEL = ('padding', 'patch')
SOURCE_TASKS = ('classify', 'simclr', 'clip')


def build(config) -> Task:
  cfg = config.prompt
  if cfg.method not in VPT + PIXEL:
    raise ValueError(f'config.prompt.method={cfg.method!r}; choose one of {", ".join(VPT + PIXEL)}.')
  if config.init_from.source:
    raise ValueError('Visual prompts keep the pretrained model frozen and out of the checkpoint: name its run with '
                     '--config.prompt.source=DIR, and leave config.init_from.source empty.')
  if not cfg.source:
    raise ValueError('config.prompt.source is empty: name the workdir of the frozen run (classify, SimCLR or CLIP).')
  saved = checkpoint.run_config(cfg.source, SOURCE_TASKS, 'a classify, SimCLR or CLIP run (the frozen model)')
  labelled = classify.labelled_images(config)
  image_shape = labelled.image_shape
  theirs = saved['data']
  if tuple(theirs['image_shape']) != image_shape:
    raise ValueError(f'The run in {cfg.source} takes images of shape {tuple(theirs["image_shape"])}, this task\'s '
                     f'are {image_shape}: pick a source trained on images of this size.')
  aug = augment.check_options(config.augment)
  source = _Source(saved, cfg.source, config.data.data_dir, cfg.method)
  tower = saved.get('frozen_sources', {}).get('lock_image_tower') if saved.get('lock_image_tower') else None
  if saved.get('lock_image_tower') and not tower:
    raise ValueError(f'the LiT run in {cfg.source} records no image tower in its config.json (frozen_sources); '
                     'train it first, or prompt a run whose tower is its own.')
  num_classes = labelled.num_classes

  if cfg.method in VPT:
    if source.encoder_kind != 'vit':
      raise ValueError(f'{cfg.method} needs a ViT encoder; the run in {cfg.source} has a {source.encoder_kind!r} '
                       'one. Pretrain a ViT (e.g. configs/contrastive/simclr_fashion_mnist.py:vit).')
    vit = source.encoder.config
    if cfg.tokens < 1:
      raise ValueError(f'config.prompt.tokens={cfg.tokens}; VPT needs at least one prompt token.')
    if cfg.method == 'vpt_deep' and vit.scan_layers:
      raise ValueError(f'vpt_deep needs an unrolled encoder; the run in {cfg.source} scans its layers.')
    shape = (cfg.tokens, vit.embed_dim) if cfg.method == 'vpt_shallow' else (vit.num_layers, cfg.tokens,
                                                                             vit.embed_dim)
    # VPT's initialisation: uniform, Xavier-style over the patch projection's fan-in and the width.
    bound = math.sqrt(6.0 / (vit.patch_size**2 * vit.num_channels + vit.embed_dim))
    head = LinearClassifier(num_classes)

    def init(rng):
      prompt_rng, head_rng = jax.random.split(rng)
      return {'prompt': jax.random.uniform(prompt_rng, shape, jnp.float32, -bound, bound),
              'head': head.init(head_rng, jnp.zeros((1, vit.embed_dim)))['params']}

    def logits(params, frozen, x):
      features = source.encoder.apply({'params': frozen}, x, prompts=params['prompt'])
      return head.apply({'params': params['head']}, features)
  else:
    mask = pixel_prompt_mask(cfg.method, image_shape, width=cfg.width, patch_size=cfg.patch_size,
                             patch_at=tuple(cfg.patch_at))
    class_map = check_class_map(tuple(cfg.class_map), num_classes, len(source.class_names))

    def init(rng):
      del rng  # zeros: step 0 is the frozen model without a prompt
      return {'prompt': jnp.zeros(image_shape, jnp.float32)}

    def logits(params, frozen, x):
      return source.classify(frozen, x + mask * params['prompt'])[:, class_map]

  def loss(params, frozen, batch, rng):
    x = augment.augment(batch['image'], augment.example_keys(rng, batch['index']), **aug)
    out = logits(params, frozen, x)
    xent = optax.softmax_cross_entropy_with_integer_labels(out, batch['label'])
    return jnp.mean(xent), {'accuracy': jnp.mean(jnp.argmax(out, -1) == batch['label'])}

  def frozen(sources):
    if not tower:
      return sources.load('prompt_source', cfg.source, source.params_path, source.abstract_params)
    # A LiT run saved no image tower: it is the one that run locked, at the step and content its config.json pins.
    vpt = cfg.method in VPT
    abstract = source.abstract_params if vpt else source.abstract_params['image_encoder']
    encoder = sources.load('prompt_source_image_tower', tower['workdir'], tower['path'], abstract, step=tower['step'])
    read = sources.recorded.get('prompt_source_image_tower')  # none in a dry run, which reads nothing
    if read and read['hash'] != tower['hash']:
      raise ValueError(f'the image tower that the LiT run in {cfg.source} locked (step {tower["step"]} of '
                       f'{tower["workdir"]}) has changed since (content hash {read["hash"]}, recorded '
                       f'{tower["hash"]}): restore that run, or prompt a run whose tower is its own.')
    if vpt:
      return encoder
    rest = {k: v for k, v in source.abstract_params.items() if k != 'image_encoder'}
    return {**sources.load('prompt_source', cfg.source, 'params', rest), 'image_encoder': encoder}

  predict = jax.jit(lambda both, x: jnp.argmax(logits(*both, augment.to_float(x)), -1))

  def evaluate(params, frozen_params, step, ctx):
    return labelled.accuracies(predict, (params, frozen_params), ctx)

  def flops_per_example():
    abstract = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
    flops = lambda n: metrics.forward_flops(logits, abstract, source.abstract_params,
                                            jax.ShapeDtypeStruct((n, *image_shape), jnp.float32))
    forward = flops(2) - flops(1)  # per image: CLIP's class embeddings are computed once per batch
    # The frozen weights get no gradient: a backward pass through the activations only, about one more forward.
    return 2 * forward

  return Task(init=init, loss=loss, train_batches=labelled.train_batches, evaluate=evaluate, frozen=frozen,
              selection_metrics=labelled.selection_metrics, flops_per_example=flops_per_example)


class _Source:
  """The frozen run: its image encoder (for VPT) or its whole classifier (for pixel prompts), read from its
  config.json. classify(params, images) -> logits over its own classes."""

  def __init__(self, saved: dict, workdir: str, data_dir: str, method: str):
    model, data, task = saved['model'], saved['data'], saved['task']
    self.class_names = images.class_names(data['name'], data_dir, classes=data.get('classes', ()))
    self.encoder_kind, fields = classify.saved_encoder(model, workdir)
    self.encoder = image_encoder(self.encoder_kind, fields)
    one_image = jnp.zeros((1, *data['image_shape']), jnp.float32)
    if method in VPT:
      self.params_path = 'params/image_encoder' if task == 'clip' else 'params/backbone'
      self.abstract_params = nn.unbox(jax.eval_shape(self.encoder.init, jax.random.key(0), one_image))['params']
      return
    if task == 'simclr':
      raise ValueError(f'{method} prompts need a frozen classifier (a classify or CLIP run); a SimCLR run has no '
                       'head for the new classes. Use vpt_shallow / vpt_deep, or transfer with :probe.')
    self.params_path = 'params'
    if task == 'classify':
      net = classifier(self.encoder_kind, fields, len(self.class_names))
      self.classify = lambda params, x: net.apply({'params': params}, x)
      self.abstract_params = nn.unbox(jax.eval_shape(net.init, jax.random.key(0), one_image))['params']
      return
    two_tower = TwoTower(TwoTowerConfig.from_dict(model))
    text_len = saved['text']['max_len']
    prompts = captions.zero_shot_prompts(self.class_names)
    tokens, text_mask, _ = images.tokenize_captions(prompts, get_tokenizer(saved['text']['tokenizer']), text_len)
    num_prompts = tokens.shape[1]
    tokens, text_mask = tokens.reshape(-1, text_len), text_mask.reshape(-1, text_len)

    def classify_clip(params, x):
      image_emb = two_tower.apply({'params': params}, x, method=TwoTower.encode_image)
      text_emb = two_tower.apply({'params': params}, jnp.asarray(tokens), jnp.asarray(text_mask),
                                 method=TwoTower.encode_text)
      class_emb = zero_shot.class_embeddings(text_emb.reshape(len(prompts), num_prompts, -1))
      return jnp.exp(params['logit_scale']) * image_emb @ class_emb.T

    self.classify = classify_clip
    self.abstract_params = nn.unbox(jax.eval_shape(
        two_tower.init, jax.random.key(0), one_image, jnp.zeros((1, text_len), jnp.int32),
        jnp.ones((1, text_len))))['params']


def pixel_prompt_mask(method: str, image_shape, *, width: int, patch_size: int, patch_at: tuple[int, int]
                      ) -> np.ndarray:
  """float32 [H, W, C], 1 where a pixel prompt may add to the image: a border `width` wide ('padding'), or a
  `patch_size` square with its top-left corner at `patch_at` ('patch')."""
  height, width_px, _ = image_shape
  mask = np.zeros(image_shape, np.float32)
  if method == 'padding':
    if width < 1 or 2 * width >= min(height, width_px):
      raise ValueError(f'config.prompt.width={width} on {height}x{width_px} images leaves no image inside the '
                       f'border; choose 1..{(min(height, width_px) - 1) // 2}.')
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = 1, 1, 1, 1
    return mask
  if len(patch_at) != 2 or not all(config_base.is_whole(x, 0) for x in patch_at):
    raise ValueError(f'config.prompt.patch_at={patch_at} must be (row, column) of the patch\'s top-left pixel.')
  row, col = patch_at
  if patch_size < 1 or row < 0 or col < 0 or row + patch_size > height or col + patch_size > width_px:
    raise ValueError(f'config.prompt.patch_size={patch_size} at config.prompt.patch_at={patch_at} does not fit in '
                     f'{height}x{width_px} images.')
  mask[row:row + patch_size, col:col + patch_size] = 1
  return mask


def check_class_map(class_map: tuple[int, ...], num_classes: int, num_source_classes: int) -> np.ndarray:
  """The source class that scores each new class: `class_map` ((): new class i -> source class i)."""
  if not class_map:
    if num_classes > num_source_classes:
      raise ValueError(f'The task has {num_classes} classes, the frozen classifier {num_source_classes}: pick a '
                       'source with enough classes.')
    return np.arange(num_classes)
  if len(class_map) != num_classes:
    raise ValueError(f'config.prompt.class_map has {len(class_map)} entries for {num_classes} classes: give one '
                     'source class per class of the task.')
  if (len(set(class_map)) != len(class_map)
      or not all(config_base.is_whole(c, 0) and c < num_source_classes for c in class_map)):
    raise ValueError(f'config.prompt.class_map={class_map}: entries must be distinct source classes in '
                     f'0..{num_source_classes - 1}.')
  return np.asarray(class_map)
