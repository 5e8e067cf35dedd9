"""Tokenizers: text <-> int32 ids.

Every tokenizer has `encode(str) -> np.ndarray[int32]`, `decode(ids) -> str`, `vocab_size`, and the special ids
`pad_id`, `bos_id`, `eos_id` that the input pipelines use (eos separates documents, pad fills weight-0 positions).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then pad, bos, eos. Needs no files and never sees an unknown symbol."""

  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids).reshape(-1)
    byte_ids = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
    return byte_ids.tobytes().decode('utf-8', errors='replace')

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


_TOKENIZERS = {'byte': ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
  """The tokenizer a config names, e.g. `config.data.tokenizer = 'byte'`."""
  if name not in _TOKENIZERS:
    raise ValueError(f'Unknown tokenizer {name!r}; valid choices: {sorted(_TOKENIZERS)}.')
  return _TOKENIZERS[name]()
