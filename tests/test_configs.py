"""Every config file: its docstring carries the command that runs it, and its `:smoke` variant trains end to end."""

import copy
import glob
import json
import os
import random
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from conftest import REPO
from foundation import config_base, metrics, optim, train
from foundation.models.image_encoders import classifier

CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'configs', '**', '*.py'),
                                                             recursive=True))


def load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(path.replace('/', '.')[:-3], os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def step_flops(config, workdir) -> tuple[float, float]:
  """(XLA's FLOP count of the config's lowered train step, the task's count behind MFU for the same global batch),
  from a dry prepare: nothing is compiled or written."""
  prepared = train.prepare(config, str(workdir), dry=True)
  return (metrics.xla_cost(train.lower_train_step(prepared, config))['flops'],
          prepared.task.flops_per_example() * config.global_batch_size)


def test_there_are_configs():
  assert 'configs/lm/shakespeare.py' in CONFIGS


@pytest.mark.parametrize('path', CONFIGS)
def test_docstring_carries_the_command(path):
  assert f'python -m foundation.main --config={path}' in load(path).__doc__


@pytest.mark.parametrize('path', CONFIGS)
def test_smoke_variant_trains(path, tfds_dir, tmp_path):
  config = load(path).get_config('smoke')
  config.data.data_dir = tfds_dir
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results and all(v == v for v in results.values())  # logged something, and no NaN
  assert os.path.exists(tmp_path / 'config.json') and os.path.exists(tmp_path / 'metrics.jsonl')
  assert os.listdir(tmp_path / 'checkpoints')
  # Every task counts its training FLOPs once it trains (the footprint at the end of the run).
  logged = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['compute/model_flops'] > 0 for r in logged if 'compute/model_flops' in r] == [True]


@pytest.mark.parametrize('path', CONFIGS)
def test_unknown_variant_is_an_error(path):
  with pytest.raises(ValueError, match='unknown variant'):
    load(path).get_config('no-such-variant')


def _mutations(value, rng):
  """Wrong types, zero, negative, huge, malformed regexes and unknown names for one config field."""
  if isinstance(value, bool):
    return [rng.choice(['yes', 2, None])]
  if isinstance(value, int):
    return [0, -1, -(10**6), 10**9, 'abc', 2.5, rng.randint(1, 7)]
  if isinstance(value, float):
    return [0.0, -1.0, float('inf'), float('nan'), 1e30, 'abc']
  if isinstance(value, str):
    return ['', 'no_such_name', '(', '[a-', 'x' * 300, 3]
  if isinstance(value, tuple):
    return [(), ('(',), ('no_such_param',), (0,), ('a', 'b', 'c', 'd', 'e', 'f', 'g')]
  return [None, 'abc', -1]


def _leaves(config, prefix=''):
  for key in sorted(config.keys()):
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def test_fuzzed_overrides_run_or_fail_with_one_clear_line_before_writing(tfds_dir, tmp_path):
  """200 random single-field overrides of the smoke configs: each is refused as the command line would refuse it
  (ml_collections' type check), or `prepare` accepts it, or `prepare` refuses it with a one-line ConfigError and
  nothing written. Anything else (a traceback, a hang, a file) fails the test, naming the override."""
  rng = random.Random(0)
  configs = {path: load(path).get_config('smoke') for path in CONFIGS}
  cases = []
  for path in CONFIGS:
    for name, value in _leaves(configs[path]):
      if name not in ('data.data_dir', 'task'):
        cases += [(path, name, m) for m in _mutations(value, rng)]
  rng.shuffle(cases)
  outcomes = {'type': 0, 'accepted': 0, 'refused': 0}
  failures = []
  for i, (path, name, value) in enumerate(cases[:200]):
    config = copy.deepcopy(configs[path])
    config.data.data_dir = tfds_dir
    try:
      *parents, leaf = name.split('.')
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
    except (TypeError, ValueError):
      outcomes['type'] += 1  # the command line refuses it the same way, before anything runs
      continue
    workdir = tmp_path / f'case{i}'
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train.prepare(config, str(workdir))
      outcomes['accepted'] += 1
    except train.ConfigError as e:
      if '\n' in str(e) or len(str(e)) > 600 + 3 * len(str(value)):
        failures.append(f'{path} --config.{name}={value!r}: a message of {len(str(e))} characters: {e}')
      outcomes['refused'] += 1
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f'{path} --config.{name}={value!r}: {type(e).__name__}: {e}')
    if workdir.exists():
      failures.append(f'{path} --config.{name}={value!r}: wrote {os.listdir(workdir)}')
  print(outcomes)
  assert not failures, '\n'.join(failures)
  assert outcomes['refused'] >= 40 and outcomes['accepted'] >= 20, outcomes


NO_VALIDATION = 'before the end give \\(none: no evaluation before the end reads a validation split\\)'
# A contrastive run whose probes read a validation split carved from train.
VALIDATION = {'data.train_split': 'train[:50000]', 'data.eval_split': 'train[50000:50400]'}
PROBES = 'eval/linear_probe/accuracy, eval/fewshot_1shot/accuracy, eval/fewshot_5shot/accuracy, eval/knn/accuracy'


@pytest.mark.parametrize('path, metric, message, overrides', [
    # Every evaluation of a contrastive run probes the test split: no metric may choose its step.
    ('configs/contrastive/simclr_fashion_mnist.py', 'eval/linear_probe/accuracy', NO_VALIDATION, {}),
    ('configs/contrastive/clip_fashion_mnist.py', 'eval/zero_shot/accuracy', NO_VALIDATION, {}),
    # Probing validation, they may: a misspelt metric is refused before training, not at the first evaluation.
    ('configs/contrastive/simclr_fashion_mnist.py', 'eval/linear_probe/acuracy', rf'\({PROBES}\)', VALIDATION),
    ('configs/contrastive/simclr_fashion_mnist.py', 'eval/knn/accuracy', None, VALIDATION),
    ('configs/contrastive/clip_fashion_mnist.py', 'eval/zero_shot/acuracy', rf'\(eval/zero_shot/accuracy, {PROBES}\)',
     VALIDATION),
    ('configs/distill/fashion_mnist.py', 'eval/accuracy', r'\(eval/train_accuracy, eval/validation/accuracy\)', {}),
    ('configs/lm/shakespeare.py', 'eval/accuracy', r'\(eval/loss, eval/perplexity, eval/nats_per_byte\)', {}),
    ('configs/lm/shakespeare.py', 'eval/loss', None, {}),  # the validation loss: accepted
])
def test_early_stopping_names_a_metric_of_the_evaluations_before_the_end(path, metric, message, overrides, tfds_dir,
                                                                           tmp_path):
  config = load(path).get_config('smoke')
  config.data.data_dir = tfds_dir
  config.update_from_flattened_dict(overrides)
  config.early_stopping.update(metric=metric, mode='min' if 'loss' in metric else 'max')
  if message is None:
    train.prepare(config, str(tmp_path / 'run'), dry=True)
  else:
    with pytest.raises(train.ConfigError, match=f'early_stopping.metric={metric!r} is not among .*{message}'):
      train.prepare(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('path, overrides, message', [
    ('configs/contrastive/simclr_fashion_mnist.py', {'eval.probe': 'logistc'},
     r"config.eval.probe='logistc'; choose one of \['logistic', 'ridge'\]"),
    ('configs/contrastive/clip_fashion_mnist.py', {'eval.shots': (0, 5)}, r'config.eval.shots=\(0, 5\) must be whole'),
    ('configs/classify/fashion_mnist.py', {'eval.fewshot_seeds': 0}, 'config.eval.fewshot_seeds=0 must be a whole'),
])
def test_probe_settings_are_checked_before_training(path, overrides, message, tfds_dir, tmp_path):
  """Not at the first evaluation, which for some runs comes after training."""
  config = load(path).get_config('smoke')
  config.data.data_dir = tfds_dir
  config.update_from_flattened_dict(overrides)
  with pytest.raises(train.ConfigError, match=message):
    train.prepare(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('path', ['configs/contrastive/simclr_fashion_mnist.py',
                                  'configs/contrastive/clip_fashion_mnist.py'])
def test_probes_scored_on_training_images_are_refused(path, tfds_dir, tmp_path):
  config = load(path).get_config('smoke')
  config.data.update(data_dir=tfds_dir, eval_split='train[:10]')
  with pytest.raises(train.ConfigError,
                     match=r"train_split='train' and config.data.eval_split='train\[:10\]' share 10"):
    train.prepare(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_the_fashion_mnist_configs_share_one_encoder():
  """SimCLR against supervised, a LiT tower, a fine-tuned backbone, a distillation teacher: one architecture."""
  want = config_base.fashion_cnn()
  encoders = [load('configs/classify/fashion_mnist.py').get_config().model.cnn,
              load('configs/contrastive/simclr_fashion_mnist.py').get_config().model.cnn,
              load('configs/contrastive/clip_fashion_mnist.py').get_config().model.image,
              load('configs/distill/fashion_mnist.py').get_config('teacher').model.cnn,
              load('configs/transfer/fashion.py').get_config().model.cnn]
  assert all(e.to_dict() == want for e in encoders)
  assert load('configs/classify/fashion_mnist.py').get_config('vit').model.vit.to_dict() == config_base.fashion_vit()


@pytest.mark.parametrize('path', ['configs/transfer/fashion.py', 'configs/transfer/digits.py'])
def test_top_stage_fine_tuning_trains_the_top_stage_and_the_head_alone(path):
  """:finetune_top freezes the stem and every stage but the last, on the full CNN and on the smoke one (whose two
  stages a fixed pattern for three would freeze whole, making it the probe)."""
  for arg in ('finetune_top', 'finetune_top,smoke'):
    config = load(path).get_config(arg)
    model = classifier('cnn', config.model.cnn, 10)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params'])
    by_part = {}  # 'stem', 'stage0', ..., 'classifier' -> {frozen or not, for each of its params}
    for name, frozen in zip(jax.tree.leaves(optim.param_names(params)),
                            jax.tree.leaves(optim.frozen_mask(config.optim, params))):
      by_part.setdefault(name.split('/')[1].split('_')[0], set()).add(bool(frozen))
    top = f'stage{len(config.model.cnn.widths) - 1}'
    assert by_part.pop(top) == {False} and by_part.pop('classifier') == {False}, (arg, by_part)
    assert by_part and all(v == {True} for v in by_part.values()) and 'stem' in by_part, (arg, by_part)
