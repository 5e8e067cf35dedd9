"""Image classification with frozen teachers: soft targets (Hinton et al. 2015), ensembles, contrastive
representation distillation (CRD, Tian et al. 2020) and feature hints (FitNets), on the one loop.

The student is an encoder with a linear head (the `classify` model; CRD and hints train projection heads beside it,
under `params` as AUXILIARY_HEADS, which a run that reads the student as a classifier leaves out). So a student
trained on whole images can itself be a teacher or be pruned, and its encoder can be an `init_from` source.
Teachers are other runs' workdirs (`config.teachers`, comma-separated), each an image classifier of this codebase
whose architecture is read from its own config.json. They are restored once through the loop's frozen sources:
never optimized, not in the student's checkpoints, pinned in config.json by step and content hash, so a resumed run
reads exactly the teachers it started with. With no teachers this task trains the student on the labels alone (the
`:teacher` and `:student` variants), evaluated like every distilled run.

The loss, with the weights of `config.distill`:
  alpha * T^2 * KL(teachers_T || student_T) + (1 - alpha) * CE(student, labels)        (soft targets, alpha > 0)
  + crd_weight * InfoNCE(proj_s(student features), proj_t(teacher features)) over the global batch
  + feature_weight * mean squared error of hint(student features) against the teacher's features
The teachers run inside the jitted step on the student's augmented batch ("consistent teaching", Beyer et al. 2022)
or, with `teacher_augment='independent'`, on another augmentation of the same images. An ensemble's soft targets
are its members' probabilities at T averaged; its features (for CRD and hints) the first teacher's. With
`student_view='pool4'` the student sees another modality made from the same image (4x4-block averages, 7x7
pixels) while the teachers see the image: cross-modal distillation, with alpha = 1 using no label of the student's
modality.

Data: a fixed split for training, one for validation (selection: T, alpha, the step) and the test split, read only
by the final evaluation. `data.train_fraction` < 1 trains on a class-balanced subset drawn by `data.subset_seed`
alone, so every run with the same fraction sees the same examples.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from foundation import checkpoint, losses, metrics
from foundation.data import augment, images, text
from foundation.evaluate.representation import encoder_features
from foundation.models.image_encoders import EncoderWithHead, classifier, encoder_config
from foundation.tasks import EvalContext, Task

TEACHER_AUGMENT = ('same', 'independent')


def _student_view(kind: str, x: jax.Array) -> jax.Array:
  """What the student sees of a (float) image batch: the image itself, or, for cross-modal distillation (Gupta,
  Hoffman & Malik 2015), a second 'sensor' made from it: 'pool4' averages 4x4 blocks (28x28 -> 7x7)."""
  if kind == 'image':
    return x
  b, h, w, c = x.shape
  return x.reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))


STUDENT_VIEWS = ('image', 'pool4')


# The params a student trains beside its classifier: CRD's two projections and the hint regressor.
AUXILIARY_HEADS = ('crd', 'hint')


def build(config) -> Task:
  data, model_cfg, cfg = config.data, config.model, config.distill
  encoder_config(model_cfg.encoder, model_cfg[model_cfg.encoder])
  images.check_prepared(data.name, data.data_dir, [data.train_split, data.validation_split, data.eval_split])
  text.check_disjoint(data.name, data.data_dir, {'config.data.train_split': data.train_split,
                                                 'config.data.validation_split': data.validation_split,
                                                 'config.data.eval_split': data.eval_split})
  class_names = images.class_names(data.name, data.data_dir)
  image_shape = images.check_image_shape(data.name, data.data_dir, data.image_shape)
  aug = augment.check_options(config.augment)
  _check_weights(cfg)
  teacher_dirs = teacher_workdirs(
      config, uses_teachers=cfg.alpha > 0 or cfg.crd_weight > 0 or cfg.feature_weight > 0,
      unused_hint='set config.distill.alpha, crd_weight or feature_weight above 0',
      example='configs/distill/fashion_mnist.py:teacher or configs/classify/fashion_mnist.py')
  if config.eval.batch_size < 1 or config.eval.batch_size % jax.process_count():
    raise ValueError(f'config.eval.batch_size={config.eval.batch_size} must be a positive multiple of the '
                     f'{jax.process_count()} processes.')
  if config.eval.max_train_examples < 0 or data.subset_seed < 0:
    raise ValueError('config.eval.max_train_examples (0 = all) and config.data.subset_seed must be >= 0.')
  teachers = [_teacher_model(d, data.name, data.data_dir, class_names) for d in teacher_dirs]
  student = classifier(model_cfg.encoder, model_cfg[model_cfg.encoder], len(class_names))
  if cfg.student_view not in STUDENT_VIEWS:
    raise ValueError(f'config.distill.student_view={cfg.student_view!r}; choose one of {STUDENT_VIEWS}.')
  if cfg.student_view == 'pool4' and (image_shape[0] % 4 or image_shape[1] % 4):
    raise ValueError(f'config.distill.student_view=pool4 needs image sides divisible by 4, not {image_shape[:2]}.')
  view = lambda x: _student_view(cfg.student_view, x)
  images.check_fraction(data.train_fraction, images.num_examples(data.name, data.data_dir, data.train_split),
                        len(class_names))

  @functools.cache
  def training_set():
    """(images, labels, record ids trained on): a class-balanced subset when train_fraction < 1, drawn once."""
    x, y = images.load_split(name=data.name, data_dir=data.data_dir, split=data.train_split)
    return x, y, images.class_balanced_subset(y, data.train_fraction, data.subset_seed)
  one_image = jnp.zeros((1, *image_shape), jnp.float32)
  one_view = view(one_image)
  feature_dim = lambda model, x: jax.eval_shape(
      lambda: model.apply(model.init(jax.random.key(0), x), x, method='features')).shape[-1]
  student_dim = feature_dim(student, one_view)
  teacher_dim = feature_dim(teachers[0], one_image) if teachers else 0

  def init(rng):
    keys = jax.random.split(rng, 4)
    params = dict(student.init(keys[0], one_view)['params'])
    if cfg.crd_weight:  # the AUXILIARY_HEADS
      params['crd'] = {'student': _projection(cfg.crd_dim).init(keys[1], jnp.zeros((1, student_dim)))['params'],
                       'teacher': _projection(cfg.crd_dim).init(keys[2], jnp.zeros((1, teacher_dim)))['params']}
    if cfg.feature_weight:
      params['hint'] = _projection(teacher_dim).init(keys[3], jnp.zeros((1, student_dim)))['params']
    return params

  def frozen(sources):
    # Boxed with the model's logical axis names, so the loop lays teachers out on the mesh like trained params.
    return {'teachers': [sources.load(f'teacher_{i}', workdir, 'params',
                                      jax.eval_shape(model.init, jax.random.key(0), one_image)['params'],
                                      without=AUXILIARY_HEADS)
                         for i, (workdir, model) in enumerate(zip(teacher_dirs, teachers))]}

  def student_params(params):
    return {k: v for k, v in params.items() if k not in AUXILIARY_HEADS}

  def forward(model, params, x):
    """(features, logits) of one image batch."""
    return model.apply({'params': params}, x, method=lambda m, x: (lambda f: (f, m.head(f)))(m.features(x)))

  def teacher_forward(frozen_params, x):
    """(first teacher's features, [num_teachers, B, C] logits)."""
    outs = [forward(m, p, x) for m, p in zip(teachers, frozen_params['teachers'])]
    return jax.lax.stop_gradient(outs[0][0]), jax.lax.stop_gradient(jnp.stack([o[1] for o in outs]))

  def loss(params, frozen_params, batch, rng):
    x = augment.augment(batch['image'], augment.example_keys(rng, batch['index']), **aug)
    features, logits = forward(student, student_params(params), view(x))
    labels = batch['label']
    aux = {'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
    if not teachers:
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), aux
    if cfg.teacher_augment == 'independent':
      tx = augment.augment(batch['image'], augment.example_keys(jax.random.fold_in(rng, 1), batch['index']), **aug)
    else:
      tx = x
    t_features, t_logits = teacher_forward(frozen_params, tx)
    total = losses.distillation_loss(logits, losses.teacher_probs(t_logits, cfg.temperature), labels,
                                     cfg.temperature, cfg.alpha)
    aux['agreement'] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(jnp.mean(jax.nn.softmax(t_logits), 0), -1))
    if cfg.crd_weight:
      project = lambda side, f: _projection(cfg.crd_dim).apply({'params': params['crd'][side]}, f)
      crd = losses.crd_loss(project('student', features), project('teacher', t_features), cfg.crd_temperature)
      total, aux['crd'] = total + cfg.crd_weight * crd, crd
    if cfg.feature_weight:
      hint = _projection(teacher_dim).apply({'params': params['hint']}, features)
      l2 = jnp.mean(jnp.square(hint - t_features))
      total, aux['hint_l2'] = total + cfg.feature_weight * l2, l2
    return total, aux

  def train_batches(process_index, process_count):
    return images.train_batches(name=data.name, data_dir=data.data_dir, split=data.train_split,
                                global_batch=config.global_batch_size, seed=config.seed, subset=training_set()[2],
                                process_index=process_index, process_count=process_count)

  student_logits = jax.jit(lambda params, x: forward(student, student_params(params),
                                                    view(augment.to_float(x)))[1])
  all_teacher_logits = jax.jit(lambda frozen_params, x: teacher_forward(frozen_params, augment.to_float(x))[1])
  splits = {}

  def split(name):
    """(images, labels) of 'train' (the examples trained on, at most eval.max_train_examples), 'validation', 'test'."""
    if name not in splits:
      if name == 'train':
        x, y, ids = training_set()
        ids = ids[:config.eval.max_train_examples or None]
        splits[name] = x[ids], y[ids]
      else:
        splits[name] = images.load_split(name=data.name, data_dir=data.data_dir,
                                         split=data.validation_split if name == 'validation' else data.eval_split)
    return splits[name]

  def logits_of(fn, params, x, ctx):
    return encoder_features(fn, params, x, ctx.mesh, config.eval.batch_size)

  teacher_cache = {}

  def evaluate(params, frozen_params, step, ctx: EvalContext):
    results = {}
    for name, key in (('train', 'eval/train_accuracy'), ('validation', 'eval/validation/accuracy'),
                      ('test', 'eval/accuracy')):
      if name == 'test' and not ctx.final:
        continue  # selection reads validation only; test is read by the final evaluation
      x, y = split(name)
      s_logits = logits_of(student_logits, params, x, ctx)
      results[key] = float(np.mean(np.argmax(s_logits, -1) == y))
      if name != 'test' or not teachers:
        continue
      if 'logits' not in teacher_cache:  # [num_teachers, N, C]; the teachers never change
        flat = logits_of(lambda fp, x: jnp.moveaxis(all_teacher_logits(fp, x), 0, 1), frozen_params, x, ctx)
        teacher_cache['logits'] = np.moveaxis(flat, 1, 0)
      t_logits = teacher_cache['logits']
      t_probs = np.mean(np.asarray(jax.nn.softmax(t_logits, -1)), 0)
      results['eval/teacher/accuracy'] = float(np.mean(np.argmax(t_probs, -1) == y))
      if len(teachers) > 1:
        for i, member in enumerate(t_logits):
          results[f'eval/teacher/{i}/accuracy'] = float(np.mean(np.argmax(member, -1) == y))
      results['eval/agreement'] = float(np.mean(np.argmax(s_logits, -1) == np.argmax(t_probs, -1)))
      log_q = np.asarray(jax.nn.log_softmax(s_logits, -1))
      results['eval/kl'] = float(np.mean(np.sum(t_probs * (np.log(np.maximum(t_probs, 1e-30)) - log_q), -1)))
    return results

  def flops_per_example():
    abstract_student = nn.unbox(jax.eval_shape(student.init, jax.random.key(0), one_view))['params']
    one = jax.ShapeDtypeStruct(one_image.shape, jnp.float32)
    flops = 3 * metrics.forward_flops(lambda p, x: student.apply({'params': p}, view(x)), abstract_student, one)
    for model in teachers:  # a teacher's forward runs in every step (no backward)
      abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), one_image))['params']
      flops += metrics.forward_flops(lambda p, x, m=model: m.apply({'params': p}, x), abstract, one)
    return flops

  return Task(init=init, loss=loss, train_batches=train_batches, evaluate=evaluate,
              frozen=frozen if teachers else None, flops_per_example=flops_per_example,
              selection_metrics=('eval/train_accuracy', 'eval/validation/accuracy'),
              batch_coupled_loss=bool(cfg.crd_weight))


def _projection(dim: int) -> nn.Dense:
  return nn.Dense(dim, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp')),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)))


def teacher_workdirs(config, *, uses_teachers: bool, unused_hint: str, example: str) -> list[str]:
  """config.teachers as a list, after checking the soft-target fields and that teachers are named exactly when the
  loss uses them (`unused_hint` says how to use them, `example` which runs can be teachers)."""
  cfg = config.distill
  if cfg.temperature <= 0:
    raise ValueError(f'config.distill.temperature={cfg.temperature} must be positive.')
  if not 0 <= cfg.alpha <= 1:
    raise ValueError(f'config.distill.alpha={cfg.alpha} must be in [0, 1] (the soft targets\' share of the loss).')
  workdirs = [d.strip() for d in config.teachers.split(',') if d.strip()]
  if workdirs and not uses_teachers:
    raise ValueError(f'config.teachers is set but nothing uses them: {unused_hint}, or drop --config.teachers.')
  if uses_teachers and not workdirs:
    raise ValueError('this variant distils from teachers: name their workdirs with --config.teachers=DIR[,DIR...] '
                     f'(runs of {example}).')
  return workdirs


def _check_weights(cfg) -> None:
  if cfg.crd_weight < 0 or cfg.feature_weight < 0:
    raise ValueError('config.distill.crd_weight and feature_weight must be >= 0.')
  if cfg.crd_weight and cfg.crd_dim < 1:
    raise ValueError(f'config.distill.crd_dim={cfg.crd_dim} must be positive.')
  if cfg.crd_weight and not 0.01 <= cfg.crd_temperature:
    raise ValueError(f'config.distill.crd_temperature={cfg.crd_temperature} must be >= 0.01 (logits are clamped '
                     'at 100).')
  if cfg.teacher_augment not in TEACHER_AUGMENT:
    raise ValueError(f'config.distill.teacher_augment={cfg.teacher_augment!r}; choose one of {TEACHER_AUGMENT}.')


def saved_classifier(workdir: str, data_dir: str | None = None) -> tuple[dict, EncoderWithHead]:
  """(config.json of an image classifier run, its model), for restoring its params; data_dir defaults to the one
  the run was trained with (it names the classes)."""
  saved = checkpoint.run_config(workdir, ('classify', 'distill'),
                                'an image classifier run (configs/distill/fashion_mnist.py:teacher)')
  model, data = saved['model'], saved['data']
  view = (saved.get('distill') or {}).get('student_view', 'image')
  if view != 'image':
    raise ValueError(f'{workdir} was trained on {view!r} views of its images (config.distill.student_view), but a '
                     'teacher or a model to prune reads whole images: name a run trained on whole images.')
  kind = model['encoder']
  num_classes = len(images.class_names(data['name'], data_dir or data['data_dir'], classes=data.get('classes') or ()))
  return saved, classifier(kind, model[kind], num_classes)


def _teacher_model(workdir: str, data_name: str, data_dir: str, class_names: list[str]) -> EncoderWithHead:
  """The classifier a teacher workdir trained; its classes must be the student's."""
  saved, model = saved_classifier(workdir, data_dir)
  theirs = images.class_names(saved['data']['name'], data_dir, classes=saved['data'].get('classes') or ())
  if theirs != class_names:
    raise ValueError(f'teacher {workdir!r} classifies {saved["data"]["name"]!r} ({len(theirs)} classes), not the '
                     f'{len(class_names)} classes of {data_name!r}; distil from a teacher of the same classes.')
  return model
