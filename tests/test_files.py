"""foundation.files, the one layer a run's files go through, on local paths and on gs:// URLs.

No test reaches Google Cloud Storage: `gs://` is served from memory by fsspec's MemoryFileSystem registered under
the gs protocol, where gcsfs serves it on a cluster, so etils.epath (and through it foundation.files) reaches it as
it would a bucket. Each check compares what the gs:// calls leave with what the same calls leave in a local
directory, and with values written out by hand; the bucket's bytes are read from the memory store directly.
Checkpoints are orbax's (tensorstore's own GCS driver) and are not covered here.
"""

import importlib
import json
import os
import struct

import fsspec
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from foundation import checkpoint, files, metrics
from foundation.evaluate import report


@pytest.fixture
def bucket(monkeypatch):
  """An empty in-memory gs://; yields its store ({'/bucket/path': BytesIO})."""

  class MemoryGCS(MemoryFileSystem):
    protocol = ('gs', 'gcs')
    store, pseudo_dirs = {}, ['']

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's option, which epath passes
      del finalize_on_close
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      return super()._strip_protocol(str(path).removeprefix('gs://').removeprefix('gcs://'))

  registry = importlib.import_module('fsspec.registry')._registry  # pylint: disable=protected-access
  for name in MemoryGCS.protocol:
    monkeypatch.setitem(registry, name, MemoryGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield MemoryGCS.store
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _calls_a_run_makes(root: str) -> list:
  """config.json rewritten, metrics appended, a binary report, checkpoint steps listed and one moved aside, a file
  removed: what a reader sees after each."""
  run = os.path.join(root, 'run')
  seen = [files.exists(os.path.join(run, 'config.json'))]
  files.makedirs(run)
  files.write_atomically(os.path.join(run, 'config.json'), '{"lr": 1}\n')
  files.write_atomically(os.path.join(run, 'config.json'), '{"lr": 2}\n')
  seen += [files.exists(os.path.join(run, 'config.json')), files.read_text(os.path.join(run, 'config.json'))]
  for step in (1, 2):
    files.append(os.path.join(run, 'metrics.jsonl'), json.dumps({'step': step}) + '\n')
  seen.append(files.read_text(os.path.join(run, 'metrics.jsonl')))
  files.write_atomically(os.path.join(run, 'fewshot.png'), b'\x89PNG\x00\xff')
  with files.open_file(os.path.join(run, 'fewshot.png'), 'rb') as f:
    seen.append(f.read())
  for step in (7, 12, 15):  # 15: a save killed before it completed (no commit file) is not a checkpoint
    files.makedirs(os.path.join(run, 'checkpoints', str(step)))
    files.write_atomically(os.path.join(run, 'checkpoints', str(step), 'state'), f'state {step}')
    if step != 15:
      files.write_atomically(os.path.join(run, 'checkpoints', str(step), checkpoint.COMMIT_FILE), 'done')
  seen.append(checkpoint.saved_steps(run))
  files.makedirs(os.path.join(run, 'checkpoints_unreadable'))
  files.move(os.path.join(run, 'checkpoints', '7'), os.path.join(run, 'checkpoints_unreadable', '7'))
  seen += [checkpoint.saved_steps(run), sorted(files.listdir(os.path.join(run, 'checkpoints_unreadable', '7'))),
           files.read_text(os.path.join(run, 'checkpoints_unreadable', '7', 'state'))]
  files.remove(os.path.join(run, 'metrics.jsonl'))
  seen += [files.exists(os.path.join(run, 'metrics.jsonl')), files.isdir(run),
           files.isdir(os.path.join(run, 'config.json')), sorted(files.listdir(run))]
  return seen


def test_a_gs_workdir_reads_back_what_a_local_one_does(tmp_path, bucket):
  want = [False, True, '{"lr": 2}\n', '{"step": 1}\n{"step": 2}\n', b'\x89PNG\x00\xff', [7, 12], [12],
          [checkpoint.COMMIT_FILE, 'state'], 'state 7', False, True, False,
          ['checkpoints', 'checkpoints_unreadable', 'config.json', 'fewshot.png']]
  assert _calls_a_run_makes(str(tmp_path)) == want
  assert _calls_a_run_makes('gs://bucket') == want
  assert bucket['/bucket/run/config.json'].getvalue() == b'{"lr": 2}\n'
  assert '/bucket/run/checkpoints/7/state' not in bucket
  assert files.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert files.absolute('run') == os.path.abspath('run')


def _events(event_file: bytes) -> list:
  """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  found, at = [], 0
  while at < len(event_file):
    (length,) = struct.unpack('<Q', event_file[at:at + 8])
    found.append(event_pb2.Event.FromString(event_file[at + 12:at + 12 + length]))
    at += 12 + length + 4
  return found


def _scalars(event_file: bytes) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in a TensorBoard event file."""
  return [(e.step, v.tag, round(v.simple_value, 6)) for e in _events(event_file) for v in e.summary.value]


def _purge_step(event_file: bytes) -> int | None:
  """The step from which TensorBoard drops the earlier files' events: the step of the file's START session log."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  starts = [e.step for e in _events(event_file) if e.HasField('session_log')
            and e.session_log.status == event_pb2.SessionLog.START]
  return starts[0] if starts else None


def test_metrics_and_events_in_a_gs_workdir_equal_a_local_workdir_s_across_a_resume(tmp_path, bucket):
  def log(workdir, resume_step, steps):
    writer = metrics.MetricWriter(workdir, enabled=True, resume_step=resume_step)
    for step in steps:
      writer.write(step, {'loss': 1.0 / step, 'tokens': 64.0 * step})
    writer.close()

  for workdir in (str(tmp_path), 'gs://bucket/run'):
    log(workdir, None, [1, 2, 3])
    log(workdir, 2, [3, 4])  # resumed from the checkpoint of step 2: step 3 is computed again
  local = (tmp_path / 'metrics.jsonl').read_text()
  assert [json.loads(line) for line in local.splitlines()] == [
      {'step': s, 'loss': 1.0 / s, 'tokens': 64.0 * s} for s in (1, 2, 3, 4)]
  assert bucket['/bucket/run/metrics.jsonl'].getvalue().decode() == local

  local_events = [(tmp_path / 'tensorboard' / name).read_bytes()
                  for name in sorted(os.listdir(tmp_path / 'tensorboard'))]
  gs_events = [bucket[name].getvalue() for name in sorted(bucket) if name.startswith('/bucket/run/tensorboard/')]
  assert len(gs_events) == len(local_events) == 2  # one event file per start
  assert [_scalars(e) for e in gs_events] == [_scalars(e) for e in local_events] == [
      [(s, k, round(v, 6)) for s in (1, 2, 3) for k, v in (('loss', 1.0 / s), ('tokens', 64.0 * s))],
      [(s, k, round(v, 6)) for s in (3, 4) for k, v in (('loss', 1.0 / s), ('tokens', 64.0 * s))]]
  # The resume drops the earlier events from step 3 on; a start over (no checkpoint left) drops them all, as it
  # drops metrics.jsonl, so TensorBoard does not draw the abandoned attempt's steps into the new run.
  assert [_purge_step(e) for e in local_events] == [0, 3]
  log(str(tmp_path), None, [1])
  newest = max(os.listdir(tmp_path / 'tensorboard'), key=lambda n: os.path.getmtime(tmp_path / 'tensorboard' / n))
  assert _purge_step((tmp_path / 'tensorboard' / newest).read_bytes()) == 0
  assert [json.loads(line)['step'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [1]


def test_reports_written_to_gs_are_the_local_bytes(tmp_path, bucket):
  curves = {'SimCLR': {1: 0.4, 10: 0.6, 600: 0.8}, 'raw pixels': {1: 0.3, 10: 0.5, 600: 0.7}}
  report.plot_fewshot(curves, str(tmp_path / 'fewshot.png'), 'probe accuracy vs labels per class')
  report.plot_fewshot(curves, 'gs://bucket/run/fewshot.png', 'probe accuracy vs labels per class')
  local = (tmp_path / 'fewshot.png').read_bytes()
  assert local.startswith(b'\x89PNG') and bucket['/bucket/run/fewshot.png'].getvalue() == local


def test_a_url_this_installation_cannot_open_is_refused_in_one_line(tmp_path, bucket, monkeypatch):
  files.require(str(tmp_path))
  files.require('gs://bucket/run')  # the filesystem is installed (here: the memory bucket)
  with pytest.raises(ValueError, match=r'^--workdir=s3://b/run: the only object store .* is gs://'):
    files.require('s3://b/run')

  def without_gcsfs(protocol):
    raise ImportError(f'Install gcsfs to access {protocol}')  # what fsspec raises when gcsfs is missing
  monkeypatch.setattr(fsspec, 'get_filesystem_class', without_gcsfs)
  with pytest.raises(ValueError, match=r'gs:// paths need the gcsfs package.*requirements-gcs.txt'):
    files.require('gs://bucket/run')
  # Every operation on a URL checks the same way (another run's path: init_from, a teacher).
  for call in (files.exists, files.isdir, files.listdir, files.read_text, files.remove):
    with pytest.raises(ValueError, match=r'^path=gs://bucket/run/config.json: gs:// paths need the gcsfs'):
      call('gs://bucket/run/config.json')
