"""The files of a run directory, on local disk or in an object store (`gs://bucket/run`), through one layer.

Local paths go through `os` exactly as a plain Python program would; a URL (`scheme://...`) goes through
`etils.epath` and fsspec (for `gs://`, the `gcsfs` package: requirements-gcs.txt). Checkpoints do not pass through
here: orbax writes `gs://` natively (and finalises a step with a commit file there, since buckets cannot rename
directories atomically).

Object stores differ from a disk in two ways that matter to a run, and each function below handles them:
- a whole-object write is atomic, but there is no rename of a temporary file into place: `write_atomically` writes
  a temporary file and renames it locally, and writes the object in one upload remotely;
- there is no append: `append` adds to a local file, and remotely reads the object and rewrites it with the new
  lines (read-and-rewrite: a metrics.jsonl of thousands of lines costs one download and one upload per log line,
  nothing next to a training step; a reader never sees a partial line).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import IO

from etils import epath
import fsspec

# Written into a run's directory as the loop's very last act once the run has finished (its final evaluation, or the
# selected step's, done; early stopping included), and removed when a run starts that trains further: what tells a
# finished run from one that crashed or was stopped (foundation.sweep reads it).
FINISHED_FILE = 'finished.json'


def is_remote(path: str) -> bool:
  return '://' in os.fspath(path)


def require(path: str, what: str = '--workdir') -> None:
  """Raises a ValueError of one line if `path` is a URL this installation cannot open (a scheme other than gs://,
  or gs:// without gcsfs), naming `what` gave it; nothing for a local path. Every function below checks its URLs
  this way, so a run's other paths (init_from, teachers) are refused as clearly as its --workdir."""
  if not is_remote(path):
    return
  scheme = os.fspath(path).split('://', 1)[0]
  if scheme != 'gs':
    raise ValueError(f'{what}={path}: the only object store foundation writes runs to is gs://; give a gs:// URL '
                     'or a local path.')
  try:
    fsspec.get_filesystem_class(scheme)
  except ImportError:
    raise ValueError(f'{what}={path}: gs:// paths need the gcsfs package; install it with '
                     '`.venv/bin/python -m pip install -r requirements-gcs.txt`.') from None


def _remote(path: str) -> epath.Path:
  require(path, what='path')
  return epath.Path(path)


def absolute(path: str) -> str:
  """An absolute local path, or the URL unchanged."""
  return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  return [p.name for p in _remote(path).iterdir()] if is_remote(path) else os.listdir(path)


def makedirs(path: str) -> None:
  """Creates `path` and its parents if missing (on an object store a directory is only a name prefix, so there
  this is a no-op)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if is_remote(path):
    _remote(path).unlink()
  else:
    os.remove(path)


def move(source: str, destination: str) -> None:
  """Moves a file or a directory tree (on an object store: copies every object, then deletes the originals)."""
  if is_remote(source):  # fsspec itself: epath's rename wants the destination's parent to exist, and on an object
    # store an empty directory does not
    require(source, what='path')
    filesystem, _ = fsspec.core.url_to_fs(source)
    filesystem.mv(source, destination, recursive=True)
  else:
    shutil.move(source, destination)


def open_file(path: str, mode: str = 'r') -> IO:
  """open() for local paths and URLs alike. Remotely, a file opened for writing appears when it is closed."""
  return _remote(path).open(mode) if is_remote(path) else open(path, mode)  # pylint: disable=unspecified-encoding


def read_text(path: str) -> str:
  with open_file(path) as f:
    return f.read()


def write_atomically(path: str, content: str | bytes) -> None:
  """Writes a whole file so that a reader (or a crash) sees the old content or the new, never a part."""
  mode = 'wb' if isinstance(content, bytes) else 'w'
  if is_remote(path):
    with open_file(path, mode) as f:  # one upload, which replaces the object when complete
      f.write(content)
    return
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, mode) as f:  # pylint: disable=unspecified-encoding
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def append(path: str, text: str) -> None:
  """Adds `text` (whole lines) at the end of a file, creating it if missing."""
  if is_remote(path):
    write_atomically(path, (read_text(path) if exists(path) else '') + text)
  else:
    with open(path, 'a') as f:  # pylint: disable=unspecified-encoding
      f.write(text)


def read_records(path: str, *, warn=print) -> list[dict]:
  """The records of a JSON-lines file (a run's metrics.jsonl). A last line cut short by a crash mid-write is
  dropped with a warning; a bad line anywhere else means the file was damaged otherwise, and is an error naming the
  line."""
  lines = read_text(path).splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise ValueError(f'{path} line {number} is not JSON ({line[:60]!r}); repair or remove that line.') from None
      warn(f'WARNING: dropped the last line of {path}, cut short by an interrupted write: {line[:60]!r}')
  return records
