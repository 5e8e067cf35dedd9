"""A Llama-style decoder: RMSNorm pre-norm blocks, rotary positions, grouped-query attention, SwiGLU, no biases.

One module serves pretraining (full sequences), generation (`decode=True` keeps a fixed-size KV cache in the
'cache' collection), soft prompts (`prefix_embeddings`), LoRA (`lora_rank` > 0 adds low-rank factors beside the
projections that `lora_targets` names; `merge_lora` folds them in), and encoders or probes (`causal=False`,
`return_hidden=True`). Parameters and activations carry logical axis names; `foundation/sharding.py` maps them
onto the mesh, and without rules they are plain arrays.
"""

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from foundation import host
from foundation.models import config_from_dict

Array = jax.Array

# What the backward pass may keep from the forward; 'full' keeps nothing (policy None), 'none' skips nn.remat.
# What a rematerialised block keeps for the backward pass: nothing ('full'), every matmul output ('dots': the
# attention scores too, f32 [batch, heads, length, length] per layer), or the matmuls without batch dimensions
# ('projections': the q/k/v/out projections and the MLP; the attention einsums are recomputed).
REMAT_POLICIES = {'none': None, 'full': None, 'dots': jax.checkpoint_policies.checkpoint_dots,
                  'projections': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int  # grouped-query attention: == num_heads is MHA, 1 is MQA
  mlp_dim: int  # SwiGLU hidden width
  max_len: int  # longest sequence; sizes the KV cache
  head_dim: int | None = None  # None: embed_dim // num_heads
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  causal: bool = True  # False: the same blocks as a bidirectional encoder
  dtype: str = 'float32'  # compute dtype; logits and softmax/norm statistics stay float32
  param_dtype: str = 'float32'
  # Mixed precision for the weight matmuls (q/k/v/out, the MLP, the logits): both operands rounded to this dtype,
  # float32 accumulation and output, in the forward and both backward matmuls (`low_precision_dot`); everything
  # else stays in `dtype`. 'bfloat16' with dtype 'float32' is the CPU's AVX-512 BF16 path (2x f32 matmul speed).
  # None: the matmuls run in `dtype`.
  matmul_dtype: str | None = None
  scan_layers: bool = False  # one compiled block scanned over layers: compile time independent of depth
  remat: str = 'none'  # 'none' | 'full' | 'dots' | 'projections' (REMAT_POLICIES)
  init_std: float = 0.02
  # LoRA (Hu et al. 2021): W x + (alpha / rank) B A x on every projection whose path ('layers_3/attention/query',
  # 'layers_0/mlp/down'; 'layers/...' when scanned) the regex `lora_targets` finds; B starts at zero. 0: no LoRA.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: str = 'attention/(query|value)'

  def __post_init__(self):
    if self.head_dim is None:
      if self.embed_dim % self.num_heads:
        raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; '
                         'set head_dim explicitly.')
      object.__setattr__(self, 'head_dim', self.embed_dim // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}.')
    if self.head_dim % 2:
      raise ValueError(f'head_dim {self.head_dim} must be even: rotary embeddings rotate pairs of features.')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}.')
    for name in ('dtype', 'param_dtype', 'matmul_dtype'):
      if getattr(self, name) is not None:
        jnp.dtype(getattr(self, name))  # fails early on a misspelt dtype
    if self.lora_rank:
      lora_target_names(self)  # a regex that matches no projection fails here, not after training

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'TransformerConfig':
    return config_from_dict(cls, d)


def param_count(cfg: TransformerConfig) -> int:
  attention = cfg.embed_dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * cfg.embed_dim * cfg.mlp_dim
  block = attention + mlp + 2 * cfg.embed_dim  # + two norm scales
  embeddings = cfg.vocab_size * cfg.embed_dim * (1 if cfg.tie_embeddings else 2)
  return cfg.num_layers * block + embeddings + cfg.embed_dim  # + final norm


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
  """Training "model FLOPs" per token (PaLM appendix B / MaxText convention), the numerator of MFU.

  forward = 2 * (matmul weights: q, k, v, out, gate, up, down in every layer, plus the projection to the vocabulary,
            counted whether or not it is tied; the input embedding lookup is not a matmul and is not counted)
          + 2 * 2 * num_layers * seq_len * num_heads * head_dim (attention scores and weighted values, over the full
            sequence: the causal mask is not halved, and rematerialisation is not counted)
  training = 3 * forward (the backward pass costs twice the forward).
  """
  return 3.0 * sum(forward_flops_per_token(cfg, seq_len))


def forward_flops_per_token(cfg: TransformerConfig, seq_len: int) -> tuple[int, int]:
  """flops_per_token's forward pass in two parts, (the blocks: their matmuls and attention, the projection to the
  vocabulary), for counts where they run a different number of passes (frozen weights, positions without a label)."""
  attention = cfg.embed_dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  blocks = 2 * cfg.num_layers * (attention + 3 * cfg.embed_dim * cfg.mlp_dim)
  attention_flops = 2 * 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  return blocks + attention_flops, 2 * cfg.embed_dim * cfg.vocab_size


# The projections LoRA can target, by path inside a block.
PROJECTIONS = ('attention/query', 'attention/key', 'attention/value', 'attention/out', 'mlp/gate', 'mlp/up',
               'mlp/down')


def lora_target_names(cfg: TransformerConfig) -> list[str]:
  """The projection paths that `cfg.lora_targets` selects; an error when it selects none."""
  try:
    pattern = re.compile(cfg.lora_targets)
  except re.error as e:
    raise ValueError(f'lora_targets={cfg.lora_targets!r} is not a valid regex: {e}') from None
  layers = ['layers'] if cfg.scan_layers else [f'layers_{i}' for i in range(cfg.num_layers)]
  names = [f'{layer}/{p}' for layer in layers for p in PROJECTIONS if pattern.search(f'{layer}/{p}')]
  if not names:
    raise ValueError(f'lora_targets={cfg.lora_targets!r} matches no projection; paths look like '
                     f"'{layers[0]}/attention/query' or '{layers[-1]}/mlp/down' ({', '.join(PROJECTIONS)}).")
  return names


def stack_layers(params: dict, num_layers: int) -> dict:
  """Params with unrolled blocks ('layers_0', ...) -> the scanned layout: one 'layers' tree whose leaves stack the
  blocks' along a leading axis (numpy arrays, in host memory)."""
  blocks = [params[f'layers_{i}'] for i in range(num_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith('layers_')}
  return {**rest, 'layers': jax.tree.map(lambda *xs: np.stack(xs), *blocks)}


def is_lora_param(name: str) -> bool:
  """Whether a parameter (its name, or a '/'-joined path) is a LoRA factor."""
  return name.endswith(('_lora_a', '_lora_b'))


def merge_lora(params: dict, cfg: TransformerConfig) -> tuple[dict, TransformerConfig]:
  """(params with every LoRA pair folded into its weight, W + alpha/rank * A B, and the config without LoRA).

  params: unboxed, unrolled or scanned (the factors then carry the same leading layer axis as the weight).
  """
  scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0

  def merge(tree):
    out = {}
    for key, value in tree.items():
      if is_lora_param(key):
        continue
      if isinstance(value, dict):
        out[key] = merge(value)
      elif f'{key}_lora_a' in tree:
        a, b = tree[f'{key}_lora_a'], tree[f'{key}_lora_b']
        lead = a.ndim + b.ndim - value.ndim - 2  # a stacked layer axis when scanned
        a2 = jnp.reshape(a, a.shape[:lead] + (-1, a.shape[-1])).astype(jnp.float32)
        b2 = jnp.reshape(b, b.shape[:lead + 1] + (-1,)).astype(jnp.float32)
        out[key] = (value.astype(jnp.float32) + scale * jnp.reshape(a2 @ b2, value.shape)).astype(value.dtype)
      else:
        out[key] = value
    return out

  return merge(params), dataclasses.replace(cfg, lora_rank=0)


def _lora(module: nn.Module, name: str, x: Array, weight_shape: tuple, axes: tuple, num_in: int) -> Array | None:
  """The LoRA term (alpha / rank) (x A) B of projection `name` (weight [*in, *out], contracting x's last num_in
  axes), or None when LoRA is off or does not target it. Called inside the module that owns the weight."""
  cfg = module.config
  if not cfg.lora_rank:
    return None
  path = module.scope.path
  inside = [i for i, part in enumerate(path) if part == 'layers' or part.startswith('layers_')]
  where = '/'.join(path[inside[-1]:] if inside else path) + '/' + name
  if not re.search(cfg.lora_targets, where):
    return None
  dtype, pdtype, rank = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), cfg.lora_rank
  fan_in = math.prod(weight_shape[:num_in])
  a = module.param(f'{name}_lora_a', _weight(1.0 / math.sqrt(fan_in), axes[:num_in] + ('lora_rank',)),
                   weight_shape[:num_in] + (rank,), pdtype)
  zeros = nn.with_logical_partitioning(nn.initializers.zeros, ('lora_rank',) + axes[num_in:])
  b = module.param(f'{name}_lora_b', zeros, (rank,) + weight_shape[num_in:], pdtype)
  low = jnp.tensordot(x, a.astype(dtype), axes=num_in)
  return (cfg.lora_alpha / rank) * jnp.tensordot(low, b.astype(dtype), axes=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def low_precision_dot(x: Array, w: Array, num_in: int, dtype: str) -> Array:
  """tensordot(x, w, num_in) with both operands rounded to `dtype`, accumulated and returned in float32.

  The backward pass's two matmuls (dx = g w^T, dw = x^T g) take the same rounded operands and the cotangent rounded
  to `dtype`, again with float32 accumulation and output; XLA's own transpose of a mixed-precision dot would run
  them at float32 speed. dx and dw come back in x's and w's dtypes.
  """
  return _low_precision_dot_fwd(x, w, num_in, dtype)[0]


def _dot_f32(a: Array, b: Array) -> Array:
  """a @ b accumulated in float32. bf16 operands on a CPU without bf16 dot-product instructions are widened to
  float32 first: the product of two bf16 values is exact in float32, so this is the same dot up to the order of the
  sum, at float32 speed instead of the 0.6x that XLA's own bf16 dot runs at there (host.slow_bf16_matmuls)."""
  dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
  if a.dtype != jnp.bfloat16 or not host.slow_bf16_matmuls():
    return dot(a, b)
  # By the platform the program is lowered for: a TPU or GPU plan compiled on such a CPU keeps its bf16 dots.
  return jax.lax.platform_dependent(a, b, cpu=lambda a, b: dot(a.astype(jnp.float32), b.astype(jnp.float32)),
                                    default=dot)


def _low_precision_dot_fwd(x, w, num_in, dtype):
  # As 2-D matmuls with one contracting axis: XLA's CPU runtime runs bf16 x bf16 -> f32 only in that form.
  batch, inputs, outputs = x.shape[:x.ndim - num_in], w.shape[:num_in], w.shape[num_in:]
  xl = x.astype(dtype).reshape(math.prod(batch), math.prod(inputs))
  wl = w.astype(dtype).reshape(math.prod(inputs), math.prod(outputs))
  out = _dot_f32(xl, wl).reshape(batch + outputs)
  # Zero-size arrays carry the primals' shapes and dtypes to the backward pass.
  return out, (xl, wl, jnp.zeros((0,) + x.shape, x.dtype), jnp.zeros((0,) + w.shape, w.dtype))


def _low_precision_dot_bwd(num_in, dtype, residuals, g):
  del num_in
  xl, wl, x_like, w_like = residuals
  g = g.astype(dtype).reshape(xl.shape[0], wl.shape[1])
  dx = _dot_f32(g, wl.T)
  dw = _dot_f32(xl.T, g)
  return dx.reshape(x_like.shape[1:]).astype(x_like.dtype), dw.reshape(w_like.shape[1:]).astype(w_like.dtype)


low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


def _low_precision(cfg: TransformerConfig) -> bool:
  return cfg.matmul_dtype is not None and jnp.dtype(cfg.matmul_dtype) != jnp.dtype(cfg.dtype)


def _matmul(cfg: TransformerConfig, x: Array, weight: Array, num_in: int) -> Array:
  """x @ weight over x's last num_in axes, in `cfg.matmul_dtype` (float32 out) or else in `cfg.dtype`."""
  if not _low_precision(cfg):
    return jnp.tensordot(x, weight.astype(cfg.dtype), axes=num_in)
  return low_precision_dot(x, weight, num_in, cfg.matmul_dtype).astype(cfg.dtype)


def _project(module: nn.Module, name: str, x: Array, weight: Array, axes: tuple, num_in: int) -> Array:
  """x @ weight over x's last num_in axes, plus the LoRA term where one is configured. When the collection
  'projection_inputs' is mutable, x is kept there as [tokens, inputs] (what foundation.compress prunes from)."""
  if module.is_mutable_collection('projection_inputs'):
    module.sow('projection_inputs', name, x.reshape(-1, math.prod(weight.shape[:num_in])))
  out = _matmul(module.config, x, weight, num_in)
  delta = _lora(module, name, x, weight.shape, axes, num_in)
  return out if delta is None else out + delta.astype(out.dtype)


def _weight(std: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def apply_rope(x: Array, positions: Array, base: float) -> Array:
  """Rotary position embedding in the rotate-half layout: feature i pairs with feature i + head_dim/2.

  x: [batch, length, heads, head_dim]; positions: [batch, length]. GGUF and Meta's original checkpoints store q/k
  weights for the interleaved-pair layout (feature 2i pairs with 2i+1), so an importer must permute the output
  features of those q/k projections (interleaved -> halves) before loading them here.
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [batch, length, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)), (cfg.embed_dim,),
                       jnp.dtype(cfg.param_dtype))
    x32 = x.astype(jnp.float32)  # a bf16 mean of squares loses too much precision
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    return (normed * scale.astype(jnp.float32)).astype(cfg.dtype)


class Attention(nn.Module):
  config: TransformerConfig
  decode: bool

  @nn.compact
  def __call__(self, x: Array, positions: Array, cache_index: Array, key_mask: Array | None = None,
               shared_mask: Array | None = None) -> Array:
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    e, h, kv, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # residual branches add up over depth (GPT-2)
    q_axes, kv_axes, out_axes = ('embed', 'heads', 'head_dim'), ('embed', 'kv_heads', 'head_dim'), \
        ('heads', 'head_dim', 'embed')
    wq = self.param('query', _weight(cfg.init_std, q_axes), (e, h, d), pdtype)
    wk = self.param('key', _weight(cfg.init_std, kv_axes), (e, kv, d), pdtype)
    wv = self.param('value', _weight(cfg.init_std, kv_axes), (e, kv, d), pdtype)
    wo = self.param('out', _weight(out_std, out_axes), (h, d, e), pdtype)

    q = _project(self, 'query', x, wq, q_axes, 1)
    k = _project(self, 'key', x, wk, kv_axes, 1)
    v = _project(self, 'value', x, wv, kv_axes, 1)
    q = nn.with_logical_constraint(q, ('act_batch', 'act_length', 'act_heads', 'act_head_dim'))
    k = nn.with_logical_constraint(k, ('act_batch', 'act_length', 'act_kv_heads', 'act_head_dim'))
    v = nn.with_logical_constraint(v, ('act_batch', 'act_length', 'act_kv_heads', 'act_head_dim'))
    q = apply_rope(q, positions, cfg.rope_base)
    k = apply_rope(k, positions, cfg.rope_base)

    batch, length = x.shape[:2]
    if self.decode:
      # The cache has a fixed size so that every decode step compiles once; slots past the index are masked below.
      cached_k = self.variable('cache', 'key', jnp.zeros, (batch, cfg.max_len, kv, d), dtype)
      cached_v = self.variable('cache', 'value', jnp.zeros, (batch, cfg.max_len, kv, d), dtype)
      cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, cache_index, 0, 0))
      cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, cache_index, 0, 0))
      k, v = cached_k.value, cached_v.value
    shared = shared_mask is not None  # decoding after a prefix that every row shares (see `Transformer`)

    query_slot = cache_index + jnp.arange(length)
    key_slot = jnp.arange(k.shape[1])
    visible = key_slot[None, :] < cache_index + length  # excludes cache slots not yet written
    if cfg.causal:
      visible &= key_slot[None, :] <= query_slot[:, None]
    if key_mask is not None:
      # Padding is seen by no query but itself: a padding query that saw nothing would turn NaN, and NaN values
      # leak through zero attention weights (0 * NaN) into the real tokens of the next layer.
      visible = visible & (key_mask[:, None, :] | (key_slot[None, :] == query_slot[:, None]))
      visible = visible[:, None, None]  # [batch, 1, 1, length, keys] against scores [batch, kv, group, ...]

    # Query head j reads k/v head j // group (Llama's repeat_kv); a grouped einsum avoids copying k/v per head.
    group = h // kv
    q = q.reshape(batch, length, kv, group, d)
    scores = jnp.einsum('blkgd,bskd->bkgls', q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(visible, scores, -jnp.inf)
    if shared:
      out = _attend_with_shared_prefix(cfg, q, scores, v, self.get_variable('cache', 'shared_key')[0],
                                       self.get_variable('cache', 'shared_value')[0], shared_mask[0])
    else:
      probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
      out = jnp.einsum('bkgls,bskd->blkgd', probs, v)
    return _project(self, 'out', out.reshape(batch, length, h, d), wo, out_axes, 2)


def _attend_with_shared_prefix(cfg: TransformerConfig, q: Array, own_scores: Array, own_v: Array, shared_k: Array,
                               shared_v: Array, shared_mask: Array) -> Array:
  """Attention over a prefix that every row shares (keys, values [slots, kv, d], mask [slots]) and the row's own
  cache (own_scores [batch, kv, group, length, keys], masked; own_v [batch, keys, kv, d]); q [batch, length, kv,
  group, d]. Returns [batch, length, kv, group, d].

  The prefix is held once, not copied per row: per KV head, all rows' queries against its keys are one 2-D matmul
  (in `cfg.matmul_dtype` where set, as the projections), and so is the weighted sum of its values. One softmax
  spans both parts, merged through a common maximum and denominator.
  """
  batch, length, kv, group, d = q.shape
  rows = batch * length * group
  queries = q.transpose(2, 0, 1, 3, 4).reshape(kv, rows, d)
  dot = lambda a, b: (low_precision_dot(a, b, 1, cfg.matmul_dtype) if _low_precision(cfg)
                      else jnp.dot(a, b.astype(a.dtype), preferred_element_type=jnp.float32))
  shared_scores = jnp.stack([dot(queries[i], shared_k[:, i].T) for i in range(kv)]) / math.sqrt(d)
  shared_scores = jnp.where(shared_mask, shared_scores, -jnp.inf)  # [kv, rows, slots]
  own = own_scores.transpose(1, 0, 3, 2, 4).reshape(kv, rows, -1)  # [kv, batch * length * group, keys]
  top = jax.lax.stop_gradient(jnp.maximum(shared_scores.max(-1, keepdims=True), own.max(-1, keepdims=True)))
  shared_p, own_p = jnp.exp(shared_scores - top), jnp.exp(own - top)
  total = shared_p.sum(-1, keepdims=True) + own_p.sum(-1, keepdims=True)
  dtype = jnp.dtype(cfg.dtype)
  from_shared = jnp.stack([dot(shared_p[i].astype(dtype), shared_v[:, i]) for i in range(kv)])
  from_own = jnp.einsum('kbms,bskd->kbmd', own_p.reshape(kv, batch, length * group, -1).astype(dtype), own_v,
                        preferred_element_type=jnp.float32).reshape(kv, rows, d)
  out = ((from_shared + from_own) / total).astype(dtype)
  return out.reshape(kv, batch, length, group, d).transpose(1, 2, 0, 3, 4)


class MLP(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    pdtype = jnp.dtype(cfg.param_dtype)
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    up_axes, down_axes = ('embed', 'mlp'), ('mlp', 'embed')
    w_gate = self.param('gate', _weight(cfg.init_std, up_axes), (cfg.embed_dim, cfg.mlp_dim), pdtype)
    w_up = self.param('up', _weight(cfg.init_std, up_axes), (cfg.embed_dim, cfg.mlp_dim), pdtype)
    w_down = self.param('down', _weight(out_std, down_axes), (cfg.mlp_dim, cfg.embed_dim), pdtype)
    hidden = nn.silu(_project(self, 'gate', x, w_gate, up_axes, 1)) * _project(self, 'up', x, w_up, up_axes, 1)
    hidden = nn.with_logical_constraint(hidden, ('act_batch', 'act_length', 'act_mlp'))
    return _project(self, 'down', hidden, w_down, down_axes, 1)


class Block(nn.Module):
  config: TransformerConfig
  decode: bool

  @nn.compact
  def __call__(self, x: Array, positions: Array, cache_index: Array, key_mask: Array | None = None,
               shared_mask: Array | None = None) -> tuple[Array, None]:
    # Returns (carry, output) so that nn.scan can stack it; the unscanned path ignores the None.
    x = x + Attention(self.config, self.decode, name='attention')(
        RMSNorm(self.config, name='attention_norm')(x), positions, cache_index, key_mask, shared_mask)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
    x = x + MLP(self.config, name='mlp')(RMSNorm(self.config, name='mlp_norm')(x))
    return nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed')), None


def run_blocks(cfg: TransformerConfig, x: Array, positions: Array, cache_index: Array, *,
               decode: bool = False, key_mask: Array | None = None, shared_mask: Array | None = None,
               before_layer: Callable[[int, Array], Array] | None = None) -> Array:
  """The stack of blocks, unrolled ('layers_0', 'layers_1', ...) or scanned (one 'layers' tree), optionally
  rematerialised. Called from inside a compact module: the decoder here, the ViT in vit.py.

  key_mask: bool [batch, keys] (keys: this call's tokens, or the whole cache when decoding), False for padding that
  no other position may attend to; None when every position is real.
  shared_mask: bool [1, slots] of the shared prefix in the cache (decoding only; see `Transformer`), or None.
  before_layer: (layer index, x) -> x, applied to the input of every layer after the first (deep visual prompts
  replace tokens there); unrolled stacks only.
  """
  block = Block
  if cfg.remat != 'none':
    # Inside a scan, XLA cannot CSE across iterations anyway, and prevent_cse would block optimisations.
    block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    if before_layer is not None:
      raise ValueError('Per-layer inputs (deep prompts) need an unrolled stack: set scan_layers=False.')
    layers = nn.scan(block, variable_axes={'params': 0, 'cache': 0}, split_rngs={'params': True},
                     in_axes=(nn.broadcast,) * 4, length=cfg.num_layers,
                     metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = layers(cfg, decode, name='layers')(x, positions, cache_index, key_mask, shared_mask)
  else:
    for i in range(cfg.num_layers):
      if i and before_layer is not None:
        x = before_layer(i, x)
      x, _ = block(cfg, decode, name=f'layers_{i}')(x, positions, cache_index, key_mask, shared_mask)
  return x


class Transformer(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None, decode: bool = False,
               prefix_embeddings: Array | None = None, return_hidden: bool = False,
               mask: Array | None = None) -> Array:
    """tokens int [batch, length] -> float32 logits [batch, prefix + length, vocab].

    positions: int [batch, prefix + length] for rotary embeddings; default: each real token's count of real tokens
      before it (in the cache too when decoding), i.e. 0, 1, ... when nothing is padded. The attention mask follows
      the order of the sequence (and the cache), not `positions`.
    decode: read and extend the KV cache (the 'cache' collection, pass mutable=['cache']); one call may add a whole
      prompt, later calls one token each. Start from an empty cache: `generate.init_cache`, or the cache of
      `init(..., decode=True)`, which holds no tokens. A cache may also hold a prefix that every row shares
      (`shared_mask` [1, slots] at its top, `shared_key`/`shared_value` [1, slots, kv_heads, head_dim] beside each
      layer's own, with a leading layer axis when `scan_layers`; `evaluate/lm_classify.extend_cache` builds it): every row attends to its real slots before its
      own, without a copy per row, and its real slots count in the positions.
    prefix_embeddings: float [batch, prefix, embed_dim] placed before the token embeddings (soft prompts).
    return_hidden: return the final-normed hidden states (float32) [batch, prefix + length, embed_dim] instead.
    mask: bool [batch, length], False for padding tokens: no other position attends to them, now or (decoding,
      where the mask is kept in the cache) in later calls, so rows of different lengths can share a batch, padded
      on either side. None: every token is real.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    embedding = self.param('embedding', _weight(cfg.init_std, ('vocab', 'embed')), (cfg.vocab_size, cfg.embed_dim),
                           jnp.dtype(cfg.param_dtype))
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    if prefix_embeddings is not None:
      x = jnp.concatenate([prefix_embeddings.astype(dtype), x], axis=1)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
    batch, length = x.shape[:2]

    real = jnp.ones((batch, length), bool)
    if mask is not None:
      real = real.at[:, length - tokens.shape[1]:].set(mask.astype(bool))  # soft-prompt positions are real
    cache_index = jnp.zeros((), jnp.int32)
    real_before = jnp.zeros((batch,), jnp.int32)
    key_mask = None if mask is None else real
    shared_mask = None
    if decode and self.has_variable('cache', 'shared_mask'):
      shared_mask = self.get_variable('cache', 'shared_mask')
      real_before = real_before + jnp.sum(shared_mask, dtype=jnp.int32)
    if decode:
      index = self.variable('cache', 'index', jnp.zeros, (), jnp.int32)
      cached_mask = self.variable('cache', 'mask', jnp.zeros, (batch, cfg.max_len), bool)
      cache_index = index.value
      real_before += jnp.sum(cached_mask.value & (jnp.arange(cfg.max_len) < cache_index), axis=1, dtype=jnp.int32)
      cached_mask.value = jax.lax.dynamic_update_slice(cached_mask.value, real, (0, cache_index))
      key_mask = cached_mask.value
      if not self.is_initializing():  # the cache that init returns is empty, ready for a prefill
        index.value = cache_index + length
    if positions is None:
      positions = real_before[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1

    x = run_blocks(cfg, x, positions, cache_index, decode=decode, key_mask=key_mask, shared_mask=shared_mask)
    x = RMSNorm(cfg, name='final_norm')(x)
    if return_hidden:
      return x.astype(jnp.float32)
    if cfg.tie_embeddings:
      head = embedding.T
    else:
      head = self.param('lm_head', _weight(cfg.init_std, ('embed', 'vocab')), (cfg.embed_dim, cfg.vocab_size),
                        jnp.dtype(cfg.param_dtype))
    # bf16 inputs, float32 accumulation and output: the softmax over a large vocabulary needs the precision.
    if not _low_precision(cfg):
      logits = jnp.einsum('ble,ev->blv', x, head.astype(dtype), preferred_element_type=jnp.float32)
    else:
      logits = low_precision_dot(x, head, 1, cfg.matmul_dtype)
    return nn.with_logical_constraint(logits, ('act_batch', 'act_length', 'act_vocab'))


def init_cache(model: Transformer, batch_size: int) -> dict:
  """An empty KV cache (zeros, index 0) for `batch_size` sequences, built without running the model."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32),
                                             decode=True)['cache'])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
