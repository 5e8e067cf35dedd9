import numpy as np

from foundation import losses


def naive_xent(logits, targets, weights):
  total = count = 0.0
  for idx in np.ndindex(targets.shape):
    row = logits[idx].astype(np.float64)
    log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
    total += weights[idx] * (log_z - row[targets[idx]])
    count += weights[idx]
  return total, count


def test_next_token_xent_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
  targets = rng.integers(0, 11, size=(3, 5))
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
  total, count = losses.next_token_xent(logits, targets, weights)
  want_total, want_count = naive_xent(logits, targets, weights)
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
  assert float(count) == want_count


def test_uniform_logits_give_log_vocab():
  logits = np.zeros((2, 4, 7), np.float32)
  total, count = losses.next_token_xent(logits, np.zeros((2, 4), np.int32), np.ones((2, 4)))
  np.testing.assert_allclose(float(total / count), np.log(7), rtol=1e-6)
