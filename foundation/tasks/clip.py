"""Image-text contrastive pretraining, CLIP (symmetric InfoNCE) or SigLIP (pairwise sigmoid), by `model.loss`.

Both losses see the GLOBAL batch: every image's negatives are the captions of every other example on every device.
Evaluation: zero-shot classification from class-name prompts (template ensembling), image<->text retrieval, and the
image tower's features through the probe suite. With `lock_image_tower` (LiT), the image encoder is restored from
another run's checkpoint, frozen (no optimizer state, not trained), and only the text side learns (with
`model.image_head=False`, as :lit sets: else a linear image head on the locked features trains too).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from foundation import losses, metrics
from foundation.data import augment, captions, images, text
from foundation.data.tokenizers import get_tokenizer
from foundation.evaluate import zero_shot
from foundation.evaluate.representation import RepresentationEval, encoder_features
from foundation.models.image_encoders import IMAGE_ENCODERS
from foundation.models.two_tower import TwoTower, TwoTowerConfig
from foundation.tasks import Task
from foundation.tasks.classify import check_saved_encoder

LOSSES = {'clip': lambda img, txt, scale, bias: losses.clip_loss(img, txt, scale), 'siglip': losses.siglip_loss}


def build(config) -> Task:
  data = config.data
  model_cfg = TwoTowerConfig.from_dict(config.model)
  images.check_prepared(data.name, data.data_dir, [data.train_split, data.eval_split])
  # The probes fit on train_split's labels and score eval_split: one example in both would be scored on its own fit.
  text.check_disjoint(data.name, data.data_dir, {'config.data.train_split': data.train_split,
                                                 'config.data.eval_split': data.eval_split})
  class_names = images.class_names(data.name, data.data_dir, classes=data.classes)
  records = images.training_records(name=data.name, data_dir=data.data_dir, split=data.train_split,
                                    classes=data.classes)
  tokenizer = get_tokenizer(config.text.tokenizer)
  if model_cfg.text.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'config.model.text.vocab_size={model_cfg.text.vocab_size} is below the tokenizer\'s '
                     f'{tokenizer.vocab_size} ids.')
  model = TwoTower(model_cfg)
  lock = config.lock_image_tower
  if lock:
    _check_locked_encoder(lock.workdir, model_cfg)
  aug = augment.check_options(config.augment)
  image_shape = images.check_image_shape(data.name, data.data_dir, data.image_shape)
  text_len = config.text.max_len
  eval_records = images.training_records(name=data.name, data_dir=data.data_dir, split=data.eval_split,
                                         classes=data.classes)
  available = images.num_examples(data.name, data.data_dir, data.eval_split) if eval_records is None \
      else len(eval_records)
  if not 0 < config.eval.retrieval_examples <= available:
    # Drawn as one batch of the split: more would repeat images, whose captions then count as misses.
    raise ValueError(f'config.eval.retrieval_examples={config.eval.retrieval_examples}: retrieval draws distinct '
                     f'pairs from the {available} examples of {data.name}/{data.eval_split}; set it to 1..{available}.')
  if not model_cfg.image_head:
    encoder = IMAGE_ENCODERS[model_cfg.image_encoder][0](model_cfg.image)
    features = jax.eval_shape(encoder.init_with_output, jax.random.key(0), jnp.zeros((1, *image_shape)))[0].shape[-1]
    if features != model_cfg.embed_dim:
      raise ValueError(f'config.model.image_head=False embeds an image as its encoder\'s {features} features: set '
                       f'--config.model.embed_dim={features}.')

  def init_all(rng):
    return model.init(rng, jnp.zeros((1, *image_shape)), jnp.zeros((1, text_len), jnp.int32),
                      jnp.ones((1, text_len)))['params']

  def init(rng):
    params = init_all(rng)
    return {k: v for k, v in params.items() if k != 'image_encoder'} if lock else params

  def frozen(sources):
    # LiT: the image encoder of another run (e.g. SimCLR's or the supervised baseline's 'backbone').
    abstract = nn.unbox(jax.eval_shape(init_all, jax.random.key(0)))['image_encoder']
    return sources.load('lock_image_tower', lock.workdir, lock.params_path, abstract)

  def merged(params, frozen_params):
    return {**params, 'image_encoder': frozen_params} if lock else params

  def loss(params, frozen_params, batch, rng):
    x = augment.augment(batch['image'], augment.example_keys(rng, batch['index']), **aug)
    img, txt, scale, bias = model.apply({'params': merged(params, frozen_params)}, x, batch['text'],
                                        batch['text_mask'])
    return LOSSES[model_cfg.loss](img, txt, scale, bias), {'logit_scale': scale}

  def train_batches(process_index, process_count):
    return images.train_batches(name=data.name, data_dir=data.data_dir, split=data.train_split,
                                global_batch=config.global_batch_size, seed=config.seed,
                                process_index=process_index, process_count=process_count,
                                captions=captions.class_prompts(class_names), tokenizer=tokenizer, text_len=text_len,
                                subset=records, classes=data.classes)

  apply = lambda method: jax.jit(lambda params, *args: model.apply({'params': params}, *args, method=method))
  encode_image, encode_text = apply(TwoTower.encode_image), apply(TwoTower.encode_text)
  image_features = apply(lambda m, x: m.image_encoder(augment.to_float(x)))
  representation = RepresentationEval(config, start=f'locked, from {lock.workdir}' if lock else 'random init')
  prompts = captions.zero_shot_prompts(class_names)
  prompt_tokens, prompt_mask, _ = images.tokenize_captions(prompts, tokenizer, text_len)
  cache = {}

  def evaluate(params, frozen_params, step, ctx):
    params = merged(params, frozen_params)
    if not cache:
      cache['x'], cache['y'] = images.load_split(name=data.name, data_dir=data.data_dir, split=data.eval_split,
                                                 classes=data.classes)
      # One caption per test image, drawn as training draws them, for retrieval.
      n = config.eval.retrieval_examples
      pairs = next(iter(images.train_batches(
          name=data.name, data_dir=data.data_dir, split=data.eval_split, global_batch=n, seed=config.seed + 1,
          captions=captions.class_prompts(class_names), tokenizer=tokenizer, text_len=text_len,
          subset=eval_records, classes=data.classes)))
      cache['pairs'] = pairs
    # Class embeddings: every prompt of every class through the text tower (one small batch), then ensembled.
    c, p = prompt_tokens.shape[:2]
    text_emb = encode_text(params, jnp.asarray(prompt_tokens.reshape(c * p, -1)),
                           jnp.asarray(prompt_mask.reshape(c * p, -1)))
    class_emb = zero_shot.class_embeddings(np.asarray(text_emb).reshape(c, p, -1))
    batch = config.eval.batch_size
    test_emb = encoder_features(lambda prm, x: encode_image(prm, augment.to_float(x)), params, cache['x'], ctx.mesh,
                                batch)
    results = {'eval/zero_shot/accuracy': zero_shot.zero_shot_accuracy(test_emb, class_emb, cache['y'])}
    pairs = cache['pairs']
    pair_img = encode_image(params, augment.to_float(jnp.asarray(pairs['image'])))
    pair_txt = encode_text(params, jnp.asarray(pairs['text']), jnp.asarray(pairs['text_mask']))
    recall = zero_shot.retrieval_recall(pair_img, pair_txt, labels=pairs['label'])
    results.update({f'eval/retrieval/{k}': v for k, v in recall.items()})
    results.update(representation(image_features, params, step, ctx))
    return results

  def flops_per_example():
    abstract = nn.unbox(jax.eval_shape(init_all, jax.random.key(0)))
    return 3 * metrics.forward_flops(lambda prm, x, t, m: model.apply({'params': prm}, x, t, m), abstract,
                                     jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
                                     jax.ShapeDtypeStruct((1, text_len), jnp.int32),
                                     jax.ShapeDtypeStruct((1, text_len), jnp.float32))

  # Zero-shot accuracy reads data.eval_split, as the probes do: selectable where they are.
  probes = representation.selection_metrics
  return Task(init=init, loss=loss, train_batches=train_batches, evaluate=evaluate, batch_coupled_loss=True,
              selection_metrics=probes and ('eval/zero_shot/accuracy', *probes),
              frozen=frozen if lock else None, flops_per_example=flops_per_example)


def _check_locked_encoder(workdir: str, model_cfg: TwoTowerConfig) -> None:
  """The locked run's image encoder must be this config's (check_saved_encoder)."""
  check_saved_encoder(workdir, model_cfg.image_encoder, model_cfg.image, 'config.model.image_encoder',
                      'config.model.image', 'config.lock_image_tower.workdir')
