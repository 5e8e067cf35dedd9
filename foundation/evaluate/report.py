"""Human-readable results: a markdown table comparing encoders, and a few-shot curve as a PNG."""

import io
import math
import textwrap

from foundation import files


def results_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
  """A markdown table, one row per encoder (e.g. 'SimCLR', 'random init', 'raw pixels', 'supervised').

  `rows` maps an encoder's name to its metrics (accuracies or recalls in [0, 1]); `columns` names the metrics to
  show, in order. Values print as percentages with one decimal; a metric a row lacks (or a NaN) prints as '-'.
  """
  header = ['encoder', *columns]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join([' --- '] + [' ---: '] * len(columns)) + '|']
  for name, metrics in rows.items():
    cells = [name] + [_percent(metrics.get(column)) for column in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _percent(value: float | None) -> str:
  if value is None or math.isnan(value):
    return '-'
  return f'{100 * value:.1f}'


def plot_fewshot(curves: dict[str, dict[int, float]], path: str, title: str) -> None:
  """Writes a PNG of test accuracy (%) against labelled examples per class (log scale), one line per encoder.

  `curves` maps an encoder's name to {shots: accuracy in [0, 1]}.
  """
  # Imported here so that only callers who plot need matplotlib; the object-oriented API with an Agg canvas
  # renders without a display and leaves pyplot's global state (and the user's chosen backend) untouched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import NullFormatter, ScalarFormatter

  figure = Figure(figsize=(5, 3.5), dpi=120)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  all_shots = set()
  for name, curve in curves.items():
    shots = sorted(curve)
    all_shots.update(shots)
    axes.plot(shots, [100 * curve[k] for k in shots], marker='o', label=textwrap.fill(name, 36))  # long names wrap
  axes.set_xscale('log')
  if all_shots:  # label the shot counts measured, not decades
    axes.set_xticks(sorted(all_shots))
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(NullFormatter())
  axes.set_xlabel('labelled examples per class')
  axes.set_ylabel('test accuracy (%)')
  axes.set_title(title, fontsize='medium', wrap=True)  # wrapped: a dataset's name must not push it off the figure
  axes.grid(True, alpha=0.3)
  if curves:
    axes.legend(loc='lower right', fontsize='small')  # accuracy rises with labels: lower right stays clear
  figure.tight_layout()
  png = io.BytesIO()
  figure.savefig(png, format='png')
  files.write_atomically(path, png.getvalue())
