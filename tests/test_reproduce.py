"""reproduce.sh: every README row is run, commands parse and chain, the table is the mean ± std it says."""
import importlib
import json
import os
import shlex
import subprocess
import sys

from conftest import ROOT, write_folder

ROWS = ["ce", "cb-ce", "focal", "cb-focal", "ce-drw", "ce-drs", "ldam", "ldam-drw",
        "ce+ssp", "cb-ce+ssp", "focal+ssp", "cb-focal+ssp", "ce-drw+ssp", "ce-drs+ssp", "ldam+ssp", "ldam-drw+ssp",
        "ce+st", "ldam-drw+st", "ce+crt", "simsiam", "simsiam+sam", "simsiam-balanced", "simsiam+rwsam", "moco"]
NEEDS = ("--pretrained", "--base", "--ckpt", "--stage1")


def reproduce(*args, **env):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", **env)
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
    assert lines["simsiam"] == "| simsiam | probe acc. % | 81.4 | 80.25 (1 seed) | 0.5 |"
    assert lines["ldam-drw+ssp"] == "| ldam-drw+ssp | error % | 22.17 | not run | — |"
    p = reproduce("table", RUNS=str(tmp_path), RHO="0.1")
    assert "| ce | error % | 13.61 | 32.00 ± 2.00 (3 seeds) | 1.5 |" in p.stdout


def test_failed_run_is_reported_and_its_dependents_skipped(tmp_path):
    p = reproduce("ce+crt", SEEDS="0", GPU="-1", RUNS=str(tmp_path / "runs"),
                  DATA=f"--dataset folder --data-root {tmp_path / 'missing'}")
    assert p.returncode == 1
    assert f"FAILED {tmp_path}/runs/ce/s0" in p.stdout
    assert f"skipped {tmp_path}/runs/ce+crt/s0: {tmp_path}/runs/ce/s0/last.pt is missing" in p.stdout
    assert "error:" in (tmp_path / "runs" / "ce" / "s0" / "log.txt").read_text()


def test_pipeline_on_fake_data_then_rerun_skips_and_resumes(tmp_path):
    write_folder(tmp_path / "data", per_class=(40, 30, 20), per_class_test=6, easy=True)
    env = dict(DATA=f"--dataset folder --data-root {tmp_path / 'data'}", RHO="0.5", SEEDS="0", JOBS="2",
               GPU="-1", RUNS=str(tmp_path / "runs"), ARGS="--epochs 1",
               ARGS_simsiam_rwsam="--batch-size 16 --knn-every -1")
    rows = ["ce+crt", "ce+ssp", "simsiam+rwsam"]
    p = reproduce(*rows, **env)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = tmp_path / "runs"
    for d in ["ce", "pretrain/rotation", "pretrain/simsiam", "pretrain/simsiam+rwsam", *rows]:
        assert (runs / d / "s0" / "final.json").exists(), d

    ce = json.loads((runs / "ce" / "s0" / "final.json").read_text())
    (runs / "ce" / "s0" / "final.json").unlink()                   # last.pt stays: continued with --resume
    p = reproduce(*rows, **env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("done already") == 6
    assert f"--resume {runs}/ce/s0/last.pt" in p.stdout
    again = json.loads((runs / "ce" / "s0" / "final.json").read_text())
    assert again["test_error"] == ce["test_error"] and again["epochs"] == 1

    table = reproduce("table", RUNS=str(runs), RHO="0.5").stdout
    for row in rows:
        line = next(l for l in table.splitlines() if l.startswith(f"| {row} |"))
        assert "(1 seed)" in line, line


# ----- paper2-fig1: paper 2 Fig. 1(a), SL vs SSL at equal n --------------------------------------------

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
    bad = reproduce("paper2-fig1", "--dry-run", METHODS="sl byol")
    assert bad.returncode == 2 and bad.stderr.strip() == "reproduce.sh: unknown method 'byol' in METHODS; methods: sl simsiam moco"


def test_fig1_tiny_end_to_end_prints_the_table(tmp_path):
    write_folder(tmp_path / "data", classes=tuple("abcd"), per_class=(40,) * 4, per_class_test=4, easy=True)
    write_folder(tmp_path / "ood", classes=tuple("xyz"), per_class=(6,) * 3, per_class_test=2)   # STL-10 stand-in
    env = dict(DATA=f"--dataset folder --data-root {tmp_path / 'data'}", RHOS="0.5", SIZES="1", METHODS="sl moco",
               SEEDS="0", SCALE="0.001", JOBS="2", GPU="-1", RUNS=str(tmp_path / "runs"),
               OOD=f"--target folder --data-root {tmp_path / 'ood'}",
               ARGS_moco_ssp="--batch-size 16 --knn-every 0")
    p = reproduce("paper2-fig1", **env)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = tmp_path / "runs"
    ck = json.loads((runs / "pretrain/sl/r0.5-q1-bal/s0/final.json").read_text())
    assert ck["epochs"] == 1 and ck["class_counts"] == [29] * 4                 # [40, 31, 25, 20] = 116, balanced
    table = p.stdout[p.stdout.index("Paper 2 Fig. 1(a)"):]
    for ev in ("linear:folder", "probe:ood"):
        assert f"({ev})" in table
    rows = [l for l in table.splitlines() if l.startswith("| 0.5 | 116 |")]
    assert len(rows) == 2 and all(l.count("|") == 9 and "—" not in l for l in rows)
    # each Δ cell is Eq. (1) of the two probes' accuracies it sits beside
    id_sl = [json.loads((runs / f"id/sl/r0.5-q1-{v}/s0/final.json").read_text())["top1"] for v in ("bal", "imb")]
    cells = rows[0].split(" | ")
    assert cells[2:5] == [f"{id_sl[0]:.2f}", f"{id_sl[1]:.2f}", f"{100 * (id_sl[0] - id_sl[1]) / id_sl[0]:.2f}"]
