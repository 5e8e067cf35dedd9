"""Token-level distillation of a language model: a student decoder learns every next-token distribution of frozen
teacher LMs (other runs of this codebase), on the LM task's data and evaluation.

loss = alpha * T^2 * KL(teachers_T || student_T) + (1 - alpha) * cross-entropy on the next tokens, both means over
the real (non-padded) tokens; teachers average in probability space; `distill.top_k` > 0 keeps each teacher's k
largest logits only. Teachers are pinned frozen sources as in `distill` (never optimized, not saved, sharded by
their logical axis names). Token-level targets need one vocabulary: a teacher with another tokenizer is refused.
The student's data, evaluation (eval/loss in nats per token, per byte with the byte tokenizer) and samples are the
`lm` task's.
"""

import jax
import jax.numpy as jnp

from foundation import losses
from foundation.models.transformer import Transformer, TransformerConfig, flops_per_token
from foundation.tasks import Task, distill, lm


def build(config) -> Task:
  cfg, data = config.distill, config.data
  base = lm.build(config)
  if cfg.top_k < 0:
    raise ValueError(f'config.distill.top_k={cfg.top_k} must be >= 0 (0: the full distribution).')
  teacher_dirs = distill.teacher_workdirs(
      config, uses_teachers=cfg.alpha > 0, unused_hint='set config.distill.alpha above 0',
      example='configs/distill/shakespeare.py:teacher or configs/lm/shakespeare.py')
  if not teacher_dirs:
    return base  # the student alone: the LM task itself
  student_cfg = TransformerConfig.from_dict(config.model)
  teacher_cfgs = [_teacher_config(d, data.tokenizer, student_cfg.vocab_size, data.seq_len) for d in teacher_dirs]
  student = Transformer(student_cfg)
  teachers = [Transformer(c) for c in teacher_cfgs]
  tokens = jnp.zeros((1, data.seq_len), jnp.int32)

  def frozen(sources):
    return {'teachers': [sources.load(f'teacher_{i}', workdir, 'params',
                                      jax.eval_shape(model.init, jax.random.key(0), tokens)['params'])
                         for i, (workdir, model) in enumerate(zip(teacher_dirs, teachers))]}

  def loss(params, frozen_params, batch, rng):
    del rng
    logits = student.apply({'params': params}, batch['inputs'])
    t_logits = jax.lax.stop_gradient(jnp.stack([
        model.apply({'params': p}, batch['inputs']) for model, p in zip(teachers, frozen_params['teachers'])]))
    targets = losses.teacher_probs(t_logits, cfg.temperature, cfg.top_k)
    weights = batch['weights']
    total = losses.distillation_loss(logits, targets, batch['targets'], cfg.temperature, cfg.alpha, weights)
    return total, {'weight': jnp.sum(weights.astype(jnp.float32))}

  teacher_flops = sum(flops_per_token(c, data.seq_len) / 3 * data.seq_len for c in teacher_cfgs)  # forward only
  return base._replace(loss=loss, frozen=frozen, flops_per_example=lambda: base.flops_per_example() + teacher_flops)


def _teacher_config(workdir: str, tokenizer: str, vocab_size: int, seq_len: int) -> TransformerConfig:
  saved, model_cfg = lm.saved_lm(workdir)
  # Positions past the teacher's trained context: rotary attention does not extrapolate, so its targets there would
  # be noise (as lm.build holds samples to that context).
  if seq_len > saved['data']['seq_len']:
    raise ValueError(f'config.data.seq_len={seq_len} is longer than the context teacher {workdir!r} was trained on '
                     f'({saved["data"]["seq_len"]} tokens), where its soft targets mean nothing: set '
                     f'--config.data.seq_len={saved["data"]["seq_len"]} or less.')
  theirs = saved['data']['tokenizer']
  if theirs != tokenizer or model_cfg.vocab_size != vocab_size:
    raise ValueError(f'teacher {workdir!r} uses tokenizer {theirs!r} (vocab {model_cfg.vocab_size}), the '
                     f'student {tokenizer!r} (vocab {vocab_size}): token-level distillation needs one vocabulary. '
                     'Train the student with the teacher\'s tokenizer, or distil at the sequence level: write the '
                     f'teacher\'s samples with python -m foundation.sample_corpus --teacher={workdir} --out=DIR and '
                     'train on them with configs/distill/shakespeare.py:seqkd --config.data.data_dir=DIR.')
  return model_cfg
