"""theory_sim.py: every bound holds at default settings, violated assumptions are flagged, the exact
reductions agree with raw sampling, the SVM is the min-norm one, results depend only on the seed."""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import math
import subprocess

import numpy as np
import pytest
from scipy import stats
from scipy.optimize import minimize

import theory_sim as T

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = 4000


# ----- Theorem 1 -----------------------------------------------------------------------------------

def test_thm1_holds_at_defaults():
    rows = T.thm1(trials=FAST)
    assert any(not r["vacuous"] for r in rows)
    assert all(r["holds"] for r in rows)


def test_thm1_balanced_unlabeled_data_is_more_accurate():
    rows = {(r["n_pos"], r["n_neg"], r["p"], r["delta"]): r["empirical"] for r in T.thm1(trials=FAST)}
    for p in (0.9, 0.95):
        for delta in (0.1, 0.2):
            assert rows[(2000, 2000, p, delta)] > rows[(3960, 40, p, delta)]
    assert T.thm1_bound(0.2, 1000, 1000, 1, -1, 1) > T.thm1_bound(0.2, 1800, 200, 1, -1, 1)


def test_thm1_reduction_matches_raw_samples():
    n_pos, n_neg, p, q, mu1, mu2, sigma, trials = 30, 10, 0.8, 0.6, 2.0, -0.5, 1.5, 5000
    rng = np.random.default_rng(11)
    right_pos = rng.random((trials, n_pos)) < p
    right_neg = rng.random((trials, n_neg)) < q
    x_pos = np.where(right_pos, mu1, mu2) + sigma * rng.standard_normal((trials, n_pos))
    x_neg = np.where(right_neg, mu2, mu1) + sigma * rng.standard_normal((trials, n_neg))
    raw = 0.5 * (x_pos.mean(1) + x_neg.mean(1))
    fast = T.thm1_sample_theta(np.random.default_rng(12), trials, n_pos, n_neg, p, q, mu1, mu2, sigma)
    assert stats.ks_2samp(raw, fast).pvalue > 1e-3
    target = (mu1 + mu2) / 2 + (p - q) * (mu1 - mu2) / 2
    assert abs(fast.mean() - target) < 4 * fast.std() / math.sqrt(trials)


def test_thm1_false_statements_are_flagged():
    no_shift = T.thm1(trials=FAST, center="bayes")
    assert not all(r["holds"] for r in no_shift)
    assert all(r["holds"] for r in no_shift if r["Delta"] == 0)
    assert any(not r["holds"] and not r["vacuous"] for r in no_shift if r["Delta"] != 0)
    certain = T.thm1(trials=FAST, bound=lambda *args: 1.0)
    assert not all(r["holds"] for r in certain)


# ----- Theorem 2 -----------------------------------------------------------------------------------

def test_thm2_holds_and_simulation_matches_closed_form():
    rows = T.thm2(trials=FAST)
    assert all(r["holds"] for r in rows)
    assert all(r["sim_agrees"] for r in rows)


def test_thm2_closed_form_against_raw_simulation():
    rng = np.random.default_rng(5)
    beta, p_pos, b, sigma1, n = 4.0, 0.3, 0.9, 1.3, 60_000
    theta = rng.standard_normal(5)
    theta *= 0.7 / np.linalg.norm(theta)
    y_pos = rng.random(n) < p_pos
    x = rng.standard_normal((n, 5)) * np.where(y_pos, sigma1, math.sqrt(beta) * sigma1)[:, None]
    err = np.mean(np.sign(x @ theta + b) != np.where(y_pos, 1, -1))
    closed = T.thm2_error(0.7, b, sigma1, beta, p_pos)
    assert abs(err - closed) < 4 * math.sqrt(closed * (1 - closed) / n)


@pytest.mark.parametrize("beta", [1.5, 4.0, 50.0])
def test_thm2_search_finds_the_stationary_point(beta):
    # p+ = p- = 1/2: d err/dt = 0 <=> phi(t) = phi(t/sqrt(beta))/sqrt(beta) <=> t^2 = beta ln(beta)/(beta-1)
    t_star = math.sqrt(beta * math.log(beta) / (beta - 1))
    t, err = T.thm2_search(beta, 0.5)
    assert t == pytest.approx(t_star, rel=1e-4)
    assert err == pytest.approx(float(T.thm2_error(1.0, t_star, 1.0, beta, 0.5)), abs=1e-9)


def test_thm2_violated_assumptions_are_detected():
    majority_positive = T.thm2(trials=FAST, p_pos=(0.8,))
    assert not any(r["holds"] for r in majority_positive)
    assert all(r["err_closed"] < 0.25 for r in majority_positive)
    negative_b = T.thm2(trials=FAST, p_pos=(0.2,), allow_negative_b=True)
    assert not any(r["holds"] for r in negative_b)
    assert all(r["t_star"] < 0 for r in negative_b)


def test_thm2_quarter_does_not_need_beta_above_3():
    # err >= p- Phi(t / sqrt(beta)) > p- / 2 >= 1/4 for every beta > 0, so beta <= 3 must still hold
    rows = T.thm2(trials=FAST, betas=(0.5, 1.0, 2.0, 3.0), p_pos=(0.5, 0.3))
    assert all(r["holds"] and r["sim_agrees"] for r in rows)


# ----- Theorem 3 -----------------------------------------------------------------------------------

def test_thm3_holds_at_defaults_and_error_decays_in_d():
    rows = T.thm3(trials=FAST)
    assert all(r["holds"] for r in rows)
    errs = [r["mean_err"] for r in rows if r["n_pos"] == r["n_neg"] == 100 and r["delta"] == 0.2]
    assert len(errs) == 4 and all(a > b for a, b in zip(errs, errs[1:]))


def test_thm3_reductions_match_raw_samples():
    d, n_pos, n_neg, beta, sigma1, k1, k2, trials = 4, 3, 7, 5.0, 1.5, 2.0, 0.5, 5000
    rng = np.random.default_rng(21)
    z_pos = k1 * np.sum((sigma1 * rng.standard_normal((trials, n_pos, d))) ** 2, -1) + k2
    z_neg = k1 * np.sum((math.sqrt(beta) * sigma1 * rng.standard_normal((trials, n_neg, d))) ** 2, -1) + k2
    raw = 0.5 * (z_pos.mean(1) + z_neg.mean(1))
    fast = T.thm3_sample_b(np.random.default_rng(22), trials, d, n_pos, n_neg, beta, sigma1, k1, k2)
    assert stats.ks_2samp(raw, fast).pvalue > 1e-3

    b, p_pos, n = float(np.median(raw)), 0.3, 200_000
    y_pos = rng.random(n) < p_pos
    x = rng.standard_normal((n, d)) * np.where(y_pos, sigma1, math.sqrt(beta) * sigma1)[:, None]
    predict_pos = -(k1 * np.sum(x ** 2, 1) + k2) + b > 0
    err = np.mean(predict_pos != y_pos)
    exact = float(T.thm3_error(b, d, beta, p_pos, sigma1, k1, k2))
    assert abs(err - exact) < 4 * math.sqrt(exact * (1 - exact) / n)


def test_thm3_bound_branches_and_delta_range():
    beta, d, p_pos = 5.0, 40, 0.2
    for delta in ((beta - 3) / (beta + 1), 0.5):     # first case, left end included
        c = beta - 1 - (1 + beta) * delta
        assert T.thm3_err_bound(delta, d, beta, p_pos) == pytest.approx(
            p_pos * math.exp(-d * c ** 2 / 32) + (1 - p_pos) * math.exp(-d * c ** 2 / (32 * beta ** 2)))
    c = beta - 1 - (1 + beta) * 0.1                   # second case
    assert T.thm3_err_bound(0.1, d, beta, p_pos) == pytest.approx(
        p_pos * math.exp(-d * c / 16) + (1 - p_pos) * math.exp(-d * c ** 2 / (32 * beta ** 2)))
    for bad in (0.0, (beta - 1) / (beta + 1), 0.9):
        with pytest.raises(ValueError):
            T.thm3_err_bound(bad, d, beta, p_pos)


def test_thm3_bound_also_holds_for_beta_between_1_and_3():
    beta = 2.0                                        # only the first case of the bound applies
    rows = T.thm3(trials=FAST, beta=beta, deltas=(0.1, 0.3))
    assert all(r["case"] == 1 for r in rows)
    assert all(r["holds"] for r in rows)


def test_thm3_label_biased_threshold_is_flagged():
    settings = ((1000, 10, 1000),)
    assert all(r["holds"] for r in T.thm3(trials=FAST, settings=settings))
    pooled = T.thm3(trials=FAST, settings=settings, b_rule="pooled")
    assert not any(r["holds"] for r in pooled)
    assert all(not r["vacuous"] and r["mean_err"] > r["err_bound"] for r in pooled)


# ----- Theorem 3.1 ---------------------------------------------------------------------------------

def test_multiclass_svm_matches_a_generic_solver():
    rng = np.random.default_rng(3)
    x, y = T.thm31_data(rng, 12, 8, 3, 1.5, 0.4)
    W = T.multiclass_svm(x, y, chunk=5)             # small chunks: the working set has to grow
    assert np.allclose(W, T.multiclass_svm(x, y), atol=1e-8)
    G = np.array([np.outer(np.eye(3)[yi] - np.eye(3)[k], xi).ravel()
                  for xi, yi in zip(x, y) for k in range(3) if k != yi])
    assert np.min(G @ W.ravel()) > 1 - 1e-7
    ref = minimize(lambda w: w @ w, np.zeros(G.shape[1]), jac=lambda w: 2 * w, method="SLSQP",
                   constraints=[dict(type="ineq", fun=lambda w: G @ w - 1, jac=lambda w: G)],
                   options=dict(ftol=1e-12, maxiter=1000))
    assert ref.success
    assert np.sum(W ** 2) == pytest.approx(ref.fun, rel=1e-5)
    assert np.allclose(W.ravel(), ref.x, atol=1e-4)


def test_thm31_holds_and_ssl_beats_sl():
    rows = T.thm31(datasets=2, dims=(60, 120))
    assert all(r["holds"] for r in rows)
    for d in (60, 120):
        sl, ssl = (next(r for r in rows if r["d"] == d and r["method"] == m) for m in ("SL", "SSL"))
        assert ssl["span_capture"] > 0.9 > 0.3 > sl["span_capture"]


def test_thm31_violated_assumptions_are_detected():
    balanced = T.thm31(datasets=1, dims=(100,), n_rare=100)         # rare class not rare
    assert not next(r for r in balanced if r["method"] == "SL")["holds"]
    small_tau = T.thm31(datasets=1, dims=(100,), tau_power=-0.5)    # e2 barely present in frequent classes
    assert not next(r for r in small_tau if r["method"] == "SSL")["holds"]


# ----- seeds and command line ----------------------------------------------------------------------

def test_same_seed_same_json_and_other_seed_differs():
    names = ["thm1", "thm2", "thm3"]
    a = json.dumps(T.run(names, trials=2000, seed=3))
    assert a == json.dumps(T.run(names, trials=2000, seed=3))
    b = json.loads(json.dumps(T.run(names, trials=2000, seed=4)))
    a = json.loads(a)
    for name in ("thm1", "thm2", "thm3"):
        ea = [r["empirical"] if name != "thm3" else r["mean_err"] for r in a["theorems"][name]["rows"]]
        eb = [r["empirical"] if name != "thm3" else r["mean_err"] for r in b["theorems"][name]["rows"]]
        assert ea != eb
    s31 = [T.thm31(datasets=1, dims=(60,), seed=s) for s in (7, 7, 8)]
    assert s31[0] == s31[1] and s31[0] != s31[2]


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "theory_sim.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_json_smoke():
    out = _cli("all", "--json", "--trials", "2000", "--datasets", "1", "--seed", "2")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["seed"] == 2 and doc["trials"] == 2000 and doc["all_hold"] is True
    assert sorted(doc["theorems"]) == ["thm1", "thm2", "thm3", "thm31"]
    for t in doc["theorems"].values():
        assert t["rows"] and all({"empirical", "bound", "holds"} <= set(r) for r in t["rows"])


def test_cli_table_and_bad_input():
    out = _cli("thm2", "--trials", "2000")
    assert out.returncode == 0 and "holds" in out.stdout and "2000 trials per row" in out.stdout
    for args in (["thm1", "--trials", "-3"], ["thm1", "--datasets", "0"], ["thm7"]):
        bad = _cli(*args)
        assert bad.returncode == 2
        assert "Traceback" not in bad.stderr and "error" in bad.stderr
    assert len(_cli("thm1", "--trials", "-3").stderr.strip().splitlines()) == 1
