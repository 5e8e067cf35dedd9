r"""Ablations: a grid of config overrides x seeds, one `foundation.main` run each, then a table of final metrics.

  python -m foundation.sweep --config=configs/lm/shakespeare.py:baby \
      --grid='optim.lr=1e-3,3e-3;model.num_layers=2,4' --seeds=3 --root=workdirs/lr_depth \
      [--metrics=eval/loss,eval/perplexity] [--set=num_train_steps=500 ...] [--jobs=print]
  python -m foundation.sweep --root=workdirs/lr_depth --table_only

The grid is `field=value,value;field=value,...`: `;` separates fields and `,` values, but only outside brackets and
quotes, so tuples (`optim.freeze=('layers_0/',),('layers_[01]/',)`) and quoted strings (`data.name='a,b'`) are one
value each. The field `variant` takes the config's variants (several fields at once, e.g. a prompt's template and
label words): each value goes before --config's own variants, `+` joining several (`variant=chat,icl+chat`), so
that a modifier given in --config (`:smoke`) applies last and keeps its say over the cell's. A value that is one
quoted string is passed without its quotes (they only protect commas). A cell is one combination of values; each
cell runs `--seeds` times with `--config.seed=0..seeds-1` into `ROOT/<cell>/seed_<s>`, where `<cell>` spells the
cell's overrides (`optim.lr=0.001,model.num_layers=2`); where a value has quotes, spaces or characters a filesystem
would mind (`/`, `:`, ...), they are left out or replaced by `_`, and a hash of the overrides ends the name, so that
a cell's directory depends on that cell alone.

Everything is checked before any run starts or anything is written: the config loads, and every `--set` and grid
value parses into it through the same loader `foundation.main` uses (`config_flags`), so a typo fails here, once,
with exit status 2, instead of in every run.

Runs go one after another as subprocesses that print to this terminal. Rerunning the sweep skips the runs that
have finished (the loop's `finished.json`: the final evaluation written, early stopping included), however they
were run, whose `config.json` is the config their cell's command resolves to now; the others run, and resume from
their checkpoints. (A run whose config changed, say by another `--set`, is rerun, and `foundation.main` refuses a
workdir that holds another config: give a changed sweep a new root.) Ctrl-C stops the sweep after the run it
interrupted has saved its checkpoint. A failing run does not stop the sweep: it is reported at the end, and the
exit status is 1. `--jobs=print` prints the commands of the runs not done (one per line, shell-quoted) instead of
running them, to submit them as separate jobs; `--table_only` builds the tables once they have finished. A run
that exits 0 here gets a `.sweep_done` marker holding its command.

The tables (`ROOT/table.md`, `table.csv`, `table.png`) have one row per cell. For every metric (default: every
`eval/...` key logged) they give the mean and the sample standard deviation (ddof=1; undefined for a single seed)
over seeds of the metric's last logged value in each finished run (a metric missing from a run is averaged over the
runs that have it: the CSV's `<metric> n`, and `[k of n]` in the markdown; a value that is not finite, as a diverged
seed logs, is left out of the mean and std and counted apart: the CSV's `<metric> not finite`, and `[k of n; j not
finite]`; `a|b` takes each run's `a`, or its `b` where it has no `a`, so that `best/eval/accuracy|eval/accuracy` is
the selected step's accuracy of a run that trains and the only evaluation of one that does not), and n, the number
of finished runs. A run counts as finished when it wrote `finished.json`, however it was run (a run that crashed in
its final evaluation, or was stopped, has not). The tables cover the cells of the latest sweep started or printed
for the root (`ROOT/sweep.json`); a finished run whose `config.json` differs from the config its cell's command
resolves to now (another `--set`, an edited config file or default, a resume with `--allow_config_change`) is left
out of them, with the fields that differ; fields added to the code after the run are not compared. Build the tables
from the directory the sweep ran in (its --config path is relative).
"""

import argparse
import ast
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from typing import NamedTuple

from absl import flags

from foundation import files

MANIFEST = 'sweep.json'  # what --table_only needs to find the runs again: config, fields, cells, seeds
DONE_MARKER = '.sweep_done'
VARIANT = 'variant'  # the grid field whose values are config variants, not a config field
_UNSAFE = re.compile(r'[^A-Za-z0-9._,=+()-]')  # safe in a file name on any filesystem
_MAX_NAME = 150  # characters; file names may have 255 bytes, and the hash suffix needs room
_OPEN, _CLOSE = '([{', ')]}'


class SweepError(ValueError):
  """A bad sweep definition; reported as one line with exit status 2, before anything runs."""


class Cell(NamedTuple):
  name: str                    # its directory under the root
  overrides: dict[str, str]    # field -> value, as passed to --config.field=value


# ---------------------------------------------------------------------------------------------------- the grid

def split_top_level(text: str, separator: str) -> list[str]:
  """Splits at `separator` outside brackets and quotes, so tuples and quoted strings stay whole."""
  parts, current, closers, quote = [], [], [], None
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in '\'"':
      quote = char
    elif char in _OPEN:
      closers.append(_CLOSE[_OPEN.index(char)])
    elif char in _CLOSE:
      if not closers or closers.pop() != char:
        raise SweepError(f'unbalanced {char!r} in {text!r}')
    elif char == separator and not closers:
      parts.append(''.join(current))
      current = []
      continue
    current.append(char)
  if quote or closers:
    raise SweepError(f'unclosed {quote or closers[-1]!r} in {text!r}')
  parts.append(''.join(current))
  return parts


def config_value(text: str) -> str:
  """The value as --config.field receives it: one quoted string loses its quotes, which only protected commas."""
  text = text.strip()
  if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
    try:
      value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
      return text
    if isinstance(value, str):
      return value
  return text


def _field_and_value(text: str, what: str) -> tuple[str, str]:
  field, equals, value = text.partition('=')
  field = field.strip()
  if not equals or not re.fullmatch(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)*', field):
    raise SweepError(f'{what} {text.strip()!r} is not field=value (e.g. optim.lr=1e-3)')
  return field, value


def parse_grid(text: str) -> dict[str, list[str]]:
  """'a.b=1,2;c=(0,1),(2,3)' -> {'a.b': ['1', '2'], 'c': ['(0,1)', '(2,3)']}, fields in the order given."""
  grid = {}
  for part in split_top_level(text, ';') if text.strip() else []:
    field, values = _field_and_value(part, 'grid entry')
    if field in grid:
      raise SweepError(f'grid field {field} appears twice')
    texts = split_top_level(values, ',')
    if any(not text.strip() for text in texts):
      raise SweepError(f'grid field {field} has an empty value in {part.strip()!r}')
    grid[field] = [config_value(text) for text in texts]
  return grid


def parse_sets(texts: list[str]) -> dict[str, str]:
  sets = {}
  for text in texts:
    field, value = _field_and_value(text, '--set')
    sets[field] = config_value(value)
  return sets


def _safe_name(overrides: dict[str, str]) -> str:
  """The overrides as written where that is a safe file name; else cleaned and cut to length, and ended by a hash
  of the overrides (names that cleaning made equal stay apart, whatever else the grid holds)."""
  raw = ','.join(f'{field}={value}' for field, value in overrides.items()) or 'default'
  name = _UNSAFE.sub('_', re.sub(r'[\'"\s]', '', raw))  # quotes and spaces carry nothing in a name
  if name == raw and len(name) <= _MAX_NAME:
    return name
  return name[:_MAX_NAME - 9] + '~' + hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def make_cells(grid: dict[str, list[str]]) -> list[Cell]:
  """The Cartesian product of the grid, first field slowest."""
  cells = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  names = [_safe_name(overrides) for overrides in cells]
  if len(set(names)) != len(names):
    raise SweepError('the grid has the same cell twice (a value repeated within a field?)')
  return [Cell(name, overrides) for name, overrides in zip(names, cells)]


# ---------------------------------------------------------------------------------------- config and commands

def _one_line(error: Exception) -> str:
  if isinstance(error, (AttributeError, KeyError)) and error.args:  # a field the config lacks
    message = error.args[0]
    while isinstance(message, KeyError) and message.args:
      message = message.args[0]
    while isinstance(message, str) and message[:1] in '\'"':  # KeyError's repr, wrapped again by config_flags
      try:
        message = ast.literal_eval(message)
      except (SyntaxError, ValueError):
        break
    return 'no such field ' + ' '.join(str(message).split())
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    return lines[-1]  # a config file that raised: its own message is the last line
  return ' '.join(lines)


def load_config(config: str, overrides: dict[str, str]):
  """The config exactly as `foundation.main --config=CONFIG --config.field=value ...` would resolve it (a
  `variant` override added to CONFIG's variants)."""
  from ml_collections import config_flags
  config, overrides = with_variant(config, overrides)
  argv = ['foundation.main', f'--config={config}', *(f'--config.{k}={v}' for k, v in overrides.items())]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def validate(config: str, grid: dict[str, list[str]], sets: dict[str, str], seeds: int) -> None:
  """Loads every cell's config as main would. Raises SweepError."""
  path = config.split(':', 1)[0]
  if not os.path.isfile(path):
    raise SweepError(f'--config={config}: no such file {path}')
  if seeds < 1:
    raise SweepError(f'--seeds={seeds} must be at least 1')
  for field in ('seed', *sets):
    if field in grid:
      raise SweepError(f'grid field {field} is also set by ' + ('--seeds' if field == 'seed' else '--set'))
  if 'seed' in sets:
    raise SweepError('--set=seed=... conflicts with --seeds, which sets config.seed for each run')
  if VARIANT in sets:
    raise SweepError(f'--set={VARIANT}=... : give variants in --config (path:variant) or as a grid field')

  def load(overrides, what):
    try:
      return load_config(config, overrides)
    except Exception as e:  # config_flags raises several kinds (AttributeError, flags.Error, errors of the file)
      raise SweepError(f'{what}: {_one_line(e)}') from None

  load(sets, f'--config={config}' + ''.join(f' --set={k}={v}' for k, v in sets.items()))
  for field, values in grid.items():  # one value at a time, so an error names the value at fault
    for value in values:
      load({**sets, field: value}, f'grid value {field}={value}')
  resolved = {}
  for cell in make_cells(grid):
    same = resolved.setdefault(load({**sets, **cell.overrides}, f'cell {cell.name}').to_json_best_effort(), cell)
    if same is not cell:  # 1e-3 and 0.001: one run's compute twice, and two rows of one thing
      raise SweepError(f'cells {same.name} and {cell.name} give the same config; keep one spelling of the value')


def with_variant(config: str, overrides: dict[str, str]) -> tuple[str, dict[str, str]]:
  """(--config with the cell's `variant` value before its own variants, the other overrides)."""
  overrides = dict(overrides)
  variant = overrides.pop(VARIANT, '')
  if not variant:
    return config, overrides
  path, _, own = config.partition(':')
  return f'{path}:' + ','.join(v for v in [*variant.split('+'), *own.split(',')] if v.strip()), overrides


def run_command(config: str, workdir: str, sets: dict[str, str], cell: Cell, seed: int) -> list[str]:
  config, overrides = with_variant(config, {**sets, **cell.overrides, 'seed': str(seed)})
  return [sys.executable, '-m', 'foundation.main', f'--config={config}', f'--workdir={workdir}',
          *(f'--config.{field}={value}' for field, value in overrides.items())]


def _workdir(root: str, cell_name: str, seed: int) -> str:
  return os.path.join(root, cell_name, f'seed_{seed}')


# ------------------------------------------------------------------------------------------------ the runs

def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  return files.read_records(path, warn=lambda m: print(m, file=sys.stderr)) if os.path.exists(path) else []


def finished(workdir: str) -> bool:
  """Whether the run ended with its result written (the loop's last act: its finished.json), early stopping
  included; a run that crashed in its final evaluation, or was stopped, has not. A run this sweep saw exit 0 before
  the loop wrote that file counts by the sweep's marker, while its metrics.jsonl is not newer than the marker (a
  later run in the workdir, which trains on or goes back to an older step, rewrites it)."""
  if os.path.exists(os.path.join(workdir, files.FINISHED_FILE)):
    return True
  marker, metrics = (os.path.join(workdir, name) for name in (DONE_MARKER, 'metrics.jsonl'))
  return (os.path.exists(marker) and os.path.exists(metrics)
          and os.path.getmtime(metrics) <= os.path.getmtime(marker))


def done(workdir: str, config: str, sets: dict[str, str], cell: Cell, seed: int) -> bool:
  """Whether the run of this cell and seed has finished, however it was run (here, or as a job printed by
  --jobs=print): its workdir holds a finished run of the config that the cell's command resolves to now."""
  return finished(workdir) and other_config(workdir, config, sets, cell, seed) is None


def run_all(config: str, root: str, sets: dict[str, str], cells: list[Cell], seeds: int) -> list[str]:
  """Runs every unfinished run in turn; returns one line per failed run."""
  failures = []
  total = len(cells) * seeds
  for i, (cell, seed) in enumerate(itertools.product(cells, range(seeds)), 1):
    workdir = _workdir(root, cell.name, seed)
    command = run_command(config, workdir, sets, cell, seed)
    if done(workdir, config, sets, cell, seed):
      print(f'[sweep {i}/{total}] {workdir}: finished before, skipped', flush=True)
      continue
    print(f'[sweep {i}/{total}] {workdir}: running\n  {shlex.join(command)}', flush=True)
    run = subprocess.Popen(command)
    try:
      returncode = run.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the run too, which saves its checkpoint and stops: let it
      print(f'[sweep] interrupted: {workdir} saves its checkpoint before it stops (Ctrl-C again: stop waiting)',
            file=sys.stderr, flush=True)
      run.wait()
      raise
    if returncode != 0:
      failures.append(f'{workdir}: exit status {returncode}')
    elif not os.path.exists(os.path.join(workdir, files.FINISHED_FILE)):
      failures.append(f'{workdir}: exited 0 but did not finish (no {files.FINISHED_FILE})')
    else:
      with open(os.path.join(workdir, DONE_MARKER), 'w') as f:
        json.dump({'args': command[1:], 'finished_at': time.strftime('%Y-%m-%dT%H:%M:%S')}, f, indent=1)
  return failures


# --------------------------------------------------------------------------------------------------- tables

class Row(NamedTuple):
  cell: Cell
  n: int                                     # finished runs
  stats: dict[str, tuple[float, float]]      # metric -> (mean, sample std) of its finite values; NaN where undefined
  counts: dict[str, int]                     # metric -> how many of the n runs logged it as a finite number
  nonfinite: dict[str, int]                  # metric -> how many logged NaN or an infinity (a diverged seed, say)


def last_values(records: list[dict]) -> dict[str, float]:
  """Each key's value on the last line that has it (eval and train lines of one step may be separate)."""
  last = {}
  for record in records:
    last.update({k: v for k, v in record.items() if k != 'step'})
  return last


def mean_and_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1): the spread a new seed would show; NaN for fewer values."""
  if not values:
    return math.nan, math.nan
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, math.nan
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def other_config(workdir: str, config: str, sets: dict[str, str], cell: Cell, seed: int) -> str | None:
  """Why the finished run in `workdir` is not the run of this cell and seed: the fields in which its config.json
  differs from the config the cell's command resolves to now (a field its config.json lacks, added to the code
  since, is not compared), or that command's config does not load here; None if it is that run."""
  from foundation import train  # pylint: disable=import-outside-toplevel  (jax: only for tables)
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    return f'its config.json cannot be read ({e})'
  try:
    resolved = json.loads(load_config(config, {**sets, **cell.overrides, 'seed': str(seed)}).to_json_best_effort())
  except Exception as e:  # pylint: disable=broad-except  (as validate: config_flags raises several kinds)
    return f'the cell\'s config does not load here: {_one_line(e)}'
  differences = train.config_differences(recorded, resolved, new_fields=False)
  if not differences:
    return None
  return 'another config (' + ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in list(differences.items())[:3]) + ')'


def collect(root: str, manifest: dict,
            metrics: list[str] | None) -> tuple[list[Row], list[str], list[str]]:
  """Rows of the table, the metrics shown, and the runs left out of it: not finished, or finished with another
  config than their cell's (a changed --set or config file), each with the reason."""
  cells = [Cell(c['name'], c['overrides']) for c in manifest['cells']]
  done, left_out = {}, []
  for cell, seed in itertools.product(cells, range(manifest['seeds'])):
    workdir = _workdir(root, cell.name, seed)
    if not finished(workdir):
      left_out.append(f'{workdir} (unfinished or not run)')
    elif reason := other_config(workdir, manifest['config'], manifest['set'], cell, seed):
      left_out.append(f'{workdir} ({reason})')
    else:
      try:
        last = last_values(read_metrics(workdir))
      except ValueError as e:  # a damaged line before the last: the other runs still make their table
        left_out.append(f'{workdir} (its metrics.jsonl cannot be read: {_one_line(e)})')
        continue
      done.setdefault(cell.name, []).append(last)
  if metrics is None:  # every eval metric logged, in the order they were logged
    metrics = list(dict.fromkeys(k for runs in done.values() for last in runs for k in last
                                 if k.startswith('eval/')))
  rows = []
  for cell in cells:
    runs = done.get(cell.name, [])
    values = {m: [float(v) for last in runs if (v := _value(last, m)) is not None] for m in metrics}
    finite = {m: [v for v in vs if math.isfinite(v)] for m, vs in values.items()}
    rows.append(Row(cell, len(runs), {m: mean_and_std(v) for m, v in finite.items()},
                    {m: len(v) for m, v in finite.items()}, {m: len(values[m]) - len(finite[m]) for m in metrics}))
  return rows, metrics, left_out


def _value(last: dict[str, float], metric: str) -> float | None:
  """A run's value of `metric`: its first `|`-separated alternative that the run logged; None if none."""
  return next((last[m] for m in metric.split('|') if m in last), None)


def _format(mean: float, std: float, count: int, n: int, nonfinite: int) -> str:
  """mean (std), and how many of the cell's n runs it is over where some did not log the metric or logged a value
  that is not finite."""
  if not count and not nonfinite:
    return '-'
  text = '-' if not count else f'{mean:.4g}' if math.isnan(std) else f'{mean:.4g} ({std:.2g})'
  return text if count == n else f'{text} [{count} of {n}' + (f'; {nonfinite} not finite]' if nonfinite else ']')


def markdown_table(rows: list[Row], fields: list[str], metrics: list[str]) -> str:
  # a|b and a regex's pipe escaped; a template's line break written as \n, so that a row stays one line
  line = lambda cells: '| ' + ' | '.join(str(c).replace('|', r'\|').replace('\n', r'\n') for c in cells) + ' |'
  lines = [line([*(fields or ['cell']), *metrics, 'n']),
           '|' + '|'.join([' --- '] * len(fields or ['cell']) + [' ---: '] * (len(metrics) + 1)) + '|']
  for row in rows:
    keys = [row.cell.overrides[f] for f in fields] if fields else [row.cell.name]
    lines.append(line([*keys, *(_format(*row.stats[m], row.counts[m], row.n, row.nonfinite[m]) for m in metrics),
                       row.n]))
  return '\n'.join(lines) + '\n'


def write_csv(path: str, rows: list[Row], fields: list[str], metrics: list[str]) -> None:
  number = lambda x: '' if math.isnan(x) else repr(x)  # full precision; empty where undefined
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['cell', *fields, *(f'{m} {s}' for m in metrics for s in ('mean', 'std', 'n', 'not finite')),
                     'n'])
    for row in rows:
      writer.writerow([row.cell.name, *(row.cell.overrides[f] for f in fields),
                       *(x for m in metrics for x in (*map(number, row.stats[m]), row.counts[m], row.nonfinite[m])),
                       row.n])


def _as_number(value: str) -> float | None:
  try:
    return float(value)
  except ValueError:
    return None


def plot(path: str, rows: list[Row], fields: list[str], metrics: list[str], title: str) -> None:
  """One panel per metric, error bars one std. A numeric field with several values is the x axis of a line plot,
  one line per combination of the other fields; otherwise grouped bars, grouped by the first field."""
  # Imported here: only plotting needs matplotlib. The Agg canvas renders without a display (as in evaluate/report).
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import NullFormatter

  numeric = [f for f in fields if len({r.cell.overrides[f] for r in rows}) > 1
             and all(_as_number(r.cell.overrides[f]) is not None for r in rows)]
  x_field = numeric[0] if numeric else None
  series_fields = [f for f in fields if f != x_field] if x_field else fields[1:]
  series_of = lambda row: ', '.join(f'{f}={row.cell.overrides[f]}' for f in series_fields)
  series = list(dict.fromkeys(series_of(r) for r in rows))
  columns = min(len(metrics), 3)
  figure = Figure(figsize=(4.8 * columns, 3.6 * math.ceil(len(metrics) / columns)), dpi=110)
  FigureCanvasAgg(figure)
  for k, metric in enumerate(metrics):
    axes = figure.add_subplot(math.ceil(len(metrics) / columns), columns, k + 1)
    std = lambda r: 0.0 if math.isnan(r.stats[metric][1]) else r.stats[metric][1]
    if x_field:
      for name in series:
        members = sorted((r for r in rows if series_of(r) == name), key=lambda r: float(r.cell.overrides[x_field]))
        axes.errorbar([float(r.cell.overrides[x_field]) for r in members], [r.stats[metric][0] for r in members],
                      yerr=[std(r) for r in members], marker='o', capsize=3, label=name or None)
      ticks = {float(r.cell.overrides[x_field]): r.cell.overrides[x_field] for r in rows}
      if min(ticks) > 0 and max(ticks) / min(ticks) >= 10:  # learning rates, weight decays: decades apart
        axes.set_xscale('log')
      axes.set_xticks(list(ticks), list(ticks.values()))  # the values swept, as written, not decades
      axes.xaxis.set_minor_formatter(NullFormatter())
      axes.set_xlabel(x_field)
    else:
      groups = list(dict.fromkeys(r.cell.overrides[fields[0]] if fields else r.cell.name for r in rows))
      width = 0.8 / max(len(series), 1)
      for j, name in enumerate(series):
        members = {(r.cell.overrides[fields[0]] if fields else r.cell.name): r for r in rows if series_of(r) == name}
        positions = [g + (j - (len(series) - 1) / 2) * width for g, key in enumerate(groups) if key in members]
        present = [members[key] for key in groups if key in members]
        axes.bar(positions, [r.stats[metric][0] for r in present], width, yerr=[std(r) for r in present],
                 capsize=3, label=name or None)
      axes.set_xticks(range(len(groups)), groups, rotation=30 if max(map(len, groups)) > 8 else 0)
      axes.set_xlabel(fields[0] if fields else 'cell')
    axes.set_title(metric, fontsize='medium')
    axes.grid(True, alpha=0.3)
    if len(series) > 1:
      axes.legend(fontsize='x-small')
  figure.suptitle(textwrap.fill(title, int(17 * figure.get_figwidth())), fontsize='small')  # long --set lists wrap
  figure.tight_layout()
  figure.savefig(path, format='png')


def write_tables(root: str, metrics: list[str] | None) -> tuple[list[Row], list[str]]:
  """Writes table.md, table.csv and table.png from the runs under `root`; returns the rows and the runs left out,
  each with its reason."""
  try:
    with open(os.path.join(root, MANIFEST)) as f:
      manifest = json.load(f)
  except OSError:
    raise SweepError(f'{root} holds no {MANIFEST}: run the sweep (or --jobs=print) first') from None
  except ValueError as e:
    raise SweepError(f'{os.path.join(root, MANIFEST)} is not readable JSON ({e}): run the sweep again') from None
  fields = list(manifest['grid'])
  rows, metrics, left_out = collect(root, manifest, metrics or manifest['metrics'])
  if any(r.n for r in rows):
    for metric in metrics:
      if not any(r.counts[metric] or r.nonfinite[metric] for r in rows):
        print(f'[sweep] no finished run logged {metric}: a misspelled --metrics?', file=sys.stderr)
  sets = ''.join(f' --set={k}={v}' for k, v in manifest['set'].items())
  title = f'{manifest["config"]}{sets}, {manifest["seeds"]} seeds'
  with open(os.path.join(root, 'table.md'), 'w') as f:
    f.write(f'Sweep of `{manifest["config"]}`{sets}: each metric\'s last logged value, mean (sample std, '
            f'ddof=1) over the n finished seeds of {manifest["seeds"]}.\n\n')
    f.write(markdown_table(rows, fields, metrics))
  write_csv(os.path.join(root, 'table.csv'), rows, fields, metrics)
  png = os.path.join(root, 'table.png')
  if metrics and any(r.n for r in rows):
    plot(png, rows, fields, metrics, title)
  elif os.path.exists(png):
    os.remove(png)  # nothing to plot: an old figure would contradict the table
  return rows, left_out


# ------------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(prog='python -m foundation.sweep', description='\n\n'.join(__doc__.split('\n\n')[:2]),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', help='path to a config file, optionally with :variant (as for main)')
  parser.add_argument('--grid', help="fields and their values: 'field=v1,v2;field2=a,b'")
  parser.add_argument('--seeds', type=int, default=1, help='runs per cell, with config.seed = 0, ..., seeds - 1')
  parser.add_argument('--root', required=True, help='directory of the sweep: a subdirectory per cell, the tables')
  parser.add_argument('--metrics', type=lambda s: [m.strip() for m in s.split(',') if m.strip()],
                      help='comma-separated metrics of the tables (default: every eval/... key logged); a|b: a, '
                      'or b where a run has no a')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='set in every run (repeat for several fields)')
  parser.add_argument('--jobs', choices=('run', 'print'), default='run',
                      help='run: here, one after another; print: print the commands, to submit as separate jobs')
  parser.add_argument('--table_only', action='store_true', help='only (re)build the tables from the runs in --root')
  return parser.parse_args(argv)


def sweep(args) -> int:
  """Validates, runs (or prints) the runs, writes the tables; returns the exit status."""
  if files.is_remote(args.root):
    raise SweepError(f'--root={args.root}: a sweep keeps its runs under a local directory (it reads their results '
                     'from there); give one on this machine')
  if os.path.exists(args.root) and not os.path.isdir(args.root):
    raise SweepError(f'--root={args.root} is a file; give a directory')
  root = os.path.normpath(args.root)  # one spelling of each workdir
  if args.table_only:
    rows, left_out = write_tables(root, args.metrics)
    failures = []
  else:
    if not args.config or args.grid is None:
      raise SweepError('--config and --grid are required (or --table_only)')
    grid, sets = parse_grid(args.grid), parse_sets(args.set)
    validate(args.config, grid, sets, args.seeds)
    cells = make_cells(grid)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, MANIFEST), 'w') as f:
      json.dump({'config': args.config, 'grid': grid, 'set': sets, 'seeds': args.seeds, 'metrics': args.metrics,
                 'cells': [c._asdict() for c in cells]}, f, indent=1)
    if args.jobs == 'print':
      for cell, seed in itertools.product(cells, range(args.seeds)):
        workdir = _workdir(root, cell.name, seed)
        if not done(workdir, args.config, sets, cell, seed):
          print(shlex.join(run_command(args.config, workdir, sets, cell, seed)))
      print(f'When they have finished: python -m foundation.sweep --root={shlex.quote(root)} --table_only',
            file=sys.stderr)
      return 0
    failures = run_all(args.config, root, sets, cells, args.seeds)
    try:
      rows, left_out = write_tables(root, args.metrics)
    finally:  # the failed runs are reported even if building the tables fails
      if failures:
        print(f'[sweep] {len(failures)} run(s) failed:\n  ' + '\n  '.join(failures), file=sys.stderr)
  print(f'[sweep] {sum(r.n for r in rows)} finished run(s) in {os.path.join(root, "table.md")} and table.csv'
        + (', table.png' if os.path.exists(os.path.join(root, 'table.png')) else ''))
  if left_out:
    print('[sweep] not in the table:\n  ' + '\n  '.join(left_out), file=sys.stderr)
  return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
  try:
    return sweep(parse_args(argv))
  except SweepError as e:
    print(f'sweep: error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('[sweep] stopped by Ctrl-C; rerun the same command to go on', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
