"""The papers' figures from this project's run files, as PNG (--svg: and SVG) in --out (default runs/figures).

    python plots.py fig1 [--runs runs/paper2-fig1]      # paper 2 Figs. 1-2, CIFAR-10: A(n, 1), A(n, r), Δ against n
    python plots.py fig2 fig3 [--runs runs/repro-0.02]  # paper 1 Figs. 2-3: test error against relevance, ρ_U
    python plots.py theory [--theory-json FILE]         # paper 2 Theorem 3.1 (the toy setting of Fig. 3) against d
    python plots.py subsets [--train-list L --lt-list LT]   # paper 2 Fig. 5: class counts of the pre-training sets
    python plots.py run runs/ldam_drw-cifar10-0.01-0    # one run: loss and test accuracy per epoch, per-class acc.

fig1 reads `bash reproduce.sh paper2-fig1`'s probes (<runs>/{id,ood}/<method>/<cell>/s<seed>/final.json), paired by
eval_linear.gap_rows; fig2 / fig3 the self_training.py runs of `RHO=0.02 bash reproduce.sh fig2 fig3` (<runs>/fig2-r*,
fig3-u*); theory runs theory_sim.thm31 here or reads `python theory_sim.py thm31 --json > FILE`; subsets counts
datasets_lt's own subsets on labels alone; run reads metrics.jsonl and final.json. Error bars: sample std over seeds.
Paper numbers are drawn only where the paper's text gives them. matplotlib (requirements-plots.txt) is for this file.
"""
import argparse
import glob
import json
import os
import sys
from types import SimpleNamespace

import numpy as np

import datasets_lt as D
import eval_linear as E
import run_lt as R
import theory_sim as T

FIGURES = ("fig1", "fig2", "fig3", "theory", "subsets", "run")
NAMES = {"ldam_drw[he]:ce-none": "SL", "simsiam_rwsam+sgd": "SimSiam", "moco_ssp[paper2]+sgd": "MoCo v2"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only); without matplotlib, one line and exit 2."""
    try:
        import matplotlib
    except ImportError:
        R.fail("plots.py needs matplotlib: pip install matplotlib (or pip install -r requirements-plots.txt)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.constrained_layout.use": True, "legend.fontsize": 7})
    return plt


def series(ax, store, label, x, y, err=None, **kw):
    """Draw one series (with error bars where err is given; None counts as 0) and record in store[label] exactly
    the arrays drawn, so that a caller (and the tests) can check them against the run files."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    err = None if err is None else np.asarray([0.0 if e is None else e for e in err], float)
    kw.setdefault("marker", "o")
    ax.errorbar(x, y, yerr=err, label=label, capsize=3, **kw)
    store[label] = {"x": x.tolist(), "y": y.tolist(), "err": None if err is None else err.tolist()}


def spread(values):
    """Mean and sample std (0 for a single value)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        R.fail(f"cannot read '{path}' ({e.__class__.__name__}: {e})")


def caption(fig, text):
    fig.text(0.5, -0.01, text, ha="center", va="top", fontsize=8, wrap=True)


# ----- paper 2 Figs. 1-2: A(n, 1), A(n, r) and Δ(n, r) of Eq. (1) against n ------------------------

def fig1(runs, plt):
    """One figure per evaluation (ID probe, OOD probe): a row per r, a column per method with A(n, 1) and A(n, r)
    (the gap between them shaded: Δ^SL or Δ^SSL), and a last column with every method's Δ(n, r) in %."""
    paths = sorted(glob.glob(os.path.join(runs, "id", "*", "*", "s*", "final.json")) +
                   glob.glob(os.path.join(runs, "ood", "*", "*", "s*", "final.json")))
    if not paths:
        R.fail(f"no probe final.json under {runs}/id or {runs}/ood; run bash reproduce.sh paper2-fig1 or pass --runs")
    rows, unpaired = E.gap_rows([E.read_result(p) for p in paths])
    for key, why in unpaired:
        print(f"note: eval={key[0]} method={key[2]} n={key[5]}: {why}; not drawn", file=sys.stderr)
    if not rows:
        R.fail(f"no balanced and imbalanced probe of equal n under {runs}: Δ needs both")
    drawn = []
    for ev in sorted({x["eval"] for x in rows}):
        sel = [x for x in rows if x["eval"] == ev]
        rs, methods = sorted({x["r"] for x in sel}, reverse=True), sorted({(x["kind"], x["method"]) for x in sel})
        fig, axes = plt.subplots(len(rs), len(methods) + 1, figsize=(4.2 * (len(methods) + 1), 3.4 * len(rs)),
                                 squeeze=False)
        data = {}
        for i, r in enumerate(rs):
            for j, (kind, m) in enumerate(methods):
                ax, cell = axes[i, j], sorted((x for x in sel if (x["r"], x["method"]) == (r, m)), key=lambda x: x["n"])
                if not cell:                                       # this method has no pair at this r
                    ax.set_axis_off()
                    continue
                n, store, name = [x["n"] for x in cell], data.setdefault(f"{m} r={r:.4g}", {}), NAMES.get(m, m)
                series(ax, store, "A(n,1)", n, [x["A_balanced"] for x in cell], [x["A_balanced_std"] for x in cell])
                series(ax, store, "A(n,r)", n, [x["A_imbalanced"] for x in cell], [x["A_imbalanced_std"] for x in cell])
                ax.fill_between(n, store["A(n,r)"]["y"], store["A(n,1)"]["y"], alpha=0.2, label=f"Δ^{kind} (shaded)")
                ax.set(title=f"{name} ({kind}), r = {r:.4g}", xlabel="pre-training examples n", ylabel="test top-1 %")
                ax.legend()
                series(axes[i, -1], data.setdefault(f"delta r={r:.4g}", {}), f"Δ^{kind}: {name}", n,
                       [100 * x["delta"] for x in cell], [x["delta_std"] and 100 * x["delta_std"] for x in cell])
            axes[i, -1].axhline(0, color="grey", lw=0.5)
            axes[i, -1].set(title=f"Δ(n, r), r = {r:.4g} (lower: more robust)", xlabel="pre-training examples n",
                            ylabel="Δ %")
            axes[i, -1].legend()
        what = "ID: linear probe on the full training set" if ev.startswith("linear:") else f"OOD: {ev} probe"
        fig.suptitle(f"Paper 2 Fig. 2 (A) and Fig. 1 (Δ) on {sel[0]['dataset']}, {what}; runs in {runs}/"
                     f"{'id' if ev.startswith('linear:') else 'ood'}")
        caption(fig, "A: last-epoch probe top-1, mean ± sample std over runs (pre-training seed + its probe); Δ = "
                "(A(n,1) − A(n,r)) / A(n,1), Eq. (1), ± the sample std of the per-seed Δ; n, r from the pre-training "
                "class counts. The paper's text gives numbers for ImageNet only (Table 2): only ours are drawn.")
        drawn.append((f"paper2-fig1-{ev.replace(':', '-').replace('@', '-')}", fig, data))
    return drawn


# ----- paper 1 Figs. 2-3: self-training's test error against D_U's relevance and ρ_U ---------------

PAPER1 = {  # figure: (final.json key, its value → x, x label, what the figure varies, what the paper's text says)
    "fig2": ("relevance", lambda v: 100 * v, "relevance of the unlabeled data D_U %", "unlabeled-data relevance "
             "(ρ_U = 50)", 60, "the paper's text: D_U helps only from 60% relevance"),
    "fig3": ("rho_u", lambda v: 1 / v, "imbalance ratio ρ_U of the relevant D_U (head / tail)", "ρ_U of the "
             "relevant D_U (60% relevance)", 50, "the paper's text: ρ_U must not exceed 50, the training ratio"),
}


def paper1(name, runs, plt):
    key, to_x, xlabel, varies, mark, says = PAPER1[name]
    paths = sorted(glob.glob(os.path.join(runs, f"{name}-*", "s*", "final.json")))
    if not paths:
        R.fail(f"no {name}-*/s*/final.json under {runs}; run RHO=0.02 bash reproduce.sh {name} or pass --runs")
    errors, base = {}, {}
    for path in paths:
        res = load_json(path)
        if not isinstance(res, dict) or not {key, "test_error", "base_error"} <= res.keys():
            R.fail(f"'{path}' has no '{key}', 'test_error' and 'base_error': not a self_training.py final.json")
        errors.setdefault(to_x(res[key]), []).append(res["test_error"])
        base[res.get("seed")] = res["base_error"]                 # one CE base per seed, shared by every row
    xs = sorted(errors)
    stats, (b, b_std) = [spread(errors[x]) for x in xs], spread(list(base.values()))
    fig, ax = plt.subplots(figsize=(6, 4))
    data = {}
    series(ax, data, "ours: CE + self-training", xs, [m for m, _ in stats], [s for _, s in stats])
    ax.axhline(b, color="grey", ls="--", label=f"ours: CE base, no unlabeled data ({b:.2f} ± {b_std:.2f})")
    data["base"] = {"y": b, "err": b_std, "seeds": len(base)}
    ax.axvline(mark, color="red", ls=":", label=says)
    if name == "fig3":
        ax.set_xscale("log")
    ax.set(title=f"Paper 1 Fig. {name[-1]}: test error against {varies}, CIFAR-10-LT ρ = 50\nruns {runs}/{name}-*",
           xlabel=xlabel, ylabel="test error %")
    ax.legend()
    caption(fig, f"Ours: mean ± sample std over seeds ({max(map(len, errors.values()))} at most per point). The "
            f"paper's text gives no numbers for Fig. {name[-1]}, so its curve is not drawn; the dotted line: its text.")
    return [(f"paper1-{name}", fig, {"test error": data})]


# ----- paper 2 Theorem 3.1: e2 captured by SL and SSL features against d ---------------------------

def theory(json_path, plt):
    if json_path:
        doc = load_json(json_path)
        res = (doc.get("theorems") or {}).get("thm31") if isinstance(doc, dict) else None
        if not isinstance(res, dict) or "rows" not in res:
            R.fail(f"'{json_path}' holds no thm31 result; write one with python theory_sim.py thm31 --json > FILE")
        source = json_path
    else:
        res, source = T.thm31(), "theory_sim.thm31() (seed 0, 5 data sets per d)"
    rows, slope = res["rows"], {t["method"]: t["slope"] for t in res.get("trend", [])}
    d, sl, deficit = ([x[k] for x in rows] for k in ("d", "sl", "ssl_deficit"))
    sl_err, deficit_err = ([spread(x[k])[1] for x in rows] for k in ("sl_values", "ssl_values"))   # over data sets
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    data = {"capture": {}, "rates": {}}
    series(a, data["capture"], "SL: Σ_i <w_i, e2>²", d, sl, sl_err)
    series(a, data["capture"], "SSL: ||Π e2||²", d, [1 - v for v in deficit], deficit_err)
    a.set(xscale="log", title="e2 (the rare class's direction) captured by the features", xlabel="dimension d")
    series(b, data["rates"], f"SL capture (slope {slope.get('SL', np.nan):.3f})", d, sl, sl_err)
    series(b, data["rates"], f"SSL deficit 1 − ||Π e2||² (slope {slope.get('SSL', np.nan):.3f})", d, deficit,
           deficit_err)
    series(b, data["rates"], "theorem: d^(-1/10) (SL)", d, [x["sl_ref"] for x in rows], ls="--", marker="")
    series(b, data["rates"], "theorem: d^(-1/5) (SSL)", d, [x["ssl_ref"] for x in rows], ls=":", marker="")
    b.set(xscale="log", yscale="log", title="against the theorem's rates (log-log)", xlabel="dimension d")
    a.legend()
    b.legend()
    fig.suptitle(f"Paper 2 Theorem 3.1 (§3.1, the toy setting of its Fig. 3; Fig. 3 itself is a sketch): {source}")
    caption(fig, "Mean ± sample std over the data sets at each d (rho = d^(-1/5), tau = d^(1/5), n1 = n2 = d, "
            "n3 = floor(d^(1/5))). The paper gives rates, not numbers.")
    return [("paper2-theorem3.1", fig, data)]


# ----- paper 2 Fig. 5: label distributions of the pre-training subsets ------------------------------

def subsets(train_list, lt_list, plt):
    """CIFAR-10 (exp, r 0.1 and 0.01) by datasets_lt.training_subset, the call every training script makes, on
    CIFAR-10's 5,000 labels per class; ImageNet (Pareto, r 0.004 and 0.0025) by datasets_lt.imagenet_variants on
    --train-list's labels (--lt-list: ImageNet-LT itself), else on 1,000 classes of 1,300: the same counts."""
    C, n_max = 10, D.N_MAX["cifar10"]
    labels, panels = np.repeat(np.arange(C), n_max), {}
    for r in (0.1, 0.01):
        for q in (1.0, *D.SIZE_SWEEP):
            a = SimpleNamespace(dataset="cifar10", rho=r, imb_type="exp", data_seed=0, subsample=q,
                                balanced=False, val_frac=0)
            idx = D.training_subset(labels, a)[0]
            panels.setdefault(f"CIFAR-10, r = {r:g}", {})[q] = np.bincount(labels[idx], minlength=C)
    try:
        full = D.read_file_list(train_list)[1] if train_list else np.repeat(np.arange(1000), 1300)
        lt = D.read_file_list(lt_list)[1] if lt_list else None
        variants = D.imagenet_variants(full, 0, lt)
    except D.DataError as e:
        R.fail(str(e))
    for name, (src, idx) in variants.items():
        if not name.startswith("bal-"):
            ratio, _, q = name.partition("-sub")
            y = full if src == "full" else lt
            panels.setdefault(f"ImageNet, r = {ratio[1:]}", {})[float(q or 1)] = np.bincount(y[idx])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    data = {}
    for ax, (title, by_q) in zip(axes[0], panels.items()):
        for q, counts in sorted(by_q.items(), reverse=True):
            counts = np.sort(counts[counts > 0])[::-1]
            series(ax, data.setdefault(title, {}), f"×{q:g}: n = {counts.sum():,}", np.arange(1, len(counts) + 1),
                   counts, marker="." if len(counts) < 100 else "")
        ax.set(yscale="log", title=title, xlabel="class rank (sorted by count)", ylabel="training images")
        ax.legend()
    fig.suptitle("Paper 2 Fig. 5: label distributions of the imbalanced pre-training sets and their downsampled "
                 "variants (each has a balanced partner of equal n)")
    caption(fig, "Counts: datasets_lt.training_subset (CIFAR-10), datasets_lt.imagenet_variants (ImageNet, on "
            + (" and ".join(filter(None, (train_list, lt_list))) or "1,000 classes of 1,300 labels: no list given")
            + "). The sorted counts do not depend on the data seed.")
    return [("paper2-fig5-subsets", fig, data)]


# ----- one run: its curves and per-class accuracy ---------------------------------------------------

ACCURACY = (("test", "test top-1 %"), ("test_rotation_pretext", "rotation accuracy (pretext) %"),
            ("knn_test", "kNN top-1 %"), ("knn_top1", "kNN top-1 %"))


def run_figure(folder, plt):
    rows, final_path = R.read_metrics(os.path.join(folder, "metrics.jsonl")), os.path.join(folder, "final.json")
    final = load_json(final_path) if os.path.isfile(final_path) else {}
    if not rows and not final:
        R.fail(f"'{folder}' holds neither metrics.jsonl nor final.json: not a run folder")
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    data = {"loss": {}, "accuracy": {}, "per class": {}}
    if rows:
        series(a, data["loss"], "training loss", [r["epoch"] for r in rows], [r["loss"] for r in rows], marker="")
    key, label = next(((k, lab) for k, lab in ACCURACY if any(r.get(k) is not None for r in rows)),
                      (None, "no test accuracy in metrics.jsonl"))
    acc = [(r["epoch"], v if isinstance(v, dict) else {"top1": v}) for r in rows for v in [r.get(key)]]
    for part in ("top1", "many", "medium", "few"):                 # many / medium / few: by the run's class counts
        points = [(epoch, v[part]) for epoch, v in acc if v.get(part) is not None]
        if points:
            series(b, data["accuracy"], part, *zip(*points), marker=".", ls="-" if part == "top1" else "--")
    a.set(title="training loss (metrics.jsonl)", xlabel="epoch")
    b.set(title=label, xlabel="epoch", ylabel="%")
    last = final.get("last") or final.get("knn_test") or final.get("rotation_accuracy_pretext") or {}
    per_class, counts = last.get("per_class"), final.get("labeled_counts") or final.get("class_counts")
    if per_class and counts and len(per_class) == len(counts):
        n = np.arange(10 ** 5)                                    # the many / medium / few edges of shot_groups
        few_top, many_low = n[D.shot_groups(n)["few"]].max(), n[D.shot_groups(n)["many"]].min()
        for group, mask in D.shot_groups(counts).items():
            if mask.any():
                series(c, data["per class"], group, np.asarray(counts)[mask], np.asarray(per_class)[mask], ls="")
        for edge in (few_top + 0.5, many_low - 0.5):
            c.axvline(edge, color="grey", ls=":")
        c.set(xscale="log", title=f"per-class accuracy, last epoch (few ≤ {few_top} < medium < {many_low} ≤ many)",
              xlabel="training images of the class", ylabel="accuracy %")
    else:
        c.set_axis_off()
        c.text(0.5, 0.5, "final.json has no per-class accuracy\nwith class counts", ha="center", transform=c.transAxes)
    for ax in (a, b, c):
        if ax.has_data():
            ax.legend()
    fig.suptitle(f"Run {folder} ({final.get('script', 'script unknown')}): a run's own curves, no paper figure")
    return [(f"run-{os.path.basename(os.path.normpath(folder))}", fig, data)]


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the papers' figures from run files (PNG; --svg: and SVG).")
    p.error = R.fail                                              # a bad flag: one line, exit 2
    p.add_argument("what", nargs="+", metavar="FIGURE", help=f"{', '.join(FIGURES)}; run takes run folders after it")
    p.add_argument("--runs", help="run tree: fig1's (default runs/paper2-fig1), fig2 / fig3's (runs/repro-0.02)")
    p.add_argument("--out", default="runs/figures", help="folder for the figures (default runs/figures)")
    p.add_argument("--svg", action="store_true", help="also write each figure as SVG")
    p.add_argument("--theory-json", help="theory: a `python theory_sim.py thm31 --json` file (default: run it here)")
    p.add_argument("--train-list", help="subsets: the full ImageNet training list ('relative/path label')")
    p.add_argument("--lt-list", help="subsets: ImageNet_LT_train.txt, the r = 0.004 list itself")
    args = p.parse_args(argv)
    figures, folders = [], []
    for w in args.what:
        if w in FIGURES:
            figures += [w] if w not in figures else []
        elif "run" in figures:
            folders.append(w)
        else:
            R.fail(f"unknown figure '{w}'; figures: {' '.join(FIGURES)} (run takes run folders after it)")
    if "run" in figures and not folders:
        R.fail("run needs a run folder: python plots.py run runs/<run>")
    plt = pyplot()
    draw = {"fig1": lambda: fig1(args.runs or "runs/paper2-fig1", plt),
            "fig2": lambda: paper1("fig2", args.runs or "runs/repro-0.02", plt),
            "fig3": lambda: paper1("fig3", args.runs or "runs/repro-0.02", plt),
            "theory": lambda: theory(args.theory_json, plt),
            "subsets": lambda: subsets(args.train_list, args.lt_list, plt),
            "run": lambda: [f for folder in folders for f in run_figure(folder, plt)]}
    drawn = [f for name in figures for f in draw[name]()]
    os.makedirs(args.out, exist_ok=True)
    written = {}
    for name, fig, data in drawn:
        files = [os.path.join(args.out, f"{name}.{ext}") for ext in ("png", "svg")[:1 + args.svg]]
        for path in files:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        print("wrote " + " ".join(files))
        written[name] = {"files": files, "data": data}
    return written


if __name__ == "__main__":
    main()
