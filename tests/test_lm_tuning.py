"""Tuning a pretrained LM through the loop (configs/adapt/movie_sentiment.py): what trains, what is saved, what an
adapter loads onto, and the classifiers' numbers against references computed one example at a time with plain
full forwards. The numerics of the adapters themselves are in test_adapters.py (soft prompt, prefix) and
test_transformer.py (LoRA)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from foundation import checkpoint, tasks, train
from foundation.evaluate import lm_classify as lmc
from foundation.evaluate import probes
from foundation.models.gguf import load_gguf
from foundation.models.transformer import Transformer, TransformerConfig
from foundation.tasks import lm_classify as task_module
import test_gguf
from test_transformer import np_hidden
from test_configs import load as load_config, step_flops
from test_lm_classify import BYTES, movie_dir, smoke_config  # noqa: F401  (movie_dir is a fixture)
from test_train import logged, run


def saved_params(config, workdir):
  """The trainable params of the run's newest checkpoint, as the task's init shapes them."""
  task = tasks.build(config)
  abstract = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
  return checkpoint.restore_params(workdir, 'params', abstract)[0]


def saved_scalars(workdir):
  """How many numbers the newest checkpoint's state holds (from its metadata)."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                                                 'record': ocp.JsonCheckpointHandler()})
  try:
    metadata = manager.item_metadata(manager.latest_step()).state
  finally:
    manager.close()
  return sum(int(np.prod(m.shape)) for m in jax.tree.leaves(metadata))


def eval_metrics(results):
  return {k: v for k, v in results.items() if k.startswith('eval/')}


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
  monkeypatch.setitem(test_gguf.TINY, 'context', 1024)
  return lambda name, seed=0: test_gguf.write_tiny_gguf(str(tmp_path / name), seed=seed)


def gguf_config(movie_dir, method, path, **overrides):
  return smoke_config(movie_dir, f'{method},smoke', **{'lm.source': path, 'prompt.label_words': ('bad', 'good'),
                                                       'eval.max_examples': 4, 'eval.selection_max_examples': 2,
                                                       **overrides})


@pytest.mark.parametrize('method, trained', [('prompt', {'prompt'}), ('prefix', {'prefix'}), ('lora', {'lora'})])
def test_an_adapter_saves_only_itself_and_loads_onto_its_base_only(movie_dir, tiny_gguf, tmp_path, method, trained):
  path = tiny_gguf('base.gguf')
  config = gguf_config(movie_dir, method, path)
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)

  params = saved_params(config, workdir)
  assert set(params) == trained
  adapter_size = sum(x.size for x in jax.tree.leaves(params))
  base_size = sum(x.size for x in jax.tree.leaves(load_gguf(path)[1]))
  assert 0 < adapter_size < base_size / 10
  # Params, and Adam's two moments of them, and a few counters: nothing of the frozen base.
  assert 3 * adapter_size <= saved_scalars(workdir) <= 3 * adapter_size + 8
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['frozen_sources']['lm']['hash'] == checkpoint.file_hash(path)
  steps = logged(workdir)
  # Evaluations during training read the first 2 validation sentences only; test is read for the result alone.
  assert steps[2]['eval/validation/accuracy'] in (0.0, 0.5, 1.0) and 'eval/accuracy' not in steps[2]
  assert 'best/eval/accuracy' in results and 'best/eval/validation/accuracy' in results
  assert steps[min(steps)]['params/trainable'] == adapter_size
  assert steps[min(steps)]['params/total'] == adapter_size + base_size

  # Evaluation only, from the adapter's workdir onto the same base: it reads the step early stopping selected and
  # gives the numbers the run reported for it.
  again = gguf_config(movie_dir, method, path, num_train_steps=0, **{'init_from.source': workdir})
  reloaded = train.train_and_evaluate(again, str(tmp_path / 'eval'))
  final = {k[len('best/'):]: v for k, v in results.items() if k.startswith('best/eval/')}
  assert final and eval_metrics(reloaded) == pytest.approx(final, rel=1e-6, abs=1e-6)

  other = gguf_config(movie_dir, method, tiny_gguf('other.gguf', seed=1), num_train_steps=0,
                      **{'init_from.source': workdir})
  with pytest.raises(train.ConfigError, match='its params belong to that base'):
    train.prepare(other, str(tmp_path / 'elsewhere'))
  assert not (tmp_path / 'elsewhere').exists()
  # Loaded with another seed (a soft prompt's or prefix's initial tokens), or another LoRA scale, the saved values
  # would make another adapter: refused, naming the field.
  field, value = {'lora': ('tune.lora_alpha', 32.0)}.get(method, ('seed', 1))
  moved = gguf_config(movie_dir, method, path, num_train_steps=0, **{'init_from.source': workdir, field: value})
  with pytest.raises(train.ConfigError, match=rf'was trained with {field}=.* \(here {value!r}\): its params mean'):
    train.prepare(moved, str(tmp_path / 'moved'))
  assert not (tmp_path / 'moved').exists()


def reference_hidden(model, params, tokens):
  """The final hidden state of the last token, one unpadded full forward (the numpy decoder's)."""
  return np_hidden(params, model.config, tokens)[-1]


def test_head_classifies_the_last_tokens_hidden_state(movie_dir, tmp_path):
  """Standard fine-tuning: the LM and a linear head train; its validation accuracy at the end equals the head
  applied to hidden states of unpadded full forwards with the saved params."""
  config = smoke_config(movie_dir, 'head,smoke', **{'eval.max_examples': 8})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  params = saved_params(config, workdir)
  model = Transformer(TransformerConfig.from_dict(config.lm.random_model))
  texts, labels = task_module.read_split(config.data, 'validation', 8)
  features = np.stack([reference_hidden(model, params['lm'], np.asarray(BYTES.encode(lmc.fill(
      config.prompt.template, t)), np.int32)) for t in texts])
  predicted = (features @ params['head']['kernel'] + params['head']['bias']).argmax(1)
  last = logged(workdir)[config.num_train_steps]
  assert last['eval/validation/accuracy'] == pytest.approx(np.mean(predicted == labels))
  init = nn.unbox(jax.jit(tasks.build(config).init)(jax.random.key(config.seed)))
  assert not np.array_equal(init['lm']['layers_0']['mlp']['up'], params['lm']['layers_0']['mlp']['up'])


def test_top_blocks_fine_tuning_leaves_the_frozen_blocks_bitwise(movie_dir, tmp_path):
  config = smoke_config(movie_dir, 'finetune_top,smoke')
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  params = saved_params(config, workdir)
  init = nn.unbox(jax.jit(tasks.build(config).init)(jax.random.key(config.seed)))
  for name in ('embedding', 'layers_0'):
    jax.tree.map(np.testing.assert_array_equal, params['lm'][name], init['lm'][name])
  assert not np.array_equal(params['lm']['layers_1']['mlp']['down'], init['lm']['layers_1']['mlp']['down'])
  steps = logged(workdir)
  trained = sum(x.size for x in jax.tree.leaves((params['lm']['layers_1'], params['lm']['final_norm'])))
  assert steps[min(steps)]['params/trainable'] == trained


def test_frozen_blocks_get_no_backward_pass_and_the_flops_count_follows(movie_dir, tmp_path):
  """Under the top-block freeze the step's FLOPs (XLA's count of the lowered step, blocks unrolled so that it sees
  each one) fall below full fine-tuning's, and the count behind MFU falls by the same factor."""
  flops = {}
  for variant in ('finetune', 'finetune_top'):
    flops[variant] = step_flops(smoke_config(movie_dir, f'{variant},smoke', **{'lm.scan_layers': False}),
                                tmp_path / variant)
  xla, ours = (flops['finetune_top'][i] / flops['finetune'][i] for i in (0, 1))
  assert xla < 0.75 and ours == pytest.approx(xla, rel=0.05), flops


# The input's gradient alone through a frozen block costs XLA about 1.2 forward passes (attention's backward), which
# the count takes as 1: the last case, where only that runs through the blocks, is held to 10%.
@pytest.mark.parametrize('tied, frozen, rel', [(True, '^(embedding$|layers_[0-2]/)', 0.05),  # the top block trains
                                               (False, '^(embedding$|layers_[0-2]/)', 0.05),  # and lm_head
                                               (False, '^(lm_head$|layers_)', 0.1)])  # the input embedding, norms
def test_a_language_model_under_a_freeze_counts_the_flops_it_runs(tfds_dir, tmp_path, tied, frozen, rel):
  """Next-token training (configs/lm/shakespeare.py, four blocks) with some weights frozen: the count behind MFU
  falls by the factor that XLA's count of the lowered step falls, with the output projection tied to the embedding
  or not."""
  flops = {}
  for freeze in ((), (frozen,)):
    config = load_config('configs/lm/shakespeare.py').get_config('smoke')
    config.data.data_dir = tfds_dir
    config.model.update(num_layers=4, tie_embeddings=tied)
    config.optim.freeze = freeze
    flops[freeze] = step_flops(config, tmp_path / f'frozen{len(freeze)}')
  xla, ours = (flops[(frozen,)][i] / flops[()][i] for i in (0, 1))
  assert xla < 0.9 and ours == pytest.approx(xla, rel=rel), flops


@pytest.mark.parametrize('chat', [False, True])
def test_probe_is_the_probe_suite_on_last_token_features(movie_dir, tiny_gguf, tmp_path, chat):
  """The ridge probe of the frozen LM's last-token features, against features of unpadded full forwards. A chat
  prompt's features are read after the chat turn's start, as the other methods read their prompts. An evaluation
  before the end reads the selection split's first eval.selection_max_examples, never test."""
  overrides = {'data.shots_per_class': 6, 'eval.max_examples': 12}
  config = (gguf_config(movie_dir, 'probe', tiny_gguf('base.gguf'), **{'prompt.chat': True, **overrides}) if chat
            else smoke_config(movie_dir, 'probe,smoke', **overrides))
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  task = tasks.build(config)
  lm = nn.unbox(task.frozen(checkpoint.Sources()))['lm']
  model_cfg, tokenizer = task_module._language_model(config.lm)  # pylint: disable=protected-access
  head, tail = tokenizer.chat_parts()[:2] if chat else ('', '')
  encode = lambda s: np.asarray(tokenizer.encode(s), np.int32).reshape(-1)
  feature = lambda text: np_hidden(lm, model_cfg, np.concatenate(
      [encode(head), encode(lmc.fill(config.prompt.template, text) + tail)]))[-1]
  texts, labels = task_module.read_split(config.data, 'train', 0)
  picks = lmc.demonstration_indices(labels, 12, 2, seed=config.seed, draw=task_module.TRAIN_SUBSET_DRAW)
  train_x = np.stack([feature(texts[i]) for i in picks])

  def probe(split, n):
    split_texts, split_labels = task_module.read_split(config.data, split, n)
    return probes.ridge_probe(train_x, labels[picks], np.stack([feature(t) for t in split_texts]), split_labels,
                              num_classes=2)

  for split, at in (('validation', 'validation/'), ('test', '')):
    assert results[f'eval/{at}accuracy'] == pytest.approx(probe(split, 12)), split
  during = logged(workdir)[config.eval_every]
  assert {k.split('/')[1] for k in during if k.startswith('eval/')} == {'validation'}
  assert during['eval/validation/accuracy'] == pytest.approx(probe('validation', config.eval.selection_max_examples
                                                                   or 12))


def test_few_shot_training_rows_are_balanced_and_drawn_per_seed(movie_dir):
  seen = {}
  for seed in (0, 1):
    config = smoke_config(movie_dir, 'prompt,smoke', **{'data.shots_per_class': 4, 'global_batch_size': 8,
                                                        'seed': seed})
    batch = tasks.build(config).train_batches(0, 1)[3]  # one epoch of the 8 rows
    assert sorted(batch['label'].tolist()) == [0] * 4 + [1] * 4
    seen[seed] = sorted(BYTES.decode(t[m]) for t, m in zip(batch['tokens'], batch['mask']))
  assert seen[0] != seen[1]


# The flags of the README's 16-per-class table, as its commands give them to each method.
README_FEW_SHOT = {'data.shots_per_class': 16, 'num_train_steps': 60, 'eval_every': 20, 'checkpoint_every': 20,
                   'optim.warmup_steps': 6, 'eval.splits': ('test', 'ood_tweets')}


def test_the_few_shot_variant_gives_each_method_the_readme_tables_flags():
  """`:few_shot` after a method (the sweep that regenerates the 16-per-class table) is the method with the flags
  the table's commands name; the methods that train nothing keep their zero steps. Named in another order, it is
  refused."""
  module = load_config('configs/adapt/movie_sentiment.py')
  for method in ('prompt', 'prefix', 'lora', 'finetune', 'finetune_top', 'head', 'probe', 'zero_shot'):
    expected = module.get_config(method)
    if expected.num_train_steps:
      expected.update_from_flattened_dict(README_FEW_SHOT)
    else:  # eval_every and the schedule do nothing without steps; zero-shot keeps validation, where it chooses
      expected.data.shots_per_class = 16
      expected.eval.splits = README_FEW_SHOT['eval.splits'] if method == 'probe' else (
          'validation', 'test', 'ood_tweets')
    assert module.get_config(f'{method},few_shot').to_dict() == expected.to_dict(), method
  for misordered in ('few_shot,lora', 'prompt,smoke,few_shot'):  # the method would undo it, or it the smoke run
    with pytest.raises(ValueError, match='name :few_shot after the method and before :smoke'):
      module.get_config(misordered)


def test_length_sorted_batches_cover_every_row_once_per_epoch_and_pad_less(movie_dir):
  config = smoke_config(movie_dir, 'prompt,smoke', **{'global_batch_size': 16, 'data.shots_per_class': 0})
  texts, _ = task_module.read_split(config.data, 'train', 0)
  bodies = {lmc.fill(config.prompt.template, t) for t in texts}
  padding = {}
  for window in (16, 0):
    config.data.sort_window = window
    rows = tasks.build(config).train_batches(0, 1)
    epoch = [rows[s] for s in range(len(texts) // 16)]
    seen = [BYTES.decode(t[m]) for b in epoch for t, m in zip(b['tokens'], b['mask'])]
    assert len(set(seen)) == len(seen) and set(seen) <= bodies
    for b in epoch:
      assert b['tokens'].shape[1] == lmc.bucket_length(b['mask'].sum(1).max())
    padding[window] = np.mean([1 - b['mask'].mean() for b in epoch])
  assert padding[16] < padding[0] / 2


@pytest.mark.parametrize('variant, overrides, message', [
    ('lora', {'tune.lora_targets': 'attention/qkv'}, 'matches no projection'),
    ('prompt', {'tune.length': 5000}, "exceeds the model's context"),
    ('prefix', {'tune.prefix_hidden': 8}, r"tune.init='vocab' does not apply .* set --config.tune.init=uniform"),
    ('finetune_top', {'optim.freeze': ('.*',)}, 'leaves nothing trainable'),
    ('head', {'icl.shots': 4}, 'set --config.icl.shots=0'),
    ('lora', {'icl.shots': 4}, r'training reads zero-shot prompts.*--config.num_train_steps=0'),
    ('prompt', {'early_stopping.metric': 'eval/accuracy'},
     r"early_stopping.metric='eval/accuracy' is not among the metrics that the evaluations before the end give "
     r"\(eval/validation/accuracy, eval/validation/calibrated/accuracy\)"),
    ('head', {'early_stopping.metric': 'eval/validation/calibrated/accuracy'},
     r"before the end give \(eval/validation/accuracy\); name one of them"),
    ('prompt', {'eval.selection_splits': ('test',)}, 'not test: it is read for the result only'),
    ('prompt', {'eval.selection_splits': ('validation+test[:8]',)}, 'not test: it is read for the result only'),
    # The probe fits on the training split, though it takes no steps: what it is measured on must be apart from it.
    ('probe', {'eval.splits': ('validation', 'train[:5]'), 'num_train_steps': 0},
     r"config.eval.splits='train\[:5\]' share 5 examples"),
])
def test_bad_tuning_input_is_one_line_before_anything_is_written(movie_dir, tmp_path, variant, overrides, message):
  config = smoke_config(movie_dir, f'{variant},smoke', **overrides)
  with pytest.raises(train.ConfigError, match=message) as error:
    train.prepare(config, str(tmp_path / 'run'))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'run').exists()


def test_fine_tuning_a_gguf_needs_init_from_the_same_file_and_its_run_evaluates_in_context(movie_dir, tiny_gguf,
                                                                                          tmp_path):
  path = tiny_gguf('base.gguf')
  config = gguf_config(movie_dir, 'finetune', path, **{'init_from.source': ''})
  with pytest.raises(train.ConfigError, match='--config.init_from.target=lm'):
    train.prepare(config, str(tmp_path / 'run'))
  # Its workdir in place of the file, training nothing: the fine-tuned LM read with demonstrations, as the advice
  # against demonstrations in training says; with no demonstrations it gives the run's own numbers.
  workdir = str(tmp_path / 'tuned')
  results = train.train_and_evaluate(gguf_config(movie_dir, 'finetune', path, **{'init_from.source': path}), workdir)
  again = {'init_from.source': workdir, 'init_from.params_path': 'params/lm', 'num_train_steps': 0}
  reread = train.train_and_evaluate(gguf_config(movie_dir, 'finetune', path, **again), str(tmp_path / 'reread'))
  final = {k[len('best/'):]: v for k, v in results.items() if k.startswith('best/eval/')}
  assert final and eval_metrics(reread) == pytest.approx(final, rel=1e-6, abs=1e-6)
  in_context = train.train_and_evaluate(gguf_config(movie_dir, 'finetune', path, **again, **{'icl.shots': 2}),
                                        str(tmp_path / 'in_context'))
  assert 'eval/accuracy_std' in in_context


PROMPT_SMOKE = ('configs/adapt/movie_sentiment.py:prompt,smoke', '--config.num_train_steps=4',
                '--config.log_every=1', '--config.checkpoint_every=4', '--config.eval_every=4',
                '--config.eval.max_examples=4', '--config.early_stopping.metric=',
                '--config.lm.matmul_dtype=float32',  # equal losses across layouts are a float32 claim
                '--config.lm.scan_layers=False')


def test_prompt_tuning_on_a_sharded_base_and_on_pmap_and_scanned_equals_one_device(movie_dir, tmp_path):
  """The frozen base sharded over a 2x2x2 mesh (fsdp and tensor split its weights) and the pmap path, each with the
  base's blocks scanned (one stacked layer tree, as the config's default), log the losses of one device running
  the blocks unrolled. (Two runs against one, rather than each change on its own: a subprocess run is ~30 s of the
  suite.)"""
  one = str(tmp_path / 'one')
  run(one, movie_dir, *PROMPT_SMOKE[1:], config=PROMPT_SMOKE[0], devices=1)
  for name, flags in (('sharded', ('--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')),
                      ('pmap', ('--config.parallelism=pmap',))):
    other = str(tmp_path / name)
    run(other, movie_dir, *PROMPT_SMOKE[1:], *flags, '--config.lm.scan_layers=True', config=PROMPT_SMOKE[0])
    with open(os.path.join(other, 'config.json')) as f:
      assert json.load(f)['lm']['scan_layers']
    a, b = logged(one), logged(other)
    for step in range(1, 5):
      np.testing.assert_allclose(b[step]['train/loss'], a[step]['train/loss'], rtol=2e-5, err_msg=f'{name} {step}')


def test_selection_reads_validation_only_and_the_result_reads_its_own_splits(movie_dir, tmp_path):
  config = smoke_config(movie_dir, 'prompt,smoke', **{'eval.splits': ('test',), 'eval.max_examples': 4})
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  during = {k for step, m in logged(workdir).items() for k in m if k.startswith('eval/') and 'content_free' not in k}
  assert during and all(k.startswith('eval/validation/') for k in during)
  assert 'best/eval/accuracy' in results and not any(k.startswith('best/eval/validation/') for k in results)
