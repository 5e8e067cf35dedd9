"""Pure Flax modules, no training logic. Their configs are frozen dataclasses built from config dicts here."""

import dataclasses
from typing import Any, Mapping


def config_from_dict(cls, d: Mapping[str, Any]):
  """A model config dataclass from a dict or an ml_collections ConfigDict (lists become tuples, as configs given on
  the command line or read from JSON hold lists); unknown keys are an error, not silently dropped."""
  d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
  known = {f.name for f in dataclasses.fields(cls)}
  if set(d) - known:
    raise ValueError(f'unknown {cls.__name__} fields {sorted(set(d) - known)}; known: {sorted(known)}')
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
