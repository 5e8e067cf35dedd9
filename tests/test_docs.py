"""Every `foundation.main`, `foundation.sweep` and `foundation.plan` command in the fenced code blocks of the
README, the docs and the config files' docstrings resolves: its config file, variants and `--config.field=value`
overrides load through the same loader `foundation.main` uses, and a sweep's grid and --set values pass the sweep's
own checks; no value holds a line break. Nothing runs; a renamed variant or field fails here, naming the command."""

import ast
import glob
import os
import re
import shlex

import pytest

from foundation import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md', 'docs/*.md', 'benchmarks/*.md']


def shell_line(lines: str) -> str:
  """Continued lines as the shell joins them: a backslash-newline outside single quotes is removed (inside them it
  stays, as in bash, and the test below refuses the value it lands in)."""
  out, quote, i = '', None, 0
  while i < len(lines):
    char = lines[i]
    if char == '\\' and quote != "'":
      out += '' if lines[i + 1:i + 2] == '\n' else lines[i:i + 2]  # an escaped character stays escaped for shlex
      i += 2
      continue
    if char in '\'"' and quote in (None, char):
      quote = None if quote else char
    out += char
    i += 1
  return out


def fenced_commands(text: str) -> list[str]:
  """The commands that run foundation.main, .sweep or .plan in a markdown file's fenced code blocks (indented ones
  too), each with its continuation lines joined as the shell would."""
  commands, lines, fence = [], [], None
  for line in text.splitlines():
    if line.lstrip().startswith('```'):
      if fence is not None:
        at = 0
        while at < len(lines):
          if re.search(r'-m foundation\.(main|sweep|plan) ', lines[at]) and not lines[at].lstrip().startswith('#'):
            group = [lines[at]]
            while group[-1].endswith('\\') and at + 1 < len(lines):
              at += 1
              group.append(lines[at])
            commands.append(shell_line('\n'.join(group)).strip())
          at += 1
      fence, lines = (None if fence is not None else len(line) - len(line.lstrip())), []
    elif fence is not None:
      lines.append(line[fence:] if line[:fence].isspace() else line)
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
  module, flags = parse(command)
  where = (flags.get('--workdir') or flags.get('--root') or flags.get('--topology') or flags.get('--gpu') or [''])[0]
  return f"{path} {module.split('.')[-1]} {flags['--config'][0]} {where}"


@pytest.mark.parametrize('path, command', DOCUMENTED, ids=[_name(*d) for d in DOCUMENTED])
def test_a_documented_command_resolves(path, command, monkeypatch):
  del path  # in the test's id
  monkeypatch.chdir(REPO)
  module, flags = parse(command)
  config = flags['--config'][0]
  broken = [f'{name}={value}' for name, values in flags.items() for value in values if '\n' in value or '\\' in value]
  assert not broken, f'a line break inside a value (a continuation inside quotes?): {broken}'
  if module in ('foundation.main', 'foundation.plan'):  # the plan reads --config as main does
    overrides = {name[len('--config.'):]: values[-1] for name, values in flags.items()
                 if name.startswith('--config.')}
    sweep.load_config(config, overrides)
  else:
    grid = sweep.parse_grid(flags['--grid'][0]) if '--grid' in flags else {}
    sweep.validate(config, grid, sweep.parse_sets(flags.get('--set', [])), int(flags.get('--seeds', ['1'])[0]))
