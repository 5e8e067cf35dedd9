"""Pure Flax modules, no training logic. Their configs are frozen dataclasses built from config dicts here."""

import dataclasses
import math
from typing import Any, Mapping


def config_from_dict(cls, d: Mapping[str, Any]):
  """A model config dataclass from a dict or an ml_collections ConfigDict (lists become tuples, as configs given on
  the command line or read from JSON hold lists); unknown keys are an error, not silently dropped."""
  d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
  known = {f.name for f in dataclasses.fields(cls)}
  if set(d) - known:
    raise ValueError(f'unknown {cls.__name__} fields {sorted(set(d) - known)}; known: {sorted(known)}')
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  for name, value in values.items():
    # Sizes (layers, widths, heads, patch sizes...) are the int fields: zero or negative ones fail deep inside
    # initialisation (a division by zero, an empty stack), so they are refused here with the field's name.
    ints = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in ints) or value == ():
      raise ValueError(f'{cls.__name__}.{name}={value!r}: sizes must be whole numbers of at least 1.')
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{cls.__name__}.{name}={value!r} must be finite.')
  return cls(**values)
