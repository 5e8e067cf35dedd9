"""Distillation: the losses against numpy, the fixed training subset, and runs with frozen teachers end to end
(teachers pinned and never trained; sharded, pmap and kill -9 runs log the losses of one device)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foundation import checkpoint, losses, train
from foundation.data import images
from test_configs import load
from test_tasks_vision import _latest_state
from test_train import logged, run

CONFIG = 'configs/distill/fashion_mnist.py'


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_soft_target_loss_matches_numpy_with_temperature_and_mixing():
  rng = np.random.default_rng(0)
  student, teachers = rng.normal(size=(5, 7)) * 3, rng.normal(size=(3, 5, 7)) * 3
  labels = rng.integers(0, 7, size=5)
  for temperature, alpha in ((1.0, 0.5), (4.0, 0.9), (0.5, 0.0), (8.0, 1.0)):
    p = np.mean([_softmax(t / temperature) for t in teachers], 0)  # the ensemble: mean of probabilities
    q = _softmax(student / temperature)
    kl = np.mean([sum(p[i, c] * np.log(p[i, c] / q[i, c]) for c in range(7)) for i in range(5)])
    hard = np.mean([-np.log(_softmax(student)[i, labels[i]]) for i in range(5)])
    want = alpha * temperature ** 2 * kl + (1 - alpha) * hard
    targets = losses.teacher_probs(jnp.asarray(teachers), temperature)
    np.testing.assert_allclose(targets, p, rtol=1e-5)
    got = losses.distillation_loss(jnp.asarray(student), targets, jnp.asarray(labels), temperature, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_at_high_temperature_the_gradient_is_logit_matching():
  """Hinton et al. section 2.1: d/dz of T^2 KL -> ((z - mean z) - (v - mean v)) / (C * batch) as T grows."""
  rng = np.random.default_rng(1)
  z, v = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  matching = ((z - z.mean(-1, keepdims=True)) - (v - v.mean(-1, keepdims=True))) / (6 * 4)
  errors = []
  for temperature in (10.0, 100.0, 1000.0):
    grad = jax.grad(lambda s: losses.soft_target_loss(
        s, losses.teacher_probs(jnp.asarray(v)[None], temperature), temperature))(jnp.asarray(z))
    errors.append(np.abs(np.asarray(grad) - matching).max())
  # The difference shrinks as 1/T (the next term of the expansion): tenfold per decade of T.
  assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5 and errors[2] < 1e-3 * np.abs(matching).max(), errors


def test_crd_loss_is_infonce_between_student_and_teacher_embeddings():
  rng = np.random.default_rng(2)
  s, t, temperature = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), 0.2
  s_n = s / np.linalg.norm(s, axis=1, keepdims=True)
  t_n = t / np.linalg.norm(t, axis=1, keepdims=True)
  total = 0.0
  for i in range(6):  # each student row picks its own teacher row among all, and each teacher row its student row
    row = [s_n[i] @ t_n[j] / temperature for j in range(6)]
    col = [s_n[j] @ t_n[i] / temperature for j in range(6)]
    total += -row[i] + np.log(np.sum(np.exp(row))) - col[i] + np.log(np.sum(np.exp(col)))
  np.testing.assert_allclose(losses.crd_loss(jnp.asarray(s), jnp.asarray(t), temperature), total / 12, rtol=1e-5)


def test_class_balanced_subset_is_fixed_by_its_seed_alone():
  labels = np.repeat(np.arange(10), 100)[np.random.default_rng(3).permutation(1000)]
  a = images.class_balanced_subset(labels, 0.03, seed=0)
  assert len(a) == 30 and np.all(np.bincount(labels[a], minlength=10) == 3)
  np.testing.assert_array_equal(a, images.class_balanced_subset(labels, 0.03, seed=0))
  assert not np.array_equal(a, images.class_balanced_subset(labels, 0.03, seed=1))
  np.testing.assert_array_equal(images.class_balanced_subset(labels, 1.0, seed=0), np.arange(1000))
  with pytest.raises(ValueError, match='choose a larger fraction'):
    images.class_balanced_subset(labels, 0.001, seed=0)


def _config(tfds_dir, variant, **overrides):
  config = load(CONFIG).get_config(variant)
  config.data.data_dir = tfds_dir
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def teacher(tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train.train_and_evaluate(_config(tfds_dir, 'teacher,smoke'), workdir)
  return workdir


def test_teachers_are_pinned_frozen_and_not_saved_with_the_student(tfds_dir, teacher, tmp_path):
  workdir = str(tmp_path / 'kd')
  config = _config(tfds_dir, 'kd,smoke', teachers=f'{teacher},{teacher}')
  config.data.train_fraction = 0.03
  train.train_and_evaluate(config, workdir)
  state = _latest_state(tmp_path / 'kd')
  assert sorted(state['params']) == ['backbone', 'head']  # no teacher among the trained (and saved) params
  student_size = sum(x.size for x in jax.tree.leaves(state['params']))
  # Adam's two moments of the student only: the teachers have no optimizer state.
  assert sum(x.size for x in jax.tree.leaves(state['opt_state'])) <= 2 * student_size + 8
  teacher_params = _latest_state(__import__('pathlib').Path(teacher))['params']
  pins = json.loads((tmp_path / 'kd' / 'config.json').read_text())['frozen_sources']
  assert sorted(pins) == ['teacher_0', 'teacher_1']
  assert pins['teacher_0']['step'] == 4 and pins['teacher_0']['hash'] == checkpoint.content_hash(teacher_params)
  # Two copies of one teacher are that teacher: the ensemble's accuracy is the member's, computed on test.
  evals = logged(workdir)
  final = evals[max(evals)]
  assert final['best/eval/teacher/accuracy'] == final['best/eval/teacher/0/accuracy']
  assert 0 <= final['best/eval/agreement'] <= 1 and final['best/eval/kl'] >= 0
  assert 'eval/accuracy' not in evals[4]  # selection evaluations read validation, not test


@pytest.fixture(scope='module')
def kd_one_device(tfds_dir, teacher, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('kd_one'))
  run(workdir, tfds_dir, f'--config.teachers={teacher}', '--config.log_every=1', devices=1,
      config=f'{CONFIG}:kd,smoke')
  return logged(workdir)


@pytest.mark.parametrize('name,flags', [
    ('sharded', ('--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')),
    ('pmap', ('--config.parallelism=pmap',))])
def test_distillation_sharded_and_on_pmap_logs_the_losses_of_one_device(tfds_dir, teacher, kd_one_device, tmp_path,
                                                                         name, flags):
  workdir = str(tmp_path / name)
  run(workdir, tfds_dir, f'--config.teachers={teacher}', '--config.log_every=1', *flags, config=f'{CONFIG}:kd,smoke')
  other = logged(workdir)
  for step in range(1, 5):
    np.testing.assert_allclose(other[step]['train/loss'], kd_one_device[step]['train/loss'], rtol=2e-5,
                               err_msg=f'{name} step {step}')


def test_kill_9_of_a_distillation_run_resumes_to_the_uninterrupted_numbers(tfds_dir, teacher, kd_one_device,
                                                                           tmp_path):
  args = (f'--config.teachers={teacher}', '--config.log_every=1')
  killed = run(str(tmp_path), tfds_dir, *args, kill_at_step=2, check=False, config=f'{CONFIG}:kd,smoke')
  assert killed.returncode != 0
  run(str(tmp_path), tfds_dir, *args, config=f'{CONFIG}:kd,smoke')
  resumed = logged(str(tmp_path))
  for step in range(1, 5):
    np.testing.assert_allclose(resumed[step]['train/loss'], kd_one_device[step]['train/loss'], rtol=2e-5)
  np.testing.assert_allclose(resumed[4]['best/eval/accuracy'], kd_one_device[4]['best/eval/accuracy'])


@pytest.mark.parametrize('variant,overrides,message', [
    ('kd,smoke', dict(teachers='/nonexistent/run'), 'has no config.json'),
    ('kd,smoke', dict(teachers=''), r'--config.teachers=DIR\[,DIR...\]'),
    ('student,smoke', dict(teachers='TEACHER'), 'nothing uses them'),
    ('kd,smoke', {'teachers': 'TEACHER', 'distill.temperature': 0.0}, 'temperature=0.0 must be positive'),
    ('kd,smoke', {'teachers': 'TEACHER', 'distill.alpha': 1.5}, r'alpha=1.5 must be in \[0, 1\]'),
    ('kd,smoke', {'teachers': 'OTHER_CLASSES'}, r"classifies 'movie_sentiment' \(2 classes\), not the 10"),
    ('crd,smoke', {'teachers': 'TEACHER', 'parallelism': 'pmap'}, '--config.parallelism=jit'),
    ('kd,smoke', {'teachers': 'TEACHER', 'data.validation_split': 'test[:100]'}, 'share 100 examples'),
])
def test_bad_distillation_input_is_one_line_before_anything_is_written(tfds_dir, teacher, tmp_path, variant,
                                                                       overrides, message):
  other = tmp_path / 'other_classes'
  other.mkdir()
  saved = json.loads(open(f'{teacher}/config.json').read())
  saved['data']['name'] = 'movie_sentiment'
  (other / 'config.json').write_text(json.dumps(saved))
  where = {'TEACHER': teacher, 'OTHER_CLASSES': str(other)}
  config = _config(tfds_dir, variant)
  for key, value in overrides.items():
    config.update_from_flattened_dict({key: where.get(value, value)} if isinstance(value, str) else {key: value})
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_weighted_and_top_k_soft_targets_match_numpy():
  rng = np.random.default_rng(4)
  student, teacher = rng.normal(size=(2, 5, 9)), rng.normal(size=(1, 2, 5, 9))
  labels, weights = rng.integers(0, 9, size=(2, 5)), (rng.uniform(size=(2, 5)) > 0.4).astype(np.float32)
  temperature, alpha, k = 2.0, 0.7, 3
  kth = np.sort(teacher[0] / temperature, -1)[..., -k][..., None]
  p = np.where(teacher[0] / temperature >= kth, np.exp(teacher[0] / temperature), 0.0)
  p /= p.sum(-1, keepdims=True)  # the teacher's top 3 only, renormalised
  log_q = np.log(_softmax(student / temperature))
  kl = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0), -1)
  hard = -np.log(np.take_along_axis(_softmax(student), labels[..., None], -1)[..., 0])
  mean = lambda v: np.sum(v * weights) / np.sum(weights)  # padded tokens (weight 0) do not count
  want = alpha * temperature ** 2 * mean(kl) + (1 - alpha) * mean(hard)
  targets = losses.teacher_probs(jnp.asarray(teacher), temperature, top_k=k)
  np.testing.assert_allclose(targets, p, rtol=1e-5, atol=1e-7)
  got = losses.distillation_loss(jnp.asarray(student), targets, jnp.asarray(labels), temperature, alpha,
                                 jnp.asarray(weights))
  np.testing.assert_allclose(got, want, rtol=1e-5)


LM_CONFIG = 'configs/distill/shakespeare.py'


@pytest.fixture(scope='module')
def lm_teacher(tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lm_teacher'))
  config = load(LM_CONFIG).get_config('teacher,smoke')
  config.data.data_dir = tfds_dir
  train.train_and_evaluate(config, workdir)
  return workdir


def test_lm_student_initialised_as_its_teacher_has_zero_token_kl(tfds_dir, lm_teacher, tmp_path):
  # The teacher's own architecture and weights as the student, soft targets only: KL(teacher || student) = 0 at the
  # first step, on every real token; a second teacher of another tokenizer is refused before anything is written.
  config = load(LM_CONFIG).get_config('teacher,kd,smoke')
  config.data.data_dir = tfds_dir
  config.update(teachers=lm_teacher, log_every=1, num_train_steps=2)
  config.distill.alpha = 1.0
  config.init_from.source = lm_teacher
  config.sample.num_samples = 0
  train.train_and_evaluate(config, str(tmp_path / 'self'))
  assert abs(logged(str(tmp_path / 'self'))[1]['train/loss']) < 1e-5
  other = load(LM_CONFIG).get_config('kd,bpe,smoke')
  other.data.data_dir = tfds_dir
  other.teachers = lm_teacher
  with pytest.raises(ValueError, match='token-level distillation needs one vocabulary.*foundation.sample_corpus'):
    train.train_and_evaluate(other, str(tmp_path / 'other'))
  assert not (tmp_path / 'other').exists()
  longer = load(LM_CONFIG).get_config('kd,smoke')
  longer.data.data_dir = tfds_dir
  longer.teachers = lm_teacher
  longer.data.seq_len = config.data.seq_len + 1  # past the teacher's trained context
  with pytest.raises(ValueError, match=rf'seq_len={longer.data.seq_len} is longer than the context teacher .* was '
                                       rf'trained on \({config.data.seq_len} tokens\)'):
    train.train_and_evaluate(longer, str(tmp_path / 'longer'))
  assert not (tmp_path / 'longer').exists()


def test_teacher_samples_continue_each_chunk_from_the_trained_context(lm_teacher):
  """Greedy samples (top_k=1) against the teacher's plain causal forward: chunk i's token j is the argmax after the
  `context` tokens before chunk i and its first j tokens, and nothing older."""
  import flax.linen as nn
  from foundation.models.transformer import Transformer
  from foundation.sample_corpus import sample_rows
  from foundation.tasks.lm import saved_lm
  _, cfg = saved_lm(lm_teacher)
  model = Transformer(cfg)
  context, chunk, rows, length = 12, 8, 3, 20  # 3 chunks, the last one cut to 4 tokens
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32), jnp.int32)))['params']
  params, _ = checkpoint.restore_params(lm_teacher, 'params', abstract)
  prompts = np.random.default_rng(0).integers(0, 256, size=(rows, context))
  with nn.logical_axis_rules(()):
    got = sample_rows(model, params, prompts, tokens_per_row=length, chunk=chunk, rng=jax.random.key(1),
                      temperature=1.0, top_k=1, top_p=1.0)
    assert got.shape == (rows, length)
    full = np.concatenate([prompts, got], axis=1)
    for i in range(0, length, chunk):
      window = full[:, i:context + i + chunk - 1]  # the chunk's context, then its tokens but the last
      logits = np.asarray(model.apply({'params': params}, jnp.asarray(window)))[:, context - 1:]
      want = logits.argmax(-1)[:, :min(chunk, length - i)]
      np.testing.assert_array_equal(got[:, i:i + chunk], want)


def test_sequence_level_distillation_trains_another_tokenizer_on_the_teachers_text(tfds_dir, lm_teacher, tmp_path,
                                                                                      capsys):
  from foundation import sample_corpus
  from foundation.data import text
  from foundation.data.tokenizers import ByteTokenizer
  tok = ByteTokenizer()
  row = np.concatenate([tok.encode('ab'), [tok.eos_id, tok.eos_id], tok.encode('c'), [tok.pad_id, tok.eos_id]])
  assert sample_corpus.documents(row[None], tok) == ['ab', 'c']  # cut at eos, empty pieces dropped
  out = str(tmp_path / 'text')
  args = [f'--teacher={lm_teacher}', f'--out={out}', '--tokens=610', '--tokens_per_row=40', '--batch=8',
          f'--data_dir={tfds_dir}']
  assert sample_corpus.main(args) == 0
  summary = json.loads(open(f'{out}/teacher_samples.json').read())
  # 2 rounds of 8 rows of 40: the second keeps 7 rows and 10 tokens of an eighth, 610 in all
  assert (summary['tokens'], summary['step'], summary['chunk']) == (610, 6, 16)
  samples = text.read_texts('teacher_samples', out, 'train', 'text')
  assert len(samples) == summary['documents'] and sum(len(s.encode()) for s in samples) == summary['bytes']
  assert text.read_texts('teacher_samples', out, 'validation', 'text') == text.read_texts(
      'shakespeare_plays', tfds_dir, 'validation', 'text')  # the student is evaluated on the real text
  assert sample_corpus.main(args) == 2  # --out exists: refused, nothing overwritten
  # Settings it cannot sample with, and more prompts than the shards hold: one line each, before the teacher is read.
  capsys.readouterr()
  for bad, message in (('--temperature=0', '--temperature=0.0 must be positive.'),
                       ('--top_p=1.5', '--top_p=1.5 must be in (0, 1]'), ('--batch=800000', '--batch=800000: ')):
    assert sample_corpus.main([*args[:-3], f'--out={tmp_path / "bad"}', bad, f'--data_dir={tfds_dir}']) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f'foundation.sample_corpus: {message}')
  assert not (tmp_path / 'bad').exists()
  config = load(LM_CONFIG).get_config('seqkd,bpe,smoke')
  with pytest.raises(ValueError, match='data_dir is empty.*foundation.sample_corpus'):
    train.train_and_evaluate(config, str(tmp_path / 'no_data'))
  config.data.data_dir, config.data.num_shards = out, 2  # a few hundred bytes of samples: two shards hold a window
  train.train_and_evaluate(config, str(tmp_path / 'student'))
  final = logged(str(tmp_path / 'student'))[config.num_train_steps]
  assert np.isfinite(final['eval/nats_per_byte']) and final['eval/nats_per_byte'] < final['eval/loss']


def test_cross_modal_student_sees_block_averages_and_no_labels(tfds_dir, teacher):
  from foundation.tasks import distill
  config = _config(tfds_dir, 'cross_modal,smoke', teachers=teacher)
  task = distill.build(config)
  params = task.init(jax.random.key(0))
  frozen = task.frozen(checkpoint.Sources())
  batch = next(iter(task.train_batches(0, 1)))
  shuffled = dict(batch, label=np.roll(batch['label'], 1))
  rng = jax.random.key(1)
  # alpha = 1: the loss (and so every gradient) is the same whatever the labels of the student's modality.
  assert float(task.loss(params, frozen, batch, rng)[0]) == float(task.loss(params, frozen, shuffled, rng)[0])
  x = np.random.default_rng(5).normal(size=(2, 28, 28, 1)).astype(np.float32)
  want = np.array([[[[x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4, 0].mean()] for j in range(7)] for i in range(7)]
                   for b in range(2)])
  np.testing.assert_allclose(distill._student_view('pool4', jnp.asarray(x)), want, rtol=1e-5)


def test_a_student_trained_with_crd_and_hints_is_a_teacher_and_can_be_pruned(tfds_dir, teacher, tmp_path):
  """Its checkpoint holds CRD's projections and the hint regressor beside the classifier. As a teacher only the
  classifier is read, pinned by the hash of those params, and it scores on test what its own run reported; pruning
  reads the same params."""
  from foundation import compress
  crd = tmp_path / 'crd'
  config = _config(tfds_dir, 'crd,smoke', teachers=teacher)
  config.distill.feature_weight = 0.5
  reported = train.train_and_evaluate(config, str(crd))
  params = _latest_state(crd)['params']
  assert {'crd', 'hint'} <= set(params) and np.isfinite(reported['best/eval/accuracy'])
  classifier = {k: v for k, v in params.items() if k not in ('crd', 'hint')}

  results = train.train_and_evaluate(_config(tfds_dir, 'kd,smoke', teachers=str(crd)), str(tmp_path / 'kd'))
  pin = json.loads((tmp_path / 'kd' / 'config.json').read_text())['frozen_sources']['teacher_0']
  assert pin['step'] == 4 and pin['hash'] == checkpoint.content_hash(classifier)
  assert results['best/eval/teacher/accuracy'] == pytest.approx(reported['best/eval/accuracy'], abs=1e-9)

  out = tmp_path / 'pruned'
  assert compress.main([f'--workdir={crd}', '--method=magnitude', '--sparsity=0.5', f'--out={out}',
                        '--calibration_examples=8']) == 0
  pruned = _latest_state(out)['params']
  assert sorted(pruned) == sorted(classifier)
  head_kernel = lambda tree: next(x for path, x in jax.tree_util.tree_flatten_with_path(tree['head'])[0]
                                  if 'kernel' in jax.tree_util.keystr(path))
  kernel, dense = head_kernel(pruned), head_kernel(classifier)
  assert np.mean(kernel == 0) == 0.5 and np.all(kernel[kernel != 0] == dense[kernel != 0])
