"""Every variant of every config, alone and combined with `:smoke`, passes the checks the loop makes before
writing anything. (A file of its own, so that the test runner can run it beside test_configs.py.)"""

import contextlib
import json
import math

import jax
import pytest

from foundation import train
from test_configs import CONFIGS, load


def _variants():
  return [(path, name) for path in CONFIGS for name in load(path).VARIANTS]


class _Records(list):
  def __init__(self, source):
    super().__init__(source[i] for i in range(len(source)))

  def __getitems__(self, keys):
    return [self[k] for k in keys]


@pytest.fixture
def offline_or_mocked_data(monkeypatch):
  """Datasets this codebase builds are read from the test's TFDS dir; any other (cifar10 on a TPU VM) is TFDS's own
  mock data of the real feature spec, so the variant's shapes are checked without downloading it."""
  import tensorflow_datasets as tfds
  from foundation.data import images, prepare, text

  @contextlib.contextmanager
  def context(name):
    if name.split(':')[0] in (*prepare.FOUNDATION_BUILDERS, 'teacher_samples'):  # built by the test
      yield
      return
    with tfds.testing.mock_data(num_examples=1024, policy=tfds.testing.MockPolicy.USE_CODE):
      monkeypatch.setattr(images, 'check_prepared', lambda *a, **k: None)
      monkeypatch.setattr(text, 'check_prepared', lambda *a, **k: None)
      monkeypatch.setattr(text, 'check_disjoint', lambda *a, **k: None)  # the mock has no split sizes
      # The mock source's batched read takes other arguments than a real one; its records in a list serve.
      mocked = images._data_source  # pylint: disable=protected-access
      monkeypatch.setattr(images, '_data_source', lambda *a, **k: _Records(mocked(*a, **k)))
      yield
  return context


def _teacher_samples(tfds_dir, tmp_path) -> str:
  from foundation.data import teacher_samples, text
  out = tmp_path / 'teacher_samples'
  if not out.exists():
    (out / teacher_samples.SAMPLES_DIR).mkdir(parents=True)
    for split in ('train', 'validation'):
      texts = text.read_texts('shakespeare_plays', tfds_dir, split, 'text')
      with open(out / teacher_samples.SAMPLES_DIR / f'{split}.jsonl', 'w') as f:
        f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
    teacher_samples.build(str(out))
  return str(out)


@pytest.mark.parametrize('path, variant', _variants())
def test_every_variant_builds_alone_and_with_smoke(path, variant, tfds_dir, tmp_path, offline_or_mocked_data):
  """Every variant, and every variant combined with smoke, passes every check the loop makes before writing: the
  config's validation, the task's data and shapes, the optimizer's rules, and the train step traced abstractly."""
  for arg in (variant, f'{variant},smoke'):
    config = load(path).get_config(arg)
    config.data.data_dir = tfds_dir
    replicas = math.gcd(config.global_batch_size, jax.device_count())
    if replicas < jax.device_count():  # e.g. :baby's batch of 12 on these 8 devices: the rest goes to tensor
      config.mesh.update(data=replicas, fsdp=1, tensor=jax.device_count() // replicas)
    if config.get('lock_image_tower'):  # LiT checks the locked run's encoder config: give it a matching one
      source = tmp_path / 'locked'
      source.mkdir(exist_ok=True)
      locked = load('configs/contrastive/simclr_fashion_mnist.py').get_config('smoke' if 'smoke' in arg else None)
      (source / 'config.json').write_text(locked.to_json_best_effort())
      config.lock_image_tower.workdir = str(source)
    if config.get('distill') and not config.teachers and any(
        config.distill.get(weight) for weight in ('alpha', 'crd_weight', 'feature_weight')):
      # A distilling variant reads its teacher's config.json (dry: not its checkpoint): give it the teacher's.
      source = tmp_path / 'teacher'
      source.mkdir(exist_ok=True)
      teacher = load(path).get_config('teacher,smoke' if 'smoke' in arg else 'teacher')
      (source / 'config.json').write_text(teacher.to_json_best_effort())
      config.teachers = str(source)
    if config.get('eval', {}).get('source_probe_examples') and not config.init_from.source:
      # A transfer variant from a pretrained encoder: a source run of the same encoder (dry: its config.json).
      source = tmp_path / 'source'
      (source / 'checkpoints').mkdir(parents=True, exist_ok=True)
      (source / 'config.json').write_text(config.to_json_best_effort())
      config.init_from.source = str(source)
    if config.task == 'visual_prompt' and not config.prompt.source:
      # Visual prompts read the frozen run's config.json (dry: not its checkpoint): a ViT run for VPT, CLIP else.
      source = tmp_path / 'frozen'
      source.mkdir(exist_ok=True)
      vpt = config.prompt.method.startswith('vpt')
      frozen = load('configs/classify/fashion_mnist.py' if vpt else 'configs/contrastive/clip_fashion_mnist.py')
      frozen = frozen.get_config(','.join(['vit'] * vpt + ['smoke'] * ('smoke' in arg)))
      (source / 'config.json').write_text(frozen.to_json_best_effort())
      config.prompt.source = str(source)
    if config.data.name == 'teacher_samples':  # sequence-level KD's corpus: the real plays stand in for samples
      config.data.data_dir = _teacher_samples(tfds_dir, tmp_path)
    with offline_or_mocked_data(config.data.name):
      train.prepare(config, str(tmp_path / 'run'), dry=True)
    assert not (tmp_path / 'run').exists()
