"""Tokenizers: text <-> int32 ids.

Every tokenizer has `encode(str) -> np.ndarray[int32]`, `decode(ids) -> str`, `vocab_size`, the special ids
`pad_id`, `bos_id`, `eos_id` that the input pipelines use (eos separates documents, pad fills weight-0 positions),
and `byte_lengths()`: how many bytes of text each id stands for, so that a loss per byte compares models whose
tokenizers differ (eos counts as one byte, the document break, as a newline would; other special ids as none).
Both kinds also convert to a Hugging Face `tokenizers.Tokenizer` (`to_tokenizers()`), so an exported model ships a
`tokenizer.json` that other tools read.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np


def byte_to_unicode() -> dict[int, str]:
  """GPT-2's printable stand-in for every byte, the alphabet of byte-level BPE vocabularies.

  Printable Latin-1 bytes stand for themselves; the other 68 are shifted to U+0100 and up, in byte order. BPE
  vocabularies (GGUF `tokenizer.ggml.tokens`, `tokenizer.json`) spell tokens in this alphabet.
  """
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  mapping, shifted = {}, 0
  for b in range(256):
    if b in printable:
      mapping[b] = chr(b)
    else:
      mapping[b] = chr(256 + shifted)
      shifted += 1
  return mapping


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then pad, bos, eos. Needs no files and never sees an unknown symbol."""

  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259
  # The names ids 256.. get in an exported tokenizer.json, where (unlike in encode here) text spelling one of them
  # becomes that id, as with any Hugging Face special token.
  SPECIAL_TOKENS = ('<pad>', '<bos>', '<eos>')

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids).reshape(-1)
    byte_ids = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
    return byte_ids.tobytes().decode('utf-8', errors='replace')

  def byte_lengths(self) -> np.ndarray:
    lengths = np.zeros([self.vocab_size], np.int32)
    lengths[:256] = 1
    lengths[self.eos_id] = 1
    return lengths

  def to_tokenizers(self):
    """The same ids as a byte-level BPE without merges: each byte's stand-in character is its own token."""
    import tokenizers
    vocab = {char: b for b, char in byte_to_unicode().items()}
    vocab.update({name: self.pad_id + i for i, name in enumerate(self.SPECIAL_TOKENS)})
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    # Without the GPT-2 regex every byte of the text reaches the model: no split is needed when nothing merges.
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)
                           for name in self.SPECIAL_TOKENS])
    return hf

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


# How llama.cpp's `tokenizer.ggml.pre` names split text into words before BPE, as `tokenizers` pre-tokenizers.
# A name missing here is refused: a wrong split still runs but silently hands the model unfamiliar tokens.
def _gpt2_split(tk):
  return tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split(tk):  # StarCoder/SmolLM: every digit its own word, then GPT-2's regex
  return tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True), _gpt2_split(tk)])


# llama.cpp's 'default' (also what it assumes when the key is missing) is a split of its own, not GPT-2's: refused.
_GGUF_PRE_TOKENIZERS = {'gpt-2': _gpt2_split, 'smollm': _digits_then_gpt2_split}

# llama.cpp's token types (gguf.TokenType): 3 is a control token (<|im_start|>, <|endoftext|>), 4 a user-defined
# one; both are matched whole in the text before BPE runs, and only control tokens are dropped by decode.
_CONTROL, _USER_DEFINED = 3, 4


class BPETokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` behind the interface of ByteTokenizer, plus the chat turns of an
  instruct model (ChatML: `<|im_start|>role\\ntext<|im_end|>\\n`)."""

  def __init__(self, tokenizer, *, bos_id: int, eos_id: int, pad_id: int, chat_template: str | None = None):
    self.tokenizer = tokenizer
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.chat_template = chat_template  # the model's Jinja template, kept for export (tokenizer_config.json)
    self.default_system = _chatml_default_system(chat_template or '')
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> BPETokenizer:
    """From a GGUF file's `tokenizer.*` key-values (plain Python values: strings, ints, lists)."""
    import tokenizers
    model = metadata.get('tokenizer.ggml.model')
    if model != 'gpt2':
      raise ValueError(f'GGUF tokenizer.ggml.model={model!r}: only byte-level BPE (\'gpt2\') is supported.')
    pre = metadata.get('tokenizer.ggml.pre')
    if pre not in _GGUF_PRE_TOKENIZERS:
      raise ValueError(f'GGUF tokenizer.ggml.pre={pre!r} has no pre-tokenizer here; known: '
                       f'{sorted(_GGUF_PRE_TOKENIZERS)}. Add its split to _GGUF_PRE_TOKENIZERS.')
    for key in ('tokenizer.ggml.add_bos_token', 'tokenizer.ggml.add_eos_token'):
      if metadata.get(key):  # encode() adds nothing: the prompt's parts are encoded apart and joined
        raise ValueError(f'GGUF {key}=True: this tokenizer adds no special tokens to what it encodes, so the model '
                         'would read its text without the token it was trained to see there.')
    tokens = list(metadata['tokenizer.ggml.tokens'])
    types = list(metadata.get('tokenizer.ggml.token_type', [1] * len(tokens)))
    merges = [tuple(m.split(' ', 1)) for m in metadata.get('tokenizer.ggml.merges', [])]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                                    ignore_merges=False))
    hf.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre](tokenizers)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                   for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == _CONTROL])
    if hf.get_vocab_size(with_added_tokens=True) != len(tokens):
      raise ValueError(f'GGUF tokenizer.ggml.tokens holds {len(tokens)} entries but only '
                       f'{hf.get_vocab_size(with_added_tokens=True)} distinct tokens.')
    eos = metadata.get('tokenizer.ggml.eos_token_id')
    bos = metadata.get('tokenizer.ggml.bos_token_id', eos)
    pad = metadata.get('tokenizer.ggml.padding_token_id', eos)
    if eos is None:
      raise ValueError('GGUF metadata has no tokenizer.ggml.eos_token_id: documents could not be separated.')
    return cls(hf, bos_id=int(bos), eos_id=int(eos), pad_id=int(pad),
               chat_template=metadata.get('tokenizer.chat_template'))

  @classmethod
  def from_file(cls, path: str) -> BPETokenizer:
    """From a `tokenizer.json`; the bos/eos/pad tokens (and the chat template) come from the
    `tokenizer_config.json` beside it, as Hugging Face writes them. Without one, a vocabulary with a single special
    token (GPT-2's <|endoftext|>) uses it for all three; guessing among several is refused."""
    import tokenizers
    hf = tokenizers.Tokenizer.from_file(path)
    _check_byte_level(json.loads(hf.to_str()), path)
    config_path = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
    config = {}
    if os.path.exists(config_path):
      with open(config_path) as f:
        config = json.load(f)
    specials = [t.content for t in hf.get_added_tokens_decoder().values() if t.special]

    def token_id(key, fallback):
      token = config.get(key) or fallback
      if isinstance(token, dict):  # {"content": "<|im_end|>", ...}
        token = token['content']
      if token is None or hf.token_to_id(token) is None:
        raise ValueError(f'{path}: no {key} in {config_path}, and not exactly one special token to use instead.')
      return hf.token_to_id(token)

    eos = token_id('eos_token', specials[0] if len(specials) == 1 else None)
    eos_token = hf.id_to_token(eos)
    return cls(hf, bos_id=token_id('bos_token', eos_token), eos_id=eos,
               pad_id=token_id('pad_token', eos_token), chat_template=config.get('chat_template'))

  def encode(self, text: str) -> np.ndarray:
    """Special tokens written in the text (`<|im_start|>`) become their ids; no bos is added."""
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

  def chat(self, text: str, system: str | None = None) -> np.ndarray:
    """Ids of one user turn followed by the start of the assistant's turn, ready for generation.

    As the instruct model's template does, a system turn comes first: `system`, else the template's default one
    (SmolLM2-Instruct: "You are a helpful AI assistant named SmolLM, ..."), else none.
    """
    head, tail, _ = self.chat_parts(system)
    return self.encode(head + text + tail)

  def chat_parts(self, system: str | None = None) -> tuple[str, str, str]:
    """The text of ChatML turns around user texts: (system turn + start of the user turn, end of the user turn +
    start of the assistant turn, end of the assistant's reply + start of the next user turn). `chat` puts the first
    two around its text; a conversation of demonstrations (user text, assistant reply, ...) joins them with the
    third. For prompts whose first part is shared and encoded once (in-context demonstrations before a query)."""
    if self.tokenizer.token_to_id('<|im_start|>') is None:
      raise ValueError('this tokenizer has no <|im_start|> token: its model does not use ChatML turns.')
    system = self.default_system if system is None else system
    head = f'<|im_start|>system\n{system}<|im_end|>\n' if system else ''
    return head + '<|im_start|>user\n', '<|im_end|>\n<|im_start|>assistant\n', '<|im_end|>\n<|im_start|>user\n'

  def byte_lengths(self) -> np.ndarray:
    unicode_to_byte = {char: b for b, char in byte_to_unicode().items()}
    added = self.tokenizer.get_added_tokens_decoder()
    lengths = np.zeros([self.vocab_size], np.int32)
    for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
      if i in added:  # matched literally in the text; control tokens stand for no text
        lengths[i] = 0 if added[i].special else len(token.encode('utf-8'))
      else:  # spelled in the byte alphabet: one character per byte
        lengths[i] = len(token) if all(c in unicode_to_byte for c in token) else len(token.encode('utf-8'))
    lengths[self.eos_id] = 1
    return lengths

  def to_tokenizers(self):
    return self.tokenizer

  def __repr__(self) -> str:
    return f'BPETokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})'


def _check_byte_level(spec: dict, path: str) -> None:
  """Refuses a tokenizer.json that is not GPT-2-style byte-level BPE (a BPE model, a ByteLevel pre-tokenizer that
  adds no space, a ByteLevel decoder, no normalizer). byte_lengths reads each token as spelled in the byte
  alphabet, so a SentencePiece-style one (Metaspace, byte-fallback tokens) would give wrong bytes per token and
  a wrong nats/byte, silently."""
  def parts(part, key):  # a component, or the members of a Sequence of them
    return [p for inner in part.get(key, []) for p in parts(inner, key)] if part and key in part else [part or {}]

  pre = parts(spec.get('pre_tokenizer'), 'pretokenizers')
  byte_level = [p for p in pre if p.get('type') == 'ByteLevel']
  decoders = [p.get('type') for p in parts(spec.get('decoder'), 'decoders')]
  found = (f"model {spec['model'].get('type')}, pre-tokenizer {[p.get('type') for p in pre]}, decoder {decoders}, "
           f"normalizer {(spec.get('normalizer') or {}).get('type')}")
  if (spec['model'].get('type') != 'BPE' or not byte_level or any(p.get('add_prefix_space') for p in byte_level)
      or 'ByteLevel' not in decoders or spec.get('normalizer')):
    raise ValueError(f'{path} is not a byte-level BPE tokenizer ({found}); foundation reads GPT-2-style ones only '
                     '(a ByteLevel pre-tokenizer without add_prefix_space and decoder, no normalizer), whose tokens '
                     'spell their bytes.')


def _chatml_default_system(template: str) -> str | None:
  """The system prompt a ChatML Jinja template inserts when the conversation has none (a literal in the
  template), so that `chat` builds the same prompt the model was tuned on without a Jinja engine."""
  match = re.search(r"'<\|im_start\|>system\n(.*?)<\|im_end\|>", template, flags=re.DOTALL)
  return match.group(1) if match else None


def get_tokenizer(name: str) -> ByteTokenizer | BPETokenizer:
  """The tokenizer a config names, e.g. `config.data.tokenizer = 'byte'`, or a path to a `tokenizer.json`."""
  if name == 'byte':
    return ByteTokenizer()
  if name.endswith('.json') and os.path.exists(name):
    return BPETokenizer.from_file(name)
  raise ValueError(f'Unknown tokenizer {name!r}; valid choices: [\'byte\'] or the path of a tokenizer.json.')
