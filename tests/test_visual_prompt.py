"""Visual prompts on a frozen run (foundation/tasks/visual_prompt.py): what trains, what is saved, where a pixel
prompt acts, how new classes are read from the frozen classifier, and the refusals."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foundation import checkpoint, train
from foundation.data import captions, images
from foundation.data.tokenizers import get_tokenizer
from foundation.models.image_encoders import classifier
from foundation.models.two_tower import TwoTower, TwoTowerConfig
from foundation.models.vit import ViT, ViTConfig
from foundation.tasks import visual_prompt
from test_configs import load
from test_tasks_vision import _latest_state

TINY_VIT = dict(embed_dim=32, num_layers=2, num_heads=2, mlp_dim=64)
NO_AUGMENT = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, brightness=0.0, contrast=0.0, blur_prob=0.0, noise_std=0.0)
REVERSED = tuple(range(9, -1, -1))


@pytest.fixture(scope='module')
def sources(tfds_dir, tmp_path_factory):
  """Two finished runs to prompt: a supervised ViT classifier and a CLIP model (two steps each)."""
  root = tmp_path_factory.mktemp('sources')
  supervised = load('configs/classify/fashion_mnist.py').get_config('vit,smoke')
  supervised.model.vit.update(TINY_VIT)
  supervised.eval.representation = False
  supervised.data.data_dir = tfds_dir
  supervised.num_train_steps = 2
  train.train_and_evaluate(supervised, str(root / 'vit'))
  clip = load('configs/contrastive/clip_fashion_mnist.py').get_config('smoke')
  clip.data.data_dir = tfds_dir
  clip.update(num_train_steps=2, eval_every=2)
  train.train_and_evaluate(clip, str(root / 'clip'))
  return {'vit': str(root / 'vit'), 'clip': str(root / 'clip'), 'supervised_config': supervised}


def prompt_config(variant, source, tfds_dir, target='configs/transfer/digits.py', **prompt):
  config = load(target).get_config(f'{variant},smoke')
  config.data.data_dir = tfds_dir
  config.prompt.update(source=source, **prompt)
  config.augment = NO_AUGMENT
  return config


def first_batch(task):
  batch = task.train_batches(0, 1)[0]
  return {k: jnp.asarray(v) for k, v in batch.items()}


def np_cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.mean(log_probs[np.arange(len(labels)), labels])


def test_vpt_deep_trains_prompts_and_a_head_on_a_frozen_vit(sources, tfds_dir, tmp_path):
  config = prompt_config('vpt_deep', sources['vit'], tfds_dir, target='configs/transfer/fashion.py')
  config.update(num_train_steps=4, eval_every=2, checkpoint_every=2)
  config.early_stopping.metric = ''  # the result is the last step's, whose checkpoint is the latest
  results = train.train_and_evaluate(config, str(tmp_path / 'vpt'))

  state = _latest_state(tmp_path / 'vpt')
  assert set(state['params']) == {'prompt', 'head'}  # the backbone is neither trained nor saved
  assert state['params']['prompt'].shape == (2, 10, 32)  # [layers, P, width]
  trainable = sum(x.size for x in jax.tree.leaves(state['params']))
  opt_leaves = [x for x in jax.tree.leaves(state['opt_state']) if np.ndim(x)]
  assert sum(x.size for x in opt_leaves) == 2 * trainable  # Adam's two moments of the prompt and head only
  with open(tmp_path / 'vpt' / 'config.json') as f:
    pin = json.load(f)['frozen_sources']['prompt_source']
  backbone = _latest_state(pathlib.Path(sources['vit']))['params']['backbone']
  assert pin['path'] == 'params/backbone' and pin['hash'] == checkpoint.content_hash(backbone)
  with open(tmp_path / 'vpt' / 'metrics.jsonl') as f:
    counts = [json.loads(line) for line in f if 'params/trainable' in line][0]
  assert counts['params/trainable'] == trainable

  # The reported test accuracy, recomputed from the saved prompts and head on the source's own encoder weights.
  vit = ViT(ViTConfig.from_dict(sources['supervised_config'].model.vit))
  x, y = images.load_split(name='fashion_mnist_offline', data_dir=tfds_dir, split=config.data.eval_split)
  features = jax.jit(lambda p, a: vit.apply({'params': p}, a.astype(jnp.float32) / 255,
                                            prompts=state['params']['prompt']))(backbone, x)
  head = state['params']['head']['classifier']
  predicted = np.argmax(np.asarray(features) @ head['kernel'] + head['bias'], -1)
  assert results['eval/accuracy'] == pytest.approx(float(np.mean(predicted == y)), abs=1e-6)


@pytest.mark.parametrize('method', ['padding', 'patch'])
def test_pixel_prompts_act_only_where_they_are_and_read_the_mapped_classes(sources, tfds_dir, method):
  """At a zero prompt the loss is the frozen classifier's cross-entropy with new class i scored by source class
  class_map[i]; the prompt's gradient is non-zero exactly on the border (padding) or the patch."""
  config = prompt_config(method, sources['vit'], tfds_dir, class_map=REVERSED, width=3, patch_size=5,
                         patch_at=(2, 20))
  task = visual_prompt.build(config)
  frozen = task.frozen(checkpoint.Sources())
  batch = first_batch(task)
  params = task.init(jax.random.key(0))
  loss, grads = jax.jit(jax.value_and_grad(lambda p: task.loss(p, frozen, batch, jax.random.key(1))[0]))(params)

  net = classifier('vit', sources['supervised_config'].model.vit, 10)
  source_logits = net.apply({'params': frozen}, batch['image'].astype(jnp.float32) / 255)
  assert float(loss) == pytest.approx(np_cross_entropy(np.asarray(source_logits)[:, list(REVERSED)],
                                                       np.asarray(batch['label'])), rel=1e-5)
  want = np.zeros((28, 28, 1), bool)
  if method == 'padding':
    want[:3], want[-3:], want[:, :3], want[:, -3:] = True, True, True, True
  else:
    want[2:7, 20:25] = True
  np.testing.assert_array_equal(np.asarray(grads['prompt']) != 0, want)


def test_padding_on_clip_uses_its_zero_shot_classifier(sources, tfds_dir):
  """CLIP's head: exp(logit scale) x cosine of the image embedding with each source class's held-out prompts,
  embedded, normalised, averaged and normalised again (numpy here), columns in class_map order."""
  config = prompt_config('padding', sources['clip'], tfds_dir, class_map=REVERSED)
  task = visual_prompt.build(config)
  frozen = task.frozen(checkpoint.Sources())
  batch = first_batch(task)
  loss, _ = task.loss(task.init(jax.random.key(0)), frozen, batch, jax.random.key(1))

  with open(f'{sources["clip"]}/config.json') as f:
    saved = json.load(f)
  model = TwoTower(TwoTowerConfig.from_dict(saved['model']))
  names = images.class_names('fashion_mnist_offline', tfds_dir)
  prompts = captions.zero_shot_prompts(names)
  tokens, mask, _ = images.tokenize_captions(prompts, get_tokenizer('byte'), saved['text']['max_len'])
  text = np.asarray(model.apply({'params': frozen}, tokens.reshape(-1, tokens.shape[-1]),
                                mask.reshape(-1, tokens.shape[-1]), method=TwoTower.encode_text), np.float64)
  text = text.reshape(10, len(prompts[0]), -1)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  class_emb = text.mean(1)
  class_emb /= np.linalg.norm(class_emb, axis=-1, keepdims=True)
  image = np.asarray(model.apply({'params': frozen}, batch['image'].astype(jnp.float32) / 255,
                                 method=TwoTower.encode_image), np.float64)
  logits = np.exp(float(frozen['logit_scale'])) * image @ class_emb.T
  assert float(loss) == pytest.approx(np_cross_entropy(logits[:, list(REVERSED)], np.asarray(batch['label'])),
                                      rel=1e-4)


def test_bad_prompt_configs_are_refused_before_anything_is_written(sources, tfds_dir, tmp_path):
  cnn_source = tmp_path / 'cnn'
  cnn_source.mkdir()
  (cnn_source / 'config.json').write_text(load('configs/classify/fashion_mnist.py').get_config('smoke')
                                          .to_json_best_effort())
  simclr_source = tmp_path / 'simclr'
  simclr_source.mkdir()
  (simclr_source / 'config.json').write_text(load('configs/contrastive/simclr_fashion_mnist.py')
                                             .get_config('vit,smoke').to_json_best_effort())
  cases = [
      ('vpt_shallow', str(cnn_source), {}, "needs a ViT encoder; the run in .* has a 'cnn' one"),
      ('padding', str(simclr_source), {}, 'need a frozen classifier'),
      ('padding', sources['vit'], dict(class_map=(0, 1, 2)), 'has 3 entries for 10 classes'),
      ('padding', sources['vit'], dict(class_map=(0,) * 10), 'entries must be distinct source classes'),
      ('padding', sources['vit'], dict(width=14), 'leaves no image inside the border; choose 1..13'),
      ('patch', sources['vit'], dict(patch_size=8, patch_at=(0, 24)), 'does not fit'),
      ('padding', sources['vit'], dict(class_map=(0.5, *range(1, 10))), 'entries must be distinct source classes'),
      ('patch', sources['vit'], dict(patch_at=(0, 0, 0)), r'patch_at=\(0, 0, 0\) must be \(row, column\)'),
  ]
  for method, source, prompt, message in cases:
    config = prompt_config(method, source, tfds_dir, **prompt)
    with pytest.raises(train.ConfigError, match=message):
      train.prepare(config, str(tmp_path / 'run'))
  config = prompt_config('vpt_deep', sources['vit'], tfds_dir)
  config.init_from.source = sources['vit']
  with pytest.raises(train.ConfigError, match='--config.prompt.source=DIR'):
    train.prepare(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
