"""SimCLR: an image encoder learns by matching two augmentations of each image against the rest of the batch.

Loss: NT-Xent over the 2N views of the GLOBAL batch (the similarity matrix spans every device). Views are made on
the accelerator inside the jitted step, one key per example from its global position, so a run is reproducible
whatever the mesh. Evaluation: the frozen encoder (without the projection head) through the probe suite.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from foundation import losses, metrics
from foundation.data import augment, images, text
from foundation.evaluate.representation import RepresentationEval
from foundation.models.heads import ProjectionHead
from foundation.models.image_encoders import EncoderWithHead, encoder_config
from foundation.tasks import Task


def build(config) -> Task:
  data, model_cfg = config.data, config.model
  encoder_config(model_cfg.encoder, model_cfg[model_cfg.encoder])  # validates the fields before anything runs
  for name in ('head_hidden', 'head_out'):
    if not isinstance(model_cfg[name], int) or model_cfg[name] < 1:
      raise ValueError(f'config.model.{name}={model_cfg[name]!r} must be a whole number of at least 1.')
  images.check_prepared(data.name, data.data_dir, [data.train_split, data.eval_split])
  # The probes fit on train_split's labels and score eval_split: one example in both would be scored on its own fit.
  text.check_disjoint(data.name, data.data_dir, {'config.data.train_split': data.train_split,
                                                 'config.data.eval_split': data.eval_split})
  model = EncoderWithHead(model_cfg.encoder, tuple(sorted(model_cfg[model_cfg.encoder].items())),
                          ProjectionHead(model_cfg.head_hidden, model_cfg.head_out))
  aug = augment.check_options(config.augment)
  image_shape = images.check_image_shape(config.data.name, config.data.data_dir, config.data.image_shape)

  def init(rng):
    return model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))['params']

  def loss(params, frozen, batch, rng):
    del frozen
    keys = augment.example_keys(rng, batch['index'])
    views = [augment.augment(batch['image'], jax.vmap(lambda k, v=v: jax.random.fold_in(k, v))(keys), **aug)
             for v in (0, 1)]
    z = model.apply({'params': params}, jnp.concatenate(views))  # one forward over both views
    z1, z2 = jnp.split(z, 2)
    return losses.nt_xent(z1, z2, config.temperature), {}

  records = images.training_records(name=data.name, data_dir=data.data_dir, split=data.train_split,
                                    classes=data.classes)

  def train_batches(process_index, process_count):
    return images.train_batches(name=data.name, data_dir=data.data_dir, split=data.train_split,
                                global_batch=config.global_batch_size, seed=config.seed,
                                process_index=process_index, process_count=process_count, subset=records,
                                classes=data.classes)

  representation = RepresentationEval(config)
  encode = jax.jit(lambda params, x: model.apply({'params': params}, augment.to_float(x), method=model.features))

  def evaluate(params, frozen, step, ctx):
    return representation(encode, params, step, ctx)

  def flops_per_example():  # forward + backward of both views
    abstract_params = jax.eval_shape(init, jax.random.key(0))
    one_image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return 3 * 2 * metrics.forward_flops(lambda p, x: model.apply({'params': p}, x), nn.unbox(abstract_params),
                                         one_image)

  return Task(init=init, loss=loss, train_batches=train_batches, evaluate=evaluate, batch_coupled_loss=True,
              selection_metrics=representation.selection_metrics,
              flops_per_example=flops_per_example)
