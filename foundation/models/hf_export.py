"""Export a `Transformer` as a Hugging Face Llama directory: config.json, model.safetensors, tokenizer files.

The directory loads with `transformers.LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, but
neither torch nor transformers is needed to write it (`safetensors.numpy`). Hugging Face's Llama rotates feature i
with i + head_dim/2 (`rotate_half`), exactly as `apply_rope` here, so q/k need no reordering, only HF's [out, in]
transposes. Weights are written as float32, whatever the training dtype.
"""

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from foundation.models.transformer import TransformerConfig, merge_lora


def _layers(params: Mapping[str, Any], cfg: TransformerConfig):
  """Each block's params, from unrolled ('layers_0', ...) or scanned ('layers', leading axis of depth) trees."""
  for i in range(cfg.num_layers):
    if cfg.scan_layers:
      yield _map(lambda x: x[i], params['layers'])
    else:
      yield params[f'layers_{i}']


def _map(fn, tree):
  return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, Mapping) else fn(tree)


def hf_tensors(params: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """Hugging Face Llama state-dict names -> float32 arrays in its [out, in] layout."""
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))
  e, h, kv, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {'model.embed_tokens.weight': f32(params['embedding'])}
  for i, layer in enumerate(_layers(params, cfg)):
    prefix = f'model.layers.{i}'
    attention, mlp = layer['attention'], layer['mlp']
    out[f'{prefix}.self_attn.q_proj.weight'] = f32(np.reshape(attention['query'], (e, h * d)).T)
    out[f'{prefix}.self_attn.k_proj.weight'] = f32(np.reshape(attention['key'], (e, kv * d)).T)
    out[f'{prefix}.self_attn.v_proj.weight'] = f32(np.reshape(attention['value'], (e, kv * d)).T)
    out[f'{prefix}.self_attn.o_proj.weight'] = f32(np.reshape(attention['out'], (h * d, e)).T)
    out[f'{prefix}.mlp.gate_proj.weight'] = f32(np.transpose(mlp['gate']))
    out[f'{prefix}.mlp.up_proj.weight'] = f32(np.transpose(mlp['up']))
    out[f'{prefix}.mlp.down_proj.weight'] = f32(np.transpose(mlp['down']))
    out[f'{prefix}.input_layernorm.weight'] = f32(layer['attention_norm']['scale'])
    out[f'{prefix}.post_attention_layernorm.weight'] = f32(layer['mlp_norm']['scale'])
  out['model.norm.weight'] = f32(params['final_norm']['scale'])
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = f32(np.transpose(params['lm_head']))
  return out


def hf_config(cfg: TransformerConfig, tokenizer) -> dict[str, Any]:
  """LlamaForCausalLM's config.json fields."""
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'hidden_size': cfg.embed_dim,
      'intermediate_size': cfg.mlp_dim,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'num_hidden_layers': cfg.num_layers,
      'head_dim': cfg.head_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_base,
      'rope_scaling': None,
      'max_position_embeddings': cfg.max_len,
      'vocab_size': cfg.vocab_size,
      'tie_word_embeddings': cfg.tie_embeddings,
      'attention_bias': False,
      'mlp_bias': False,
      'attention_dropout': 0.0,
      'initializer_range': cfg.init_std,
      'torch_dtype': 'float32',
      'use_cache': True,
      'bos_token_id': int(tokenizer.bos_id),
      'eos_token_id': int(tokenizer.eos_id),
      'pad_token_id': int(tokenizer.pad_id),
  }


def export_llama(params: Mapping[str, Any], model_config: TransformerConfig | Mapping[str, Any], tokenizer,
                 out_dir: str) -> None:
  """Writes `out_dir`/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json}.

  params: the (unboxed) `Transformer` params, unrolled or scanned (LoRA factors are merged into their weights);
  model_config: its TransformerConfig or config dict; tokenizer: a tokenizer of foundation/data/tokenizers.py
  (ByteTokenizer becomes a merge-free byte-level BPE with the same ids).
  """
  from safetensors.numpy import save_file
  cfg = model_config if isinstance(model_config, TransformerConfig) else TransformerConfig.from_dict(model_config)
  if cfg.lora_rank:  # a Llama has no low-rank factors: fold them into the weights they adapt, in float32 (the
    # file's dtype), so that bfloat16 params do not round away the adapter that training added unrounded
    params, cfg = merge_lora(jax.tree.map(lambda v: np.asarray(v, np.float32), params), cfg)
  if not cfg.causal:
    raise ValueError('a bidirectional (causal=False) Transformer is not a LlamaForCausalLM; refusing to export it.')
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} rows.')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf_config(cfg, tokenizer), f, indent=2)
  # transformers refuses a safetensors file whose metadata does not name its framework.
  save_file(hf_tensors(params, cfg), os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  hf_tokenizer = tokenizer.to_tokenizers()
  hf_tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
  # The special tokens by name, as AutoTokenizer (and BPETokenizer.from_file) read them.
  tokenizer_config = {
      'tokenizer_class': 'PreTrainedTokenizerFast',
      'bos_token': hf_tokenizer.id_to_token(tokenizer.bos_id),
      'eos_token': hf_tokenizer.id_to_token(tokenizer.eos_id),
      'pad_token': hf_tokenizer.id_to_token(tokenizer.pad_id),
      'model_max_length': cfg.max_len,
      'clean_up_tokenization_spaces': False,
  }
  if getattr(tokenizer, 'chat_template', None):
    tokenizer_config['chat_template'] = tokenizer.chat_template
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump(tokenizer_config, f, indent=2)
