"""The decoder against a naive numpy decoder written here from the same weights, plus closed forms and invariants."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from foundation import host
from foundation.models.transformer import init_cache
from foundation.models.transformer import (Transformer, TransformerConfig, apply_rope, flops_per_token,
                                           low_precision_dot, param_count, stack_layers)

# A large init_std makes attention far from uniform, so a wrong mask or rotation shows up in the logits.
TINY = TransformerConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         max_len=16, init_std=0.25)
BATCH, LENGTH = 2, 12


def make(cfg=TINY, seed=0):
  tokens = jax.random.randint(jax.random.key(seed + 1), (BATCH, LENGTH), 0, cfg.vocab_size)
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(seed), tokens)['params'])
  return params, tokens


def forward(cfg, params, tokens, **kwargs):
  # Compiled: running a model op by op is slower than compiling it, even at this size.
  return jax.jit(lambda p, t: Transformer(cfg).apply({'params': p}, t, **kwargs))(params, tokens)


# ---- an independent numpy decoder -------------------------------------------------------------------------------


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, positions, base):
  """x [length, head_dim]: rotates the pair (i, i + head_dim/2) by positions * base^(-2i/head_dim)."""
  d = x.shape[-1]
  out = np.empty_like(x)
  for i in range(d // 2):
    angle = positions * base ** (-2.0 * i / d)
    a, b = x[:, i], x[:, i + d // 2]
    out[:, i] = a * np.cos(angle) - b * np.sin(angle)
    out[:, i + d // 2] = a * np.sin(angle) + b * np.cos(angle)
  return out


def np_hidden(params, cfg, seq):
  """The final-normed hidden states [length, embed_dim] of one token sequence, in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  group = cfg.num_heads // cfg.num_kv_heads
  length = len(seq)
  positions = np.arange(length, dtype=np.float64)
  x = p['embedding'][np.asarray(seq)]
  for layer in range(cfg.num_layers):
    lp = p[f'layers_{layer}']
    h = np_rms_norm(x, lp['attention_norm']['scale'], cfg.norm_eps)
    attn = np.zeros_like(x)
    for head in range(cfg.num_heads):
      q = np_rope(h @ lp['attention']['query'][:, head], positions, cfg.rope_base)
      k = np_rope(h @ lp['attention']['key'][:, head // group], positions, cfg.rope_base)
      v = h @ lp['attention']['value'][:, head // group]
      scores = q @ k.T / np.sqrt(cfg.head_dim)
      if cfg.causal:
        scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      attn += (weights @ v) @ lp['attention']['out'][head]
    x = x + attn
    h = np_rms_norm(x, lp['mlp_norm']['scale'], cfg.norm_eps)
    gate = h @ lp['mlp']['gate']
    x = x + (gate / (1 + np.exp(-gate)) * (h @ lp['mlp']['up'])) @ lp['mlp']['down']
  return np_rms_norm(x, p['final_norm']['scale'], cfg.norm_eps)


def np_decoder(params, cfg, tokens):
  out = np.asarray(params['embedding'] if cfg.tie_embeddings else params['lm_head'], np.float64)
  out = out.T if cfg.tie_embeddings else out
  return np.stack([np_hidden(params, cfg, seq) @ out for seq in np.asarray(tokens)])


@pytest.mark.parametrize('overrides', [
    {},  # GQA: 4 query heads share 2 k/v heads
    {'tie_embeddings': False},
    {'num_kv_heads': 1, 'causal': False},  # MQA, bidirectional
    {'num_kv_heads': 4, 'head_dim': 6},  # MHA, head_dim not embed_dim / num_heads
])
def test_matches_numpy_decoder(overrides):
  cfg = dataclasses.replace(TINY, **overrides)
  params, tokens = make(cfg)
  logits = forward(cfg, params, tokens)
  assert logits.dtype == jnp.float32 and logits.shape == (BATCH, LENGTH, cfg.vocab_size)
  np.testing.assert_allclose(logits, np_decoder(params, cfg, tokens), rtol=1e-5, atol=1e-5)


def test_prefix_embeddings_and_hidden_states():
  params, tokens = make()
  full = forward(TINY, params, tokens)
  # The embeddings of the first 3 tokens given as a prefix must act exactly like those tokens.
  prefix = params['embedding'][tokens[:, :3]]
  np.testing.assert_allclose(forward(TINY, params, tokens[:, 3:], prefix_embeddings=prefix), full,
                             rtol=1e-5, atol=1e-5)
  hidden = forward(TINY, params, tokens, return_hidden=True)
  assert hidden.shape == (BATCH, LENGTH, TINY.embed_dim) and hidden.dtype == jnp.float32
  np.testing.assert_allclose(hidden @ params['embedding'].T, full, rtol=1e-5, atol=1e-5)


def test_causal():
  params, tokens = make()
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % TINY.vocab_size)
  before, after = forward(TINY, params, tokens), forward(TINY, params, changed)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert np.abs(before[:, t:] - after[:, t:]).min(axis=-1).max() > 1e-3  # and later positions do see it


def test_rope_depends_only_on_offset():
  head_dim, base = 8, 100.0
  q, k = np.random.default_rng(0).normal(size=(2, head_dim))

  def rotated(x, position):
    return np.asarray(apply_rope(jnp.asarray(x, jnp.float32)[None, None, None], jnp.array([[position]]), base))[0, 0, 0]

  # Closed form: pairs (i, i + d/2) as complex numbers z; <R_m q, R_n k> = Re sum z_q conj(z_k) e^{i (m - n) theta}.
  half = head_dim // 2
  theta = base ** (-np.arange(half) * 2.0 / head_dim)
  zq, zk = q[:half] + 1j * q[half:], k[:half] + 1j * k[half:]
  for m, n in [(0, 0), (5, 2), (103, 100), (2, 5), (40, 43)]:
    expected = np.real(np.sum(zq * np.conj(zk) * np.exp(1j * (m - n) * theta)))
    np.testing.assert_allclose(rotated(q, m) @ rotated(k, n), expected, rtol=1e-4, atol=1e-5)


def test_scan_layers_matches_loop():
  params, tokens = make()
  scanned = dataclasses.replace(TINY, scan_layers=True)
  stacked = stack_layers(params, TINY.num_layers)
  # The restacked tree must be exactly what the scanned model initialises.
  abstract = jax.eval_shape(Transformer(scanned).init, jax.random.key(0), tokens)['params']
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, nn.unbox(abstract))
  np.testing.assert_allclose(forward(scanned, stacked, tokens), forward(TINY, params, tokens), rtol=1e-5, atol=1e-5)


def next_token_loss(model, params, tokens):
  logits = model.apply({'params': params}, tokens[:, :-1])
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@pytest.mark.parametrize('remat,scan', [('full', False), ('dots', False), ('projections', True), ('full', True)])
def test_remat_same_loss_and_gradients(remat, scan):
  params, tokens = make()
  loss_and_grads = jax.jit(jax.value_and_grad(next_token_loss, argnums=1), static_argnums=0)
  loss, grads = loss_and_grads(Transformer(TINY), params, tokens)
  cfg = dataclasses.replace(TINY, remat=remat, scan_layers=scan)
  remat_params = stack_layers(params, TINY.num_layers) if scan else params
  remat_loss, remat_grads = loss_and_grads(Transformer(cfg), remat_params, tokens)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  expected_grads = stack_layers(grads, TINY.num_layers) if scan else grads
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), remat_grads, expected_grads)


def test_remat_projections_does_not_keep_the_attention_scores():
  """The compiled backward of 'projections' needs less scratch memory than 'dots' by at least the f32 attention
  scores that 'dots' keeps (layers x batch x heads x length x length x 4 bytes); both keep less than no remat."""
  batch, length = 4, 256
  cfg = dataclasses.replace(TINY, max_len=length, scan_layers=True)
  tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)
  temp = {}
  for remat in ('none', 'dots', 'projections'):
    model = Transformer(dataclasses.replace(cfg, remat=remat))
    params = nn.unbox(jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
    compiled = jax.jit(jax.grad(lambda p, t, m=model: next_token_loss(m, p, t))).lower(params['params'],
                                                                                        tokens).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  scores = cfg.num_layers * batch * cfg.num_heads * length * length * 4
  assert temp['dots'] - temp['projections'] >= scores and temp['dots'] < temp['none']


@pytest.mark.parametrize('scan', [False, True])
def test_kv_cache_matches_full_forward(scan):
  params, tokens = make()
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  model = Transformer(cfg)
  if scan:
    params = stack_layers(params, cfg.num_layers)
  expected = forward(cfg, params, tokens)
  cache = init_cache(model, BATCH)
  step = jax.jit(lambda cache, chunk: model.apply({'params': params, 'cache': cache}, chunk, decode=True,
                                                  mutable=['cache']))
  pieces, start = [], 0
  for size in [5, 1, 1, 3, 1, 1]:  # a prefill, single steps, and a later multi-token chunk
    logits, mutated = step(cache, tokens[:, start:start + size])
    cache, start = mutated['cache'], start + size
    pieces.append(logits)
  assert start == LENGTH and int(cache['index']) == LENGTH
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('scan', [False, True])
def test_padding_mask_on_either_side_with_and_without_cache(scan):
  """Rows of different lengths share a batch, padded left or right: with `mask`, the real positions get the logits
  each row gets alone, in one forward and through the cache (where the mask is kept for the chunks after it)."""
  params, tokens = make()
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  if scan:
    params = stack_layers(params, cfg.num_layers)
  lengths = [7, 10]
  alone = [forward(cfg, params, tokens[row:row + 1, :n])[0] for row, n in enumerate(lengths)]
  for left in (True, False):
    shift = [LENGTH - n if left else 0 for n in lengths]
    mask = np.stack([np.roll(np.arange(LENGTH) < n, s) for n, s in zip(lengths, shift)])
    padded = np.stack([np.roll(np.where(np.arange(LENGTH) < n, np.asarray(tokens[row]), 5), s)  # pad id: any
                       for row, (n, s) in enumerate(zip(lengths, shift))])
    logits = forward(cfg, params, jnp.asarray(padded), mask=jnp.asarray(mask))
    model = Transformer(cfg)
    step = jax.jit(lambda cache, chunk, m: model.apply({'params': params, 'cache': cache}, chunk, mask=m, decode=True,
                                                       mutable=['cache']))
    cache, pieces = init_cache(model, BATCH), []
    for start, stop in [(0, 6), (6, 11), (11, 12)]:
      piece, mutated = step(cache, jnp.asarray(padded[:, start:stop]), jnp.asarray(mask[:, start:stop]))
      cache = mutated['cache']
      pieces.append(piece)
    cached = jnp.concatenate(pieces, axis=1)
    for row in range(BATCH):
      for result in (logits, cached):
        np.testing.assert_allclose(result[row][mask[row]], alone[row], rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(result[row]))  # padding positions too: NaN there would leak into later layers


def test_init_with_decode_returns_empty_cache():
  _, tokens = make()
  cache = Transformer(TINY).init(jax.random.key(0), tokens, decode=True)['cache']
  assert int(cache['index']) == 0
  assert cache['layers_0']['attention']['key'].shape == (BATCH, TINY.max_len, TINY.num_kv_heads, TINY.head_dim)


def test_bfloat16_compute_close_to_float32():
  params, tokens = make()
  expected = forward(TINY, params, tokens)
  logits = forward(dataclasses.replace(TINY, dtype='bfloat16'), params, tokens)
  assert logits.dtype == jnp.float32
  assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()
  assert np.mean(np.argmax(logits, -1) == np.argmax(expected, -1)) > 0.9


def round_to_bf16(x):
  return np.asarray(np.asarray(x, np.float32).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize('flags', [{'avx512f', 'avx512_bf16'}, {'avx2'}], ids=['bf16_dots', 'no_bf16_dots'])
@pytest.mark.parametrize('x_shape,w_shape,num_in', [((3, 5, 8), (8, 6), 1),            # a projection
                                                    ((2, 3, 4, 6), (4, 6, 7), 2),       # 'out': heads x head_dim
                                                    ((2, 5, 8), (8, 2, 3), 1)])         # 'query': [in, heads, dim]
def test_low_precision_dot_and_its_gradients_against_numpy(x_shape, w_shape, num_in, flags, monkeypatch):
  """Forward x.w, and dx = g.w^T, dw = x^T.g, each from operands rounded to bf16 and summed exactly (float64): with
  XLA's bf16 dot on a CPU that has bf16 dot instructions, and on one without them as float32 dots of the rounded
  operands (XLA's own bf16 dot is slow there); a program lowered on that CPU for a TPU keeps its bf16 dots."""
  monkeypatch.setattr(host, 'cpu_flags', lambda: frozenset(flags))
  traced = jax.jit(jax.value_and_grad(lambda a, b: low_precision_dot(a, b, num_in, 'bfloat16').sum(), (0, 1))).trace(
      jnp.zeros(x_shape), jnp.zeros(w_shape))
  for platform, bf16_dots in (('cpu', 'avx512_bf16' in flags), ('tpu', True)):
    lowered = traced.lower(lowering_platforms=(platform,)).as_text()
    operands = re.findall(r'stablehlo\.dot_general .*: \((tensor<[^)]*)\)', lowered)
    assert len(operands) == 3 and all(('bf16' in o) == bf16_dots for o in operands), (platform, operands)
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=w_shape).astype(np.float32)
  out_shape = x_shape[:len(x_shape) - num_in] + w_shape[num_in:]
  g = rng.normal(size=out_shape).astype(np.float32)
  out, vjp = jax.vjp(lambda a, b: low_precision_dot(a, b, num_in, 'bfloat16'), x, w)
  dx, dw = vjp(jnp.asarray(g))
  assert out.dtype == dx.dtype == dw.dtype == jnp.float32
  xb = round_to_bf16(x).reshape(-1, int(np.prod(w_shape[:num_in])))
  wb = round_to_bf16(w).reshape(xb.shape[1], -1)
  gb = round_to_bf16(g).reshape(xb.shape[0], wb.shape[1])
  np.testing.assert_allclose(out, (xb @ wb).reshape(out_shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, (gb @ wb.T).reshape(x_shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, (xb.T @ gb).reshape(w_shape), rtol=1e-5, atol=1e-5)


def test_bfloat16_matmuls_close_to_float32_and_remat_gives_the_same_gradients():
  params, tokens = make()
  loss_and_grads = jax.jit(jax.value_and_grad(next_token_loss, argnums=1), static_argnums=0)
  loss, grads = loss_and_grads(Transformer(TINY), params, tokens)
  mixed = dataclasses.replace(TINY, matmul_dtype='bfloat16')
  mixed_loss, mixed_grads = loss_and_grads(Transformer(mixed), params, tokens)
  # bf16 operands carry 8 bits of mantissa: the loss and every gradient within a few percent of float32.
  np.testing.assert_allclose(mixed_loss, loss, rtol=2e-3)
  for a, b in zip(jax.tree.leaves(mixed_grads), jax.tree.leaves(grads)):
    assert a.dtype == jnp.float32
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()
  # Rematerialising the custom-gradient matmuls recomputes the same numbers.
  remat = dataclasses.replace(mixed, remat='projections', scan_layers=True)
  remat_loss, remat_grads = loss_and_grads(Transformer(remat), stack_layers(params, TINY.num_layers), tokens)
  np.testing.assert_allclose(remat_loss, mixed_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), remat_grads,
               stack_layers(mixed_grads, TINY.num_layers))


@pytest.mark.parametrize('overrides', [{}, {'tie_embeddings': False}, {'num_kv_heads': 1, 'head_dim': 6},
                                       {'scan_layers': True}])
def test_param_count_matches_init(overrides):
  cfg = dataclasses.replace(TINY, **overrides)
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert param_count(cfg) == sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))


def test_flops_per_token_by_hand():
  cfg = TransformerConfig(vocab_size=10, num_layers=2, embed_dim=4, num_heads=2, num_kv_heads=1, mlp_dim=8,
                          max_len=16)  # head_dim 2
  # per layer: q 4*2*2=16, k 4*1*2=8, v 8, out 16, gate/up/down 3*4*8=96 -> 144; two layers 288; lm head 40.
  # forward = 2 * 328 + 2*2*2 layers*seq 5*2 heads*2 head_dim = 656 + 160 = 816; training = 3 * 816.
  assert flops_per_token(cfg, seq_len=5) == 2448


def test_logical_axis_names():
  cfg = dataclasses.replace(TINY, tie_embeddings=False)
  def logical_specs(cfg):
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return nn.get_partition_spec(abstract['params'])

  specs = logical_specs(cfg)
  layer = specs['layers_0']
  assert specs['embedding'] == P('vocab', 'embed') and specs['lm_head'] == P('embed', 'vocab')
  assert layer['attention']['query'] == P('embed', 'heads', 'head_dim')
  assert layer['attention']['key'] == layer['attention']['value'] == P('embed', 'kv_heads', 'head_dim')
  assert layer['attention']['out'] == P('heads', 'head_dim', 'embed')
  assert layer['mlp']['gate'] == layer['mlp']['up'] == P('embed', 'mlp') and layer['mlp']['down'] == P('mlp', 'embed')
  assert layer['attention_norm']['scale'] == specs['final_norm']['scale'] == P('norm')
  scanned = logical_specs(dataclasses.replace(cfg, scan_layers=True))
  assert scanned['layers']['attention']['query'] == P('layers', 'embed', 'heads', 'head_dim')


def test_sharded_run_matches_single_device():
  """Tensor- and data-parallel on 8 fake CPU devices, through the logical names, gives the single-device logits."""
  params, tokens = make()
  expected = forward(TINY, params, tokens)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ('data', 'tensor'), axis_types=(AxisType.Auto,) * 2)
  rules = (('vocab', 'tensor'), ('embed', None), ('mlp', 'tensor'), ('heads', 'tensor'), ('kv_heads', None),
           ('head_dim', None), ('norm', None), ('act_batch', 'data'), ('act_length', None), ('act_embed', None),
           ('act_heads', 'tensor'), ('act_kv_heads', None), ('act_head_dim', None), ('act_mlp', 'tensor'),
           ('act_vocab', 'tensor'))
  model = Transformer(TINY)
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    logits = jax.jit(lambda p, t: model.apply({'params': p}, t))(sharded_params,
                                                                 jax.device_put(tokens, NamedSharding(mesh, P('data'))))
  assert logits.sharding.spec == P('data', None, 'tensor')
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_config_from_dict():
  d = ml_collections.ConfigDict(dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                                     mlp_dim=64, max_len=16))
  cfg = TransformerConfig.from_dict(d)
  assert cfg.head_dim == 8 and cfg == TransformerConfig(**d)
  with pytest.raises(ValueError, match='unknown TransformerConfig fields'):
    TransformerConfig.from_dict({**d.to_dict(), 'num_layer': 3})
  with pytest.raises(ValueError, match='multiple of num_kv_heads'):
    dataclasses.replace(cfg, num_kv_heads=3)
