"""reproduce.sh: every README row is run, commands parse and chain, the table is the mean ± std it says."""
import importlib
import json
import os
import shlex
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT, forkrun_env, write_folder

ROWS = ["ce", "cb-ce", "focal", "cb-focal", "ce-drw", "ce-drs", "ldam", "ldam-drw",
        "ce+ssp", "cb-ce+ssp", "focal+ssp", "cb-focal+ssp", "ce-drw+ssp", "ce-drs+ssp", "ldam+ssp", "ldam-drw+ssp",
        "ce+st", "ce+st-half", "ce+st-same", "ce+st-double", "ldam-drw+st", "ldam-drw+st-half", "ldam-drw+st-same",
        "ldam-drw+st-double", "ce+crt", "simsiam", "simsiam+sam", "simsiam-balanced", "simsiam+rwsam",
        "simsiam-step", "simsiam+sam-step", "simsiam-balanced-step", "simsiam+rwsam-step", "moco"]
NEEDS = ("--pretrained", "--base", "--ckpt", "--stage1")


def reproduce(*args, fork=False, **env):
    """Run reproduce.sh; fork=True runs its Python scripts through the session's fork server (conftest.py)."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **(forkrun_env() if fork else {}), **env}
    return subprocess.run(["bash", "reproduce.sh", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=900)


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_dry_run_runs_every_row_with_commands_that_parse_and_chain():
    p = reproduce("--dry-run", SEEDS="0 1", RUNS="R")
    assert p.returncode == 0, p.stderr
    stage, made, outs = 0, {}, []
    for line in p.stdout.splitlines():
        if line.startswith("# stage"):
            stage += 1
            continue
        python, script, *argv = shlex.split(line)
        assert python == sys.executable and flag(argv, "--gpu") == "0"
        importlib.import_module(script[:-3]).parse_args(argv)      # SystemExit on an unknown flag or value
        for name in NEEDS:
            needed = flag(argv, name)
            if needed:                                               # produced by an earlier stage
                assert needed.endswith("/last.pt") and made.get(needed[:-len("/last.pt")], stage) < stage, line
        out = flag(argv, "--out")
        assert out not in made, f"two runs write {out}"
        made[out] = stage
        outs.append(out)
    rows = {o.split("/")[1] for o in outs if not o.startswith("R/pretrain/")}
    assert rows == set(ROWS)
    for row in ROWS:
        assert {f"R/{row}/s0", f"R/{row}/s1"} <= set(outs)


def test_rows_select_only_the_runs_they_need():
    p = reproduce("--dry-run", "ldam-drw+ssp", SEEDS="3", RUNS="R")
    assert p.returncode == 0, p.stderr
    outs = [flag(shlex.split(l), "--out") for l in p.stdout.splitlines() if not l.startswith("#")]
    assert outs == ["R/pretrain/rotation/s3", "R/ldam-drw+ssp/s3"]
    bad = reproduce("--dry-run", "ldam_drw")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown row 'ldam_drw'" in bad.stderr


def test_table_is_mean_and_sample_std_of_the_seeds(tmp_path):
    def final(row, seed, **values):
        d = tmp_path / row / f"s{seed}"
        d.mkdir(parents=True)
        (d / "final.json").write_text(json.dumps(values))
    for seed, (err, secs) in enumerate([(30.0, 60), (32.0, 120), (34.0, 90)]):
        final("ce", seed, test_error=err, wall_seconds=secs)
    final("simsiam", 0, top1=80.25, wall_seconds=30)
    p = reproduce("table", RUNS=str(tmp_path), RHO="0.01")
    assert p.returncode == 0, p.stderr
    lines = {l.split(" | ")[0][2:]: l for l in p.stdout.splitlines() if l.count(" | ") == 4}
    assert lines["ce"] == "| ce | error % | 29.64 | 32.00 ± 2.00 (3 seeds) | 1.5 |"
    assert "simsiam" not in lines                                 # in the Table 1(a) block
    assert lines["ldam-drw+ssp"] == "| ldam-drw+ssp | error % | 22.17 | not run | — |"
    p = reproduce("table", RUNS=str(tmp_path), RHO="0.1")
    assert "| ce | error % | 13.61 | 32.00 ± 2.00 (3 seeds) | 1.5 |" in p.stdout


@pytest.mark.parametrize("env,msg", [
    ({"DATA": "--dataset folder --data-root {tmp}/missing"}, "DATA: no train or test split under"),
    ({"DATA": "--dataset cifar10 --data-root {tmp}/missing"}, "DATA: cifar10 (train) not found"),
    ({"RHO": "100"}, "RHO=100 must be a tail/head ratio in (0, 1]"),
    ({"RHO": "0.01x"}, "RHO=0.01x must be"),
    ({"GPU": "-3"}, "GPU=-3 must be a GPU index"),
    ({"GPU": "99"}, "GPU=99")])
def test_shared_settings_are_checked_before_anything_starts(tmp_path, env, msg):
    write_folder(tmp_path / "data", per_class=(6, 6, 6))
    env = {"DATA": f"--dataset folder --data-root {tmp_path / 'data'}", "GPU": "-1", **env}
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    p = reproduce("ce", SEEDS="0", RUNS=str(tmp_path / "runs"), **env)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stdout + p.stderr
    assert msg in p.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_failed_run_is_reported_its_dependents_skipped_and_the_other_rows_finish(tmp_path):
    """ce (LDAM-DRW's script, given a bad flag) fails; the rotation pre-training of ce+ssp still runs to its end."""
    write_folder(tmp_path / "data", per_class=(6, 6, 6))
    p = reproduce("ce+crt", "ce+ssp", fork=True, SEEDS="0", GPU="-1", RHO="1", RUNS=str(tmp_path / "runs"),
                  ARGS_ldam_drw="--beta 1", ARGS_rotation_ssp="--epochs 1 --batch-size 8",
                  DATA=f"--dataset folder --data-root {tmp_path / 'data'}")
    assert p.returncode == 1
    assert (f"FAILED {tmp_path}/runs/ce/s0 (exit 2): error: --beta must be in [0, 1), got 1; see "
            f"{tmp_path}/runs/ce/s0/log.txt") in p.stdout
    assert f"skipped {tmp_path}/runs/ce+crt/s0: {tmp_path}/runs/ce/s0/last.pt is missing" in p.stdout
    assert f"finished {tmp_path}/runs/pretrain/rotation/s0" in p.stdout
    assert (tmp_path / "runs" / "pretrain" / "rotation" / "s0" / "final.json").exists()
    assert f"FAILED {tmp_path}/runs/ce+ssp/s0 (exit 2)" in p.stdout                   # its pre-training is there
    assert p.stdout.splitlines()[-4] == "== 3 run(s) did not finish:"


@pytest.mark.slow
def test_pipeline_on_fake_data_then_rerun_skips_and_resumes(tmp_path):
    write_folder(tmp_path / "data", per_class=(20, 15, 10), per_class_test=4, size=16, easy=True)
    env = dict(DATA=f"--dataset folder --data-root {tmp_path / 'data'}", RHO="0.5", SEEDS="0", JOBS="2",
               GPU="-1", RUNS=str(tmp_path / "runs"), ARGS="--epochs 1",
               ARGS_simsiam_rwsam="--batch-size 16 --knn-every -1", ARGS_crt="--batch-size 8")
    rows = ["ce+crt", "ce+ssp", "simsiam+rwsam"]
    p = reproduce(*rows, fork=True, **env)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = tmp_path / "runs"
    for d in ["ce", "pretrain/rotation", "pretrain/simsiam", "pretrain/simsiam+rwsam", *rows]:
        assert (runs / d / "s0" / "final.json").exists(), d

    ce = json.loads((runs / "ce" / "s0" / "final.json").read_text())
    (runs / "ce" / "s0" / "final.json").unlink()                   # last.pt stays: continued with --resume
    p = reproduce(*rows, fork=True, **env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("done already") == 6
    assert f"--resume {runs}/ce/s0/last.pt" in p.stdout
    again = json.loads((runs / "ce" / "s0" / "final.json").read_text())
    assert again["test_error"] == ce["test_error"] and again["epochs"] == 1

    table = reproduce("table", RUNS=str(runs), RHO="0.5").stdout
    for row in rows:
        line = next(l for l in table.splitlines() if l.startswith(f"| {row} |"))
        assert "(1 seed)" in line, line


def _parse_dry_run(stdout):
    """(out -> argv) of every command of a dry run; each parses with its script's argparse."""
    runs = {}
    for line in stdout.splitlines():
        if line.startswith("# stage"):
            continue
        python, script, *argv = shlex.split(line)
        args = importlib.import_module(script[:-3]).parse_args(argv)      # SystemExit on an unknown flag or value
        runs[flag(argv, "--out")] = (script, argv, args)
    return runs


def test_dry_run_of_the_paper1_groups_parses(tmp_path):
    """CIFAR-100-LT (Table 2), SVHN-LT (Table 1(b)), the ρ = 50 column and Figs. 2-3 with a CINIC-10 pool."""
    c100 = _parse_dry_run(reproduce("--dry-run", SET="cifar100", RHO="0.02", SEEDS="0", RUNS="R").stdout)
    assert {o.split("/")[1] for o in c100 if not o.startswith("R/pretrain")} == set(ROWS[:16])
    assert all(a.dataset == "cifar100" and a.rho == 0.02 for _, _, a in c100.values())
    svhn = _parse_dry_run(reproduce("--dry-run", SET="svhn", SEEDS="0", RUNS="R").stdout)
    assert set(svhn) == {f"R/{r}/s0" for r in ["ce", "ldam-drw"] + [r for r in ROWS if "+st" in r]}
    assert {svhn[f"R/ce+st{u}/s0"][2].rho_u for u in ("", "-half", "-same", "-double")} == {1, 0.02, 0.01, 0.005}
    assert all(a.pool == "rest" for s, _, a in svhn.values() if s == "self_training.py")       # SVHN's extra split
    figs = _parse_dry_run(reproduce("--dry-run", "fig2", "fig3", RHO="0.02", SEEDS="0", RUNS="R",
                                    POOL_ROOT="/cinic", C100_ROOT="/c100").stdout)
    st = {o: a for o, (s, _, a) in figs.items() if s == "self_training.py"}
    assert sorted(a.relevance for o, a in st.items() if "fig2" in o) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert sorted(a.rho_u for o, a in st.items() if "fig3" in o) == [0.005, 0.01, 0.02, 0.04, 1.0]
    assert all(a.pool == "cinic10" and a.pool_root == "/cinic" and a.irrelevant_root == "/c100"
               and a.unlabeled_mult == 4 and a.base == "R/ce/s0/last.pt" for a in st.values())
    bad = reproduce("--dry-run", "fig2", RHO="0.01")
    assert bad.returncode == 2 and "RHO=0.02" in bad.stderr


def test_table_marks_the_in_cifar_pool_and_shows_the_rho50_column(tmp_path):
    def final(row, **values):
        d = tmp_path / row / "s0"
        d.mkdir(parents=True)
        (d / "final.json").write_text(json.dumps({"wall_seconds": 60, **values}))
    final("ce+st", test_error=25.0, pool="rest", dataset="folder")
    final("ldam-drw+st-same", test_error=15.0, pool="cinic10", dataset="folder")
    table = reproduce("table", RUNS=str(tmp_path), RHO="0.02").stdout
    assert "| ce+st (not the paper's pool) | error % | 16.79 | 25.00 (1 seed) | 1.0 |" in table
    assert "| ldam-drw+st-same | error % | 14.93 | 15.00 (1 seed) | 1.0 |" in table
    assert "| ldam-drw | error % | 19.06 | not run | — |" in table
    table = reproduce("table", RUNS=str(tmp_path), RHO="0.1", SET="cifar100").stdout
    assert "| ldam-drw+ssp | error % | 41.09 | not run | — |" in table and "simsiam" not in table
    table = reproduce("table", RUNS=str(tmp_path), RHO="0.01", SET="svhn").stdout
    assert "| ce | error % | 19.98 |" in table and "| ce+st-double | error % | 15.04 |" in table


@pytest.mark.parametrize("dataset,rows", [
    ("imagenet_lt", ["ce", "ce+ssp", "ce-balanced", "ce-balanced+ssp", "crt", "crt+ssp"]),
    ("inat", ["ce", "ce+ssp", "ce-balanced", "ce-balanced+ssp", "ldam-drw", "ldam-drw+ssp", "crt", "crt+ssp"])])
def test_dry_run_of_tables_3_and_4_parses_and_chains(dataset, rows):
    p = reproduce("--dry-run", SET=dataset, SEEDS="0", RUNS="R", LT_ROOT="/img", LT_LISTS="/lists")
    assert p.returncode == 0, p.stderr
    runs, stage, made = {}, 0, {}
    for line in p.stdout.splitlines():
        if line.startswith("# stage"):
            stage += 1
            continue
        python, script, *argv = shlex.split(line)
        args = importlib.import_module(script[:-3]).parse_args(argv)
        for name in NEEDS:
            if flag(argv, name):
                assert made.get(flag(argv, name)[:-len("/last.pt")], stage) < stage, line
        made[flag(argv, "--out")] = stage
        runs[flag(argv, "--out")] = (script, args)
    assert {o.split("/")[1] for o in runs if not o.startswith("R/pretrain")} == set(rows)
    sup = [a for s, a in runs.values() if s == "ldam_drw.py"]
    assert all(a.dataset == dataset and a.data_root == "/img" and a.arch == "resnet50" and a.train_list.startswith("/lists/")
               for a in sup)
    assert all(a.val_list == "/lists/ImageNet_LT_val.txt" for a in sup) if dataset == "imagenet_lt" else \
        all(a.val_list is None and a.test_list == "/lists/iNaturalist18_val.txt" for a in sup)
    assert runs["R/ce-balanced/s0"][1].rule == "resample" and runs["R/ce-balanced/s0"][1].resample_weights == "inverse"
    assert runs["R/ce+ssp/s0"][1].pretrained == "R/pretrain/moco/s0/last.pt"
    moco = runs["R/pretrain/moco/s0"][1]                          # paper 1's released pretrain_moco.py
    assert (moco.epochs, moco.batch_size, moco.lr, moco.wd, moco.moco_t, moco.queue) == (200, 128, 0.015, 1e-4, 0.2, None)
    assert runs["R/crt+ssp/s0"][1].ckpt == "R/ce+ssp/s0/last.pt" and runs["R/crt/s0"][1].ckpt == "R/ce/s0/last.pt"
    table = reproduce("table", SET=dataset, RUNS="R").stdout
    assert ("| crt+ssp | error % | 48.7 |" if dataset == "imagenet_lt" else "| crt+ssp | error % | 31.9 |") in table


def test_cross_validation_group_dry_run():
    """`cv`: one SimSiam stage 1 per seed with a --val-frac split, then rwSAM runs from it that vary h, α, ρ
    one at a time, every run on the same split; nothing of the main table runs."""
    p = reproduce("--dry-run", "cv", SEEDS="0 1", RUNS="R", CV_H="0.3", CV_ALPHA="2", CV_RHO="0.5 7", CV_FRAC="0.2")
    assert p.returncode == 0, p.stderr
    stage, made, settings = 0, {}, {}
    for line in p.stdout.splitlines():
        if line.startswith("# stage"):
            stage += 1
            continue
        python, script, *argv = shlex.split(line)
        args = importlib.import_module(script[:-3]).parse_args(argv)
        out = flag(argv, "--out")
        assert script == "simsiam_rwsam.py" and out.startswith("R/cv/") and args.val_frac == 0.2
        if args.stage1:
            assert made[args.stage1[:-len("/last.pt")]] < stage and args.opt == "rwsam"
        made[out] = stage
        settings.setdefault(out.split("/")[2], set()).add((args.bandwidth, args.alpha, args.sam_rho, args.seed))
    assert settings == {
        "stage1-simsiam": {(None, 1.2, 5.0, 0), (None, 1.2, 5.0, 1)},
        "default": {(None, 1.2, 5.0, 0), (None, 1.2, 5.0, 1)},
        "h=0.3": {(0.3, 1.2, 5.0, 0), (0.3, 1.2, 5.0, 1)},
        "alpha=2": {(None, 2.0, 5.0, 0), (None, 2.0, 5.0, 1)},
        "rho=0.5": {(None, 1.2, 0.5, 0), (None, 1.2, 0.5, 1)},
        "rho=7": {(None, 1.2, 7.0, 0), (None, 1.2, 7.0, 1)},
    }


def test_cross_validation_table(tmp_path):
    for setting, seed, top1, cm in [("default", 0, 70.0, 60.0), ("default", 1, 72.0, 62.0), ("h=0.3", 0, 65.5, 50.0)]:
        d = tmp_path / "cv" / setting / f"s{seed}"
        d.mkdir(parents=True)
        (d / "final.json").write_text(json.dumps({"last": {"knn_top1": top1, "knn_class_mean": cm}}))
    p = reproduce("cv-table", RUNS=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "| default | 71.00 ± 1.41 | 61.00 ± 1.41 | 2 |" in p.stdout
    assert "| h=0.3 | 65.50 | 50.00 | 1 |" in p.stdout


T1A = ("simsiam", "simsiam+sam", "simsiam-balanced", "simsiam+rwsam")


def test_table_1a_rows_train_the_same_epochs():
    """Paper 2 Table 1(a): SimSiam, +SAM, balanced and +rwSAM each train their model for the same epochs, in
    the exp column (row <name>) and the step column (row <name>-step); rwSAM's stage 2 is a fresh model (its
    stage 1 is the SimSiam row's run of the same column, read through --stage1); every row is probed."""
    rows = [m + v for v in ("", "-step") for m in T1A]
    p = reproduce("--dry-run", *rows, SEEDS="0", RUNS="R")
    parsed = _parse_dry_run(p.stdout)
    runs = {o: a for o, (s, _, a) in parsed.items() if s == "simsiam_rwsam.py"}
    assert set(runs) == {f"R/pretrain/{r}/s0" for r in rows}
    assert {a.epochs for a in runs.values()} == {1600} and all(a.subsample == 1 and a.rho == 0.01 for a in runs.values())
    for r in rows:
        a = runs[f"R/pretrain/{r}/s0"]
        assert a.imb_type == ("step" if r.endswith("-step") else "exp") and a.balanced == ("balanced" in r)
        assert a.opt == {"simsiam": "sgd", "simsiam+sam": "sam", "simsiam-balanced": "sgd",
                         "simsiam+rwsam": "rwsam"}[r.removesuffix("-step")]
        assert parsed[f"R/{r}/s0"][2].ckpt == f"R/pretrain/{r}/s0/last.pt"          # the probe of that run
    for v in ("", "-step"):
        rw = runs[f"R/pretrain/simsiam+rwsam{v}/s0"]
        assert rw.stage1 == f"R/pretrain/simsiam{v}/s0/last.pt" and rw.stage2_init == "scratch" and rw.stage1_epochs is None


def test_table_1a_block_has_exp_step_and_gap_columns(tmp_path):
    """The Table 1(a) block: probe top-1 of the exp and step rows, and the step pre-training runs' frequent /
    rare generalization gap from their final.json, each beside the paper's number."""
    def final(folder, seed, **values):
        d = tmp_path / folder / f"s{seed}"
        d.mkdir(parents=True)
        (d / "final.json").write_text(json.dumps({"wall_seconds": 60, **values}))
    gap = lambda f, r: {"gap": {"frequent": {"gap": f, "se": 0.001}, "rare": {"gap": r, "se": 0.002}}, "knn_top1": 50.0}
    final("simsiam", 0, top1=80.0)
    final("simsiam", 1, top1=81.0)
    final("simsiam-step", 0, top1=84.5)
    final("pretrain/simsiam-step", 0, last=gap(0.030, 0.090), epochs=1600)
    final("pretrain/simsiam-step", 1, last=gap(0.040, 0.070))
    final("simsiam+rwsam-step", 2, top1=85.25)
    final("pretrain/simsiam+rwsam-step", 2, last=None)                   # run with --knn-every -1
    p = reproduce("table", RUNS=str(tmp_path), RHO="0.01")
    assert p.returncode == 0, p.stderr
    lines = {l.split(" | ")[0][2:]: l for l in p.stdout.splitlines() if l.count(" | ") == 8}
    assert lines["simsiam"] == ("| simsiam | 81.4 | 80.50 ± 0.71 (2 seeds) | 84.3 | 84.50 (1 seed) | 0.035 | "
                                "0.035 ± 0.007 (2 seeds) | 0.081 | 0.080 ± 0.014 (2 seeds) |")
    assert lines["simsiam+rwsam"] == ("| simsiam+rwsam | 82.7 | not run | 85.6 | 85.25 (1 seed) | 0.037 | not measured "
                                      "(--knn-every -1) | 0.066 | not measured (--knn-every -1) |")
    assert lines["simsiam-balanced"] == ("| simsiam-balanced | 82.0 | not run | 85.8 | not run | 0.038 | not run | "
                                         "0.037 | not run |")
    assert "SimSiam pre-training: 1600 epochs" in p.stdout                  # the budget, beside paper2-fig1's 800
    assert "| simsiam+sam | 82.1 | not run | 84.7 | not run | 0.044 |" in lines["simsiam+sam"]
    assert "| simsiam-step | the simsiam command with --imb-type step |" in p.stdout            # pre-training list
    rho1 = reproduce("table", RUNS=str(tmp_path), RHO="0.1").stdout                     # the paper has rho 0.01 only
    assert "| simsiam | — | 80.50 ± 0.71 (2 seeds) | — | 84.50 (1 seed) | — |" in rho1


# ----- paper2-fig1: paper 2 Fig. 2(a,c), SL vs SSL at equal n -----------------------------------------

def test_fig1_dry_run_parses_and_every_cell_has_its_balanced_partner():
    p = reproduce("paper2-fig1", "--dry-run", SEEDS="0 1", RUNS="F", SCALE="0.5")
    assert p.returncode == 0, p.stderr
    pre, evals, stage = {}, {}, 0
    for line in p.stdout.splitlines():
        if line.startswith("# stage"):
            stage += 1
            continue
        python, script, *argv = shlex.split(line)
        args = importlib.import_module(script[:-3]).parse_args(argv)      # SystemExit on a bad flag or value
        out = flag(argv, "--out")
        if stage == 1:
            assert out.startswith("F/pretrain/") and out not in pre
            pre[out] = (script, argv, args)
        else:
            assert stage == 2 and flag(argv, "--ckpt") == out.replace("/id/", "/pretrain/").replace("/ood/", "/pretrain/") + "/last.pt"
            evals[out] = args
    cells = {o.rsplit("-", 1)[0].split("/", 2)[2] + "/" + o.rsplit("/", 1)[1] for o in pre}
    assert len(cells) == 3 * 2 * 5 * 2 and len(pre) == 2 * len(cells)        # methods × r × sizes × seeds, bal + imb
    for out, (script, argv, args) in pre.items():
        if out.split("/")[3].endswith("-bal"):
            continue
        partner = out.replace("-imb/", "-bal/")
        b_script, b_argv, b_args = pre[partner]
        assert b_script == script and b_args.balanced and not args.balanced
        drop = lambda a: [x for i, x in enumerate(a) if x != "--balanced" and (i == 0 or a[i - 1] != "--out") and x != "--out"]
        assert drop(b_argv) == drop(argv)                                  # same data, seed, epochs: same n
        for kind in ("id", "ood"):
            assert out.replace("/pretrain/", f"/{kind}/") in evals and partner.replace("/pretrain/", f"/{kind}/") in evals
    sl = pre["F/pretrain/sl/r0.01-q0.25-imb/s1"][2]
    assert (sl.recipe, sl.arch, sl.loss, sl.rule, sl.epochs_full, sl.epochs) == ("he", "resnet18", "ce", "none", 100, 400)
    moco = pre["F/pretrain/moco/r0.1-q1-bal/s0"][2]
    assert (moco.epochs, moco.subsample, moco.rho) == (100, 1.0, 0.1)
    assert evals["F/ood/simsiam/r0.1-q0.125-bal/s0"].target == "stl10" and evals["F/id/moco/r0.1-q1-imb/s1"].epochs == 50
    other = reproduce("paper2-fig1", "--dry-run", SET="cifar100")                # refused before the first job
    assert other.returncode == 2 and other.stdout == "" and other.stderr.count("\n") == 1
    assert "paper2-fig1 runs with SET=cifar10 or imagenet_lt" in other.stderr
    bad = reproduce("paper2-fig1", "--dry-run", METHODS="sl byol")
    assert bad.returncode == 2 and bad.stderr.strip() == "reproduce.sh: unknown method 'byol' in METHODS; methods: sl simsiam moco"


@pytest.mark.slow
def test_fig1_tiny_end_to_end_prints_the_table(tmp_path):
    write_folder(tmp_path / "data", classes=tuple("abcd"), per_class=(20,) * 4, per_class_test=4, size=16, easy=True)
    write_folder(tmp_path / "ood", classes=tuple("xyz"), per_class=(6,) * 3, per_class_test=2, size=16)  # STL-10 stand-in
    env = dict(DATA=f"--dataset folder --data-root {tmp_path / 'data'}", RHOS="0.5", SIZES="1", METHODS="sl moco",
               SEEDS="0", SCALE="0.001", JOBS="2", GPU="-1", RUNS=str(tmp_path / "runs"),
               OOD=f"--target folder --data-root {tmp_path / 'ood'}",
               ARGS_moco_ssp="--batch-size 16 --knn-every 0")
    p = reproduce("paper2-fig1", fork=True, **env)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = tmp_path / "runs"
    ck = json.loads((runs / "pretrain/sl/r0.5-q1-bal/s0/final.json").read_text())
    assert ck["epochs"] == 1 and ck["class_counts"] == [15, 14, 14, 14]        # [20, 15, 12, 10] = 57, balanced
    table = p.stdout[p.stdout.index("Paper 2 Fig. 2(a,c)"):]
    assert "Pre-training epochs at full size (the subsampled variants train as many steps): SL 1, MoCo v2 1 " in table
    for ev in ("linear:folder", "probe:ood"):
        assert f"({ev})" in table
    rows = [l for l in table.splitlines() if l.startswith("| 0.5 | 57 |")]
    assert len(rows) == 2 and all(l.count("|") == 9 and "—" not in l for l in rows)
    # each Δ cell is Eq. (1) of the two probes' accuracies it sits beside
    id_sl = [json.loads((runs / f"id/sl/r0.5-q1-{v}/s0/final.json").read_text())["top1"] for v in ("bal", "imb")]
    cells = rows[0].split(" | ")
    assert cells[2:5] == [f"{id_sl[0]:.2f}", f"{id_sl[1]:.2f}", f"{100 * (id_sl[0] - id_sl[1]) / id_sl[0]:.2f}"]


def test_tables_3_and_4_on_several_gpus_launch_with_torchrun():
    """NPROC=8: every ldam_drw.py / moco_ssp.py / crt.py run of SET=imagenet_lt / inat is launched by torchrun
    with 8 processes (the arguments are those of the one-process runs); NPROC is refused elsewhere."""
    for dataset in ("imagenet_lt", "inat"):
        p = reproduce("--dry-run", SET=dataset, SEEDS="0", RUNS="R", LT_ROOT="/img", LT_LISTS="/lists", NPROC="8")
        assert p.returncode == 0, p.stderr
        lines = [l for l in p.stdout.splitlines() if not l.startswith("# stage")]
        scripts = set()
        for line in lines:
            python, *launch = shlex.split(line)
            assert launch[:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8"], line
            script, *argv = launch[5:]
            importlib.import_module(script[:-3]).parse_args(argv)
            scripts.add(script)
        assert scripts == {"ldam_drw.py", "moco_ssp.py", "crt.py"}
        single = reproduce("--dry-run", SET=dataset, SEEDS="0", RUNS="R", LT_ROOT="/img", LT_LISTS="/lists")
        assert [shlex.split(l)[1:] for l in single.stdout.splitlines() if not l.startswith("#")] == \
            [shlex.split(l)[6:] for l in lines]
    for env, msg in ((dict(SET="cifar10", NPROC="2"), "NPROC (torchrun) is for SET=imagenet_lt or inat"),
                     (dict(SET="inat", NPROC="0"), "NPROC must be a whole number >= 1")):
        bad = reproduce("--dry-run", **env)
        assert bad.returncode == 2 and msg in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_semi_synthetic_dry_run_chains_and_table_sits_beside_the_paper(tmp_path):
    """paper2-semi: SimSiam, SL and SL on the 50 rare images pre-train (no flips) on the semi-synthetic folders,
    each probed 5-way on the rare classes; the table puts the probes' top-1 beside Fig. 4's 70.1 / 44.3 / 36.5."""
    p = reproduce("paper2-semi", "--dry-run", SEEDS="0", RUNS="S")
    assert p.returncode == 0, p.stderr
    runs = {}
    for line in (l for l in p.stdout.splitlines() if not l.startswith("#")):
        _, script, *argv = shlex.split(line)
        runs[flag(argv, "--out")] = (script, importlib.import_module(script[:-3]).parse_args(argv))
    for m in ("simsiam", "sl", "sl-rare"):
        script, pre = runs[f"S/pretrain/{m}/s0"]
        assert pre.no_flip and pre.dataset == "folder"
        assert (pre.data_root, pre.rho, pre.imb_type) == (("S/data/semi-rare10", 1.0, "exp") if m == "sl-rare" else
                                                          ("S/data/semi", 0.002, "step"))
        probe = runs[f"S/{m}/s0"][1]
        assert probe.ckpt == f"S/pretrain/{m}/s0/last.pt" and probe.data_root == "S/data/semi-rare"
    assert runs["S/pretrain/simsiam/s0"][0] == "simsiam_rwsam.py" and runs["S/pretrain/sl/s0"][1].recipe == "he"
    for m, top1 in (("simsiam", 60.0), ("sl", 40.0)):
        (tmp_path / m / "s0").mkdir(parents=True)
        (tmp_path / m / "s0" / "final.json").write_text(json.dumps({"top1": top1}))
    table = reproduce("paper2-semi", "table", RUNS=str(tmp_path)).stdout
    assert "| simsiam | 70.1 | 60.00 (1 seed) |" in table and "| sl | 44.3 | 40.00 (1 seed) |" in table
    assert "| sl-rare | 36.5 | not run |" in table


def test_appendix_rows_run_only_when_named_and_chain():
    """e3: LDAM-DRW + D_U at 1-4x |D_L| from the ldam-drw base (paper 1 App. E.3); f3: CE / LDAM-DRW on step
    imbalance, ± rotation SSP on the same step subset (App. F.3); e4: self-training from scratch on a quarter, half,
    three quarters of D_L (App. E.4). None is part of the default run."""
    assert not any(k in reproduce("--dry-run", SEEDS="0").stdout for k in ("e3-", "e4-", "f3-", "rotation-step"))
    p = reproduce("e3", "e4", "f3", "--dry-run", SEEDS="0", RUNS="R")
    assert p.returncode == 0, p.stderr
    runs = {}
    for line in (l for l in p.stdout.splitlines() if not l.startswith("#")):
        _, script, *argv = shlex.split(line)
        runs[flag(argv, "--out")] = importlib.import_module(script[:-3]).parse_args(argv)
    assert [runs[f"R/e3-du{m}/s0"].unlabeled_mult for m in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert all(runs[f"R/e3-du{m}/s0"].base == "R/ldam-drw/s0/last.pt" for m in (1, 2, 3, 4))
    assert [runs[f"R/e4-dl{f}/s0"].labeled_frac for f in (0.25, 0.5, 0.75)] == [0.25, 0.5, 0.75]
    assert all(runs[f"R/e4-dl{f}/s0"].base is None and runs[f"R/e4-dl{f}/s0"].unlabeled_mult == 5
               for f in (0.25, 0.5, 0.75))
    assert runs["R/pretrain/rotation-step/s0"].imb_type == "step"
    for row in ("f3-ce", "f3-ldam-drw"):
        assert runs[f"R/{row}/s0"].imb_type == runs[f"R/{row}+ssp/s0"].imb_type == "step"
        assert runs[f"R/{row}+ssp/s0"].pretrained == "R/pretrain/rotation-step/s0/last.pt"
    assert (runs["R/f3-ldam-drw/s0"].loss, runs["R/f3-ce/s0"].loss) == ("ldam", "ce")


# ----- SET=imagenet_lt paper2-fig1 / paper2-table1b: paper 2 on ImageNet ------------------------------------------

IMG = dict(SET="imagenet_lt", LT_ROOT="/img", LT_LISTS="/lists", IMAGENET_TRAIN="/full.txt", CUB_ROOT="/cub",
           CARS_ROOT="/cars", PETS_ROOT="/pets", AIRCRAFT_ROOT="/air")
TARGETS = {"cub": ("folder", "/cub"), "cars": ("cars", "/cars"), "aircraft": ("aircraft", "/air"),
           "pets": ("pets", "/pets")}


def _imagenet_dry_run(*targets, **env):
    """(the datasets_lt.py argv, {out: (stage, script, argv, args)}) of an ImageNet dry run; every later command
    parses with its script's parse_args and reads only checkpoints an earlier stage writes."""
    p = reproduce(*targets, "--dry-run", **{**IMG, "RUNS": "I", **env})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "# stage lists" and lines[2] == "# stage 1"
    python, script, *lists = shlex.split(lines[1])
    assert python == sys.executable and script == "datasets_lt.py"
    runs, stage = {}, 1
    for line in lines[3:]:
        if line.startswith("# stage"):
            stage += 1
            continue
        launcher, script, argv = _split_launch(line)
        args = importlib.import_module(script[:-3]).parse_args(argv)
        for name in NEEDS:
            if flag(argv, name):
                assert runs[flag(argv, name)[:-len("/last.pt")]][0] < stage, line
        assert flag(argv, "--out") not in runs, f"two runs write {flag(argv, '--out')}"
        runs[flag(argv, "--out")] = (stage, script, argv, args, launcher)
    return lists, runs


def _split_launch(line):
    python, *rest = shlex.split(line)
    launcher = rest[:5] if rest[:2] == ["-m", "torch.distributed.run"] else []
    script, *argv = rest[len(launcher):]
    return launcher, script, argv


def test_imagenet_fig1_dry_run_writes_the_lists_then_every_cell_with_the_papers_recipe():
    lists, runs = _imagenet_dry_run("paper2-fig1", SEEDS="0 1")
    assert (flag(lists, "--train-list"), flag(lists, "--lt-list"), flag(lists, "--out-dir")) == \
        ("/full.txt", "/lists/ImageNet_LT_train.txt", "I/lists")
    pre = {o: v for o, v in runs.items() if o.startswith("I/pretrain/")}
    assert len(pre) == 3 * 2 * 5 * 2 * 2                             # methods × r × sizes × {imb, bal} × seeds
    sizes = {"1": "", "0.75": "-sub0.75", "0.5": "-sub0.5", "0.25": "-sub0.25", "0.125": "-sub0.125"}
    for out, (stage, script, argv, a, _) in pre.items():
        m, cell, seed = out.split("/")[2:]
        r, q, v = cell[1:].split("-q")[0], cell.split("-q")[1].rsplit("-", 1)[0], cell.rsplit("-", 1)[1]
        assert stage == 1 and a.seed == int(seed[1:]) and a.dataset == "imagenet_lt" and a.data_root == "/img"
        assert a.train_list == f"I/lists/{'bal-' if v == 'bal' else ''}r{r}{sizes[q]}.txt" and a.arch == "resnet50"
        if m == "sl":       # He et al. / paper 2: CE, ResNet-50, 90 epochs at full size, the steps kept at size q
            assert script == "ldam_drw.py" and (a.recipe, a.loss, a.rule, a.schedule) == ("he", "ce", "none", "he")
            assert a.epochs == round(90 / float(q)) and a.test_list == "/lists/ImageNet_LT_test.txt"
        else:               # App. A.1: lr 0.025 at batch 256, 300 epochs at full size, 300/q on the downsampled lists
            assert (script, a.opt) == ({"moco": "moco_ssp.py", "simsiam": "simsiam_rwsam.py"}[m], "sgd")
            assert (a.batch_size, a.lr, a.subsample) == (256, 0.025, float(q))
            assert (a.recipe, a.epochs) == ("paper2", round(300 / float(q))) if m == "moco" else a.epochs == 300
        if v == "imb":      # its balanced partner: the same command on the balanced list of equal n
            b_argv = pre[out.replace("-imb/", "-bal/")][2]
            assert [x.replace("/bal-", "/").replace("-bal/", "-imb/") for x in b_argv] == argv
    for out, (stage, script, argv, a, _) in pre.items():
        ckpt = out + "/last.pt"
        ood = {o.split("/")[2]: runs[o] for o in runs if o.startswith("I/ood/") and runs[o][3].ckpt == ckpt}
        assert set(ood) == set(TARGETS)                              # the four fine-tuning targets, every cell
        for t, (_, e_script, _, e, _) in ood.items():
            assert e_script == "eval_ood.py" and (e.target, e.data_root) == TARGETS[t]
            assert (e.epochs, e.seed, e.download) == (150, a.seed, False)
        probe = [runs[o][3] for o in runs if o.startswith("I/id/") and runs[o][3].ckpt == ckpt]
        if out.split("/")[2] == "simsiam":
            assert probe == []                                       # SimSiam: OOD only (Table 2, Fig. 6)
        else:               # the ID probe: all of ImageNet's train images, its val set (= ImageNet-LT's test list)
            assert [(e.train_list, e.test_list, e.epochs, e.lr, e.data_root) for e in probe] == \
                [("/full.txt", "/lists/ImageNet_LT_test.txt", 100, 30.0, "/img")]
    assert len(runs) == len(pre) + 2 * 2 * 5 * 2 * 2 * 5 + 2 * 5 * 2 * 2 * 4
    scaled = _imagenet_dry_run("paper2-fig1", SEEDS="0", METHODS="sl", RHOS="0.0025", SIZES="0.5", SCALE="0.1",
                               IMAGENET_VAL="/val.txt")[1]
    assert scaled["I/pretrain/sl/r0.0025-q0.5-bal/s0"][3].epochs == 18          # round(9 / 0.5)
    assert scaled["I/id/sl/r0.0025-q0.5-imb/s0"][3].test_list == "/val.txt" and len(scaled) == 2 * (1 + 1 + 4)


def test_imagenet_table1b_dry_run_shares_the_fig1_runs_and_trains_rwsam_from_the_plain_run():
    lists, runs = _imagenet_dry_run("paper2-table1b", SEEDS="0")
    assert flag(lists, "--out-dir") == "I/lists"
    pre = {o.split("/")[2] + "/" + o.split("/")[3]: v for o, v in runs.items() if o.startswith("I/pretrain/")}
    assert set(pre) == {"moco/r0.004-q1-imb", "moco+sam/r0.004-q1-imb", "moco/r0.004-q1-bal",
                        "moco+rwsam/r0.004-q1-imb", "simsiam/r0.004-q1-imb", "simsiam/r0.004-q1-bal",
                        "simsiam+rwsam/r0.004-q1-imb"}
    for name, (stage, script, argv, a, _) in pre.items():
        assert a.train_list == ("I/lists/bal-r0.004.txt" if name.endswith("bal") else "I/lists/r0.004.txt")
        assert a.epochs == 300 and a.subsample == 1 and a.opt == ("sam" if "+sam" in name else "rwsam" if "rwsam" in
                                                                   name else "sgd")
        if a.opt != "sgd":  # App. C.1 on ImageNet-LT: ρ 2, α 0.5 (ASAM, as the authors)
            assert (a.sam_rho, a.alpha, a.adaptive) == (2.0, 0.5, True)
        if a.opt == "rwsam":  # stage 2: a fresh model, the features of the plain run of the same list
            assert a.stage1 == f"I/pretrain/{name.split('+')[0]}/r0.004-q1-imb/s0/last.pt" and stage == 2
    assert pre["simsiam+rwsam/r0.004-q1-imb"][3].stage2_init == "scratch"
    evals = [v for o, v in runs.items() if not o.startswith("I/pretrain/")]
    assert len(evals) == 7 * 4 and all(s == "eval_ood.py" for _, s, _, _, _ in evals)
    both = _imagenet_dry_run("paper2-fig1", "paper2-table1b", SEEDS="0")[1]     # one set of runs, none twice
    fig1 = _imagenet_dry_run("paper2-fig1", SEEDS="0")[1]
    assert set(both) == set(fig1) | set(runs) and len(set(fig1) & set(runs)) == 4 + 4 * 4
    multi = _imagenet_dry_run("paper2-fig1", "paper2-table1b", SEEDS="0", NPROC="4")[1]
    assert {o for o, v in multi.items() if v[4]} == {o for o in multi if o.startswith("I/pretrain/")}
    assert all(v[4][-1] == "4" and v[1] in ("ldam_drw.py", "moco_ssp.py", "simsiam_rwsam.py")
               for v in multi.values() if v[4])


@pytest.mark.parametrize("target,env,msg", [
    ("paper2-fig1", {"IMAGENET_TRAIN": ""}, "reproduce.sh: set IMAGENET_TRAIN: paper 2's ImageNet runs need"),
    ("paper2-table1b", {"CARS_ROOT": "", "PETS_ROOT": ""}, "reproduce.sh: set CARS_ROOT, PETS_ROOT: "),
    ("paper2-fig1", {"RHOS": "0.004 0.01"}, "reproduce.sh: '0.01' in RHOS or SIZES: paper 2's ImageNet lists are"),
    ("paper2-fig1", {"SIZES": "1 0.3"}, "reproduce.sh: '0.3' in RHOS or SIZES"),
    ("paper2-fig1", {"METHODS": "sl byol"}, "reproduce.sh: unknown method 'byol' in METHODS"),
    ("paper2-table1b", {"SET": "cifar10"}, "reproduce.sh: paper2-fig1 runs with SET=cifar10 or imagenet_lt, "
                                           "paper2-table1b with SET=imagenet_lt; not SET=cifar10")])
def test_imagenet_settings_are_checked_first(target, env, msg):
    p = reproduce(target, "--dry-run", **{**IMG, "RUNS": "I", **env})
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1 and p.stderr.startswith(msg), p.stderr


def test_imagenet_paths_are_checked_and_a_bad_list_is_one_line(tmp_path):
    """Before the lists are written every path must exist; then datasets_lt's DataError is one line and exit 2."""
    for d in ("img", "lists", "cub", "cars", "pets", "air"):
        (tmp_path / d).mkdir()
    (tmp_path / "full.txt").write_text("train/n0/a.JPEG 0\n")
    env = {k: str(tmp_path / v[1:]) for k, v in IMG.items() if k != "SET"}
    env.update(SET="imagenet_lt", GPU="-1", RUNS=str(tmp_path / "runs"), CUB_ROOT=str(tmp_path / "no-cub"))
    p = reproduce("paper2-fig1", **env)
    assert p.returncode == 2 and p.stdout == "" and p.stderr == (
        f"reproduce.sh: CUB_ROOT={tmp_path}/no-cub, IMAGENET_VAL={tmp_path}/lists/ImageNet_LT_test.txt: no such file "
        "or folder (bash reproduce.sh --help says what each holds)\n")
    (tmp_path / "lists" / "ImageNet_LT_test.txt").write_text("val/n0/b.JPEG 0\n")
    p = reproduce("paper2-table1b", **{**env, "CUB_ROOT": str(tmp_path / "cub")})
    assert p.returncode == 2 and p.stderr == (
        f"reproduce.sh: DATA: image list '{tmp_path}/lists/ImageNet_LT_train.txt' does not exist\n"), p.stderr
    assert not (tmp_path / "runs" / "pretrain").exists()
    p = reproduce("ce", SET="imagenet_lt", GPU="-1", LT_ROOT=str(tmp_path / "no-img"))      # Tables 3-4 too
    assert p.returncode == 2 and p.stderr.startswith(f"reproduce.sh: DATA: no folder '{tmp_path}/no-img'")


def test_imagenet_tables_put_each_number_in_its_cell_beside_the_papers(tmp_path):
    def final(folder, seed, top1):
        d = tmp_path / folder / f"s{seed}"
        d.mkdir(parents=True)
        (d / "final.json").write_text(json.dumps({"top1": top1, "wall_seconds": 60}))
    id_bal, id_imb = {0: 50.0, 1: 52.0}, {0: 49.0, 1: 50.0}
    for s in (0, 1):
        final("id/moco/r0.004-q1-bal", s, id_bal[s])
        final("id/moco/r0.004-q1-imb", s, id_imb[s])
    for t, acc in zip(("cub", "cars", "aircraft", "pets"), (60.0, 70.0, 80.0, 90.0)):
        final(f"ood/{t}/sl/r0.0025-q0.5-imb", 0, acc)
        final(f"ood/{t}/moco+rwsam/r0.004-q1-imb", 0, acc + 1)
        final(f"ood/{t}/moco/r0.004-q1-bal", 0, acc + 2)
    final("ood/cub/sl/r0.0025-q0.5-imb", 1, 10.0)                     # seed 1 has one target of four: left out
    p = reproduce("paper2-fig1", "table", SET="imagenet_lt", RUNS=str(tmp_path))   # no ImageNet setting needed
    assert p.returncode == 0, p.stderr
    deltas = [100 * (id_bal[s] - id_imb[s]) / id_bal[s] for s in (0, 1)]
    ours_delta = f"{statistics.mean(deltas):.2f} ± {statistics.stdev(deltas):.2f} (2 seeds)"
    id_part, ood_part = p.stdout.split("### OOD")
    assert (f"| MoCo v2 | 0.004 | 116K | 50.4 | 51.00 ± 1.41 (2 seeds) | 49.5 | 49.50 ± 0.71 (2 seeds) | "
            f"{100 * (50.4 - 49.5) / 50.4:.1f} | {ours_delta} |") in id_part.splitlines()
    assert "| SL | 0.004 | 14K | 26.3 | not run | 24.9 | not run | 5.3 | not run |" in id_part.splitlines()
    assert "SimSiam" not in id_part.split("### ID")[1]
    assert "| SL | 0.0025 | 40K | – | not run | 65.9 | 75.00 (1 seed) | – | not run |" in ood_part.splitlines()
    assert "| MoCo v2 | 0.004 | 116K | 80.3 | 77.00 (1 seed) | 80.2 | not run | 0.1 | not run |" in \
        ood_part.splitlines()
    assert "| SimSiam | 0.0025 | 10K | – | not run | 76.0 | not run | – | not run |" in ood_part.splitlines()
    assert "Table 1(b)" not in p.stdout
    p = reproduce("paper2-table1b", "table", SET="imagenet_lt", RUNS=str(tmp_path))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert ("| MoCo v2+rwSAM | 70.3±0.7 | 61.00 (1 seed) | 88.7±0.3 | 71.00 (1 seed) | 84.9±0.6 | 81.00 (1 seed) | "
            "81.7±0.4 | 91.00 (1 seed) | 81.4 | 76.00 (1 seed) |") in lines
    assert ("| MoCo v2, balanced | 69.8±0.5 | 62.00 (1 seed) | 88.6±0.4 | 72.00 (1 seed) | 82.7±0.5 | 82.00 (1 seed) | "
            "80.0±0.4 | 92.00 (1 seed) | 80.2 | 77.00 (1 seed) |") in lines           # the Fig. 1 cell's runs
    assert "| SimSiam, balanced | 70.5±0.8 | not run | 87.9±0.7 | not run |" in p.stdout and "### ID" not in p.stdout
