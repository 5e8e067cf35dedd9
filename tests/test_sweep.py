"""foundation.sweep: the grid parser, cell names, the printed commands, early errors, and the tables, whose means and
standard deviations are checked against numpy over the runs' metrics.jsonl. One small sweep runs end to end."""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, subprocess_env
from foundation import sweep

SMOKE = 'configs/lm/shakespeare.py:smoke'


def run_sweep(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'foundation.sweep', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def read_csv(path) -> dict[str, dict[str, str]]:
  with open(path) as f:
    return {row['cell']: row for row in csv.DictReader(f)}


def last_value(workdir, key) -> float:
  """The reference reading of a run: the value of `key` on the last line of metrics.jsonl that has it."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)[key] for line in f if key in json.loads(line)][-1]


@pytest.mark.parametrize('text, expected', [
    ('optim.lr=1e-3,3e-3;model.num_layers=2,4', {'optim.lr': ['1e-3', '3e-3'], 'model.num_layers': ['2', '4']}),
    # Commas and semicolons inside brackets or quotes belong to the value; one quoted string loses its quotes.
    ("optim.freeze=(),('layers_0/', 'a,b'),['x;y'];data.name='a,b;c', \"it's\"",
     {'optim.freeze': ['()', "('layers_0/', 'a,b')", "['x;y']"], 'data.name': ['a,b;c', "it's"]}),
    ('mesh={"data": (1, 2)},{}', {'mesh': ['{"data": (1, 2)}', '{}']}),
    ("data.name='a','b'", {'data.name': ['a', 'b']}),
    ("data.name='a'+'b'", {'data.name': ["'a'+'b'"]}),  # not one string literal: passed on as written
    ('', {}),
])
def test_grid_parser_keeps_tuples_and_quoted_strings_whole(text, expected):
  assert sweep.parse_grid(text) == expected


@pytest.mark.parametrize('text, message', [
    ('optim.lr=(1,2', "unclosed ')'"),
    ('optim.lr=1,2)', "unbalanced ')'"),
    ("data.name='a,b", "unclosed \"'\""),
    ('optim.lr', 'is not field=value'),
    ('optim.lr=1;optim.lr=2', 'appears twice'),
    ('optim.lr=1,,2', 'empty value'),
])
def test_grid_parser_refuses_malformed_grids(text, message):
  with pytest.raises(sweep.SweepError, match=re.escape(message)):
    sweep.parse_grid(text)


def test_parsed_values_reach_the_config_as_main_reads_them():
  grid = sweep.parse_grid("optim.freeze=('layers_0/', 'a,b');data.name='a,b;c';optim.lr=3e-3")
  config = sweep.load_config(SMOKE, {field: values[0] for field, values in grid.items()})
  assert config.optim.freeze == ('layers_0/', 'a,b') and config.data.name == 'a,b;c' and config.optim.lr == 3e-3


def test_variant_values_join_the_configs_own_variants(tmp_path, capsys):
  """`variant` is no config field: its value (several joined by +) goes before --config's variants, in order, so
  that --config's :smoke shrinks whatever the cell's variant sets; the config loads as main would load that spec."""
  root = str(tmp_path / 'root')
  assert sweep.main(['--config=configs/lm/shakespeare.py', "--grid=variant=baby,baby+smoke;optim.lr=0.01",
                     f'--root={root}', '--jobs=print']) == 0
  configs = [next(a for a in shlex.split(line) if a.startswith('--config=')) for line in capsys.readouterr().out.splitlines()]
  assert configs == ['--config=configs/lm/shakespeare.py:baby', '--config=configs/lm/shakespeare.py:baby,smoke']
  assert sweep.load_config(SMOKE, {'variant': 'baby', 'optim.lr': '0.01'}).to_dict() == \
      sweep.load_config('configs/lm/shakespeare.py:baby,smoke', {'optim.lr': '0.01'}).to_dict()
  assert sweep.load_config(SMOKE, {'variant': 'baby'}).model.num_layers == 2  # smoke's, not baby's 4
  assert sweep.main([f'--config={SMOKE}', '--grid=optim.lr=0.01', '--set=variant=baby', f'--root={root}x']) == 2


def test_cell_names_are_readable_filesystem_safe_and_distinct():
  cells = sweep.make_cells(sweep.parse_grid("optim.lr=0.001,0.01;model.num_layers=2"))
  assert [c.name for c in cells] == ['optim.lr=0.001,model.num_layers=2', 'optim.lr=0.01,model.num_layers=2']
  # 'a b' and 'ab' sanitise to the same name; a path's slashes must not make subdirectories.
  cells = sweep.make_cells(sweep.parse_grid("data.name='a b',ab,'x/../y',\"q:*?|<>\";optim.freeze=('a/',)"))
  names = [c.name for c in cells]
  assert len(set(names)) == len(names) == 4
  assert all(re.fullmatch(r'[A-Za-z0-9._,=+()~-]+', n) and '/' not in n for n in names), names
  assert cells[0].overrides == {'data.name': 'a b', 'optim.freeze': "('a/',)"}
  # A cell's directory is its own: adding a value that cleans to the same spelling does not move it.
  alone = sweep.make_cells(sweep.parse_grid("prompt.template='{text} It was'"))
  grown = sweep.make_cells(sweep.parse_grid("prompt.template='{text} It was','{text}  It was'"))
  assert grown[0] == alone[0] and grown[1].name != alone[0].name


def test_jobs_print_prints_shell_quoted_commands_and_writes_no_run(tmp_path, capsys):
  root = str(tmp_path / 'root')
  grid = "optim.freeze=(),('layers_0/', 'x y');data.name='a,b'"
  assert sweep.main([f'--config={SMOKE}', f'--grid={grid}', '--seeds=2', f'--root={root}', '--jobs=print',
                     '--set=num_train_steps=3']) == 0
  lines = capsys.readouterr().out.splitlines()
  expected = []
  cells = [c.name for c in sweep.make_cells(sweep.parse_grid(grid))]
  assert cells[0] == 'optim.freeze=(),data.name=a,b'
  assert re.fullmatch(r'optim.freeze=\(layers_0_,xy\),data.name=a,b~[0-9a-f]{8}', cells[1]), cells[1]
  for cell, freeze in zip(cells, ('()', "('layers_0/', 'x y')")):
    for seed in (0, 1):
      expected.append([sys.executable, '-m', 'foundation.main', f'--config={SMOKE}',
                       f'--workdir={root}/{cell}/seed_{seed}', '--config.num_train_steps=3',
                       f'--config.optim.freeze={freeze}', '--config.data.name=a,b', f'--config.seed={seed}'])
  assert [shlex.split(line) for line in lines] == expected
  # What bash makes of a printed line, argument by argument.
  echoed = subprocess.run(['bash', '-c', 'printf "%s\\0" ' + lines[2]], capture_output=True, text=True, check=True)
  assert echoed.stdout.split('\0')[:-1] == expected[2]
  assert os.listdir(root) == [sweep.MANIFEST]  # the manifest, for --table_only; no run directory


def test_a_bad_field_fails_with_exit_2_before_anything_is_written(tmp_path):
  root = tmp_path / 'root'
  result = run_sweep(f'--config={SMOKE}', '--grid=optim.lr=0.1,0.2;optim.lrr=1,2', f'--root={root}')
  assert result.returncode == 2
  assert result.stderr.strip() == ('sweep: error: grid value optim.lrr=1: no such field \'lrr\' '
                                   'Did you mean "lr" instead of "lrr"?'), result.stderr
  assert not root.exists()


@pytest.mark.parametrize('args, message', [
    ((f'--config={SMOKE}', '--grid=optim.lr=0.1,abc'), 'grid value optim.lr=abc: flag --config.optim.lr=abc: could '
                                                      "not convert string to float: 'abc'"),
    (('--config=configs/lm/nope.py', '--grid=optim.lr=0.1'), 'no such file configs/lm/nope.py'),
    (('--config=configs/lm/shakespeare.py:tiny', '--grid=optim.lr=0.1'), "unknown variant 'tiny'"),
    ((f'--config={SMOKE}', '--grid=optim.lr=0.1', '--set=modell.num_layers=1'), 'no such field \'modell\''),
    ((f'--config={SMOKE}', '--grid=seed=1,2'), 'grid field seed is also set by --seeds'),
    ((f'--config={SMOKE}', '--grid=optim.lr=(0.1'), "unclosed ')'"),
    ((f'--config={SMOKE}',), '--config and --grid are required'),
    ((f'--config={SMOKE}', '--grid=optim.lr=1e-3,0.001'),
     'cells optim.lr=1e-3 and optim.lr=0.001 give the same config'),
])
def test_bad_sweeps_fail_with_exit_2_before_anything_is_written(tmp_path, capsys, args, message):
  root = tmp_path / 'root'
  assert sweep.main([*args, f'--root={root}']) == 2
  error = capsys.readouterr().err
  assert error.startswith('sweep: error: ') and message in error and error.count('\n') == 1, error
  assert not root.exists()


def fake_run(root, cell, seed, final: dict[str, float] | None, earlier: dict[str, float],
             finished: bool | None = None, tail: str = '', older: bool = False):
  """The outputs foundation.main writes for a smoke run of `cell` and `seed`: its resolved config (`older`: without
  the field `sample`, as code before that field would have written it), train and eval lines of one step as
  separate objects, and finished.json once it has a final line (unless `finished` says otherwise); `tail` is
  appended to metrics.jsonl."""
  workdir = os.path.join(root, cell.name, f'seed_{seed}')
  os.makedirs(workdir)
  config = json.loads(sweep.load_config(SMOKE, {**cell.overrides, 'seed': str(seed)}).to_json_best_effort())
  num_train_steps = config['num_train_steps']
  if older:
    del config['sample']
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({**config, 'foundation_version': {'commit': 'test'}}, f)
  lines = [{'step': 5, 'train/loss': 9.0}, {'step': 5, **earlier}]
  if final is not None:
    lines += [{'step': num_train_steps, 'train/loss': final['train/loss']},
              {'step': num_train_steps, **{k: v for k, v in final.items() if k != 'train/loss'}}]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(line) + '\n' for line in lines)
    f.write(tail)
  if final is not None if finished is None else finished:
    with open(os.path.join(workdir, 'finished.json'), 'w') as f:
      json.dump({'step': num_train_steps, 'stopped_early': False}, f)


@pytest.mark.parametrize('grid', ['optim.lr=0.01,0.001;model.num_layers=1,2',        # a numeric field: lines
                                  'optim.name=adamw,sgd;optim.schedule=cosine,constant'])  # none: grouped bars
def test_tables_give_mean_and_sample_std_of_the_last_values(tmp_path, capsys, grid):
  root = str(tmp_path)
  assert sweep.main([f'--config={SMOKE}', f'--grid={grid}', '--seeds=3', f'--root={root}', '--jobs=print']) == 0
  cells = sweep.make_cells(sweep.parse_grid(grid))
  rng = np.random.default_rng(0)
  expected = {}
  for i, cell in enumerate(cells):
    finals = []
    for seed in range(3):
      final = {'train/loss': rng.uniform(1, 2), 'eval/loss': rng.uniform(1, 2), 'eval/accuracy': rng.uniform()}
      if i == 3 and seed > 0:
        continue  # never ran: this cell has one seed, whose std is undefined
      if i == 0 and seed == 2:
        fake_run(root, cell, seed, None, {'eval/loss': 0.0})  # stopped before its end: not in the table
        continue
      if i == 1 and seed == 2:  # its last step logged, then a crash in the final evaluation: not in the table
        fake_run(root, cell, seed, final, {'eval/loss': 0.0}, finished=False)
        continue
      # A last line cut short by a killed write is dropped (with a warning), as the loop drops it on resume.
      fake_run(root, cell, seed, final, {'eval/loss': 7.0, 'eval/accuracy': 0.5}, tail='{"step": 11, "eval/lo',
               older=seed == 1)  # a run from before a field existed is still its cell's
      finals.append(final)
    expected[cell.name] = finals

  assert sweep.main([f'--root={root}', '--table_only']) == 0
  table = read_csv(os.path.join(root, 'table.csv'))
  assert list(table) == [c.name for c in cells]
  assert list(next(iter(table.values()))) == ['cell', *sweep.parse_grid(grid), 'eval/loss mean', 'eval/loss std',
                                              'eval/loss n', 'eval/loss not finite', 'eval/accuracy mean',
                                              'eval/accuracy std', 'eval/accuracy n', 'eval/accuracy not finite', 'n']
  for cell in cells:
    row, finals = table[cell.name], expected[cell.name]
    assert int(row['n']) == len(finals) == (2 if cell in cells[:2] else 1 if cell == cells[3] else 3)
    for metric in ('eval/loss', 'eval/accuracy'):
      values = np.array([final[metric] for final in finals])
      np.testing.assert_allclose(float(row[f'{metric} mean']), values.mean(), rtol=1e-12)
      assert row[f'{metric} n'] == row['n']
      if len(values) > 1:
        np.testing.assert_allclose(float(row[f'{metric} std']), values.std(ddof=1), rtol=1e-12)
      else:
        assert row[f'{metric} std'] == ''

  markdown = open(os.path.join(root, 'table.md')).read()
  loss = np.array([final['eval/loss'] for final in expected[cells[1].name]])
  assert f'| {loss.mean():.4g} ({loss.std(ddof=1):.2g}) |' in markdown
  assert f'| {expected[cells[3].name][0]["eval/loss"]:.4g} |' in markdown  # one seed: no std
  with open(os.path.join(root, 'table.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  assert sweep.main([f'--root={root}', '--table_only', '--metrics=train/loss']) == 0
  table = read_csv(os.path.join(root, 'table.csv'))
  train_loss = [final['train/loss'] for final in expected[cells[2].name]]
  np.testing.assert_allclose(float(table[cells[2].name]['train/loss mean']), np.mean(train_loss), rtol=1e-12)
  assert 'eval/loss mean' not in table[cells[2].name]
  error = capsys.readouterr().err
  assert f'{os.path.join(root, cells[0].name, "seed_2")} (unfinished or not run)' in error, error

  # The sweep's --set changed since these runs: none of them is a run of the new cells, each is named with why.
  assert sweep.main([f'--config={SMOKE}', f'--grid={grid}', '--seeds=3', f'--root={root}', '--jobs=print',
                     '--set=num_train_steps=7']) == 0
  capsys.readouterr()
  assert sweep.main([f'--root={root}', '--table_only']) == 0
  assert {row['n'] for row in read_csv(os.path.join(root, 'table.csv')).values()} == {'0'}
  error = capsys.readouterr().err
  steps = sweep.load_config(SMOKE, {}).num_train_steps
  assert error.count(f'another config (num_train_steps: {steps} -> 7)') == sum(map(len, expected.values())), error
  # A config that does not load here (moved, or a relative path from another directory): every run is left out.
  manifest = json.loads(open(os.path.join(root, sweep.MANIFEST)).read())
  with open(os.path.join(root, sweep.MANIFEST), 'w') as f:
    json.dump({**manifest, 'config': 'configs/lm/moved.py:smoke'}, f)
  assert sweep.main([f'--root={root}', '--table_only']) == 0
  error = capsys.readouterr().err
  assert error.count("the cell's config does not load here") == sum(map(len, expected.values())), error


def test_a_marker_counts_while_its_run_is_unchanged_and_a_damaged_run_is_left_out(tmp_path, capsys):
  """A run the sweep saw finish before the loop wrote finished.json counts by the sweep's marker, until a later run
  in its workdir rewrites metrics.jsonl (trained on, or went back to an older step, and was stopped): then it is
  unfinished, and --jobs=print lists it again. A run whose metrics.jsonl is damaged before its last line is left
  out with the reason, and the other runs still make the table."""
  root, grid = str(tmp_path), 'optim.lr=0.01,0.001'
  assert sweep.main([f'--config={SMOKE}', f'--grid={grid}', '--seeds=2', f'--root={root}', '--jobs=print']) == 0
  capsys.readouterr()
  cells = sweep.make_cells(sweep.parse_grid(grid))
  finals = {(c, s): {'train/loss': 1.0, 'eval/loss': 1.0 + c + s / 10} for c in (0, 1) for s in (0, 1)}
  for (c, s), final in finals.items():
    fake_run(root, cells[c], s, final, {'eval/loss': 9.0}, finished=c == 1)
  workdir = lambda c, s: os.path.join(root, cells[c].name, f'seed_{s}')
  for s, metrics_age in ((0, -10), (1, +10)):  # seed 1's metrics.jsonl was rewritten after its marker
    marker = os.path.join(workdir(0, s), sweep.DONE_MARKER)
    with open(marker, 'w') as f:
      json.dump({'args': sweep.run_command(SMOKE, workdir(0, s), {}, cells[0], s)[1:]}, f)
    os.utime(os.path.join(workdir(0, s), 'metrics.jsonl'), (1e9 + metrics_age,) * 2)
    os.utime(marker, (1e9,) * 2)
  with open(os.path.join(workdir(1, 0), 'metrics.jsonl'), 'r+') as f:
    f.write('#')  # the first line is no longer JSON

  assert sweep.main([f'--root={root}', '--table_only', '--metrics=eval/loss']) == 0
  table = read_csv(os.path.join(root, 'table.csv'))
  assert [table[cells[c].name]['n'] for c in (0, 1)] == ['1', '1']
  for c, s in ((0, 0), (1, 1)):
    assert float(table[cells[c].name]['eval/loss mean']) == finals[(c, s)]['eval/loss']
  error = capsys.readouterr().err
  assert f'{workdir(0, 1)} (unfinished or not run)' in error, error
  assert f'{workdir(1, 0)} (its metrics.jsonl cannot be read: ' in error and 'line 1 is not JSON' in error, error
  assert sweep.main([f'--config={SMOKE}', f'--grid={grid}', '--seeds=2', f'--root={root}', '--jobs=print']) == 0
  printed = capsys.readouterr().out
  assert f'--workdir={workdir(0, 1)}' in printed and f'--workdir={workdir(0, 0)}' not in printed, printed


def test_a_value_that_is_not_finite_is_counted_apart_and_a_metric_no_run_logged_is_named(tmp_path, capsys):
  root, grid = str(tmp_path), 'optim.lr=0.01'
  assert sweep.main([f'--config={SMOKE}', f'--grid={grid}', '--seeds=3', f'--root={root}', '--jobs=print']) == 0
  cell, = sweep.make_cells(sweep.parse_grid(grid))
  for seed, loss in enumerate([1.0, 2.0, float('nan')]):  # json writes the diverged seed's NaN as the loop does
    fake_run(root, cell, seed, {'train/loss': 1.0, 'eval/loss': loss}, {})
  capsys.readouterr()
  assert sweep.main([f'--root={root}', '--table_only', '--metrics=eval/los, eval/loss']) == 0
  row = read_csv(os.path.join(root, 'table.csv'))[cell.name]
  assert (float(row['eval/loss mean']), row['eval/loss n'], row['eval/loss not finite'], row['n']) == (1.5, '2', '1',
                                                                                                     '3')
  np.testing.assert_allclose(float(row['eval/loss std']), np.std([1.0, 2.0], ddof=1), rtol=1e-12)
  markdown = open(os.path.join(root, 'table.md')).read()
  assert f'| 0.01 | - | 1.5 ({np.std([1.0, 2.0], ddof=1):.2g}) [2 of 3; 1 not finite] | 3 |' in markdown, markdown
  assert '[sweep] no finished run logged eval/los: a misspelled --metrics?' in capsys.readouterr().err


def test_a_remote_root_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # where os.makedirs('gs:/bucket') would make a local 'gs:' directory
  config = os.path.join(REPO, SMOKE)
  assert sweep.main([f'--config={config}', '--grid=optim.lr=0.01', '--root=gs://bucket/sweep', '--jobs=print']) == 2
  assert 'a sweep keeps its runs under a local directory' in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_a_metric_with_alternatives_takes_each_runs_first_logged_one(tmp_path):
  """`best/eval/accuracy|eval/accuracy`: a run that trains reports its selected step's number, one that trains
  nothing its only evaluation, and a run with both its first alternative; a run with neither is left out. The
  markdown table escapes the pipes of the metric and of a grid value (a regex)."""
  root = str(tmp_path)
  grid = "optim.freeze='^embed|^head',''"
  assert sweep.main([f'--config={SMOKE}', f'--grid={grid}', '--seeds=3', f'--root={root}', '--jobs=print']) == 0
  cells = sweep.make_cells(sweep.parse_grid(grid))
  logged = [[{'best/eval/accuracy': 0.8, 'eval/accuracy': 0.1}, {'eval/accuracy': 0.6}, {'eval/loss': 1.0}],
            [{'best/eval/accuracy': 0.7}, {'best/eval/accuracy': 0.5}, {'eval/accuracy': 0.9}]]
  for cell, finals in zip(cells, logged):
    for seed, final in enumerate(finals):
      fake_run(root, cell, seed, {'train/loss': 1.0, **final}, {})
  metric = 'best/eval/accuracy|eval/accuracy'
  assert sweep.main([f'--root={root}', '--table_only', f'--metrics={metric}']) == 0
  table = read_csv(os.path.join(root, 'table.csv'))
  for cell, expected in zip(cells, ([0.8, 0.6], [0.7, 0.5, 0.9])):
    np.testing.assert_allclose(float(table[cell.name][f'{metric} mean']), np.mean(expected), rtol=1e-12)
    np.testing.assert_allclose(float(table[cell.name][f'{metric} std']), np.std(expected, ddof=1), rtol=1e-12)
    assert table[cell.name][f'{metric} n'] == str(len(expected)) and table[cell.name]['n'] == '3'
  header, _, *rows = [line for line in open(os.path.join(root, 'table.md')).read().splitlines() if line[:1] == '|']
  assert header == r'| optim.freeze | best/eval/accuracy\|eval/accuracy | n |'
  # Two of the cell's three runs logged the metric, and the cell says so.
  assert rows[0] == rf'| ^embed\|^head | {np.mean([0.8, 0.6]):.4g} ({np.std([0.8, 0.6], ddof=1):.2g}) [2 of 3] | 3 |'
  assert rows[1].startswith('|  | ') and rows[1].count(' | ') == 2


def sweep_env():
  """One CPU device and the suite's compilation cache for the runs (they inherit the sweep's environment)."""
  return subprocess_env(1, FOUNDATION_CPU_PEAK_FLOPS='1e11')


def fast(data_dir):
  """Two steps, one eval batch, no samples: seconds per run."""
  return [f'--set=data.data_dir={data_dir}', '--set=num_train_steps=2', '--set=log_every=1', '--set=eval_every=2',
          '--set=checkpoint_every=2', '--set=sample.num_samples=0']


def test_a_sweep_runs_tabulates_and_skips_finished_runs_on_rerun(tmp_path, tfds_dir):
  root = str(tmp_path / 'root')
  # The cells differ only in evaluation, so a seed's two runs share one compiled train step: compiling is most of a
  # smoke run's time. Their eval losses still differ (one validation batch or two).
  args = [f'--config={SMOKE}', '--grid=eval.max_batches=1,2', '--seeds=2', f'--root={root}', *fast(tfds_dir)]
  first = run_sweep(*args, env=sweep_env())
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert first.stdout.count(': running') == 4

  table = read_csv(os.path.join(root, 'table.csv'))
  assert list(table) == ['eval.max_batches=1', 'eval.max_batches=2']
  for cell, row in table.items():
    assert row['n'] == '2'
    for metric in ('eval/loss', 'eval/perplexity'):
      values = np.array([last_value(os.path.join(root, cell, f'seed_{s}'), metric) for s in (0, 1)])
      np.testing.assert_allclose(float(row[f'{metric} mean']), values.mean(), rtol=1e-12)
      np.testing.assert_allclose(float(row[f'{metric} std']), values.std(ddof=1), rtol=1e-12)
      assert values.std() > 0  # the seeds differ, so the std is a real check
  assert table['eval.max_batches=2']['eval.max_batches'] == '2'
  assert table['eval.max_batches=1']['eval/loss mean'] != table['eval.max_batches=2']['eval/loss mean']

  workdirs = [os.path.join(root, cell, f'seed_{s}') for cell in table for s in (0, 1)]
  mtimes = {w: os.stat(os.path.join(w, 'metrics.jsonl')).st_mtime_ns for w in workdirs}
  again = run_sweep(*args, env=sweep_env())
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('finished before, skipped') == 4 and ': running' not in again.stdout
  assert {w: os.stat(os.path.join(w, 'metrics.jsonl')).st_mtime_ns for w in workdirs} == mtimes
  assert read_csv(os.path.join(root, 'table.csv')) == table

  # A finished run counts however it was run (no marker: a job printed by --jobs=print) and whatever the order of
  # the --set flags; one that has not finished (killed, say) is the only one left to do.
  for workdir in workdirs:
    os.remove(os.path.join(workdir, sweep.DONE_MARKER))
  os.remove(os.path.join(workdirs[1], 'finished.json'))
  printed = run_sweep(*args[:4], *reversed(args[4:]), '--jobs=print').stdout.splitlines()
  assert len(printed) == 1 and f'--workdir={workdirs[1]}' in shlex.split(printed[0])


# Runs the sweep of one cell whose run, in place of foundation.main, stops as the loop does on SIGINT: it takes a
# second to save its checkpoint, then exits. The sweep takes Ctrl-C as a terminal's foreground job does: a suite
# started in the background by a shell without job control (`nohup ... &`) inherits SIGINT ignored.
INTERRUPTED_SWEEP = """
import os, signal, sys
from foundation import sweep
signal.signal(signal.SIGINT, signal.default_int_handler)
run = '''
import os, signal, sys, time
def save_and_stop(*_):
  time.sleep(1)  # writing its checkpoint
  open(os.path.join(sys.argv[1], 'saved'), 'w').close()
  sys.exit(0)
signal.signal(signal.SIGINT, save_and_stop)
open(os.path.join(sys.argv[1], 'ready'), 'w').close()
signal.pause()
'''
sweep.run_command = lambda config, workdir, *_: (os.makedirs(workdir), [sys.executable, '-c', run, workdir])[1]
sys.exit(sweep.main(['--config=' + sys.argv[2], '--grid=optim.lr=0.01', '--root=' + sys.argv[1]]))
"""


def test_ctrl_c_stops_the_sweep_after_its_run_has_saved(tmp_path):
  workdir = tmp_path / 'optim.lr=0.01' / 'seed_0'
  driver = subprocess.Popen([sys.executable, '-c', INTERRUPTED_SWEEP, str(tmp_path), SMOKE], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
  try:
    deadline = time.monotonic() + 120
    while not (workdir / 'ready').exists() and driver.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    assert (workdir / 'ready').exists(), driver.communicate(timeout=5)
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole foreground group
    _, err = driver.communicate(timeout=60)
  finally:
    driver.kill()
  assert (workdir / 'saved').exists(), err
  assert driver.returncode == 130 and 'stopped by Ctrl-C' in err, err


def test_a_failing_run_is_reported_and_the_sweep_exits_nonzero(tmp_path, tfds_dir):
  root = tmp_path / 'root'
  # grad_accum_steps=3 does not divide the batch of 8: foundation.main refuses it before compiling anything.
  result = run_sweep(f'--config={SMOKE}', '--grid=grad_accum_steps=3', f'--root={root}', *fast(tfds_dir),
                     '--set=eval.max_batches=1',
                     env=sweep_env())
  assert result.returncode == 1
  assert f'1 run(s) failed:\n  {root}/grad_accum_steps=3/seed_0: exit status 2' in result.stderr, result.stderr
  assert not (root / 'grad_accum_steps=3' / 'seed_0' / sweep.DONE_MARKER).exists()
  assert read_csv(root / 'table.csv')['grad_accum_steps=3']['n'] == '0'
