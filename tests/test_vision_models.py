"""ViT, CNN, heads and the two-tower model: numpy references for patching, heads and text pooling; invariants."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foundation import sharding
from foundation.models.cnn import CNN, CNNConfig, grid_average_pool
from foundation.models.heads import LinearClassifier, ProjectionHead
from foundation.models.transformer import Transformer, TransformerConfig
from foundation.models.two_tower import TwoTower, TwoTowerConfig
from foundation.models.vit import ViT, ViTConfig, patchify
from test_transformer import np_rms_norm

# A large init_std makes attention far from uniform, so a wrong mask or order shows up in the outputs.
VIT = ViTConfig(image_size=8, patch_size=4, num_channels=3, embed_dim=16, num_layers=2, num_heads=2, mlp_dim=32,
                pool='mean', init_std=0.3)
TEXT = TransformerConfig(vocab_size=32, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=2, mlp_dim=32,
                         max_len=8, init_std=0.3)


# Each test compiles one function that initialises and runs everything it checks: compiling dominates the time of
# these tiny models (running op by op is slower still), and a fresh lambda per call would recompile every time.


def init(module, *args, **kwargs):
  # An rbg key: threefry's random bits take most of a tiny model's compile time on CPU (~2.5 s vs 0.7 s here).
  return nn.unbox(module.init(jax.random.key(0, impl='rbg'), *args, **kwargs)['params'])


def apply(module, params, *args, **kwargs):
  return module.apply({'params': params}, *args, **kwargs)


def images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def logical_names(module, *args, **kwargs):
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))['params']
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return {name for spec in specs for name in spec if name is not None}


# ---- ViT ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_vit_shapes(pool):
  cfg = dataclasses.replace(VIT, image_size=(8, 12), pool=pool)
  x = images((3, 8, 12, 3))
  vit = ViT(cfg)

  @jax.jit
  def run(x):
    params = init(vit, x)
    return apply(vit, params, x), apply(vit, params, x, return_tokens=True)

  pooled, tokens = run(x)
  assert pooled.shape == (3, 16)
  assert tokens.shape == (3, 6 + (pool == 'cls'), 16) and cfg.num_tokens == tokens.shape[1]
  assert tokens.dtype == jnp.float32
  np.testing.assert_allclose(pooled, tokens[:, 0] if pool == 'cls' else tokens.mean(1), rtol=1e-5, atol=1e-6)


def test_patchify_matches_loop_and_strided_conv():
  x = np.asarray(images((2, 8, 12, 3)))
  p = 4
  want = np.stack([np.stack([x[b, i:i + p, j:j + p, :].reshape(-1) for i in range(0, 8, p) for j in range(0, 12, p)])
                   for b in range(2)])
  np.testing.assert_array_equal(np.asarray(patchify(x, p)), want)
  # The same as a stride-p convolution whose HWIO kernel is the [p*p*C, D] matrix reshaped.
  kernel = np.asarray(images((p * p * 3, 5), seed=1))
  conv = jax.lax.conv_general_dilated(x, kernel.reshape(p, p, 3, 5), (p, p), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(np.asarray(patchify(x, p) @ kernel), np.asarray(conv).reshape(2, 6, 5), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_vit_embedding_against_numpy(pool):
  """No blocks: tokens = final_norm(patch @ W + b (+ cls) + position) in raster order, from a numpy loop."""
  cfg = dataclasses.replace(VIT, num_layers=0, pool=pool)
  x = images((2, 8, 8, 3))
  vit = ViT(cfg)
  params = jax.jit(lambda x: init(vit, x))(x)
  rng = np.random.default_rng(0)
  params = {**params, 'patch_bias': rng.normal(size=16).astype(np.float32),
            'final_norm': {'scale': rng.normal(size=16).astype(np.float32)}}
  if pool == 'cls':
    params['cls_token'] = rng.normal(size=16).astype(np.float32)
  got = np.asarray(jax.jit(lambda p, x: apply(vit, p, x, return_tokens=True))(params, x))

  xn, w, pos = np.asarray(x), np.asarray(params['patch_embedding']), np.asarray(params['position_embedding'])
  tokens = [np.broadcast_to(params['cls_token'], (2, 16))] if pool == 'cls' else []
  for i in range(2):  # patch rows
    for j in range(2):  # patch columns
      tokens.append(xn[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :].reshape(2, -1) @ w + params['patch_bias'])
  want = np.stack(tokens, axis=1) + pos
  want = want / np.sqrt(np.mean(want**2, -1, keepdims=True) + 1e-5) * params['final_norm']['scale']
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def permute_patches(x, order, p=4):
  """Rearranges the [2 x 2] grid of p x p patches of x [batch, 8, 8, C] so that new patch k is old patch order[k]."""
  grid = [x[:, 4 * (k // 2):4 * (k // 2) + p, 4 * (k % 2):4 * (k % 2) + p] for k in range(4)]
  new = [grid[o] for o in order]
  return jnp.concatenate([jnp.concatenate(new[0:2], axis=2), jnp.concatenate(new[2:4], axis=2)], axis=1)


def test_vit_is_permutation_equivariant_without_position_embeddings():
  """Bidirectional blocks with RoPE off see a set of patches: permuting patches permutes the tokens. A causal mask,
  a rotary position or a wrong patch order would break this."""
  x = images((2, 8, 8, 3))
  vit = ViT(VIT)
  order = [3, 0, 2, 1]

  @jax.jit
  def run(x, xp):
    params = init(vit, x)
    no_pos = {**params, 'position_embedding': jnp.zeros_like(params['position_embedding'])}
    return (apply(vit, no_pos, x, return_tokens=True), apply(vit, no_pos, xp, return_tokens=True),
            apply(vit, params, x), apply(vit, params, xp))

  tokens, permuted_tokens, pooled, permuted_pooled = run(x, permute_patches(x, order))
  np.testing.assert_allclose(permuted_tokens, tokens[:, order], rtol=1e-4, atol=1e-5)
  # With the learned positions the model does see the order.
  assert np.abs(np.asarray(permuted_pooled - pooled)).max() > 1e-2


def np_vit_tokens(params, cfg, x, prompts=None):
  """A numpy ViT (float64), written from the parameter names: raster patches, [cls,] prompts, patches; no position
  embedding on the prompts; bidirectional attention; a deep prompt [layers, P, D] replaces the prompt tokens at the
  input of each layer. Returns the final-normed tokens with the prompts dropped."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  batch, size = x.shape[0], cfg.patch_size
  n = cfg.image_hw[0] // size
  patches = [np.asarray(x, np.float64)[:, size * i:size * (i + 1), size * j:size * (j + 1)].reshape(batch, -1)
             for i in range(n) for j in range(n)]
  h = np.stack(patches, 1) @ p['patch_embedding'] + p['patch_bias']
  start = int(cfg.pool == 'cls')
  if start:
    h = np.concatenate([np.broadcast_to(p['cls_token'], (batch, 1, cfg.embed_dim)), h], 1)
  h = h + p['position_embedding']
  deep = prompts is not None and prompts.ndim == 3
  length = 0 if prompts is None else prompts.shape[-2]
  if prompts is not None:
    first = np.broadcast_to(np.asarray(prompts[0] if deep else prompts, np.float64), (batch, length, cfg.embed_dim))
    h = np.concatenate([h[:, :start], first, h[:, start:]], 1)
  head_dim = cfg.embed_dim // cfg.num_heads
  for layer in range(cfg.num_layers):
    if deep and layer:
      h[:, start:start + length] = np.asarray(prompts[layer], np.float64)
    lp = p[f'layers_{layer}']
    a = np_rms_norm(h, lp['attention_norm']['scale'], 1e-5)
    attn = np.zeros_like(h)
    for head in range(cfg.num_heads):
      q, k, v = (a @ lp['attention'][name][:, head] for name in ('query', 'key', 'value'))
      scores = q @ k.transpose(0, 2, 1) / np.sqrt(head_dim)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      attn += (weights / weights.sum(-1, keepdims=True)) @ v @ lp['attention']['out'][head]
    h = h + attn
    m = np_rms_norm(h, lp['mlp_norm']['scale'], 1e-5)
    gate = m @ lp['mlp']['gate']
    h = h + (gate / (1 + np.exp(-gate)) * (m @ lp['mlp']['up'])) @ lp['mlp']['down']
  h = np_rms_norm(h, p['final_norm']['scale'], 1e-5)
  return np.concatenate([h[:, :start], h[:, start + length:]], 1)


@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_vit_with_visual_prompts_against_numpy(pool):
  """VPT shallow and deep: the prompt tokens sit after the class token (first under mean pooling) and before the
  patches, and leave the pooled features to the class token or the patches' mean."""
  cfg = dataclasses.replace(VIT, pool=pool)
  x = images((2, 8, 8, 3))
  vit = ViT(cfg)
  rng = np.random.default_rng(1)
  shallow = rng.normal(size=(3, 16)).astype(np.float32)
  deep = rng.normal(size=(2, 3, 16)).astype(np.float32)

  @jax.jit
  def run(x, shallow, deep):
    params = init(vit, x)
    outputs = [apply(vit, params, x, prompts=prompts, return_tokens=tokens)
               for prompts in (None, shallow, deep) for tokens in (True, False)]
    return params, outputs

  params, outputs = run(x, shallow, deep)
  for i, prompts in enumerate((None, shallow, deep)):
    want = np_vit_tokens(params, cfg, x, prompts)
    np.testing.assert_allclose(outputs[2 * i], want, rtol=2e-4, atol=2e-5)
    pooled = want[:, 0] if pool == 'cls' else want.mean(1)
    np.testing.assert_allclose(outputs[2 * i + 1], pooled, rtol=2e-4, atol=2e-5)
  # The prompts change the features, and deep prompts differ from their first layer's alone.
  assert np.abs(outputs[3] - outputs[1]).max() > 1e-2 and np.abs(outputs[5] - outputs[3]).max() > 1e-2


def test_vit_refuses_prompts_of_the_wrong_shape_and_deep_prompts_when_scanned():
  x = images((1, 8, 8, 3))
  with pytest.raises(ValueError, match=r'expected \[P, 16\] \(shallow\) or \[2, P, 16\] \(deep\)'):
    jax.eval_shape(lambda: ViT(VIT).init(jax.random.key(0), x, prompts=jnp.zeros((3, 3, 16))))
  with pytest.raises(ValueError, match='scan_layers=False'):
    jax.eval_shape(lambda: ViT(dataclasses.replace(VIT, scan_layers=True)).init(jax.random.key(0), x,
                                                                                prompts=jnp.zeros((2, 3, 16))))


def test_vit_scanned_layers_match_unscanned():
  x = images((2, 8, 8, 3))
  scanned = ViT(dataclasses.replace(VIT, scan_layers=True, remat='full'))

  def stack(params):
    stacked = {k: v for k, v in params.items() if not k.startswith('layers_')}
    stacked['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), params['layers_0'], params['layers_1'])
    return stacked

  @jax.jit
  def run(x):
    params = init(ViT(VIT), x)
    return apply(ViT(VIT), params, x), apply(scanned, stack(params), x)

  abstract = jax.eval_shape(lambda x: init(ViT(VIT), x), x)
  assert jax.tree.structure(jax.eval_shape(lambda x: init(scanned, x), x)) == jax.tree.structure(jax.eval_shape(stack, abstract))
  unscanned_out, scanned_out = run(x)
  np.testing.assert_allclose(scanned_out, unscanned_out, rtol=1e-5, atol=1e-6)


# ---- CNN ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('norm', ['group', 'layer', 'none'])
def test_cnn_shapes_and_no_batch_statistics(norm):
  cfg = CNNConfig(widths=(8, 16, 32), norm=norm)
  cnn = CNN(cfg)
  x = images((3, 28, 28, 1))
  variables = jax.eval_shape(cnn.init, jax.random.key(0), x)
  assert set(variables) == {'params'}  # no batch_stats collection, nothing mutable

  @jax.jit
  def run(x, other):
    params = init(cnn, x)
    return apply(cnn, params, x), apply(cnn, params, other)

  # A function of each example alone: the first row does not change when the others do.
  out, out_other = run(x, x.at[1:].set(images((2, 28, 28, 1), seed=1)))
  assert out.shape == (3, 32) and out.dtype == jnp.float32
  np.testing.assert_allclose(out_other[0], out[0], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(out_other[1:] - out[1:])).max() > 1e-3


def test_cnn_any_image_size_and_downsampling():
  cnn = CNN(CNNConfig(widths=(8, 16), blocks_per_stage=2))
  x = images((2, 13, 17, 3))
  params = jax.eval_shape(lambda x: init(cnn, x), x)  # shapes only: nothing to compile
  out, state = jax.eval_shape(lambda p, x: cnn.apply({'params': p}, x, capture_intermediates=True), params, x)
  assert out.shape == (2, 16)
  # stage1's first block halves the resolution with a strided conv and a 1x1 projection shortcut.
  assert params['stage1_block0']['shortcut']['kernel'].shape == (1, 1, 8, 16)
  assert 'shortcut' not in params['stage0_block1'] and 'shortcut' not in params['stage1_block1']
  assert state['intermediates']['stage1_block0']['__call__'][0].shape == (2, 7, 9, 16)


def test_cnn_strided_stem_halves_the_resolution_before_the_first_stage():
  cnn = CNN(CNNConfig(widths=(8, 16), stem_stride=2))
  x = images((2, 28, 28, 1))
  params = jax.eval_shape(lambda x: init(cnn, x), x)
  _, state = jax.eval_shape(lambda p, x: cnn.apply({'params': p}, x, capture_intermediates=True), params, x)
  assert state['intermediates']['stage0_block0']['__call__'][0].shape == (2, 14, 14, 8)
  assert state['intermediates']['stage1_block0']['__call__'][0].shape == (2, 7, 7, 16)


@pytest.mark.parametrize('height, width, grid', [(4, 4, 1), (4, 4, 2), (7, 5, 2), (7, 7, 3)])
def test_grid_average_pool_against_numpy(height, width, grid):
  x = np.random.default_rng(0).normal(size=(2, height, width, 3)).astype(np.float32)
  expected = []
  for i in range(grid):  # rows, then columns; cell i covers [floor(i n / g), ceil((i + 1) n / g))
    for j in range(grid):
      rows = slice(int(np.floor(i * height / grid)), int(np.ceil((i + 1) * height / grid)))
      cols = slice(int(np.floor(j * width / grid)), int(np.ceil((j + 1) * width / grid)))
      expected.append(x[:, rows, cols].astype(np.float64).mean(axis=(1, 2)))
  # float32 sums in a different order than numpy's float64 mean: agree to float32 rounding, not bit for bit.
  np.testing.assert_allclose(grid_average_pool(jnp.asarray(x), grid), np.concatenate(expected, axis=-1),
                             rtol=1e-5, atol=1e-6)


def test_cnn_pool_grid_keeps_where_features_are_and_refuses_a_grid_finer_than_the_map():
  x = images((2, 28, 28, 1))
  cnn = CNN(CNNConfig(widths=(8, 16), stem_stride=2, pool_grid=2))  # final map 7x7
  params = jax.eval_shape(lambda x: init(cnn, x), x)
  assert jax.eval_shape(lambda p, x: cnn.apply({'params': p}, x), params, x).shape == (2, 4 * 16)
  with pytest.raises(ValueError, match='finer than the final 7x7 feature map'):
    jax.eval_shape(lambda x: init(CNN(CNNConfig(widths=(8, 16), stem_stride=2, pool_grid=8)), x), x)
  with pytest.raises(ValueError, match='pool_grid=0'):
    CNNConfig(pool_grid=0)


# ---- heads --------------------------------------------------------------------------------------------------------


def test_projection_head_against_numpy():
  head = ProjectionHead(hidden_dim=12, out_dim=5, num_layers=3)
  x = images((4, 7))
  params = jax.jit(lambda x: init(head, x))(x)
  h = np.asarray(x)
  for name in ('hidden_0', 'hidden_1'):
    h = np.maximum(h @ params[name]['kernel'] + params[name]['bias'], 0)
  want = h @ params['output']['kernel'] + params['output']['bias']
  np.testing.assert_allclose(jax.jit(lambda p, x: apply(head, p, x))(params, x), want, rtol=1e-5, atol=1e-6)


def test_linear_classifier_starts_uniform():
  clf = LinearClassifier(num_classes=10)
  x = images((4, 7))
  params = jax.jit(lambda x: init(clf, x))(x)
  assert params['classifier']['kernel'].shape == (7, 10)
  np.testing.assert_array_equal(jax.jit(lambda p, x: apply(clf, p, x))(params, x), np.zeros((4, 10), np.float32))


# ---- two towers ---------------------------------------------------------------------------------------------------


def two_tower(image_encoder='vit', loss='clip', text=TEXT):
  image = VIT if image_encoder == 'vit' else CNNConfig(widths=(8, 16))
  return TwoTower(TwoTowerConfig(image_encoder=image_encoder, image=image, text=text, embed_dim=6, loss=loss))


def text_batch():
  tokens = jax.random.randint(jax.random.key(3), (3, 8), 1, TEXT.vocab_size)
  lengths = np.array([8, 3, 1])
  mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  return tokens, mask, lengths


@pytest.mark.parametrize('causal', [True, False])
def test_two_tower_pools_the_last_real_token(causal):
  text = dataclasses.replace(TEXT, causal=causal)
  model = two_tower(text=text)
  x = images((3, 8, 8, 3))
  tokens, mask, lengths = text_batch()
  repadded = jnp.where(mask == 1, tokens, 7)

  @jax.jit
  def run(x, tokens, repadded, mask):
    params = init(model, x, tokens, mask)
    # The reference reads each row alone, unpadded: its hidden state at its last token.
    alone = [apply(Transformer(text), params['text_encoder'], tokens[i:i + 1, :n], return_hidden=True)[0, -1]
             for i, n in enumerate(lengths)]
    return (params, apply(model, params, tokens, mask, method=TwoTower.encode_text),
            apply(model, params, repadded, mask, method=TwoTower.encode_text), jnp.stack(alone))

  params, got, got_repadded, pooled = run(x, tokens, repadded, mask)
  pooled = np.asarray(pooled)
  want = pooled @ np.asarray(params['text_projection']['kernel'])
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  # Causal or not, whatever sits in the padding does not move the embedding.
  np.testing.assert_allclose(got_repadded, got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('image_encoder,loss', [('vit', 'siglip'), ('cnn', 'clip')])
def test_two_tower_outputs(image_encoder, loss):
  model = two_tower(image_encoder, loss)
  x = images((3, 8, 8, 3))
  tokens, mask, _ = text_batch()

  @jax.jit
  def run(x, tokens, mask):
    params = init(model, x, tokens, mask)
    return params, apply(model, params, x, tokens, mask), apply(model, params, x, method=TwoTower.encode_image)

  params, (image_emb, text_emb, logit_scale, logit_bias), image_only = run(x, tokens, mask)
  assert image_emb.shape == text_emb.shape == (3, 6)
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text_emb, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(image_only, image_emb, rtol=1e-6)
  if loss == 'siglip':  # SigLIP's init: t' = log 10, b = -10
    np.testing.assert_allclose(float(params['logit_scale']), np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(float(params['logit_bias']), -10.0)
  else:  # CLIP's init: temperature 0.07, no bias parameter
    np.testing.assert_allclose(float(params['logit_scale']), np.log(1 / 0.07), rtol=1e-6)
    assert 'logit_bias' not in params and float(logit_bias) == 0.0
  assert float(logit_scale) == float(params['logit_scale'])


def test_two_tower_config_from_dict():
  cfg = TwoTowerConfig.from_dict({'image_encoder': 'cnn', 'image': {'widths': [8, 16], 'norm': 'layer'},
                                  'text': dataclasses.asdict(TEXT), 'embed_dim': 6, 'loss': 'siglip'})
  assert cfg.image == CNNConfig(widths=(8, 16), norm='layer')
  with pytest.raises(ValueError, match='needs a ViTConfig'):
    TwoTowerConfig(image_encoder='vit', image=CNNConfig(), text=TEXT, embed_dim=6)
  with pytest.raises(ValueError, match='unknown ViTConfig fields'):
    ViTConfig.from_dict({**dataclasses.asdict(VIT), 'patch': 4})


def test_every_logical_name_has_a_sharding_rule():
  """An axis name missing from the rules table would silently stay replicated."""
  x = images((2, 8, 8, 3))
  tokens, mask, _ = text_batch()
  names = set()
  for image_encoder in ('vit', 'cnn'):
    names |= logical_names(two_tower(image_encoder, 'siglip'), x, tokens[:2], mask[:2])
  names |= logical_names(ViT(dataclasses.replace(VIT, pool='cls')), x)
  names |= logical_names(ProjectionHead(8, 4), jnp.zeros((2, 5)))
  names |= logical_names(LinearClassifier(3), jnp.zeros((2, 5)))
  assert {'patch', 'position', 'conv_out', 'projection', 'classes', 'mlp'} <= names
  assert names <= {name for name, _ in sharding.DEFAULT_RULES}
