"""Pruning by Optimal Brain Surgeon: the rule against brute force, against magnitude pruning, N:M patterns, the
im2col inputs of a conv, and the command end to end (a pruned workdir that init_from evaluates)."""

import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foundation import compress, config_base, train
from foundation.data import text
from foundation.tasks import lm
from test_configs import load


def _optimal(w, h, removed):
  """argmin over w' with w'[removed] = 0 of (w' - w)^T H (w' - w), by a direct solve over the free weights."""
  free = [i for i in range(len(w)) if i not in removed]
  out = np.zeros_like(w)
  if free:
    r = sorted(removed)
    # Stationarity on the free coordinates: H_ff (w'_f - w_f) = H_fr w_r.
    out[free] = w[free] + np.linalg.solve(h[np.ix_(free, free)], h[np.ix_(free, r)] @ w[r])
  return out, (out - w) @ h @ (out - w)


def test_obs_removes_the_weights_brute_force_picks_and_compensates_exactly():
  rng = np.random.default_rng(0)
  d, out = 6, 3
  x = rng.normal(size=(40, d)) @ rng.normal(size=(d, d))  # correlated inputs
  w = rng.normal(size=(d, out))
  hessian = 2 * x.T @ x / len(x)
  damped = hessian + 0.01 * np.mean(np.diag(hessian)) * np.eye(d)
  got = compress.obs_prune(w, hessian, sparsity=0.5, rounds=3, rows_at_once=2)  # one weight per round
  for row in range(out):
    removed = set()
    for _ in range(3):  # greedy: each step removes the weight whose optimally compensated removal costs least
      costs = {q: _optimal(w[:, row], damped, removed | {q})[1] for q in set(range(d)) - removed}
      removed.add(min(costs, key=costs.get))
    want, _ = _optimal(w[:, row], damped, removed)
    assert set(np.flatnonzero(got[:, row] == 0)) == removed
    np.testing.assert_allclose(got[:, row], want, rtol=1e-6, atol=1e-8)
  # Removing two at once per round uses the exact update for a set: the compensation is still the optimum for the
  # weights it removed.
  batched = compress.obs_prune(w, hessian, sparsity=0.5, rounds=2)
  for row in range(out):
    want, _ = _optimal(w[:, row], damped, set(np.flatnonzero(batched[:, row] == 0)))
    np.testing.assert_allclose(batched[:, row], want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('pattern', [None, (2, 4)])
def test_obs_output_error_is_below_magnitude_pruning_and_patterns_hold(pattern):
  rng = np.random.default_rng(1)
  d, out = 32, 16
  x = rng.normal(size=(256, d)) @ rng.normal(size=(d, d)) * rng.uniform(0.1, 3, size=d)
  w = rng.normal(size=(d, out))
  hessian = 2 * x.T @ x / len(x)
  error = lambda new: np.sum((x @ w - x @ new) ** 2)
  obs = compress.obs_prune(w, hessian, 0.5, pattern)
  magnitude = compress.magnitude_prune(w, 0.5, pattern)
  for new in (obs, magnitude):
    assert np.all(np.sum(new == 0, axis=0) == d // 2)  # every row (output) keeps half its weights
    if pattern:
      assert np.all(np.sum(new.reshape(d // 4, 4, out) == 0, axis=1) == 2)  # two of every four inputs
  assert error(obs) < 0.5 * error(magnitude), (error(obs), error(magnitude))
  # Magnitude pruning keeps the largest weights untouched.
  kept = magnitude != 0
  np.testing.assert_array_equal(magnitude[kept], w[kept])


@pytest.mark.parametrize('d, sparsity, removed', [(9, 0.95, 8),   # a grayscale stem: 8.55, and one weight stays
                                                  (9, 0.5, 5), (11, 0.5, 6),  # halves go up in every layer
                                                  (10, 0.3, 3), (20, 0.95, 19),
                                                  (90, 0.35, 32)])  # 0.35 * 90 is 31.4999... in floats
def test_each_row_loses_the_nearest_count_but_keeps_a_weight(d, sparsity, removed):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(64, d))
  w = rng.normal(size=(d, 5))
  magnitude = compress.magnitude_prune(w, sparsity)
  want = np.where(np.abs(w) >= np.sort(np.abs(w), axis=0)[removed], w, 0)  # each output's d - removed largest
  np.testing.assert_array_equal(magnitude, want)
  obs = compress.obs_prune(w, 2 * x.T @ x / len(x), sparsity)
  assert np.all(np.sum(obs == 0, axis=0) == removed) and np.all(np.any(obs != 0, axis=0))


def test_layer_inputs_are_what_each_kernel_multiplies():
  """im2col patches of a strided conv times its flattened kernel give the conv's output (before the bias)."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.Conv(5, (3, 3), strides=(2, 2), padding='SAME', use_bias=False, name='conv')(x)
      return nn.Dense(4, use_bias=False, name='dense')(y.reshape(len(x), -1))

  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
  params = Net().init(jax.random.key(1), x)['params']
  inputs = compress.layer_inputs(Net(), params, x)
  conv_out = nn.Conv(5, (3, 3), strides=(2, 2), padding='SAME', use_bias=False).apply(
      {'params': params['conv']}, x)
  np.testing.assert_allclose(inputs[('conv', 'kernel')] @ np.asarray(params['conv']['kernel']).reshape(27, 5),
                             np.asarray(conv_out).reshape(-1, 5), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(inputs[('dense', 'kernel')], np.asarray(conv_out).reshape(2, -1), rtol=1e-6)
  # A zero-initialised layer (a fresh classifier head) has no output to lose: its error is 0, not 0/0.
  params = {**params, 'dense': {'kernel': jnp.zeros_like(params['dense']['kernel'])}}
  _, report = compress.prune_model(Net(), params, np.asarray(x), method='obs', sparsity=0.5, pattern=None, damp=0.01,
                                   rounds=4)
  assert report['dense/kernel']['relative_error'] == 0.0 and 0 < report['conv/kernel']['relative_error'] < 1
  # Explicit padding, even the same amounts as SAME's here, is another padding than the patches': refused.
  class Padded(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name='conv')(x)

  padded = Padded().init(jax.random.key(1), x)['params']
  with pytest.raises(ValueError, match=r'conv: only plain \(ungrouped, undilated, SAME-padded\) convolutions'):
    compress.layer_inputs(Padded(), padded, x)


def test_compress_writes_a_pruned_workdir_that_init_from_evaluates(tfds_dir, tmp_path, capsys, monkeypatch):
  config = load('configs/distill/fashion_mnist.py').get_config('teacher,smoke')
  config.data.data_dir = tfds_dir
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  out = tmp_path / 'pruned'
  monkeypatch.chdir(tmp_path)  # --out relative to the working directory, as the README's command gives it
  assert compress.main([f'--workdir={tmp_path / "run"}', '--method=obs', '--pattern=2:4', '--sparsity=0.9',
                        '--out=pruned', '--calibration_examples=64']) == 0
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('pruned')) == ['pruned']
  summary = json.loads((out / 'compress.json').read_text())
  assert summary['sparsity'] == 0.5  # the pattern's, which overrides --sparsity
  # Every conv and dense kernel is 2:4 sparse (half of it zero), but the stem conv with its 9 inputs.
  layers = summary['layers']
  assert sorted(name for name, layer in layers.items() if 'skipped' in layer) == ['backbone/stem/kernel']
  assert len(layers) > 5 and all(abs(layer['sparsity'] - 0.5) < 1e-9 for name, layer in layers.items()
                                 if name != 'backbone/stem/kernel')
  # --eval_only reads the pruned workdir's params, all it saved: the same accuracy as a run initialised from them.
  only = train.evaluate_checkpoint(config, str(out))
  evaluation = load('configs/distill/fashion_mnist.py').get_config('teacher,smoke')
  evaluation.data.data_dir = tfds_dir
  evaluation.update(num_train_steps=0)
  evaluation.early_stopping.metric = ''
  evaluation.init_from.source = str(out)
  results = train.train_and_evaluate(evaluation, str(tmp_path / 'eval'))
  logged = [json.loads(line) for line in (tmp_path / 'eval' / 'metrics.jsonl').read_text().splitlines()]
  assert any('eval/accuracy' in record for record in logged)
  assert only['eval/accuracy'] == pytest.approx(results['eval/accuracy'], abs=1e-6)
  # A write that fails leaves nothing behind, so the same command can run again.
  with monkeypatch.context() as patch:
    patch.setattr(compress.checkpoint.Checkpointer, 'save', lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
      compress.main([f'--workdir={tmp_path / "run"}', '--out=failed', '--calibration_examples=64'])
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith('failed')]
  # Refused before anything is written: the output exists or is remote, a sparsity outside [0, 1), a bad pattern.
  for args, message in (([f'--out={out}'], 'exists'), (['--out=gs://bucket/x'], 'writes a local directory'),
                        (['--sparsity=1.0', f'--out={tmp_path / "x"}'], '[0, 1)'),
                        (['--pattern=4:2', f'--out={tmp_path / "x"}'], '0 < N < M'),
                        (['--damp=0', f'--out={tmp_path / "x"}'], '--damp must be positive')):
    assert compress.main([f'--workdir={tmp_path / "run"}', *args]) == 2
    assert message in capsys.readouterr().err
  # Runs whose saved weights pruning cannot read layer by layer, or that read other inputs than whole images.
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  scanned = {**config_base.fashion_vit(), 'scan_layers': True}
  vit = {**saved, 'model': {**saved['model'], 'encoder': 'vit', 'vit': scanned}}
  pool4 = {**saved, 'distill': {**saved['distill'], 'student_view': 'pool4'}}
  vit_message = ("scans its blocks (one stacked tree); pruning reads each layer's inputs from the unrolled model: "
                 'retrain with --config.model.vit.scan_layers=False.')
  for name, changed, message in (('vit', vit, vit_message), ('pool4', pool4, "'pool4' views")):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(json.dumps(changed))
    assert compress.main([f'--workdir={tmp_path / name}', f'--out={tmp_path / "x"}']) == 2
    assert message in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()


def test_decoder_projections_are_pruned_from_their_own_inputs(tfds_dir, tmp_path, capsys):
  config = load('configs/lm/shakespeare.py').get_config('smoke')
  config.data.data_dir = tfds_dir
  train.train_and_evaluate(config, str(tmp_path / 'lm'))
  from foundation.models.transformer import Transformer, TransformerConfig
  model_cfg = TransformerConfig.from_dict(config.model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, size=(2, 16)), jnp.int32)
  params = nn.unbox(Transformer(model_cfg).init(jax.random.key(0), tokens)['params'])
  inputs = compress.layer_inputs(Transformer(model_cfg), params, tokens)
  names = {'/'.join(k) for k in inputs}
  for i in range(model_cfg.num_layers):
    assert {f'layers_{i}/attention/{n}' for n in ('query', 'key', 'value', 'out')} <= names
    assert {f'layers_{i}/mlp/{n}' for n in ('gate', 'up', 'down')} <= names
  # Layer 0's query reads the RMS-normalised embeddings of the tokens (numpy).
  x = np.asarray(params['embedding'])[np.asarray(tokens)].reshape(-1, model_cfg.embed_dim)
  normed = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + model_cfg.norm_eps)
  normed = normed * np.asarray(params['layers_0']['attention_norm']['scale'])
  np.testing.assert_allclose(inputs[('layers_0', 'attention', 'query')], normed, rtol=1e-4, atol=1e-5)

  out = tmp_path / 'pruned'
  scanned = json.loads((tmp_path / 'lm' / 'config.json').read_text())
  scanned['model']['scan_layers'] = True
  (tmp_path / 'scanned').mkdir()
  (tmp_path / 'scanned' / 'config.json').write_text(json.dumps(scanned))
  assert compress.main([f'--workdir={tmp_path / "scanned"}', f'--out={out}']) == 2
  assert 'retrain with --config.model.scan_layers=False.' in capsys.readouterr().err and not out.exists()
  # More calibration sequences than the training split holds: one line naming the flag.
  assert compress.main([f'--workdir={tmp_path / "lm"}', f'--out={out}', '--calibration_examples=10000000']) == 2
  assert capsys.readouterr().err.startswith('foundation.compress: --calibration_examples=10000000: ')
  assert not out.exists()
  # Calibration sequences come from every shard in turn, so that 10 of them read 8 shards: the first batch of 2
  # rows per shard (shard k's at rows 2k and 2k + 1), interleaved.
  saved = json.loads((tmp_path / 'lm' / 'config.json').read_text())
  assert saved['data']['num_shards'] == 8
  batch = text.train_batches(name=saved['data']['name'], data_dir=tfds_dir, split='train', text_key='text',
                             tokenizer=lm.tokenizer_for('byte'), seq_len=saved['data']['seq_len'], global_batch=16,
                             num_shards=8, seed=saved['seed'])[0]
  np.testing.assert_array_equal(compress._calibration(saved, tfds_dir, 10),
                                batch['inputs'][[0, 2, 4, 6, 8, 10, 12, 14, 1, 3]])
  assert compress.main([f'--workdir={tmp_path / "lm"}', '--sparsity=0.5', f'--out={out}',
                        '--calibration_examples=16']) == 0
  layers = json.loads((out / 'compress.json').read_text())['layers']
  assert len(layers) == 7 * model_cfg.num_layers and all(v['sparsity'] == 0.5 for v in layers.values())
  evaluation = load('configs/lm/shakespeare.py').get_config('smoke')
  evaluation.data.data_dir = tfds_dir
  evaluation.update(num_train_steps=0)
  evaluation.init_from.source = str(out)
  results = train.train_and_evaluate(evaluation, str(tmp_path / 'eval'))
  assert np.isfinite(results['eval/loss'])
