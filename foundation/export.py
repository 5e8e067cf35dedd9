"""Command line: python -m foundation.export --workdir=DIR --out=DIR [--step=N]

Writes a language-model run's params as a Hugging Face Llama directory (foundation/models/hf_export.py), with the
tokenizer the run was trained with. The run's config.json says which model and tokenizer; its checkpoint gives the
params.
"""

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a language-model run (config.json, checkpoints/).',
                               required=True)
_OUT = flags.DEFINE_string('out', None, 'Directory to write the Hugging Face model into.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to export; default the step the run selected by '
                              'early stopping, else the newest.')


def export_workdir(workdir: str, out_dir: str, step: int | None = None) -> None:
  from foundation.models.hf_export import export_llama
  from foundation.tasks.lm import restore_run, tokenizer_for

  config, model_cfg, params, _ = restore_run(workdir, step)
  export_llama(params, model_cfg, tokenizer_for(config['data']['tokenizer']), out_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}.')
  try:
    export_workdir(_WORKDIR.value, _OUT.value, _STEP.value)
  except (ValueError, FileNotFoundError) as e:  # a workdir that is no LM run, a step it lacks: one line, status 2
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
