"""Vision tasks end to end: LiT restores and freezes another run's encoder; contrastive tasks refuse to split their
batch; retrieval with class labels."""

import json
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from foundation import checkpoint, config_base, tasks, train
from foundation.evaluate import zero_shot
from foundation.models.image_encoders import image_encoder
from foundation.models.two_tower import TwoTower, TwoTowerConfig
from foundation.tasks import clip
from test_configs import load, step_flops


def test_lit_restores_the_encoder_of_another_run_and_keeps_it_frozen(tfds_dir, tmp_path):
  supervised = load('configs/classify/fashion_mnist.py').get_config('smoke')
  supervised.data.data_dir = tfds_dir
  train.train_and_evaluate(supervised, str(tmp_path / 'supervised'))

  lit = load('configs/contrastive/clip_fashion_mnist.py').get_config('smoke')
  lit.data.data_dir = tfds_dir
  lit.lock_image_tower = dict(workdir=str(tmp_path / 'supervised'), params_path='params/backbone')
  # A stem stride changes no parameter shape: without the architecture check this would restore and be wrong.
  lit.model.image = dict(supervised.model.cnn.to_dict(), stem_stride=1)
  with pytest.raises(ValueError, match=r'--config\.model\.image\.stem_stride=2$'):
    train.train_and_evaluate(lit, str(tmp_path / 'lit'))
  assert not (tmp_path / 'lit').exists()  # refused before anything was written

  lit.model.image = supervised.model.cnn.to_dict()
  # LiT proper: no image head, so the locked features are the embedding space and must have its size.
  lit.model.image_head = False
  with pytest.raises(ValueError, match=r'embeds an image as its encoder\'s (\d+) features: set '
                                       r'--config\.model\.embed_dim=\1\.$') as refused:
    train.train_and_evaluate(lit, str(tmp_path / 'lit'))
  lit.model.embed_dim = int(refused.value.args[0].split('=')[-1].rstrip('.'))
  train.train_and_evaluate(lit, str(tmp_path / 'lit'))

  task = clip.build(lit)
  restored = task.frozen(checkpoint.Sources())
  saved = _latest_state(tmp_path / 'supervised')['params']['backbone']
  jax.tree.map(np.testing.assert_array_equal, restored, saved)
  # The source is pinned: config.json names its step and content hash, which a resumed run must find again.
  pin = json.loads((tmp_path / 'lit' / 'config.json').read_text())['frozen_sources']['lock_image_tower']
  assert pin['step'] == supervised.num_train_steps and pin['hash'] == checkpoint.content_hash(saved)
  lit_state = _latest_state(tmp_path / 'lit')
  assert 'image_encoder' not in lit_state['params']  # not trained, not saved with the trainable state
  assert 'text_encoder' in lit_state['params'] and 'image_projection' not in lit_state['params']
  # An image's embedding is its locked features, normalised (numpy here).
  x = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
  model = TwoTower(TwoTowerConfig.from_dict(lit.model))
  embedded = model.apply({'params': {**lit_state['params'], 'image_encoder': saved}}, x, method=model.encode_image)
  features = np.asarray(image_encoder('cnn', supervised.model.cnn).apply({'params': saved}, x), np.float64)
  np.testing.assert_allclose(embedded, features / np.linalg.norm(features, axis=-1, keepdims=True), rtol=1e-5)

  # A padding prompt on the LiT run's zero-shot classifier reads its text tower from it and the image tower it
  # locked, from the run that tower came from.
  prompt = load('configs/transfer/fashion.py').get_config('padding,smoke')
  prompt.data.data_dir = tfds_dir
  prompt.prompt.source = str(tmp_path / 'lit')
  sources = checkpoint.Sources()
  both = tasks.build(prompt).frozen(sources)
  jax.tree.map(np.testing.assert_array_equal, both.pop('image_encoder'), saved)
  jax.tree.map(np.testing.assert_array_equal, both, lit_state['params'])
  assert sources.recorded['prompt_source_image_tower'] == pin


@pytest.mark.parametrize('path', ['configs/contrastive/simclr_fashion_mnist.py', 'configs/contrastive/clip_fashion_mnist.py'])
@pytest.mark.parametrize('overrides', [dict(parallelism='pmap'), dict(grad_accum_steps=2)])
def test_contrastive_tasks_refuse_to_split_the_batch_their_loss_contrasts(tfds_dir, tmp_path, path, overrides):
  config = load(path).get_config('smoke')
  config.data.data_dir = tfds_dir
  config.update(overrides)
  with pytest.raises(ValueError, match='--config.parallelism=jit --config.grad_accum_steps=1'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_class_filter_label_budget_and_transfer_to_digits(tfds_dir, tmp_path):
  """A source classifier on Fashion-MNIST classes 5-9 with 2 labels each: a 5-way head, evaluated on those classes'
  test images relabelled 0-4 (against its saved params). Fine-tuned onto mnist5k, intermediate evaluations read the
  validation split alone; the final one adds test and the source task's ridge probe with the encoder before (the
  source's own backbone, recomputed here) and after adaptation. Bad filters, budgets, overlapping splits, an
  early-stopping metric without a validation split and bad encoders are one line before anything is written."""
  from foundation.data import images
  from foundation.evaluate import probes
  from foundation.models.image_encoders import classifier
  from foundation.tasks import distill
  from test_train import logged
  classes = (5, 6, 7, 8, 9)
  source = load('configs/classify/fashion_mnist.py').get_config('smoke')
  source.data.update(data_dir=tfds_dir, classes=classes, shots_per_class=2)
  source.eval.representation = False
  source.update(global_batch_size=8, num_train_steps=2)
  for field, value, message in [
      ('data.classes', (5, 5), 'at least two distinct class ids'),
      ('data.shots_per_class', 6001, 'class 5 has only 6000'),
      ('data.shots_per_class', 1, 'global_batch_size=8 is larger than the 5 training examples .* at most 5'),
      ('data.validation_split', 'train[40000:]', r"train_split='train' and config.data.validation_split="
                                                 r"'train\[40000:\]' share 20,000 examples"),
      ('data.eval_split', 'train[:10]', 'share 10 examples'),
      ('early_stopping.metric', 'eval/accuracy',
       'before the end give \\(none: no evaluation before the end reads a validation split')]:
    bad = source.copy_and_resolve_references()
    bad.update_from_flattened_dict({field: value})
    with pytest.raises(train.ConfigError, match=message):
      train.prepare(bad, str(tmp_path / 'bad'))
    assert not (tmp_path / 'bad').exists()
  source_results = train.train_and_evaluate(source, str(tmp_path / 'source'))
  params = _latest_state(tmp_path / 'source')['params']
  assert {leaf.shape[-1] for leaf in jax.tree.leaves(params['head'])} == {5}
  model = classifier('cnn', source.model.cnn, 5)
  assert distill.saved_classifier(str(tmp_path / 'source'))[1].head == model.head  # 5-way for a teacher, a pruning
  tx, ty = images.load_split(name='fashion_mnist_offline', data_dir=tfds_dir, split=source.data.eval_split)
  tx, ty = tx[np.isin(ty, classes)], ty[np.isin(ty, classes)] - 5
  logits = np.asarray(jax.jit(model.apply)({'params': params}, tx.astype(np.float32) / 255))
  assert source_results['eval/accuracy'] == pytest.approx(np.mean(np.argmax(logits, -1) == ty), abs=1e-6)

  config = load('configs/transfer/digits.py').get_config('finetune,smoke')
  config.data.data_dir = tfds_dir
  config.init_from.source = str(tmp_path / 'source')
  config.update(num_train_steps=4, eval_every=2)
  wrong = config.copy_and_resolve_references()
  wrong.model.cnn.widths = (8, 32)
  with pytest.raises(train.ConfigError, match=r'another architecture; to restore it, set --config\.model\.cnn\.widths'):
    train.prepare(wrong, str(tmp_path / 'wrong'))
  # :finetune_top's freeze is made for the widths the variant saw; wider ones given after it would train a lower
  # stage. And a negative forgetting probe would fail only after training.
  top = load('configs/transfer/digits.py').get_config('finetune_top,smoke')
  top.init_from.source = config.init_from.source
  top.data.data_dir = tfds_dir
  for field, value, message in [
      ('model.cnn.widths', (8, 16, 32), r"made by :finetune_top for a 2-stage CNN, but the encoder here is a 3-stage "
                                        r"CNN: add --config.optim.freeze=\"\('\^backbone/\(stem\|stage0\|stage1\)',"
                                        r"\)\" --config.finetune_top_stages=3"),
      ('eval.source_probe_examples', -1, 'source_probe_examples=-1 must be a whole number of at least 0')]:
    bad = top.copy_and_resolve_references()
    bad.update_from_flattened_dict({field: value})
    with pytest.raises(train.ConfigError, match=message):
      train.prepare(bad, str(tmp_path / 'wrong'))
  # Each stage's name is matched whole: with 11 stages, stage1 does not freeze stage10 (the top one).
  freeze = re.compile(config_base.below_top_stage(11))
  names = ('stem/kernel', 'stem_norm/scale', 'stage1_block0/conv1/kernel', 'stage9_block1/conv2/kernel',
           'stage10_block0/conv1/kernel')
  assert [bool(freeze.match(f'backbone/{name}')) for name in names] == [True, True, True, True, False]
  # Up to 10 stages no stage's name starts another's: the pattern is the one earlier runs recorded, so they match.
  assert config_base.below_top_stage(3) == '^backbone/(stem|stage0|stage1)'
  # A freeze written by hand is the user's, whatever it spells: the lower stage frozen, the top one and head train.
  own = config.copy_and_resolve_references()
  own.optim.freeze = ('^backbone/(stem|stage0)',)
  train.prepare(own, str(tmp_path / 'own'), dry=True)
  saved = json.loads((tmp_path / 'source' / 'config.json').read_text())
  saved['data']['name'] = 'unprepared_images'  # forgetting reads the source's task at the end: refused at the start
  (tmp_path / 'elsewhere').mkdir()
  (tmp_path / 'elsewhere' / 'config.json').write_text(json.dumps(saved))
  (tmp_path / 'elsewhere' / 'checkpoints').symlink_to(tmp_path / 'source' / 'checkpoints')
  moved = config.copy_and_resolve_references()
  moved.init_from.source = str(tmp_path / 'elsewhere')
  with pytest.raises(train.ConfigError, match="'unprepared_images' is not prepared"):
    train.prepare(moved, str(tmp_path / 'moved'))
  assert not (tmp_path / 'moved').exists() and not (tmp_path / 'wrong').exists()
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  steps = logged(str(tmp_path / 'run'))
  assert 'eval/validation/accuracy' in steps[2] and 'eval/accuracy' not in steps[2]
  assert 'best/eval/accuracy' in results and 'best/eval/forgetting/source_probe' in results
  x, y = images.load_split(name='fashion_mnist_offline', data_dir=tfds_dir, split='train', max_examples=400,
                           classes=classes)
  encode = jax.jit(lambda p, a: model.apply({'params': p}, a.astype(np.float32) / 255, method=model.features))
  features = [np.asarray(encode(params, a)) for a in (x, tx)]
  before = probes.ridge_probe(features[0], y, features[1], ty, num_classes=5)
  assert results['best/eval/forgetting/source_probe_before'] == pytest.approx(before, abs=2e-3)


def _latest_state(workdir):
  """The latest checkpoint's state read independently of foundation.checkpoint, as numpy."""
  manager = ocp.CheckpointManager(str(workdir / 'checkpoints'), item_names=('state', 'record'))
  step = manager.latest_step()
  metadata = manager.item_metadata(step).state
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=args))).state


def test_frozen_encoder_layers_get_no_backward_pass_and_the_flops_count_follows(tfds_dir, tmp_path):
  """XLA's FLOP count of the classifier's step with the whole encoder frozen (a linear probe) and with its lower
  stages frozen falls below the unfrozen step's, and the count behind MFU follows XLA's (which adds the loss and
  the optimizer: within 15% on this tiny model)."""
  flops = {}
  for freeze in ((), ('^backbone/(stem|stage0)',), ('^backbone/',)):
    config = load('configs/classify/fashion_mnist.py').get_config('smoke')
    config.data.data_dir = tfds_dir
    config.optim.freeze = freeze
    xla, ours = step_flops(config, tmp_path / 'run')
    flops[freeze] = xla
    assert ours == pytest.approx(xla, rel=0.15), freeze
  assert flops[('^backbone/',)] < flops[('^backbone/(stem|stage0)',)] < 0.7 * flops[()], flops


def test_with_a_validation_split_a_classifier_probes_test_at_the_end_alone(tfds_dir, tmp_path):
  from foundation import config_base
  config = load('configs/classify/fashion_mnist.py').get_config('smoke')
  config.data.update(data_dir=tfds_dir, train_split='train[:50000]',
                     validation_split=config_base.FASHION_SMOKE_SPLITS['validation_split'])
  config.eval_every = 2
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  evaluated = {}
  for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    evaluated.setdefault(record.pop('step'), set()).update(k for k in record if k.startswith('eval/'))
  assert 'eval/validation/accuracy' in evaluated[2]
  assert not {'eval/accuracy', 'eval/linear_probe/accuracy'} & evaluated[2]
  assert {'eval/accuracy', 'eval/linear_probe/accuracy', 'eval/validation/accuracy'} <= evaluated[4]


def test_class_level_retrieval_counts_any_item_of_the_right_class():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=40)
  images = rng.normal(size=(40, 8))
  texts = rng.normal(size=(40, 8))
  recall = zero_shot.retrieval_recall(images, texts, ks=(1, 3), labels=labels)
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  for direction, q, c in (('image_to_text', images, texts), ('text_to_image', texts, images)):
    sims = norm(q) @ norm(c).T
    for k in (1, 3):
      hits = [np.any(labels[np.argsort(-sims[i], kind='stable')[:k]] == labels[i]) for i in range(40)]
      assert recall[f'{direction}_recall_at_{k}'] == np.mean(hits)
  # A collapsed encoder ties every candidate: as for aligned pairs, a tie counts against the relevant ones, so a
  # query's class is found only when k covers every item of the other classes.
  others = len(labels) - np.bincount(labels)[labels]  # per query
  collapsed = zero_shot.retrieval_recall(np.ones((40, 8)), np.ones((40, 8)), ks=(1, others.min(), others.max() + 1),
                                         labels=labels, batch_size=7)
  for direction in ('image_to_text', 'text_to_image'):
    assert [collapsed[f'{direction}_recall_at_{k}'] for k in (1, others.min(), others.max() + 1)] == [0.0, 0.0, 1.0]


def test_clip_retrieval_asks_for_no_more_pairs_than_the_split_holds(tfds_dir, tmp_path):
  """Retrieval draws its pairs as one batch of the evaluation split: more than the split would repeat images, and a
  repeat's caption counts as a miss. Refused before anything is written, counting a class filter's examples."""
  from foundation.data import images
  config = load('configs/contrastive/clip_fashion_mnist.py').get_config('smoke')
  config.data.data_dir = tfds_dir
  labels = images.split_labels(config.data.name, tfds_dir, config.data.eval_split)
  config.data.classes = (0, 1)
  held = int(np.isin(labels, (0, 1)).sum())
  config.eval.retrieval_examples = held + 1
  with pytest.raises(ValueError, match=rf'retrieval_examples={held + 1}: .* the {held} examples of .* set it to '
                                       rf'1\.\.{held}\.$'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  config.eval.retrieval_examples = held
  assert clip.build(config).evaluate is not None
