"""Monte Carlo checks of the four theorems behind the two papers' methods.

Each theorem is simulated on its own Gaussian model and its bound is compared with what the
simulation gives:

  thm1   Yang & Xu 2020, "Rethinking the value of labels for improving class-imbalanced learning",
         §2.1, Theorem 1: the pseudo-label estimate theta_hat of the Bayes threshold lands within delta
         of (mu1+mu2)/2 + Delta(mu1-mu2)/2 with at least the stated probability.
  thm2   Yang & Xu 2020, §4.1, Theorem 2: every linear classifier sign(<theta,X> + b) with b > 0 has
         error >= 1/4 on N(0, s1^2 I) vs N(0, beta s1^2 I); the closed-form error is checked against
         simulation and minimised over (theta, b).
  thm3   Yang & Xu 2020, §4.1, Theorem 3: the classifier f_ss = sign(-Z + b) on the self-supervised
         feature Z = k1 ||X||^2 + k2 has error below the stated exponential bound with at least the
         stated probability, as d grows and as N+ shrinks.
  thm31  Liu et al. 2022, "Self-supervised learning is more robust to dataset imbalance", §3.1,
         Theorem 3.1 (proof in appendix E): on the three-class toy data the min-norm supervised
         two-layer linear features carry almost none of e2, the SSL features almost all of it.

Commands:
  python theory_sim.py all                   # all four tables
  python theory_sim.py thm1 --json           # one JSON document on stdout
  python theory_sim.py thm3 --seed 1 --trials 50000
  python theory_sim.py thm31 --datasets 10

Trial counts (defaults): 20,000 independent trials behind every empirical probability of thm1 and
thm3 and behind every simulated error of thm2, so each has standard error <= sqrt(0.25/20000)
= 0.0035. thm31 is not a probability estimate: it solves 5 independent data sets per dimension d and
reports the mean and the worst one. The counts are printed above each table and stored in the JSON.
`python theory_sim.py all` takes about 8 s (wall) on a 2-core CPU (numpy 2.4, scipy 1.17); thm31 is
7 s of it, thm1-3 together well under 1 s.

Output: a fixed-width table per theorem (parameters, empirical value, bound, holds yes/no), or with
`--json` one JSON document. "holds" for a probability is: empirical >= bound - 3*SE, SE the binomial
standard error of the empirical value (a true bound is then flagged "no" by chance with probability
below 0.14% per row). For thm2 "holds" is: the smallest closed-form error found is >= 1/4, and the
column sim=cf says whether the simulated error of that classifier is within 4 SE of the closed form.
For thm31 it is: the worst of the data sets meets the bound. Exit code 0 when every row holds, 1 when
some row does not, 2 on bad input.

Deliberate choices and differences from the papers:
 1. Constants the papers leave free. Theorem 1: mu1 = 1, mu2 = -1, sigma = 1. Theorems 2-3:
    sigma1 = 1, k1 = k2 = 1, beta = 5 (Theorem 3). The error of f_ss does not depend on sigma1, k1,
    k2 (b moves with Z), so only beta, d, N+, N-, delta matter there.
 2. Exact reductions instead of raw samples (same distribution, far fewer draws). Theorem 1: the sum
    of the n+ pseudo-positives is K mu1 + (n+ - K) mu2 + sigma sqrt(n+) G with K ~ Bin(n+, p) and G
    standard normal (likewise for the negatives with q). Theorem 3: the sum of ||X_i||^2 over the
    N+ positives is sigma1^2 chi2(N+ d), over the negatives beta sigma1^2 chi2(N- d), and given b the
    error of f_ss is computed exactly from the chi2(d) CDF. The tests check both reductions against
    raw sampling. All delta values of one (n+, n-, p, q) setting share the same 20,000 trials.
 3. Theorem 3 takes p+ = N+/(N+ + N-), i.e. the training set is a sample of P_XY, so shrinking N+
    also makes the positive class rarer at test time (p- >= 1/2 as the paper assumes).
 4. Theorem 2: the error depends on (theta, b) only through t = b / (||theta|| sigma1) (rotation
    invariance), so the search for the minimum is a 1-D search over t > 0: a log-spaced grid of 4,001
    points on [1e-4, 1e4] refined with scipy's bounded scalar minimiser. The simulated check draws
    theta as a random unit direction in d = 10 and uses b = t*.
 5. beta > 3 is not needed for Theorem 2's 1/4: for any beta > 0 and b > 0,
    err_f >= p- Phi(t / sqrt(beta)) > p-/2 >= 1/4. The table therefore also has beta = 2 rows (marked
    "beta<=3"), which hold. The assumptions whose violation does break the bound are p- >= 1/2 and
    b > 0; the tests break those. Likewise Theorem 3's bound stays valid for 1 < beta <= 3 (then only
    its first case applies), so the Theorem 3 violation tested is a threshold b that ignores the
    labels' imbalance (b = mean Z over all training data instead of the midpoint of the class means).
 6. Theorem 3.1 constants: rho = d^(-1/5), tau = d^(1/5), n1 = n2 = d (the theorem only needs
    poly(d)), n3 = floor(d^(1/5)) (the largest n3 it allows), feature dimension m = 3 (the smallest it
    allows; it is the hardest case for SSL and does not change the SL features). The O(.) constants
    are set to 1: SL passes if sum_i <w_i, e2>^2 <= d^(-1/10), SSL if ||Pi e2||^2 >= 1 - d^(-1/5).
    Those are not sharp tests of an O(.) statement; the trend over d is the point of the table.
 7. Theorem 3.1's text is OCR-damaged and partly inconsistent. Read as: rho = d^(-1/5), tau = d^(1/5),
    n3 <= d^(1/5), SL bound O(d^(-1/10)), SSL bound 1 - O(d^(-1/5)) (what the last line of the proof
    gives). Appendix E eq. (33)-(34) actually proves sum_i <w_i, e2>^2 <= ||W e2|| (not squared),
    i.e. O(d^(-1/20)); the C = 1 check uses the stated d^(-1/10), the stricter of the two.
 8. Paper 1's typesetting: Theorem 1's bound writes n-bar+- where the setup and the interpretation
    write n-tilde+-; both are read as the number of pseudo-positives / pseudo-negatives. The second
    case of Theorem 3 has an unsquared exponent d (beta-1-(1+beta)delta)/16 for the p+ term; that is
    the linear regime of the chi-square tail (deviation >= 1), not a typo, and is used as written.
    Theorem 2 is stated for b > 0 (the §4.1 text says b >= 0; at b = 0 the error is exactly 1/2).
 9. Min-norm two-layer network (Liu et al. §3.1): by their Lemma E.3 it reduces to the min-norm
    multiclass SVM min sum_k ||w_k||^2 s.t. <w_y - w_y', x> >= 1, with W_SL = Sigma^(1/2) V^T from the
    SVD W = U Sigma V^T (so W1 W1^T = W2^T W2). The SVM is solved exactly as a least-distance program
    (Lawson & Hanson 1974, ch. 23) with scipy.optimize.nnls, inside a working-set loop that adds
    violated margin constraints until none is left. SSL features: top-m eigenvectors of the
    empirical second moment M = (1/n) sum x x^T (their proof's Eckart-Young step), computed with
    scipy.linalg.eigh. The table also shows ||Pi e2||^2 for the row span of W_SL, for comparison.
10. Trials are vectorised; the only Python loops run over parameter settings and, in thm31, over the
    5 data sets (each needs its own SVM solve).
11. Run as a script, the file limits BLAS to one thread (OPENBLAS/OMP/MKL_NUM_THREADS, unless already
    set): its linear algebra is many small calls, and two BLAS threads made thm31 1.6x slower on an
    idle 2-core CPU and up to 15x slower when the other core was busy. Imported, it changes nothing.
"""
import argparse
import json
import math
import os
import sys
import time

if __name__ == "__main__":
    # The linear algebra here is many small calls, where a multi-threaded BLAS only adds
    # synchronisation: measured 1.6x slower on an idle 2-core CPU and up to 15x on a busy one.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings above)
import scipy.linalg  # noqa: E402
from scipy.optimize import minimize_scalar, nnls  # noqa: E402
from scipy.stats import chi2, norm  # noqa: E402

TRIALS = 20_000
DATASETS = 5

# ----- Paper 1, Theorem 1 (§2.1) -------------------------------------------------------------------

THM1_N = ((200, 200), (2000, 2000), (3600, 400), (3960, 40))     # (n+, n-): balanced and imbalanced
THM1_PQ = ((0.9, 0.9), (0.95, 0.7))                                # Delta = 0 and Delta = 0.25
THM1_DELTAS = (0.1, 0.2, 0.4)


def thm1_bound(delta, n_pos, n_neg, mu1, mu2, sigma):
    """Theorem 1: 1 - 2 exp(-(2 d^2 / (9 s^2)) n+ n- / (n- + n+)) - 2 exp(-8 n+ d^2 / (9 (mu1-mu2)^2))
    - 2 exp(-8 n- d^2 / (9 (mu1-mu2)^2))."""
    gap2 = (mu1 - mu2) ** 2
    return (1 - 2 * math.exp(-2 * delta ** 2 / (9 * sigma ** 2) * n_pos * n_neg / (n_neg + n_pos))
            - 2 * math.exp(-8 * n_pos * delta ** 2 / (9 * gap2))
            - 2 * math.exp(-8 * n_neg * delta ** 2 / (9 * gap2)))


def thm1_sample_theta(rng, trials, n_pos, n_neg, p, q, mu1, mu2, sigma):
    """theta_hat = (mean of the pseudo-positives + mean of the pseudo-negatives) / 2, one per trial.

    A pseudo-positive is N(mu1, s^2) with probability p (I+ ~ Bernoulli(p)), else N(mu2, s^2);
    a pseudo-negative is N(mu2, s^2) with probability q, else N(mu1, s^2) (§2.1)."""
    k_pos = rng.binomial(n_pos, p, trials)
    k_neg = rng.binomial(n_neg, q, trials)
    sum_pos = k_pos * mu1 + (n_pos - k_pos) * mu2 + sigma * math.sqrt(n_pos) * rng.standard_normal(trials)
    sum_neg = k_neg * mu2 + (n_neg - k_neg) * mu1 + sigma * math.sqrt(n_neg) * rng.standard_normal(trials)
    return 0.5 * (sum_pos / n_pos + sum_neg / n_neg)


def thm1(trials=TRIALS, seed=0, n_pairs=THM1_N, pq=THM1_PQ, deltas=THM1_DELTAS, mu1=1.0, mu2=-1.0,
         sigma=1.0, center="theorem", bound=thm1_bound):
    """Rows of P(|theta_hat - (mu1+mu2)/2 - Delta (mu1-mu2)/2| <= delta) against Theorem 1's bound.

    center="bayes" drops the Delta term (a false variant of the theorem, for the tests);
    bound replaces the bound formula (same signature as thm1_bound)."""
    rng = np.random.default_rng([seed, 1])
    rows = []
    for n_pos, n_neg in n_pairs:
        for p, q in pq:
            theta = thm1_sample_theta(rng, trials, n_pos, n_neg, p, q, mu1, mu2, sigma)
            shift = (p - q) * (mu1 - mu2) / 2 if center == "theorem" else 0.0
            dev = np.abs(theta - (mu1 + mu2) / 2 - shift)
            for delta in deltas:
                emp = float(np.mean(dev <= delta))
                se = math.sqrt(emp * (1 - emp) / trials)
                b = bound(delta, n_pos, n_neg, mu1, mu2, sigma)
                rows.append(dict(n_pos=n_pos, n_neg=n_neg, p=p, q=q, Delta=p - q, delta=delta,
                                 empirical=emp, se=se, bound=b, vacuous=b <= 0,
                                 holds=bool(emp >= b - 3 * se)))
    return rows


# ----- Paper 1, Theorem 2 (§4.1) -------------------------------------------------------------------

THM2_BETAS = (2.0, 3.5, 10.0, 100.0, 1e4)
THM2_P_POS = (0.5, 0.2)
THM2_DIM = 10


def thm2_error(theta_norm, b, sigma1, beta, p_pos):
    """Theorem 2: err_f = p+ Phi(-b / (||theta|| s1)) + p- Phi(b / (||theta|| sqrt(beta) s1))."""
    return (p_pos * norm.cdf(-b / (theta_norm * sigma1))
            + (1 - p_pos) * norm.cdf(b / (theta_norm * np.sqrt(beta) * sigma1)))


def thm2_search(beta, p_pos, allow_negative_b=False):
    """Minimise the closed-form error over b / (||theta|| s1); returns (t*, err*)."""
    grid = np.logspace(-4, 4, 4001)
    if allow_negative_b:
        grid = np.concatenate([-grid[::-1], grid])
    errs = thm2_error(1.0, grid, 1.0, beta, p_pos)
    i = int(np.argmin(errs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(lambda t: thm2_error(1.0, t, 1.0, beta, p_pos), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-10})
    if res.fun < errs[i]:
        return float(res.x), float(res.fun)
    return float(grid[i]), float(errs[i])


def thm2_simulate(rng, trials, theta, b, sigma1, beta, p_pos):
    """Error rate of sign(<theta, X> + b) on `trials` fresh draws from the §4.1 mixture."""
    y_pos = rng.random(trials) < p_pos
    scale = np.where(y_pos, sigma1, math.sqrt(beta) * sigma1)
    x = rng.standard_normal((trials, len(theta))) * scale[:, None]
    return float(np.mean((x @ theta + b > 0) != y_pos))


def thm2(trials=TRIALS, seed=0, betas=THM2_BETAS, p_pos=THM2_P_POS, sigma1=1.0, dim=THM2_DIM,
         allow_negative_b=False):
    """Rows of the smallest closed-form error over linear classifiers with b > 0 against 1/4, with a
    simulation of the minimising classifier. allow_negative_b lets the search leave b > 0 (tests)."""
    rng = np.random.default_rng([seed, 2])
    rows = []
    for beta in betas:
        for pp in p_pos:
            t, err_min = thm2_search(beta, pp, allow_negative_b)
            theta = rng.standard_normal(dim)
            theta /= np.linalg.norm(theta)
            b = t * sigma1
            err_sim = thm2_simulate(rng, trials, theta, b, sigma1, beta, pp)
            se = math.sqrt(err_sim * (1 - err_sim) / trials)
            rows.append(dict(beta=beta, p_pos=pp, t_star=t, err_closed=err_min, empirical=err_sim,
                             se=se, bound=0.25, holds=bool(err_min >= 0.25),
                             sim_agrees=bool(abs(err_sim - err_min) <= 4 * se),
                             note="beta<=3" if beta <= 3 else ""))
    return rows


# ----- Paper 1, Theorem 3 (§4.1) -------------------------------------------------------------------

THM3_SETTINGS = ((10, 100, 100), (50, 100, 100), (200, 100, 100), (1000, 100, 100),   # d grows
                 (200, 1000, 1000), (200, 100, 1000), (200, 10, 1000), (200, 1, 1000))  # N+ shrinks
THM3_DELTAS = (0.2, 0.5)
THM3_BETA = 5.0


def thm3_err_bound(delta, d, beta, p_pos):
    """Theorem 3, with c = beta - 1 - (1 + beta) delta:
    err <= p+ exp(-d c^2 / 32) + p- exp(-d c^2 / (32 beta^2))  if delta in [(beta-3)/(beta+1), (beta-1)/(beta+1));
    err <= p+ exp(-d c / 16)   + p- exp(-d c^2 / (32 beta^2))  if delta in (0, (beta-3)/(beta+1))."""
    if not 0 < delta < (beta - 1) / (beta + 1):
        raise ValueError(f"Theorem 3 needs 0 < delta < (beta-1)/(beta+1) = {(beta - 1) / (beta + 1):.3f}")
    c = beta - 1 - (1 + beta) * delta
    pos = math.exp(-d * c / 16) if delta < (beta - 3) / (beta + 1) else math.exp(-d * c ** 2 / 32)
    return p_pos * pos + (1 - p_pos) * math.exp(-d * c ** 2 / (32 * beta ** 2))


def thm3_prob_bound(delta, d, n_pos, n_neg):
    """Theorem 3: probability at least 1 - 2 exp(-N- d delta^2 / 8) - 2 exp(-N+ d delta^2 / 8)."""
    return 1 - 2 * math.exp(-n_neg * d * delta ** 2 / 8) - 2 * math.exp(-n_pos * d * delta ** 2 / 8)


def thm3_sample_b(rng, trials, d, n_pos, n_neg, beta, sigma1=1.0, k1=1.0, k2=1.0, b_rule="midpoint"):
    """The threshold b of f_ss, one per trial. midpoint (the theorem): b = (mean Z over Y=+1 + mean Z
    over Y=-1) / 2; pooled (a label-biased variant, for the tests): b = mean Z over all data."""
    s_pos = sigma1 ** 2 * rng.chisquare(n_pos * d, trials)          # sum of ||X_i||^2, Y_i = +1
    s_neg = beta * sigma1 ** 2 * rng.chisquare(n_neg * d, trials)   # sum of ||X_i||^2, Y_i = -1
    if b_rule == "midpoint":
        return k1 * (s_pos / n_pos + s_neg / n_neg) / 2 + k2
    if b_rule == "pooled":
        return k1 * (s_pos + s_neg) / (n_pos + n_neg) + k2
    raise ValueError(f"unknown b_rule {b_rule!r}")


def thm3_error(b, d, beta, p_pos, sigma1=1.0, k1=1.0, k2=1.0):
    """err of f_ss(X) = sign(-Z + b): p+ P(Z > b | Y=+1) + p- P(Z < b | Y=-1), with
    ||X||^2 / s1^2 ~ chi2(d) given Y=+1 and ||X||^2 / (beta s1^2) ~ chi2(d) given Y=-1."""
    r = (np.asarray(b) - k2) / k1
    return p_pos * chi2.sf(r / sigma1 ** 2, d) + (1 - p_pos) * chi2.cdf(r / (beta * sigma1 ** 2), d)


def thm3(trials=TRIALS, seed=0, settings=THM3_SETTINGS, deltas=THM3_DELTAS, beta=THM3_BETA,
         b_rule="midpoint"):
    """Rows of P(err_fss <= Theorem 3's error bound) against its probability bound."""
    rng = np.random.default_rng([seed, 3])
    rows = []
    for d, n_pos, n_neg in settings:
        p_pos = n_pos / (n_pos + n_neg)
        err = thm3_error(thm3_sample_b(rng, trials, d, n_pos, n_neg, beta, b_rule=b_rule), d, beta, p_pos)
        for delta in deltas:
            eb = thm3_err_bound(delta, d, beta, p_pos)
            emp = float(np.mean(err <= eb))
            se = math.sqrt(emp * (1 - emp) / trials)
            pb = thm3_prob_bound(delta, d, n_pos, n_neg)
            rows.append(dict(d=d, n_pos=n_pos, n_neg=n_neg, p_pos=p_pos, beta=beta, delta=delta,
                             case=2 if delta < (beta - 3) / (beta + 1) else 1,
                             mean_err=float(np.mean(err)), err_bound=eb, empirical=emp, se=se,
                             bound=pb, vacuous=pb <= 0, holds=bool(emp >= pb - 3 * se)))
    return rows


# ----- Paper 2, Theorem 3.1 (§3.1, appendix E) -----------------------------------------------------

THM31_DIMS = (100, 200, 400, 800)


def thm31_data(rng, d, n_freq, n_rare, tau, rho):
    """§3.1: class 1 x = e1 - q tau e2 + rho xi, class 2 x = -e1 - q tau e2 + rho xi, class 3
    x = e2 + rho xi, q ~ U{0, 1}, xi ~ N(0, I_d); e1, e2 are the first two coordinate axes."""
    y = np.repeat([0, 1, 2], [n_freq, n_freq, n_rare])
    x = rho * rng.standard_normal((len(y), d))
    q = rng.integers(0, 2, len(y)) * (y < 2)
    x[:, 0] += np.where(y == 0, 1.0, np.where(y == 1, -1.0, 0.0))
    x[:, 1] += np.where(y == 2, 1.0, -tau * q)
    return x, y


def multiclass_svm(x, y, classes=3, chunk=100, max_rounds=500):
    """min sum_k ||w_k||^2 s.t. <w_y - w_y', x> >= 1 for every example and y' != y; returns W (K x d).

    Least-distance program min ||w|| s.t. G w >= 1 (Lawson & Hanson ch. 23): u = NNLS([G^T; 1^T],
    e_last), w = G^T u / (1 - sum u), solved on a working set of constraints that grows by the most
    violated ones until every margin is >= 1."""
    n, d = x.shape
    blocks = []
    for shift in range(1, classes):
        g = np.zeros((n, classes, d))
        g[np.arange(n), y] = x
        g[np.arange(n), (y + shift) % classes] -= x
        blocks.append(g.reshape(n, classes * d))
    G = np.vstack(blocks)
    active = np.zeros(len(G), bool)
    active[np.argsort(np.einsum("ij,ij->i", G, G))[:chunk]] = True
    for _ in range(max_rounds):
        idx = np.flatnonzero(active)
        E = np.vstack([G[idx].T, np.ones((1, len(idx)))])
        if len(idx) < E.shape[0]:
            Q, R = np.linalg.qr(E)
            u, _ = nnls(R, Q[-1], maxiter=50 * len(idx))
        else:
            f = np.zeros(E.shape[0])
            f[-1] = 1.0
            u, _ = nnls(E, f, maxiter=50 * len(idx))
        if 1 - u.sum() <= 1e-12:
            raise RuntimeError("the multiclass SVM is infeasible: the data are not linearly separable")
        w = G[idx].T @ u / (1 - u.sum())
        margins = G @ w
        violated = np.flatnonzero((margins < 1 - 1e-9) & ~active)
        if len(violated) == 0:
            return w.reshape(classes, d)
        active[violated[np.argsort(margins[violated])[:chunk]]] = True
    raise RuntimeError("the multiclass SVM working set did not converge")


def thm31_sl(W):
    """Lemma E.3: the min-norm factorisation W = W2 W1 has W1 = Sigma^(1/2) V^T; returns
    sum_i <w_i, e2>^2 over the rows of W_SL = W1, and ||Pi e2||^2 for the row span of W_SL."""
    _, s, vt = np.linalg.svd(W, full_matrices=False)
    keep = s > 1e-9 * s[0]
    return float(np.sum(s * vt[:, 1] ** 2)), float(np.sum(vt[keep, 1] ** 2))


def thm31_ssl(x, m=3):
    """||Pi e2||^2, Pi the projection onto the top-m eigenvectors of M = (1/n) sum x x^T."""
    d = x.shape[1]
    _, vecs = scipy.linalg.eigh(x.T @ x / len(x), subset_by_index=[d - m, d - 1])
    return float(np.sum(vecs[1] ** 2))


def thm31(datasets=DATASETS, seed=0, dims=THM31_DIMS, n_freq=None, n_rare=None, tau_power=0.2, m=3):
    """Rows of the e2 capture of SL and SSL features against Theorem 3.1's bounds (O(.) constants 1).

    n_freq (default d), n_rare (default floor(d^(1/5))) and tau = d^tau_power can be changed to break
    the theorem's assumptions (tests)."""
    rng = np.random.default_rng([seed, 31])
    rows = []
    for d in dims:
        n1 = d if n_freq is None else n_freq
        n3 = int(math.floor(d ** 0.2 + 1e-9)) if n_rare is None else n_rare
        rho, tau = d ** -0.2, d ** tau_power
        sl, sl_span, ssl = [], [], []
        for _ in range(datasets):
            x, y = thm31_data(rng, d, n1, n3, tau, rho)
            a, b = thm31_sl(multiclass_svm(x, y))
            sl.append(a)
            sl_span.append(b)
            ssl.append(thm31_ssl(x, m))
        common = dict(d=d, n1=n1, n3=n3, rho=rho, tau=tau, datasets=datasets)
        rows.append(dict(common, method="SL", quantity="sum_i <w_i,e2>^2", empirical=float(np.mean(sl)),
                         worst=float(np.max(sl)), bound=d ** -0.1, span_capture=float(np.mean(sl_span)),
                         holds=bool(np.max(sl) <= d ** -0.1)))
        rows.append(dict(common, method="SSL", quantity="||Pi e2||^2", empirical=float(np.mean(ssl)),
                         worst=float(np.min(ssl)), bound=1 - d ** -0.2, span_capture=float(np.mean(ssl)),
                         holds=bool(np.min(ssl) >= 1 - d ** -0.2)))
    return rows


# ----- tables, JSON, command line ------------------------------------------------------------------

THEOREMS = {
    "thm1": dict(
        title="Paper 1 (Yang & Xu 2020) Theorem 1, §2.1: pseudo-label estimate of (mu1+mu2)/2",
        statement="P(|theta_hat - (mu1+mu2)/2 - Delta(mu1-mu2)/2| <= delta) >= 1 - 2e^{-2d^2 n+n-/(9s^2(n++n-))}"
                  " - 2e^{-8n+d^2/(9(mu1-mu2)^2)} - 2e^{-8n-d^2/(9(mu1-mu2)^2)};  mu1=1, mu2=-1, sigma=1",
        columns=[("n_pos", "n+", "{:d}"), ("n_neg", "n-", "{:d}"), ("p", "p", "{:.2f}"), ("q", "q", "{:.2f}"),
                 ("delta", "delta", "{:.2f}"), ("empirical", "P_emp", "{:.4f}"), ("se", "SE", "{:.4f}"),
                 ("bound", "bound", "{:.4f}"), ("holds", "holds", None)]),
    "thm2": dict(
        title="Paper 1 (Yang & Xu 2020) Theorem 2, §4.1: linear classifiers with b > 0 on raw X",
        statement="min over theta, b>0 of err_f = p+ Phi(-b/(|theta|s1)) + p- Phi(b/(|theta|sqrt(beta)s1)) >= 1/4;"
                  f"  s1=1, simulated in d={THM2_DIM} at the minimiser",
        columns=[("beta", "beta", "{:g}"), ("p_pos", "p+", "{:.2f}"), ("t_star", "b*/|theta|", "{:.3g}"),
                 ("err_closed", "err_min", "{:.4f}"), ("empirical", "err_sim", "{:.4f}"), ("se", "SE", "{:.4f}"),
                 ("sim_agrees", "sim=cf", None), ("bound", "bound", "{:.2f}"), ("holds", "holds", None),
                 ("note", "note", "{}")]),
    "thm3": dict(
        title="Paper 1 (Yang & Xu 2020) Theorem 3, §4.1: f_ss = sign(-Z + b), Z = k1||X||^2 + k2",
        statement="P(err_fss <= err_bound(delta)) >= 1 - 2e^{-N- d delta^2/8} - 2e^{-N+ d delta^2/8};"
                  f"  beta={THM3_BETA:g}, p+ = N+/N, case 1/2 = branch of the bound",
        columns=[("d", "d", "{:d}"), ("n_pos", "N+", "{:d}"), ("n_neg", "N-", "{:d}"), ("delta", "delta", "{:.2f}"),
                 ("case", "case", "{:d}"), ("mean_err", "mean_err", "{:.3g}"), ("err_bound", "err_bound", "{:.3g}"),
                 ("empirical", "P_emp", "{:.4f}"), ("se", "SE", "{:.4f}"), ("bound", "bound", "{:.4f}"),
                 ("holds", "holds", None)]),
    "thm31": dict(
        title="Paper 2 (Liu et al. 2022) Theorem 3.1, §3.1 + appendix E: e2 captured by SL vs SSL features",
        statement="SL: sum_i <w_i,e2>^2 <= d^(-1/10);  SSL: ||Pi e2||^2 >= 1 - d^(-1/5)  (O(.) constants = 1);"
                  "  rho=d^(-1/5), tau=d^(1/5), n1=n2=d, n3=floor(d^(1/5)), m=3",
        columns=[("d", "d", "{:d}"), ("n1", "n1=n2", "{:d}"), ("n3", "n3", "{:d}"), ("method", "method", "{}"),
                 ("quantity", "quantity", "{}"), ("empirical", "mean", "{:.4f}"), ("worst", "worst", "{:.4f}"),
                 ("bound", "bound", "{:.4f}"), ("holds", "holds", None), ("span_capture", "||Pi e2||^2", "{:.4f}")]),
}
RUNNERS = {"thm1": thm1, "thm2": thm2, "thm3": thm3, "thm31": thm31}


def run(names, trials=TRIALS, seed=0, datasets=DATASETS):
    """The JSON document: {"seed", "trials", "datasets", "theorems": {name: {...rows}}, "all_hold"}."""
    doc = dict(seed=seed, trials=trials, datasets=datasets, theorems={})
    for name in names:
        if name == "thm31":
            rows = thm31(datasets=datasets, seed=seed)
            counts = f"{datasets} data sets per d"
        else:
            rows = RUNNERS[name](trials=trials, seed=seed)
            counts = f"{trials} trials per row"
        doc["theorems"][name] = dict(title=THEOREMS[name]["title"], statement=THEOREMS[name]["statement"],
                                     counts=counts, rows=rows, all_hold=all(r["holds"] for r in rows))
    doc["all_hold"] = all(t["all_hold"] for t in doc["theorems"].values())
    return doc


def format_table(name, result):
    spec = THEOREMS[name]["columns"]
    cells = []
    for r in result["rows"]:
        line = []
        for key, _, fmt in spec:
            v = r[key]
            if key == "holds":
                line.append(("yes" if v else "NO") + ("*" if r.get("vacuous") else ""))
            elif fmt is None:
                line.append("yes" if v else "NO")
            else:
                line.append(fmt.format(v))
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(spec)]
    out = [result["title"], "  " + result["statement"], f"  {result['counts']}", ""]
    out.append("  ".join(h.rjust(w) for (_, h, _), w in zip(spec, widths)))
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    if any(r.get("vacuous") for r in result["rows"]):
        out.append("  * bound <= 0: holds trivially")
    out.append(f"  all rows hold: {'yes' if result['all_hold'] else 'NO'}")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Monte Carlo checks of Theorems 1-3 of Yang & Xu 2020 "
                                                 "and Theorem 3.1 of Liu et al. 2022.")
    parser.add_argument("theorem", choices=["thm1", "thm2", "thm3", "thm31", "all"])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--trials", type=int, default=TRIALS,
                        help=f"trials per probability / simulated error, thm1-3 (default {TRIALS})")
    parser.add_argument("--datasets", type=int, default=DATASETS,
                        help=f"data sets per dimension d, thm31 (default {DATASETS})")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    for flag, value, low in (("--trials", args.trials, 1), ("--datasets", args.datasets, 1), ("--seed", args.seed, 0)):
        if value < low:
            print(f"theory_sim.py: error: {flag} must be an integer >= {low}, got {value}", file=sys.stderr)
            sys.exit(2)
    names = ["thm1", "thm2", "thm3", "thm31"] if args.theorem == "all" else [args.theorem]
    start = time.perf_counter()
    doc = run(names, trials=args.trials, seed=args.seed, datasets=args.datasets)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"seed {args.seed}\n")
        print("\n\n".join(format_table(n, doc["theorems"][n]) for n in names))
        print(f"\nall theorems hold: {'yes' if doc['all_hold'] else 'NO'}   ({time.perf_counter() - start:.1f} s)")
    sys.exit(0 if doc["all_hold"] else 1)


if __name__ == "__main__":
    main()
