r"""Distillation on Fashion-MNIST: a teacher CNN, a smaller student CNN, soft targets, ensembles, CRD and hints.

Training uses the first 50,000 training images, validation (T, alpha, the reported step) the last 10,000, and the
test split is read once, by the final evaluation of the selected step.

  python -m foundation.main --config=configs/distill/fashion_mnist.py:teacher --workdir=workdirs/distill/teacher
  python -m foundation.main --config=configs/distill/fashion_mnist.py:student --workdir=workdirs/distill/student \
      --config.data.train_fraction=0.03
  python -m foundation.main --config=configs/distill/fashion_mnist.py:kd --workdir=workdirs/distill/kd \
      --config.data.train_fraction=0.03 --config.teachers=workdirs/distill/teacher
Variants: :teacher (the big CNN on the labels), :student (the small CNN on the labels), :kd (soft targets),
:ensemble (soft targets of several teachers: --config.teachers=A,B,C), :crd, :crd_kd, :feature (hints),
:cross_modal (the student sees 7x7 block averages, learns from the teacher only), :smoke (seconds, for tests;
combine with any other, e.g. :kd,smoke).
"""

import os

import ml_collections

from foundation import config_base

TEACHER_CNN = config_base.fashion_cnn()
STUDENT_CNN = config_base.fashion_cnn(widths=(32, 64))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # Every row of the Hinton table trains for the teacher's budget: 3,000 steps of 128 (7.7 epochs of 50,000 images,
  # 256 of the 3% subset), keeping the step with the best validation accuracy.
  c = config_base.loop('distill', num_train_steps=3000, global_batch_size=128, log_every=50, eval_every=250,
                       checkpoint_every=250)
  c.data = dict(name='fashion_mnist_offline',
                data_dir=os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets')),
                **config_base.FASHION_SPLITS, image_shape=(28, 28, 1),
                train_fraction=1.0,  # < 1: a class-balanced subset of train_split (0.03 = 1,500 images)
                subset_seed=0)       # draws that subset, independently of config.seed
  c.model = dict(encoder='cnn', cnn=dict(STUDENT_CNN))
  c.augment = dict(crop_scale=(0.7, 1.0), flip=True, brightness=0.0, contrast=0.0, blur_prob=0.0, noise_std=0.0)
  c.optim = config_base.optimizer(lr=2e-3)
  c.teachers = ''  # comma-separated workdirs of trained image classifiers
  c.distill = dict(
      temperature=2.0,           # T of the soft targets
      alpha=0.0,                 # share of the soft-target term (1 - alpha: cross-entropy on the labels)
      teacher_augment='same',    # 'same': teachers see the student's augmented batch; 'independent': their own
      crd_weight=0.0, crd_dim=64, crd_temperature=0.1,
      feature_weight=0.0,
      student_view='image')      # 'pool4': the student sees 7x7 block averages (cross-modal distillation)
  c.eval = dict(batch_size=1000, max_train_examples=10000)
  # The reported step is the one with the best validation accuracy (no early stop: every run trains its budget).
  c.early_stopping = dict(metric='eval/validation/accuracy', mode='max', patience=0)
  return config_base.apply_variants(c, arg, VARIANTS, __file__)


def teacher(c):
  c.model.cnn = dict(TEACHER_CNN)
  c.update(eval_every=500, checkpoint_every=500)


def student(c):
  del c  # the defaults: the small CNN on the labels


def kd(c):
  # T and alpha chosen on validation with the 3% transfer set (docs/distillation.md).
  c.distill.update(alpha=0.9, temperature=2.0)


def ensemble(c):
  kd(c)


def crd(c):
  c.distill.update(alpha=0.0, crd_weight=1.0)


def crd_kd(c):
  kd(c)
  c.distill.crd_weight = 1.0


def feature(c):
  c.distill.update(alpha=0.0, feature_weight=1.0)


def cross_modal(c):
  """The student sees 7x7 block averages of the images the teacher sees, and learns from the teacher alone (no
  labels); its supervised counterpart is :student --config.distill.student_view=pool4."""
  c.distill.update(alpha=1.0, temperature=2.0, student_view='pool4')


def smoke(c):
  config_base.smoke_loop(c, steps=4, batch=16)
  c.model.cnn.widths = (8, 16) if c.model.cnn.widths != tuple(STUDENT_CNN['widths']) else (4, 8)
  c.eval.update(batch_size=200, max_train_examples=200)
  c.data.train_split = 'train[:2000]'
  c.data.update(config_base.FASHION_SMOKE_SPLITS)


VARIANTS = {'teacher': teacher, 'student': student, 'kd': kd, 'ensemble': ensemble, 'crd': crd, 'crd_kd': crd_kd,
            'feature': feature, 'cross_modal': cross_modal, 'smoke': smoke}
