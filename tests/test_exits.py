"""adaptive/exits.py against the papers' formulas written out, and calibration on fresh data."""

import math

import numpy as np
import pytest
import scipy.stats

from adaptive import exits


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_confidence_measures_match_their_definitions():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)) * 3
  p = np.sort(_softmax(logits), axis=-1)
  np.testing.assert_allclose(
    exits.confidence("softmax_diff", logits_V=logits), p[..., -1] - p[..., -2], atol=1e-6
  )
  np.testing.assert_allclose(exits.confidence("max_prob", logits_V=logits), p[..., -1], atol=1e-6)
  a, b = rng.normal(size=(2, 4, 16))
  cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(exits.confidence("cosine", previous_D=a, hidden_D=b), cos, atol=1e-6)
  z = rng.normal(size=7)
  np.testing.assert_allclose(
    exits.confidence("classifier", classifier_logit=z), 1 / (1 + np.exp(-z)), atol=1e-6
  )
  with pytest.raises(ValueError, match="measure"):
    exits.confidence("entropy", logits_V=logits)


def test_decayed_threshold_is_calms_formula():
  n, tau = 64, 4.0
  for lam in (0.0, 0.5, 0.9, 1.0, 1.3):
    for t in (0, 1, 10, 63):
      want = min(1.0, max(0.0, 0.9 * lam + 0.1 * math.exp(-tau * t / n)))
      assert float(exits.decayed_threshold(lam, t, n, tau)) == pytest.approx(want, abs=1e-6)


def test_layer_drop_probabilities_are_layerskips_formula():
  for num_layers, p_max in ((2, 0.1), (4, 0.2), (12, 0.5)):
    got = np.asarray(exits.layer_drop_probabilities(num_layers, p_max))
    want = [p_max * (math.exp(l * math.log(2) / (num_layers - 1)) - 1) for l in range(num_layers)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[0] == 0 and got[-1] == pytest.approx(p_max)
  # Exponential time curriculum S(t) = exp(t·ln2/T) − 1, t clipped to T.
  for t in (0, 25, 100, 400):
    got = np.asarray(
      exits.layer_drop_probabilities(4, 0.2, step=t, total_steps=100, curriculum="exponential")
    )
    s = math.exp(min(t, 100) * math.log(2) / 100) - 1
    want = [s * 0.2 * (math.exp(l * math.log(2) / 3) - 1) for l in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _layerskip_scales(num_layers, exit_layers, t, e_scale, curriculum, rotation=2, total=1):
  """LayerSkip §4.1.2 written out: e_l, the curriculum C(t, l), normalised ẽ_{t,l}."""
  big_l = num_layers
  layers = [n - 1 for n in exit_layers] + [big_l - 1]  # 0-based layer of each exit
  e = []
  for l in layers:
    if l < big_l - 1:
      e.append(e_scale * sum(range(l + 1)))
    else:
      e.append(big_l - 1 + e_scale * sum(range(big_l - 1)))
  on = []
  for j, l in enumerate(layers):
    if l == big_l - 1 or curriculum == "none":
      on.append(1)
    elif curriculum == "rotational":
      on.append(int((j - t) % rotation == 0))
    else:  # gradual: one more layer from the top every T/(2L) steps
      on.append(int(l >= big_l - 1 - math.floor(t / (total / (2 * big_l)))))
  z = sum(c * x for c, x in zip(on, e, strict=True))
  return [c * x / z for c, x in zip(on, e, strict=True)]


@pytest.mark.parametrize(
  "num_layers,exit_layers,e_scale",
  [(4, (1, 2, 3), 1.0), (8, (2, 4, 6), 0.5), (6, (1, 2, 3, 4, 5), 2.0)],
)
def test_layerskip_loss_scales_and_curricula_are_the_papers(num_layers, exit_layers, e_scale):
  for curriculum, kw in (
    ("none", {}),
    ("rotational", {"rotation": 2}),
    ("rotational", {"rotation": 3}),
  ):
    for t in range(6):
      got = np.asarray(
        exits.layerskip_loss_scales(
          num_layers, exit_layers, t, e_scale=e_scale, curriculum=curriculum, **kw
        )
      )
      want = _layerskip_scales(num_layers, exit_layers, t, e_scale, curriculum, **kw)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
      assert got.sum() == pytest.approx(1.0, abs=1e-6)
  total = 160
  for t in (0, 9, 10, 19, 20, 41, 79, 80, 150):
    got = np.asarray(
      exits.layerskip_loss_scales(
        num_layers, exit_layers, t, e_scale=e_scale, curriculum="gradual", total_steps=total
      )
    )
    want = _layerskip_scales(num_layers, exit_layers, t, e_scale, "gradual", total=total)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got.sum() == pytest.approx(1.0, abs=1e-6)
  # At t = 0 the gradual curriculum trains the last layer only; from T/2 on, every exit.
  first = exits.layerskip_loss_scales(
    num_layers, exit_layers, 0, curriculum="gradual", total_steps=total
  )
  assert np.asarray(first)[-1] == pytest.approx(1.0)


def test_calm_loss_weights_grow_with_layer_index_and_sum_to_one():
  w = exits.calm_loss_weights(6, (2, 4))
  np.testing.assert_allclose(w, np.array([2, 4, 6]) / 12)


def test_first_exit_and_disagreement():
  conf = np.array([[0.1, 0.7, 0.9], [0.95, 0.2, 0.3], [0.1, 0.2, 0.3]])
  agrees = np.array([[True, False, True], [False, True, True], [True, True, True]])
  np.testing.assert_array_equal(exits.first_exit(conf, 0.5), [1, 0, 3])
  np.testing.assert_array_equal(exits.first_exit(conf, [0.8, 0.99, 0.0]), [2, 3, 0])
  d = exits.disagreement_at_thresholds(conf, agrees, [0.5, 0.8, 2.0])
  np.testing.assert_array_equal(d, [[True, False, False], [True, True, False], [False] * 3])


def _synthetic(rng, n, num_exits=3):
  """Confidence per exit ~ U(0, 1); deeper and more confident exits agree more often."""
  conf = rng.uniform(size=(n, num_exits))
  depth = np.arange(1, num_exits + 1) / (num_exits + 1)
  p_disagree = 0.6 * (1 - conf) ** 2 * (1 - depth)
  agrees = rng.uniform(size=(n, num_exits)) >= p_disagree
  return conf, agrees


def test_calibration_holds_on_fresh_data_and_certifies_the_binomial_bound():
  tolerance, risk = 0.05, 0.1
  grid = np.round(np.linspace(1.0, 0.0, 51), 4)
  rng = np.random.default_rng(0)
  conf, agrees = _synthetic(rng, 2000)
  disagree = exits.disagreement_at_thresholds(conf, agrees, grid)
  cal = exits.calibrate_threshold(disagree, grid, tolerance=tolerance, risk=risk)
  assert 0.0 < cal.threshold < 1.0  # Certifies something, but not everything.
  k, n = int(disagree[:, list(grid).index(cal.threshold)].sum()), 2000
  # The certified p-value is the binomial tail, computed here two independent ways.
  explicit = sum(math.comb(n, i) * tolerance**i * (1 - tolerance) ** (n - i) for i in range(k + 1))
  assert cal.p_value == pytest.approx(scipy.stats.binom.cdf(k, n, tolerance), rel=1e-9)
  assert cal.p_value == pytest.approx(explicit, rel=1e-9)
  assert cal.p_value <= risk
  # The bound: the exact one-sided Clopper-Pearson upper limit, <= tolerance.
  assert cal.risk_bound == pytest.approx(scipy.stats.beta.ppf(1 - risk, k + 1, n - k), rel=1e-6)
  assert cal.risk_bound <= tolerance
  assert cal.empirical_risk == k / n
  # Fixed-sequence testing: every larger threshold passed, the next smaller one failed.
  for threshold, p_value in cal.p_values:
    j = list(grid).index(threshold)
    assert p_value == pytest.approx(scipy.stats.binom.cdf(disagree[:, j].sum(), n, tolerance))
    assert (p_value <= risk) == (threshold >= cal.threshold)
  # A fresh held-out set: the measured disagreement at the returned threshold is within tolerance.
  fresh_conf, fresh_agrees = _synthetic(np.random.default_rng(1), 200_000)
  fresh = exits.disagreement_at_thresholds(fresh_conf, fresh_agrees, [cal.threshold]).mean()
  print(f"calibrated threshold {cal.threshold}, held-out disagreement {fresh:.4f} <= {tolerance}")
  assert fresh <= tolerance
  # The calibration is not vacuous: exiting everything at the first exit is unsafe.
  unsafe = exits.disagreement_at_thresholds(fresh_conf, fresh_agrees, [0.0]).mean()
  assert unsafe > tolerance


def test_calibration_certifies_nothing_when_even_the_safest_threshold_fails():
  disagree = np.ones((100, 3), bool)
  cal = exits.calibrate_threshold(disagree, [0.9, 0.5, 0.1], tolerance=0.1, risk=0.1)
  assert cal.threshold == math.inf and cal.p_value == 1.0
  with pytest.raises(ValueError, match="tolerance"):
    exits.calibrate_threshold(disagree, [0.9, 0.5, 0.1], tolerance=0.0, risk=0.1)
