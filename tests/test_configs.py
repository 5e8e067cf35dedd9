"""Every config file: its docstring carries the command that runs it, and its `:smoke` variant trains end to end."""

import glob
import os

import pytest

from conftest import REPO
from foundation import train

CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'configs', '**', '*.py'),
                                                             recursive=True))


def load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(path.replace('/', '.')[:-3], os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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


@pytest.mark.parametrize('path', CONFIGS)
def test_unknown_variant_is_an_error(path):
  with pytest.raises(ValueError, match='unknown variant'):
    load(path).get_config('no-such-variant')
