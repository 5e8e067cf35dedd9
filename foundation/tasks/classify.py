"""Supervised image classification: an encoder + linear head trained with cross-entropy on the labels.

The baseline every learned representation is compared with (its encoder goes through the same probe suite), and
the task fine-tuning builds on. Evaluation: test accuracy of the trained head, plus the representation probes.
`data.classes` trains and evaluates on those classes only (relabelled 0..k-1 in that order), `data.shots_per_class`
on that many training images of each class, drawn by `config.seed` (images.few_shot_subset).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from foundation import metrics
from foundation.data import augment, images
from foundation.evaluate.representation import RepresentationEval, encoder_features
from foundation.models.image_encoders import classifier, encoder_config
from foundation.tasks import Task


def build(config) -> Task:
  data, model_cfg = config.data, config.model
  encoder_config(model_cfg.encoder, model_cfg[model_cfg.encoder])
  images.check_prepared(data.name, data.data_dir, [data.train_split, data.eval_split])
  num_classes = len(images.class_names(data.name, data.data_dir, classes=data.classes))
  records = images.training_records(name=data.name, data_dir=data.data_dir, split=data.train_split,
                                    classes=data.classes, shots_per_class=data.shots_per_class, seed=config.seed)
  model = classifier(model_cfg.encoder, model_cfg[model_cfg.encoder], num_classes)
  aug = augment.check_options(config.augment)
  image_shape = images.check_image_shape(data.name, data.data_dir, data.image_shape)

  def init(rng):
    return model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))['params']

  def loss(params, frozen, batch, rng):
    del frozen
    x = augment.augment(batch['image'], augment.example_keys(rng, batch['index']), **aug)
    logits = model.apply({'params': params}, x)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return jnp.mean(xent), {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}

  def train_batches(process_index, process_count):
    return images.train_batches(name=data.name, data_dir=data.data_dir, split=data.train_split,
                                global_batch=config.global_batch_size, seed=config.seed,
                                process_index=process_index, process_count=process_count, subset=records,
                                classes=data.classes)

  representation = RepresentationEval(config)
  encode = jax.jit(lambda params, x: model.apply({'params': params}, augment.to_float(x), method=model.features))
  predict = jax.jit(lambda params, x: jnp.argmax(model.apply({'params': params}, augment.to_float(x)), -1))
  test_cache = {}

  def evaluate(params, frozen, step, ctx):
    if not test_cache:
      test_cache['x'], test_cache['y'] = images.load_split(name=data.name, data_dir=data.data_dir,
                                                           split=data.eval_split, classes=data.classes)
    predictions = encoder_features(predict, params, test_cache['x'], ctx.mesh, config.eval.batch_size)
    return {'eval/accuracy': float(np.mean(predictions == test_cache['y'])),
            **representation(encode, params, step, ctx)}

  abstract_params = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  one_image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  forward = metrics.forward_flops(lambda p, x: model.apply({'params': p}, x), abstract_params, one_image)
  return Task(init=init, loss=loss, train_batches=train_batches, evaluate=evaluate, flops_per_example=3 * forward)
