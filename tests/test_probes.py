"""Feature probes, zero-shot and retrieval, and the report helpers, against independent references: direct numpy
solves, scikit-learn, brute-force loops, and constructed cases whose answer is known.

A sharp way to compare a probe with a reference that predicts labels: score the probe against the reference's
predictions as `test_y`. Accuracy 1.0 then means every single prediction agrees, not just the count of right ones.
"""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from foundation.evaluate import probes
from foundation.evaluate.report import plot_fewshot, results_table
from foundation.evaluate.zero_shot import class_embeddings, retrieval_recall, zero_shot_accuracy


def gaussian_blobs(rng, n, dim, num_classes, separation, num_test=None):
  """Class means drawn once per rng; unit-variance noise; features deliberately off-centre and badly scaled."""
  means = rng.normal(size=(num_classes, dim)) * separation
  scale = rng.uniform(0.1, 10.0, size=dim)
  def draw(count):
    labels = np.arange(count) % num_classes
    return ((means[labels] + rng.normal(size=(count, dim))) * scale + 3.0).astype(np.float32), labels
  return draw(n), draw(num_test or n // 2)


def np_standardise(train, test):
  mean, std = train.mean(0), train.std(0)
  return (train - mean) / std, (test - mean) / std


def np_ridge_predict(train_x, train_y, test_x, num_classes, l2):
  """Direct solve of  min mean ||[x 1] w - onehot||^2 + l2 ||W||^2  with the intercept row unpenalised."""
  train, test = np_standardise(np.float64(train_x), np.float64(test_x))
  n, dim = train.shape
  design = np.hstack([train, np.ones((n, 1))])
  penalty = np.diag(np.r_[np.full(dim, n * l2), 0.0])
  w = np.linalg.solve(design.T @ design + penalty, design.T @ np.eye(num_classes)[train_y])
  return np.argmax(np.hstack([test, np.ones((len(test), 1))]) @ w, axis=1)


# ---- ridge ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('n, dim', [(300, 12), (24, 60)], ids=['primal', 'dual'])
def test_ridge_matches_direct_closed_form(n, dim):
  rng = np.random.default_rng(0)
  (train_x, train_y), (test_x, test_y) = gaussian_blobs(rng, n, dim, num_classes=4, separation=0.5, num_test=1000)
  for l2 in (1e-3, 0.3):
    reference = np_ridge_predict(train_x, train_y, test_x, 4, l2)
    assert probes.ridge_probe(train_x, train_y, test_x, reference, num_classes=4, l2=l2) == 1.0
    assert probes.ridge_probe(train_x, train_y, test_x, test_y, num_classes=4, l2=l2) == pytest.approx(
        np.mean(reference == test_y))
    # The documented mapping to scikit-learn: Ridge(alpha = n * l2) on the same standardised features.
    train, test = np_standardise(np.float64(train_x), np.float64(test_x))
    sklearn_predictions = Ridge(alpha=n * l2).fit(train, np.eye(4)[train_y]).predict(test).argmax(1)
    np.testing.assert_array_equal(sklearn_predictions, reference)


def test_ridge_separates_gaussian_blobs():
  rng = np.random.default_rng(1)
  (train_x, train_y), (test_x, test_y) = gaussian_blobs(rng, 2000, 32, num_classes=10, separation=2.0)
  assert probes.ridge_probe(train_x, train_y, test_x, test_y, num_classes=10) >= 0.99


@pytest.mark.parametrize('n, dim', [(60, 8), (30, 50), (3, 50)], ids=['primal', 'dual', 'one_shot'])
def test_ridge_chooses_l2_by_brute_force_leave_one_out(n, dim):
  """l2=None must pick the grid value a refit-without-each-example loop picks (larger l2 on ties). The refit keeps
  the standardisation and the penalty n * l2 of the full set, which is what leave-one-out of that fit means. With
  one example per class (3 of 3 classes) every held-out prediction is wrong, so the largest l2 is the choice."""
  rng = np.random.default_rng(2)
  # 2000 test points: enough that the predictions of neighbouring grid values differ, so a wrong choice shows.
  (train_x, train_y), (test_x, _) = gaussian_blobs(rng, n, dim, num_classes=3, separation=0.6, num_test=2000)
  train, _ = np_standardise(np.float64(train_x), np.float64(test_x))
  targets = np.eye(3)[train_y]
  best_l2, best_accuracy = None, -1.0
  for l2 in sorted(probes.RIDGE_L2_GRID, reverse=True):
    right = 0
    for i in range(n):
      keep = np.arange(n) != i
      design = np.hstack([train[keep], np.ones((n - 1, 1))])
      penalty = np.diag(np.r_[np.full(dim, n * l2), 0.0])
      w = np.linalg.solve(design.T @ design + penalty, design.T @ targets[keep])
      right += np.argmax(np.r_[train[i], 1.0] @ w) == train_y[i]
    if right / n > best_accuracy:
      best_l2, best_accuracy = l2, right / n
  reference = np_ridge_predict(train_x, train_y, test_x, 3, best_l2)
  assert probes.ridge_probe(train_x, train_y, test_x, reference, num_classes=3) == 1.0


def test_ridge_rejects_labels_out_of_range():
  x = np.zeros((4, 2), np.float32)
  with pytest.raises(ValueError, match=r'\[0, 2\)'):
    probes.ridge_probe(x, np.array([0, 1, 2, 0]), x, np.array([0, 1, 0, 1]), num_classes=2)


# ---- logistic ------------------------------------------------------------------------------------------------------


def test_logistic_matches_sklearn():
  """Overlapping classes (accuracy well below 1), so the regulariser and the optimum both matter.

  Mapping: our objective  mean_i xent + (l2/2)||W||^2  is sklearn's  C sum_i xent + (1/2)||W||^2  divided by C n,
  so C = 1 / (n * l2) gives the same minimiser (both leave the intercept unpenalised).
  """
  rng = np.random.default_rng(3)
  (train_x, train_y), (test_x, test_y) = gaussian_blobs(rng, 2000, 20, num_classes=5, separation=0.45)
  l2 = 1e-3
  train, test = np_standardise(np.float64(train_x), np.float64(test_x))
  sklearn_model = LogisticRegression(C=1 / (len(train_y) * l2), tol=1e-8, max_iter=5000).fit(train, train_y)
  sklearn_accuracy = sklearn_model.score(test, test_y)
  assert 0.5 < sklearn_accuracy < 0.95  # the set is hard, not trivially separable
  ours = probes.logistic_probe(train_x, train_y, test_x, test_y, num_classes=5, l2=l2)
  assert abs(ours - sklearn_accuracy) <= 0.01
  agreement = probes.logistic_probe(train_x, train_y, test_x, sklearn_model.predict(test), num_classes=5, l2=l2)
  assert agreement >= 0.99


# ---- k-NN ----------------------------------------------------------------------------------------------------------


def np_knn_predict(train_x, train_y, test_x, k, temperature, num_classes):
  train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  predictions = []
  for query in test_x:
    similarities = train @ (query / np.linalg.norm(query))
    votes = np.zeros(num_classes)
    for j in np.argsort(-similarities, kind='stable')[:k]:
      votes[train_y[j]] += np.exp(similarities[j] / temperature)
    predictions.append(np.argmax(votes))
  return np.array(predictions)


@pytest.mark.parametrize('k, temperature', [(5, 0.07), (20, 0.5), (1000, 0.1)])
def test_knn_matches_brute_force(k, temperature):
  rng = np.random.default_rng(4)
  (train_x, train_y), (test_x, test_y) = gaussian_blobs(rng, 300, 16, num_classes=6, separation=0.3)
  test_x, test_y = test_x[:101], test_y[:101]  # not a multiple of the batch: exercises the padding
  reference = np_knn_predict(np.float64(train_x), train_y, np.float64(test_x), k, temperature, 6)
  assert 0.2 < np.mean(reference == test_y) < 0.95  # neither chance nor trivial: k and T change the answer
  knn = lambda labels: probes.knn_accuracy(train_x, train_y, test_x, labels, k=k, temperature=temperature,
                                           num_classes=6, batch_size=32)
  assert knn(reference) == 1.0
  assert knn(test_y) == pytest.approx(np.mean(reference == test_y))


# ---- few-shot and the suite ----------------------------------------------------------------------------------------


def test_knn_refuses_mismatched_rows_and_meaningless_settings():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(20, 4)), np.arange(20) % 2
  for args, kwargs in [((x, y[:10], x, y), {}), ((x, y, x[:, :3], y), {}), ((x, y, x, y), {'k': 0}),
                       ((x, y, x, y), {'temperature': -0.1})]:
    with pytest.raises(ValueError, match='k-NN needs'):
      probes.knn_accuracy(*args, num_classes=2, **kwargs)


def test_fewshot_draws_exactly_shots_per_class_reproducibly():
  labels = np.repeat(np.arange(4), [7, 12, 5, 30])
  first = probes.fewshot_indices(labels, shots=5, num_classes=4, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[first], minlength=4), [5, 5, 5, 5])
  assert len(np.unique(first)) == 20  # without replacement
  np.testing.assert_array_equal(first, probes.fewshot_indices(labels, shots=5, num_classes=4, seed=0))
  assert not np.array_equal(first, probes.fewshot_indices(labels, shots=5, num_classes=4, seed=1))
  with pytest.raises(ValueError, match='class 2 has 5'):
    probes.fewshot_indices(labels, shots=6, num_classes=4, seed=0)


def test_fewshot_accuracy_is_mean_and_std_of_per_seed_probes():
  rng = np.random.default_rng(5)
  (train_x, train_y), (test_x, test_y) = gaussian_blobs(rng, 400, 24, num_classes=4, separation=0.5)
  per_seed = []
  for seed in (0, 1, 2):
    chosen = probes.fewshot_indices(train_y, shots=3, num_classes=4, seed=seed)
    per_seed.append(probes.ridge_probe(train_x[chosen], train_y[chosen], test_x, test_y, num_classes=4))
  mean, std = probes.fewshot_accuracy(train_x, train_y, test_x, test_y, shots=3, num_classes=4)
  assert (mean, std) == pytest.approx((np.mean(per_seed), np.std(per_seed)))
  assert (mean, std) == probes.fewshot_accuracy(train_x, train_y, test_x, test_y, shots=3, num_classes=4)


def test_probe_suite_keys_and_values():
  rng = np.random.default_rng(6)
  (train_x, train_y), (test_x, test_y) = gaussian_blobs(rng, 400, 16, num_classes=4, separation=0.5)
  suite = probes.probe_suite(train_x, train_y, test_x, test_y, num_classes=4, shots=(1, 5))
  assert list(suite) == ['linear_probe/accuracy', 'fewshot_1shot/accuracy', 'fewshot_1shot/accuracy_std',
                         'fewshot_5shot/accuracy', 'fewshot_5shot/accuracy_std', 'knn/accuracy']
  assert suite['linear_probe/accuracy'] == probes.ridge_probe(train_x, train_y, test_x, test_y, num_classes=4)
  assert suite['knn/accuracy'] == probes.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=4)
  with pytest.raises(ValueError, match='unknown probe'):
    probes.probe_suite(train_x, train_y, test_x, test_y, num_classes=4, probe='svm')


# ---- zero-shot and retrieval ---------------------------------------------------------------------------------------


def np_normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_class_embeddings_ensemble_normalised_prompts():
  rng = np.random.default_rng(7)
  per_prompt = rng.normal(size=(5, 3, 8))
  expected = np.stack([np_normalise(np.mean([np_normalise(p) for p in prompts], axis=0)) for prompts in per_prompt])
  got = np.asarray(class_embeddings(per_prompt))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
  # Each prompt counts equally, whatever its norm.
  rescaled = per_prompt * rng.uniform(0.01, 100.0, size=(5, 3, 1))
  np.testing.assert_allclose(np.asarray(class_embeddings(rescaled)), got, rtol=1e-5, atol=1e-6)


def test_zero_shot_accuracy_against_loop_and_known_case():
  rng = np.random.default_rng(8)
  images, classes, labels = rng.normal(size=(200, 16)), rng.normal(size=(7, 16)), rng.integers(0, 7, 200)
  expected = np.mean([np.argmax([np.dot(image, c) / np.linalg.norm(c) for c in classes]) == label
                      for image, label in zip(images, labels)])
  assert zero_shot_accuracy(images, classes, labels) == pytest.approx(expected)
  # Images near (but scaled copies of) their own class embedding are all classified right.
  near = (classes[labels] + 0.05 * rng.normal(size=(200, 16))) * rng.uniform(0.1, 10.0, size=(200, 1))
  assert zero_shot_accuracy(near, classes, labels) == 1.0


def np_recall(queries, candidates, k):
  hits = 0
  for i, query in enumerate(np_normalise(queries)):
    similarities = np_normalise(candidates) @ query
    others_at_least_as_close = np.sum(np.delete(similarities, i) >= similarities[i])
    hits += others_at_least_as_close < k
  return hits / len(queries)


def test_retrieval_recall_against_loop_and_known_cases():
  rng = np.random.default_rng(9)
  images = rng.normal(size=(70, 6))
  texts = images + rng.normal(size=(70, 6))  # noisy pairs: recall strictly between 0 and 1
  got = retrieval_recall(images, texts, ks=(1, 5, 10), batch_size=16)
  assert list(got) == [f'{d}_recall_at_{k}' for d in ('image_to_text', 'text_to_image') for k in (1, 5, 10)]
  for k in (1, 5, 10):
    assert got[f'image_to_text_recall_at_{k}'] == pytest.approx(np_recall(images, texts, k))
    assert got[f'text_to_image_recall_at_{k}'] == pytest.approx(np_recall(texts, images, k))
  assert 0 < got['image_to_text_recall_at_1'] < 1
  assert all(v == 1.0 for v in retrieval_recall(images, 3.0 * images, batch_size=16).values())
  # Each text paired with the next image: every true partner is orthogonal to its query, another candidate matches
  # it exactly and the other 38 tie with the partner, so the partner ranks last.
  identity = np.eye(40)
  shifted = retrieval_recall(identity, np.roll(identity, 1, axis=0), ks=(1, 39, 40))
  assert shifted == {f'{d}_recall_at_{k}': float(k == 40) for d in ('image_to_text', 'text_to_image')
                     for k in (1, 39, 40)}
  # A collapsed encoder ties everything; ties count against the true partner.
  collapsed = np.ones((10, 4))
  assert retrieval_recall(collapsed, collapsed, ks=(1, 9, 10)) == {
      'image_to_text_recall_at_1': 0.0, 'image_to_text_recall_at_9': 0.0, 'image_to_text_recall_at_10': 1.0,
      'text_to_image_recall_at_1': 0.0, 'text_to_image_recall_at_9': 0.0, 'text_to_image_recall_at_10': 1.0}


# ---- report --------------------------------------------------------------------------------------------------------


def test_results_table_markdown():
  rows = {'SimCLR': {'linear_probe/accuracy': 0.8567, 'knn/accuracy': 0.80049},
          'raw pixels': {'linear_probe/accuracy': 0.8, 'knn/accuracy': float('nan')},
          'random init': {'linear_probe/accuracy': 1.0}}
  assert results_table(rows, ['linear_probe/accuracy', 'knn/accuracy']) == (
      '| encoder | linear_probe/accuracy | knn/accuracy |\n'
      '| --- | ---: | ---: |\n'
      '| SimCLR | 85.7 | 80.0 |\n'
      '| raw pixels | 80.0 | - |\n'
      '| random init | 100.0 | - |\n')


def test_plot_fewshot_writes_png(tmp_path):
  path = tmp_path / 'fewshot.png'
  plot_fewshot({'SimCLR': {1: 0.4, 5: 0.6, 10: 0.7, 25: 0.78}, 'raw pixels': {1: 0.3, 5: 0.45, 10: 0.55, 25: 0.6}},
               str(path), 'Fashion-MNIST few-shot')
  data = path.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  assert data[12:16] == b'IHDR' and data[-8:-4] == b'IEND'
  width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
  assert (width, height) == (600, 420)  # figsize (5, 3.5) at 120 dpi


def test_a_compared_run_is_shown_at_the_step_it_reports(tmp_path):
  """eval.compare rows: a run with early stopping reports its selected step (best/eval/...), not its last one."""
  from foundation.evaluate.representation import reported_evaluation
  lines = [{'step': 100, 'eval/linear_probe/accuracy': 0.80, 'eval/knn/accuracy': 0.70},
           {'step': 150, 'train/loss': 0.1},
           {'step': 200, 'eval/linear_probe/accuracy': 0.75, 'eval/knn/accuracy': 0.72}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
  assert reported_evaluation(str(tmp_path)) == {'linear_probe/accuracy': 0.75, 'knn/accuracy': 0.72}
  selected = {'step': 200, 'best/eval/linear_probe/accuracy': 0.80, 'best/eval/knn/accuracy': 0.70, 'best/step': 100}
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps(selected) + '\n')
  assert reported_evaluation(str(tmp_path)) == {'linear_probe/accuracy': 0.80, 'knn/accuracy': 0.70}
  assert reported_evaluation(str(tmp_path / 'missing')) is None
