"""Pure Flax modules, no training logic. Their configs are frozen dataclasses built from config dicts here."""

import dataclasses
import math
from typing import Any, Mapping


# Bounds that no real model reaches but a typo does (an extra digit, 1e9): past them, tracing the model alone would
# run out of memory or time before any error could be raised.
MAX_SIZE = 1 << 24
MAX_REPEATS = 4096
REPEAT_FIELDS = ('num_layers', 'blocks_per_stage', 'num_heads', 'num_kv_heads')


def config_from_dict(cls, d: Mapping[str, Any]):
  """A model config dataclass from a dict or an ml_collections ConfigDict (lists become tuples, as configs given on
  the command line or read from JSON hold lists); unknown keys are an error, not silently dropped."""
  d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  known = set(fields)
  if set(d) - known:
    raise ValueError(f'unknown {cls.__name__} fields {sorted(set(d) - known)}; known: {sorted(known)}')
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  for name, value in values.items():
    # Sizes (layers, widths, heads, patch sizes...) are the int fields: zero or negative ones fail deep inside
    # initialisation (a division by zero, an empty stack), so they are refused here with the field's name.
    ints = [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, int) and
            not isinstance(v, bool)]
    limit = MAX_REPEATS if name in REPEAT_FIELDS else MAX_SIZE
    lowest = 0 if fields[name].default == 0 else 1  # a size whose default is 0 means "none" (e.g. no LoRA)
    if any(v < lowest or v > limit for v in ints) or value == ():
      raise ValueError(f'{cls.__name__}.{name}={value!r}: sizes must be whole numbers from {lowest} to {limit}.')
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{cls.__name__}.{name}={value!r} must be finite.')
  return cls(**values)
