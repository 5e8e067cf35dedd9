"""Supervised image classification: an encoder + linear head trained with cross-entropy on the labels.

The baseline every learned representation is compared with (its encoder goes through the same probe suite), and
the task transfer builds on (configs/transfer/): `init_from` another image run's encoder ('params/backbone' onto
'backbone', its architecture checked field by field), freeze or scale the backbone's learning rate through
`config.optim`, keep the best step by the validation split.

Data: `data.classes` trains and evaluates on those classes only (relabelled 0..k-1 in that order);
`data.shots_per_class` on that many training images of each class, drawn by `config.seed` (images.few_shot_subset).
Evaluation: with `data.validation_split`, `eval/validation/accuracy` at every evaluation and the test split's
`eval/accuracy` at the final one only (selection never reads test); without it, `eval/accuracy` every time.
`eval.representation` adds the probe suite on the encoder's features. `eval.source_probe_examples` > 0 (with an
`init_from` workdir) measures forgetting at the final evaluation: a ridge probe on the source run's own task (its
dataset and classes; those of the first that many images of its training split, its whole test split), with the
encoder before adaptation (`eval/forgetting/source_probe_before`) and after (`eval/forgetting/source_probe`).
"""

import json
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from foundation import checkpoint, config_base, files, metrics, optim
from foundation.data import augment, images, text
from foundation.evaluate import probes
from foundation.evaluate.representation import RepresentationEval, encoder_features
from foundation.models.image_encoders import classifier, encoder_config, image_encoder
from foundation.tasks import Task


class LabelledImages(NamedTuple):
  """config.data as a labelled task, for classify and the other tasks that train a classifier on it (visual
  prompts): class filter, label budget, and the validation / test protocol."""
  num_classes: int
  image_shape: tuple[int, int, int]
  train_batches: Callable[[int, int], Any]   # Task.train_batches
  # (predict, params, ctx) -> eval/validation/accuracy every time (with a validation split) and eval/accuracy, the
  # test split, at the final evaluation only (every time without one); predict: jitted (params, uint8 images) -> ids
  accuracies: Callable[[Callable, Any, Any], dict]
  selection_metrics: tuple[str, ...]  # Task.selection_metrics: the validation accuracy, if there is a validation split


def labelled_images(config) -> LabelledImages:
  data = config.data
  validation = data.validation_split
  images.check_prepared(data.name, data.data_dir, [data.train_split, data.eval_split, *[validation] * bool(validation)])
  text.check_disjoint(data.name, data.data_dir, {'config.data.train_split': data.train_split,
                                                 'config.data.validation_split': validation,
                                                 'config.data.eval_split': data.eval_split})
  num_classes = len(images.class_names(data.name, data.data_dir, classes=data.classes))
  records = images.training_records(name=data.name, data_dir=data.data_dir, split=data.train_split,
                                    classes=data.classes, shots_per_class=data.shots_per_class, seed=config.seed)
  image_shape = images.check_image_shape(data.name, data.data_dir, data.image_shape)

  def train_batches(process_index, process_count):
    return images.train_batches(name=data.name, data_dir=data.data_dir, split=data.train_split,
                                global_batch=config.global_batch_size, seed=config.seed,
                                process_index=process_index, process_count=process_count, subset=records,
                                classes=data.classes)

  splits = {}

  def accuracy(predict, params, split, ctx):
    if split not in splits:
      splits[split] = images.load_split(name=data.name, data_dir=data.data_dir, split=split, classes=data.classes)
    x, y = splits[split]
    return float(np.mean(encoder_features(predict, params, x, ctx.mesh, config.eval.batch_size) == y))

  def accuracies(predict, params, ctx):
    results = {}
    if validation:
      results['eval/validation/accuracy'] = accuracy(predict, params, validation, ctx)
    if not validation or ctx.final:  # with a validation split, test is read by the final evaluation alone
      results['eval/accuracy'] = accuracy(predict, params, data.eval_split, ctx)
    return results

  return LabelledImages(num_classes, image_shape, train_batches, accuracies,
                        ('eval/validation/accuracy',) if validation else ())


def build(config) -> Task:
  model_cfg = config.model
  encoder_config(model_cfg.encoder, model_cfg[model_cfg.encoder])
  _check_top_stage_freeze(config)
  labelled = labelled_images(config)
  image_shape = labelled.image_shape
  model = classifier(model_cfg.encoder, model_cfg[model_cfg.encoder], labelled.num_classes)
  aug = augment.check_options(config.augment)
  source = config.init_from.source if files.isdir(config.init_from.source) else ''
  if source and config.init_from.target == 'backbone':
    check_saved_encoder(source, model_cfg.encoder, encoder_config(model_cfg.encoder, model_cfg[model_cfg.encoder]),
                        'config.model.encoder', f'config.model.{model_cfg.encoder}', 'config.init_from.source')
  source_probe = config.eval.source_probe_examples
  if not config_base.is_whole(source_probe, 0):
    raise ValueError(f'config.eval.source_probe_examples={source_probe!r} must be a whole number of at least 0 '
                     '(0: no forgetting probe).')
  if source_probe and not (source and config.init_from.target == 'backbone'):
    raise ValueError('config.eval.source_probe_examples measures forgetting of an encoder restored by '
                     'config.init_from (a workdir, target backbone); set it to 0 or name the source run.')
  if source_probe:  # the source task's data, read at the final evaluation, must be here before training starts
    theirs = json.loads(files.read_text(os.path.join(source, 'config.json')))['data']
    images.check_prepared(theirs['name'], config.data.data_dir, [theirs['train_split'], theirs['eval_split']])

  def init(rng):
    return model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))['params']

  def loss(params, frozen, batch, rng):
    del frozen
    x = augment.augment(batch['image'], augment.example_keys(rng, batch['index']), **aug)
    logits = model.apply({'params': params}, x)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return jnp.mean(xent), {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}

  representation = RepresentationEval(config) if config.eval.representation else None
  encode = jax.jit(lambda params, x: model.apply({'params': params}, augment.to_float(x), method=model.features))
  predict = jax.jit(lambda params, x: jnp.argmax(model.apply({'params': params}, augment.to_float(x)), -1))

  def evaluate(params, frozen, step, ctx):
    results = labelled.accuracies(predict, params, ctx)
    # The probes score data.eval_split; with a validation split to select by, test is read at the end alone.
    if representation is not None and (ctx.final or not labelled.selection_metrics):
      results.update(representation(encode, params, step, ctx))
    if source_probe and ctx.final:
      results.update(_forgetting(params['backbone'], ctx, config, model_cfg, source_probe))
    return results

  def flops_per_example():
    abstract_params = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
    one_image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    forward = lambda p, x: model.apply({'params': p}, x)
    if not config.optim.freeze:
      return 3 * metrics.forward_flops(forward, abstract_params, one_image)
    # Frozen weights get no gradient work (train.make_train_step): XLA's count of the forward pass and of the
    # backward pass as far as the trained weights need it.
    trained_grads = lambda p, x: optim.zero_frozen(config.optim, jax.grad(lambda q: jnp.sum(forward(q, x)))(p), p)
    return metrics.forward_flops(trained_grads, abstract_params, one_image)

  return Task(init=init, loss=loss, train_batches=labelled.train_batches, evaluate=evaluate,
              selection_metrics=labelled.selection_metrics, flops_per_example=flops_per_example)


def _check_top_stage_freeze(config) -> None:
  """`:finetune_top` makes its freeze for the CNN it sees and records that CNN's stage count
  (config.finetune_top_stages); command-line --config.model.cnn.widths come after it, and another count would
  train a lower stage, or only the head: refused, with the freeze that fits. A freeze written by hand is the
  user's."""
  made_for = config.get('finetune_top_stages', 0)
  stages = len(config.model.cnn.widths) if config.model.encoder == 'cnn' else None
  if made_for and made_for != stages:
    fitting = (f'add --config.optim.freeze="(\'{config_base.below_top_stage(stages)}\',)" '
               f'--config.finetune_top_stages={stages}' if stages else 'freeze the ViT by name in config.optim.freeze')
    here = f'a {stages}-stage CNN' if stages else f'a {config.model.encoder!r} encoder'
    raise ValueError(f'config.optim.freeze was made by :finetune_top for a {made_for}-stage CNN, but the encoder '
                     f'here is {here}: {fitting}.')


def _forgetting(backbone, ctx, config, model_cfg, max_train: int) -> dict[str, float]:
  """The source run's task probed (ridge) with the encoder it gave this run, and with the adapted one."""
  read = lambda workdir: json.loads(files.read_text(os.path.join(workdir, 'config.json')))
  pin = read(ctx.workdir)['frozen_sources']['init_from']  # the exact checkpoint this run started from
  theirs = read(pin['workdir'])['data']
  load = lambda split, n=None: images.load_split(name=theirs['name'], data_dir=config.data.data_dir, split=split,
                                                 max_examples=n, classes=theirs.get('classes', ()))
  (train_x, train_y), (test_x, test_y) = load(theirs['train_split'], max_train), load(theirs['eval_split'])
  encoder = image_encoder(model_cfg.encoder, model_cfg[model_cfg.encoder])
  encode = jax.jit(lambda p, x: encoder.apply({'params': p}, augment.to_float(x)))
  # Shapes only: the adapted backbone may be sharded over several hosts.
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), backbone)
  error = before = None
  try:
    before, _ = checkpoint.restore_params(pin['workdir'], pin['path'], shapes, step=pin['step'])
  except Exception as e:  # pylint: disable=broad-except  (any fault here must reach the other processes)
    error = e
  # Every process reads it alone; the probes below are collective, so where one cannot read it, none goes on.
  checkpoint.raise_where_any_failed(error, f'the checkpoint of step {pin["step"]} in {pin["workdir"]}')
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  results = {}
  for key, params in (('source_probe_before', before), ('source_probe', backbone)):
    features = [encoder_features(encode, params, x, ctx.mesh, config.eval.batch_size) for x in (train_x, test_x)]
    results[f'eval/forgetting/{key}'] = probes.ridge_probe(features[0], train_y, features[1], test_y,
                                                           num_classes=num_classes)
  return results


def check_saved_encoder(workdir: str, kind: str, cfg, kind_flag: str, fields_flag: str, what: str) -> None:
  """The image encoder of the run in `workdir` must be `kind` with config `cfg`: an option like a stem stride changes
  no parameter shape, so a mismatch would restore without complaint and compute other features than the ones that
  were trained. Refused with the flags that make this config match, for single-encoder runs (SimCLR, classify:
  model.encoder) and two-tower runs (model.image_encoder)."""
  path = os.path.join(workdir, 'config.json')
  if not files.exists(path):
    raise FileNotFoundError(f'{what}={workdir!r} has no config.json; name the workdir of a finished SimCLR, '
                            'supervised or CLIP run.')
  theirs, fields = saved_encoder(json.loads(files.read_text(path))['model'], workdir)
  if theirs != kind:
    raise ValueError(f'The run in {workdir} has a {theirs!r} image encoder; set --{kind_flag}={theirs} and its fields.')
  saved = encoder_config(theirs, fields)
  if saved != cfg:
    flags = ' '.join(f'--{fields_flag}.{name}={str(value).replace(" ", "")}'
                     for name, value in sorted(vars(saved).items()) if getattr(cfg, name) != value)
    raise ValueError(f'The image encoder in {workdir} was trained with another architecture; to restore it, set '
                     f'{flags}')


def saved_encoder(model: dict, workdir: str) -> tuple[str, dict]:
  """(kind, config fields) of the image encoder in a run's saved `model` config: model.encoder and its fields for
  single-encoder runs (SimCLR, classify), model.image_encoder and model.image for two-tower runs (CLIP)."""
  kind = model.get('image_encoder', model.get('encoder'))
  fields = model['image'] if 'image_encoder' in model else model.get(kind)
  if kind is None or fields is None:
    raise ValueError(f'The run in {workdir} has no image encoder in its config (model keys {sorted(model)}).')
  return kind, fields
