"""plots.py: from tiny fake run trees every figure is written, and the points it draws are the run files' numbers
(fig1: eval_linear.gap_rows' A and Δ; fig2 / fig3: mean ± sample std of test_error; subsets: the papers' n);
bad input and a missing matplotlib end in one line and exit 2. Skipped without matplotlib (it is optional)."""
import io
import json
import os
import runpy
import sys
import tempfile
import traceback

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import datasets_lt as D  # noqa: E402
import eval_linear as E  # noqa: E402
import plots  # noqa: E402
import theory_sim as T  # noqa: E402
from conftest import ROOT  # noqa: E402

SL = dict(script="ldam_drw.py", recipe="he", loss="ce", rule="none")     # method key ldam_drw[he]:ce-none
SIMSIAM = dict(script="simsiam_rwsam.py", opt="sgd")                     # simsiam_rwsam+sgd


def probe(runs, split, cell, seed, top1, counts, script, **args):
    """A probe's final.json as eval_linear.py / eval_ood.py write it under reproduce.sh's paper2-fig1 tree."""
    folder = runs / split / cell / f"s{seed}"
    folder.mkdir(parents=True)
    state = {"script": script, "arch": "resnet18", "class_counts": counts, "epoch": 1,
             "args": {"dataset": "cifar10", "imb_type": "exp", "seed": seed, **args}}
    (folder / "final.json").write_text(json.dumps({
        "eval": "linear:cifar10" if split == "id" else "stl10@96", "last": {"top1": top1}, "seed": seed,
        "pretrain": E.pretrain_meta(state, str(runs / "pretrain" / cell / f"s{seed}" / "last.pt"))}))


def fig1_tree(runs):
    """SL and SimSiam at r = 0.1, sizes 1 and 0.5, seeds 0 and 1, ID and OOD; SimSiam r = 0.01 without partner."""
    for method, kw in (("sl", SL), ("simsiam", SIMSIAM)):
        for q in (1, 0.5):
            imb = [int(c * q) for c in D.lt_counts(5000, 10, 0.1)]
            n = sum(imb)
            bal = [n // 10 + (c < n % 10) for c in range(10)]
            for split, shift in (("id", 0), ("ood", -20)):
                for s in (0, 1):
                    a1 = (90 if method == "sl" else 80) + shift + 4 * q + s
                    ar = a1 - (10 if method == "sl" else 1) - 2 * s
                    probe(runs, split, f"{method}/r0.1-q{q}-bal", s, a1, bal, balanced=True, **kw)
                    probe(runs, split, f"{method}/r0.1-q{q}-imb", s, ar, imb, **kw)
    probe(runs, "id", "simsiam/r0.01-q1-imb", 0, 70.0, D.lt_counts(5000, 10, 0.01), **SIMSIAM)


def paper1_tree(runs):
    """reproduce.sh's fig2-r* / fig3-u* rows, seeds 0 and 1, as self_training.py's final.json."""
    rows = {f"fig2-r{p}": (p / 100, 0.02) for p in (20, 40, 60, 80, 100)}
    rows.update({f"fig3-u{u}": (0.6, 1 / u) for u in (1, 25, 50, 100, 200)})
    for i, (row, (relevance, rho_u)) in enumerate(rows.items()):
        for s in (0, 1):
            (runs / row / f"s{s}").mkdir(parents=True)
            (runs / row / f"s{s}" / "final.json").write_text(json.dumps({
                "script": "self_training.py", "seed": s, "relevance": relevance, "rho_u": rho_u,
                "test_error": 20.0 + i + 2 * s, "base_error": 25.0 + s}))


def run_tree(root):
    """An ldam_drw.py-like run (test top-1, many / medium / few per epoch; per-class accuracy) and a SimSiam-like
    run (kNN top-1 on some epochs only, no per-class accuracy)."""
    sup, ssl = root / "ldam_drw-cifar10-0.01-0", root / "simsiam_rwsam-cifar10-0.01-0"
    sup.mkdir(parents=True)
    ssl.mkdir()
    rows = [{"epoch": e, "lr": 0.1, "loss": 2.0 - 0.5 * e, "train_top1": 30.0 + e,
             "test": {"top1": 30.0 + 10 * e, "many": 50.0 + e, "medium": 20.0 + e, "few": None if e == 1 else 5.0 * e}}
            for e in (1, 2, 3)]
    (sup / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_class = [90.0, 80.0, 50.0, 40.0, 10.0, 0.0]
    (sup / "final.json").write_text(json.dumps({"script": "ldam_drw.py", "class_counts": [500, 150, 60, 25, 10, 5],
                                                "last": {"top1": 60.0, "per_class": per_class}}))
    (ssl / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": -0.5 * e, "knn_top1": k}) + "\n"
                                               for e, k in ((1, None), (2, 41.5))))
    (ssl / "final.json").write_text(json.dumps({"script": "simsiam_rwsam.py", "class_counts": [500, 5],
                                                "last": {"knn_top1": 41.5, "gap": None}}))
    return sup, ssl


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    fig1_tree(root / "paper2-fig1")
    paper1_tree(root / "repro-0.02")
    theory_json = root / "thm31.json"
    theory_json.write_text(json.dumps({"theorems": {"thm31": T.thm31(datasets=2, dims=(100, 200))}}))
    return root, theory_json, run_tree(root / "single")


def check_files(written, out, names, svg=False):
    """Each figure written as out/<name>.png (and .svg), a real, non-empty image."""
    assert sorted(written) == sorted(names)
    for name in names:
        files = written[name]["files"]
        assert files == [str(out / f"{name}.{ext}") for ext in ("png", "svg")[:1 + svg]]
        png = open(files[0], "rb").read()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
        assert not svg or b"<svg" in open(files[1], "rb").read()


def test_fig1_points_are_gap_rows_of_the_probe_files(trees, tmp_path, capsys):
    root, _, _ = trees
    written = plots.main(["fig1", "--runs", str(root / "paper2-fig1"), "--out", str(tmp_path)])
    check_files(written, tmp_path, ["paper2-fig1-linear-cifar10", "paper2-fig1-stl10-96"])
    assert "method=simsiam_rwsam+sgd n=12406: 1 imbalanced run(s), no balanced run of equal n; not drawn" in \
        capsys.readouterr().err
    paths = sorted((root / "paper2-fig1").glob("*/*/*/s*/final.json"))
    rows, _ = E.gap_rows([E.read_result(str(p)) for p in paths])
    assert len(rows) == 2 * 2 * 2                                           # eval × method × n
    for x in rows:
        data = written[f"paper2-fig1-{x['eval'].replace(':', '-').replace('@', '-')}"]["data"]
        cell, delta = data[f"{x['method']} r=0.1"], data["delta r=0.1"][f"Δ^{x['kind']}: {plots.NAMES[x['method']]}"]
        i = cell["A(n,1)"]["x"].index(x["n"])
        assert cell["A(n,1)"]["y"][i] == x["A_balanced"] and cell["A(n,1)"]["err"][i] == x["A_balanced_std"]
        assert cell["A(n,r)"]["y"][i] == x["A_imbalanced"] and cell["A(n,r)"]["err"][i] == x["A_imbalanced_std"]
        assert delta["x"][i] == x["n"] and delta["y"][i] == 100 * x["delta"] and delta["err"][i] == 100 * x["delta_std"]
    # by hand, ID, n = 20,431: SL A(n,1) = mean(94, 95), A(n,r) = mean(84, 83); SimSiam 84.5, 82.5
    sl = written["paper2-fig1-linear-cifar10"]["data"]["ldam_drw[he]:ce-none r=0.1"]
    assert sl["A(n,1)"]["x"] == [10213, 20431] and sl["A(n,1)"]["y"][1] == 94.5 and sl["A(n,r)"]["y"][1] == 83.5
    assert sl["A(n,1)"]["err"][1] == pytest.approx(np.std([94, 95], ddof=1))
    delta = written["paper2-fig1-linear-cifar10"]["data"]["delta r=0.1"]
    assert delta["Δ^SL: SL"]["y"][1] == pytest.approx(100 * 11 / 94.5)
    assert delta["Δ^SSL: SimSiam"]["y"][1] == pytest.approx(100 * 2 / 84.5)     # SSL: the smaller gap


def test_fig2_fig3_points_are_mean_and_std_of_test_error(trees, tmp_path):
    root, _, _ = trees
    written = plots.main(["fig2", "fig3", "--runs", str(root / "repro-0.02"), "--out", str(tmp_path)])
    check_files(written, tmp_path, ["paper1-fig2", "paper1-fig3"])
    for name, xs, first in (("paper1-fig2", [20, 40, 60, 80, 100], 0), ("paper1-fig3", [1, 25, 50, 100, 200], 5)):
        data = written[name]["data"]["test error"]
        ours = data["ours: CE + self-training"]
        assert ours["x"] == pytest.approx(xs)
        assert ours["y"] == pytest.approx([21.0 + first + i for i in range(5)])      # mean of 20 + row and 22 + row
        assert ours["err"] == pytest.approx([np.std([0, 2], ddof=1)] * 5)
        assert data["base"] == {"y": 25.5, "err": pytest.approx(np.std([25, 26], ddof=1)), "seeds": 2}


def test_theory_points_are_theory_sim_rows(trees, tmp_path):
    _, theory_json, _ = trees
    res = json.loads(theory_json.read_text())["theorems"]["thm31"]
    written = plots.main(["theory", "--theory-json", str(theory_json), "--out", str(tmp_path), "--svg"])
    check_files(written, tmp_path, ["paper2-theorem3.1"], svg=True)
    cap = written["paper2-theorem3.1"]["data"]["capture"]
    sl, ssl = (next(v for k, v in cap.items() if k.startswith(p + ":")) for p in ("SL", "SSL"))
    assert sl["x"] == [100, 200] and sl["y"] == [r["sl"] for r in res["rows"]]
    assert ssl["y"] == [1 - r["ssl_deficit"] for r in res["rows"]]
    assert sl["err"] == pytest.approx([np.std(r["sl_values"], ddof=1) for r in res["rows"]])
    rates = written["paper2-theorem3.1"]["data"]["rates"]
    assert rates["theorem: d^(-1/10) (SL)"]["y"] == pytest.approx([100 ** -0.1, 200 ** -0.1])
    slope = next(t["slope"] for t in res["trend"] if t["method"] == "SSL")
    assert any(k.startswith("SSL deficit") and f"(slope {slope:.3f})" in k for k in rates)


def test_subsets_counts_are_the_papers_variants(tmp_path):
    written = plots.main(["subsets", "--out", str(tmp_path)])
    check_files(written, tmp_path, ["paper2-fig5-subsets"])
    data = written["paper2-fig5-subsets"]["data"]
    label = lambda panel, q: next(k for k in data[panel] if k.startswith(f"×{q:g}:"))
    counts = lambda panel, q: data[panel][label(panel, q)]["y"]
    assert counts("CIFAR-10, r = 0.01", 1) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert counts("CIFAR-10, r = 0.01", 0.5) == [int(c / 2) for c in D.lt_counts(5000, 10, 0.01)]
    # paper 2 App. A.1: n = 20,431 and 12,406 (CIFAR-10), 115,846 and 80,218 (ImageNet), rarest class 5 and 3
    for panel, n, head, tail in (("CIFAR-10, r = 0.1", 20431, 5000, 500), ("CIFAR-10, r = 0.01", 12406, 5000, 50),
                                 ("ImageNet, r = 0.004", 115846, 1280, 5), ("ImageNet, r = 0.0025", 80218, 1200, 3)):
        y = counts(panel, 1)
        assert sum(y) == n and (y[0], y[-1]) == (head, tail) and y == sorted(y, reverse=True)
        assert label(panel, 1) == f"×1: n = {n:,}" and len(data[panel]) == 5
    assert len(counts("ImageNet, r = 0.004", 0.125)) == 1000 and min(counts("ImageNet, r = 0.004", 0.125)) == 1


def test_run_figure_points_are_metrics_and_final(trees, tmp_path):
    _, _, (sup, ssl) = trees
    written = plots.main(["run", str(sup), str(ssl), "--out", str(tmp_path)])
    check_files(written, tmp_path, ["run-ldam_drw-cifar10-0.01-0", "run-simsiam_rwsam-cifar10-0.01-0"])
    data = written["run-ldam_drw-cifar10-0.01-0"]["data"]
    assert data["loss"]["training loss"] == {"x": [1, 2, 3], "y": [1.5, 1.0, 0.5], "err": None}
    acc = data["accuracy"]
    assert acc["top1"]["y"] == [40, 50, 60] and acc["many"]["y"] == [51, 52, 53]
    assert acc["few"]["x"] == [2, 3] and acc["few"]["y"] == [10, 15]                     # epoch 1's None left out
    per = data["per class"]                                                    # few < 20 ≤ medium ≤ 100 < many
    assert {g: (v["x"], v["y"]) for g, v in per.items()} == {"many": ([500, 150], [90, 80]),
                                                             "medium": ([60, 25], [50, 40]), "few": ([10, 5], [10, 0])}
    other = written["run-simsiam_rwsam-cifar10-0.01-0"]["data"]
    assert other["accuracy"] == {"top1": {"x": [2], "y": [41.5], "err": None}} and other["per class"] == {}


def test_what_is_drawn_is_what_is_recorded(trees):
    """The arrays each figure function reports are the ones on its Axes (every error-bar series, both ways)."""
    from matplotlib.container import ErrorbarContainer
    plt = plots.pyplot()
    root, theory_json, folders = trees
    drawn = (plots.fig1(str(root / "paper2-fig1"), plt) + plots.paper1("fig3", str(root / "repro-0.02"), plt)
             + plots.theory(str(theory_json), plt) + plots.run_figure(str(folders[0]), plt))
    for name, fig, data in drawn:
        on_axes = sorted((c.get_label(), tuple(c.lines[0].get_xdata()), tuple(c.lines[0].get_ydata()))
                         for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer))
        recorded = sorted((label, tuple(s["x"]), tuple(s["y"])) for panel in data.values() for label, s in
                          panel.items() if isinstance(s, dict) and "x" in s)
        assert on_axes == recorded and recorded, name
        plt.close(fig)


@pytest.mark.parametrize("argv, message", [
    (["fig9"], "unknown figure 'fig9'; figures: fig1 fig2 fig3 theory subsets run"),
    (["fig1", "--runs", "EMPTY"], "no probe final.json under EMPTY/id or EMPTY/ood"),
    (["fig3", "--runs", "EMPTY"], "no fig3-*/s*/final.json under EMPTY"),
    (["run"], "run needs a run folder"),
    (["run", "EMPTY"], "'EMPTY' holds neither metrics.jsonl nor final.json"),
    (["subsets", "--train-list", "EMPTY/none.txt"], "image list 'EMPTY/none.txt' does not exist"),
    (["theory", "--theory-json", "EMPTY/bad.json"], "cannot read 'EMPTY/bad.json'"),
    (["fig1", "--colour", "red"], "unrecognized arguments: --colour red"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.replace("EMPTY", str(empty)) for a in argv] + ["--out", str(tmp_path / "figs")]
    with pytest.raises(SystemExit) as e:
        plots.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert message.replace("EMPTY", str(empty)) in err and not (tmp_path / "figs").exists()


def test_files_of_another_kind_are_refused(tmp_path, capsys):
    (tmp_path / "fig2-r20" / "s0").mkdir(parents=True)
    (tmp_path / "fig2-r20" / "s0" / "final.json").write_text(json.dumps({"test_error": 20.0}))
    (tmp_path / "thm1.json").write_text(json.dumps({"theorems": {"thm1": {"rows": []}}}))
    for argv, message in ((["fig2", "--runs", str(tmp_path)], "has no 'relevance', 'test_error' and 'base_error': "
                           "not a self_training.py final.json"),
                          (["theory", "--theory-json", str(tmp_path / "thm1.json")], "holds no thm31 result")):
        with pytest.raises(SystemExit) as e:
            plots.main(argv + ["--out", str(tmp_path / "figs")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err


def without_matplotlib(*argv):
    """(exit code, stdout, stderr) of `python plots.py ARGV` where `import matplotlib` fails: a child process forked
    from this one (torch is imported already: a fresh interpreter would spend 3-4 s on it), runs plots.py as
    __main__ with sys.modules["matplotlib"] = None, as `python -c "import sys; sys.modules[...] = None; ..."`."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:                                                  # the child: ends in os._exit, never returns
        code = 1
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), write_through=True)
                                      for fd in (1, 2))
            sys.modules["matplotlib"], sys.argv = None, ["plots.py", *argv]
            runpy.run_path(str(ROOT / "plots.py"), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


def test_without_matplotlib_one_line_exit_2_and_no_training_script_needs_it(tmp_path):
    assert without_matplotlib("subsets", "--out", str(tmp_path / "figs")) == (2, "", (
        "error: plots.py needs matplotlib: pip install matplotlib (or pip install -r requirements-plots.txt)\n"))
    assert not (tmp_path / "figs").exists()
    assert "matplotlib" not in (ROOT / "requirements.txt").read_text()
    assert (ROOT / "requirements-plots.txt").read_text() == "matplotlib>=3.8\n"
    assert [p.name for p in ROOT.glob("*.py") if "matplotlib" in p.read_text()] == ["plots.py"]
