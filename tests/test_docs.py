"""Every `foundation.main` and `foundation.sweep` command in the README, the docs and the config files' docstrings
resolves: its config file, variants and `--config.field=value` overrides load through the same loader
`foundation.main` uses, and a sweep's grid and --set values pass the sweep's own checks. Nothing runs; a renamed
variant or field fails here, naming the command."""

import ast
import glob
import os
import re
import shlex

import pytest

from foundation import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md', 'docs/*.md', 'benchmarks/*.md']


def fenced_commands(text: str) -> list[str]:
  """The commands in a markdown file's fenced code blocks that run foundation.main or foundation.sweep, each with its
  continuation lines joined (a line ending in `,\\` continues a value; one ending in ` \\` the command)."""
  commands, block, inside = [], [], False
  for line in text.splitlines():
    if line.startswith('```'):
      if inside:
        joined = re.sub(r'\\\n\s*', ' ', re.sub(r',\\\n', ',', '\n'.join(block)))
        commands += [c.strip() for c in joined.splitlines() if re.search(r'-m foundation\.(main|sweep) ', c)]
      inside, block = not inside, []
    elif inside:
      block.append(line)
  return commands


def parse(command: str) -> tuple[str, dict[str, list[str]]]:
  """(the module run, its --name=value flags by name; a flag may repeat, as --set does)."""
  argv = shlex.split(command, comments=True)
  at = argv.index('-m')
  flags = {}
  for arg in argv[at + 2:]:
    name, _, value = arg.partition('=')
    flags.setdefault(name, []).append(value)
  return argv[at + 1], flags


def _documented():
  """(file, command) for every command with a concrete --config: not `--table_only`, nor the usage line's
  `--config=configs/lm/shakespeare.py[:variant]`, nor a pattern such as `configs/transfer/<file>`."""
  found = []
  for pattern in (*DOCS, 'configs/**/*.py'):
    for path in sorted(glob.glob(os.path.join(REPO, pattern), recursive=True)):
      with open(path) as f:
        text = f.read()
      if path.endswith('.py'):  # the docstring's commands, as one block
        text = '```\n' + (ast.get_docstring(ast.parse(text), clean=False) or '') + '\n```'
      found += [(os.path.relpath(path, REPO), c) for c in fenced_commands(text)
                if not re.search(r'[\[<]', parse(c)[1].get('--config', ['['])[0])]
  return found


DOCUMENTED = _documented()


def test_the_docs_hold_the_commands_this_test_reads():
  """The extraction itself: both kinds of command, continuation lines joined, and the config files' own."""
  readme = [c for path, c in DOCUMENTED if path == 'README.md']
  assert sum('foundation.main' in c for c in readme) >= 30 and sum('foundation.sweep' in c for c in readme) >= 3
  assert any("--metrics='params/trainable,best/step,best/eval/accuracy|eval/accuracy," in c for c in readme)
  assert len({path for path, _ in DOCUMENTED if path.startswith('configs/')}) >= 9


def _name(path: str, command: str) -> str:
  flags = parse(command)[1]
  return f"{path} {flags['--config'][0]} {(flags.get('--workdir') or flags.get('--root'))[0]}"


@pytest.mark.parametrize('path, command', DOCUMENTED, ids=[_name(*d) for d in DOCUMENTED])
def test_a_documented_command_resolves(path, command, monkeypatch):
  del path  # in the test's id
  monkeypatch.chdir(REPO)
  module, flags = parse(command)
  config = flags['--config'][0]
  if module == 'foundation.main':
    overrides = {name[len('--config.'):]: values[-1] for name, values in flags.items()
                 if name.startswith('--config.')}
    sweep.load_config(config, overrides)
  else:
    grid = sweep.parse_grid(flags['--grid'][0]) if '--grid' in flags else {}
    sweep.validate(config, grid, sweep.parse_sets(flags.get('--set', [])), int(flags.get('--seeds', ['1'])[0]))
