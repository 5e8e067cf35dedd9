"""The optimizer, built from `config.optim`: schedule, AdamW with a weight-decay mask, clipping, freezing by regex,
and sparsity kept by regex.

Parameter names are the '/'-joined key paths of the trainable tree (e.g. `layers/attn/q/kernel`); every regex rule
in the config is matched against them with `re.search`. A rule that matches no parameter is an error, because a
misspelled freeze pattern silently training everything is the worst kind of ablation bug.
"""

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax


def param_names(params: Any) -> Any:
  """A tree shaped like params whose leaves are the '/'-joined key paths."""
  def name(path, _):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
  return jax.tree.map_with_path(name, params)


def _matching(patterns: Sequence[str], params: Any, field: str) -> Any:
  """A bool tree: does any pattern match the parameter's name? Unused patterns are reported."""
  names = param_names(params)
  flat = jax.tree.leaves(names)
  for pattern in patterns:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f'config.optim.{field} pattern {pattern!r} is not a regular expression ({e}).') from None
    if not any(re.search(pattern, n) for n in flat):
      raise ValueError(f'config.optim.{field} pattern {pattern!r} matches no parameter; names look like '
                       f'{flat[:4]}.')
  return jax.tree.map(lambda n: any(re.search(p, n) for p in patterns), names)


def learning_rate_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  warmup = min(int(cfg.warmup_steps), total_steps)
  if cfg.schedule == 'constant':
    decay = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1), alpha=cfg.end_lr_fraction)
  elif cfg.schedule == 'linear':
    decay = optax.linear_schedule(cfg.lr, cfg.lr * cfg.end_lr_fraction, max(total_steps - warmup, 1))
  else:
    raise ValueError(f'config.optim.schedule={cfg.schedule!r}; choose one of constant, cosine, linear.')
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _check_numbers(cfg: Any) -> None:
  """Values that would only show up as a NaN many steps later are refused up front."""
  ranges = {'lr': (0, None), 'weight_decay': (0, None), 'grad_clip': (0, None), 'end_lr_fraction': (0, 1),
            'b1': (0, 1), 'b2': (0, 1), 'warmup_steps': (0, None)}
  for name, (low, high) in ranges.items():
    value = cfg.get(name)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (
        high is not None and value > high) or (name in ('b1', 'b2') and value >= 1):
      bound = f'in [{low}, {high}{")" if name in ("b1", "b2") else "]"}' if high is not None else f'>= {low}'
      raise ValueError(f'config.optim.{name}={value!r} must be a finite number {bound}.')
  if 'eps' in cfg and (not isinstance(cfg.eps, (int, float)) or not 0 < cfg.eps < 1):
    raise ValueError(f'config.optim.eps={cfg.eps!r} must be a small positive number (e.g. 1e-8).')


def make_optimizer(cfg: Any, params: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule). `params` may be abstract (ShapeDtypeStructs): only names and structure are used."""
  _check_numbers(cfg)
  schedule = learning_rate_schedule(cfg, total_steps)
  decay_mask = jax.tree.map(lambda excluded: not excluded,
                            _matching(cfg.weight_decay_exclude, params, 'weight_decay_exclude'))
  if cfg.name == 'adamw':
    core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.name == 'sgd':
    core = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.sgd(schedule, momentum=cfg.b1))
  else:
    raise ValueError(f'config.optim.name={cfg.name!r}; choose adamw or sgd.')
  # A pruned weight's gradient is dropped before clipping, so that the global norm is the sparse model's: the update
  # of a weight whose gradient is always zero is zero through AdamW and SGD alike (its decay too, as it is zero).
  parts = [_keep_zeros(_matching(cfg.keep_zeros, params, 'keep_zeros'))] if cfg.get('keep_zeros') else []
  parts += [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
  tx = optax.chain(*parts, core, *_lr_scales(cfg.get('lr_scale', ()), params),
                   *_param_max(cfg.get('param_max', ()), params))
  if cfg.freeze:
    # Frozen parameters get zero updates and no optimizer state (set_to_zero keeps none).
    labels = jax.tree.map(lambda f: 'frozen' if f else 'trained', frozen_mask(cfg, params))
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, schedule


def _rules(rules: Sequence[str], params: Any, field: str, valid: Callable[[float], bool],
           needs: str) -> list[tuple[Any, float]]:
  """config.optim.<field> entries 'REGEX=NUMBER' -> (mask of the parameters the regex matches, number); an entry that
  does not parse, or whose number `valid` refuses, is a one-line error ending in `needs`."""
  out = []
  for rule in rules:
    pattern, _, text = str(rule).rpartition('=')
    try:
      value = float(text)
    except ValueError:
      value = math.nan
    if not pattern or not valid(value):
      raise ValueError(f'config.optim.{field} entry {rule!r} must read {needs}')
    out.append((_matching([pattern], params, field), value))
  return out


def _lr_scales(rules: Sequence[str], params: Any) -> list[optax.GradientTransformation]:
  """config.optim.lr_scale, e.g. ('backbone=0.1',): the updates of the parameters a regex matches are multiplied by
  the factor (with AdamW, exactly a learning rate, weight decay included, that many times the schedule's). A
  parameter matched by several rules gets the product."""
  rules = _rules(rules, params, 'lr_scale', lambda v: 0 < v < math.inf,
                 'REGEX=FACTOR with a positive factor, e.g. "backbone=0.1".')
  return [optax.masked(optax.scale(value), mask) for mask, value in rules]


def _param_max(rules: Sequence[str], params: Any) -> list[optax.GradientTransformation]:
  """config.optim.param_max (a field of the configs that set it: CLIP's), e.g. ('logit_scale=4.6052',): the
  parameters a regex matches are at most the value after every update (the update is cut to reach it), as CLIP
  bounds its learned logit scale at log(100); a gradient still moves them back below it."""
  def bound(value):
    def update(updates, state, params):
      if params is None:
        raise ValueError('config.optim.param_max needs the parameters in the optimizer update.')
      return jax.tree.map(lambda u, p: jnp.minimum(u, (value - p).astype(u.dtype)), updates, params), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)
  rules = _rules(rules, params, 'param_max', math.isfinite,
                 'REGEX=VALUE with a finite value, e.g. "logit_scale=4.6052".')
  return [optax.masked(bound(value), mask) for mask, value in rules]


def _keep_zeros(mask: Any) -> optax.GradientTransformation:
  """Zero gradients at the entries that are exactly zero in the parameters `mask` selects, so that a pruned weight
  stays pruned. Stateless."""
  def update(updates, state, params):
    if params is None:
      raise ValueError('config.optim.keep_zeros needs the parameters in the optimizer update.')
    # The mask leads: under config.optim.freeze the updates and params hold an empty MaskedNode where a frozen
    # parameter is (optax.multi_transform), which this leaves as it is.
    keep = lambda m, u, p: jnp.where(p == 0, jnp.zeros_like(u), u) if m and not isinstance(u, optax.MaskedNode) else u
    return jax.tree.map(keep, mask, updates, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def frozen_mask(cfg: Any, params: Any) -> Any:
  """A bool tree: which parameters `cfg.freeze` keeps fixed. Freezing every one of them is an error."""
  frozen = _matching(cfg.freeze, params, 'freeze') if cfg.freeze else jax.tree.map(lambda _: False, params)
  leaves = jax.tree.leaves(frozen)
  if leaves and all(leaves):
    raise ValueError(f'config.optim.freeze={tuple(cfg.freeze)!r} leaves nothing trainable: every parameter matches. '
                     'Narrow the patterns.')
  return frozen


def zero_frozen(cfg: Any, grads: Any, params: Any) -> Any:
  """`grads` with the entries of the parameters cfg.freeze holds replaced by zeros that do not depend on the loss:
  the optimizer discards those gradients, and so XLA computes none of them (under frozen bottom layers the backward
  pass stops at the lowest trained weight)."""
  if not cfg.get('freeze'):
    return grads
  return jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen_mask(cfg, params))


def global_norm(tree: Any) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
