"""The command line shared by foundation.main and foundation.plan: the --config flag, and flag parsing that reports
each mistake as one line."""

import re
import sys

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, optionally with :variant.',
                                         lock_config=True)


def fail(message: str, status: int):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with each mistake (an unknown --config. key, a wrong type, a missing file or variant) reported
  as one line and exit status 2 instead of a traceback through ml_collections."""
  try:
    rest = flags.FLAGS(argv)
    if CONFIG.value is not None:
      CONFIG.value.get('task')  # a config file that did not load (a wrong path) raises here: ml_collections defers it
    return rest
  except OSError as e:
    if '--verbose' in argv:
      raise
    cause = str(e.__cause__ or e).strip().splitlines()
    fail(f'the --config file does not load: {cause[-1].strip() if cause else type(e).__name__}', 2)
  except flags.Error as e:
    message = str(e).strip()
    fail(re.sub(r'^\w+Error: ', '', message.splitlines()[-1]) if '--verbose' not in argv else message, 2)
  except Exception as e:  # pylint: disable=broad-except  (a config file's get_config, or an unknown field)
    if '--verbose' in argv:
      raise
    text = str(e).strip().strip("'").replace('\\n', '\n').replace("\\'", "'")
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if suggestion:
      wrong = [a.split('=')[0] for a in argv if re.match(rf'--config\.(.+\.)?{re.escape(suggestion[2])}(=|$)', a)]
      fail(f'{wrong[0] if wrong else suggestion[2]} is not a field of the config; did you mean '
           f'"{suggestion[1]}"?', 2)
    if isinstance(e, (AttributeError, KeyError)):
      fail(f'{text.splitlines()[0].strip(chr(34) + chr(39))!r} is not a field of the config.', 2)
    fail(text.splitlines()[-1] if text else type(e).__name__, 2)
