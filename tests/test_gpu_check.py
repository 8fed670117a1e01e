"""gpu_check.sh's dry mode (DRY=1: the device sequence on the CPU, tiny settings) from an archive in the real
layout, and bench_train.py through it: every step recorded, the figures in the table those the runs wrote."""
import csv
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import datasets_lt as D
from conftest import ROOT

STEPS = ["env", "data", "tests", "bench", "ldam-drw-s0", "ldam-drw-s1", "ce-s0", "ce-s1"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A tar.xz of train/<class>/NNNN.jpg (8 a class) and test/<class>/ (2), the JPEG CIFAR-10's layout."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(0)
    with tarfile.open(root / "tiny.tar.xz", "w:xz") as tar:
        for split, n in (("train", 8), ("test", 2)):
            for c in range(10):
                for i in range(n):
                    path = root / split / f"c{c}" / f"{i:04d}.jpg"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        tar.add(root / "train", "train")
        tar.add(root / "test", "test")
    return root / "tiny.tar.xz"


def gpu_check(archive, out, **env):
    return subprocess.run(["bash", str(ROOT / "gpu_check.sh"), str(archive), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable, **env))


@pytest.fixture(scope="module")
def dry(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    r = gpu_check(archive, out, DRY="1")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "results.tsv") as f:
        return out, {row["check"]: row for row in csv.DictReader(f, delimiter="\t")}


@pytest.mark.slow
def test_dry_run_records_every_step_ok_in_order(dry):
    out, rows = dry
    assert list(rows) == STEPS and all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["data"]["detail"].startswith("100 files")                   # 10 × (8 + 2) images
    assert "skipped" in rows["tests"]["detail"]                              # no CUDA here: test_gpu.py skips
    assert all((out / f"{s}.log").exists() for s in STEPS[1:])


@pytest.mark.slow
def test_each_training_row_is_what_its_run_wrote(dry):
    out, rows = dry
    for run in STEPS[4:]:
        final = json.loads((out / "runs" / run / "final.json").read_text())
        args = json.loads((out / "runs" / run / "args.json").read_text())
        assert (args["loss"], args["rule"], args["seed"]) == {"ldam-drw": ("ldam", "drw"), "ce": ("ce", "none")}[
            run[:-3]] + (int(run[-1]),)
        assert final["epochs"] == 1 and final["class_counts"] == D.lt_counts(8, 10, 0.5)
        assert rows[run]["detail"].startswith(f"epoch 1/1: test error {final['test_error']:.2f}%")


@pytest.mark.slow
def test_bench_measures_every_run_and_the_kde(dry):
    out, rows = dry
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["runs"]) == {"ldam-eager", "ldam-amp", "ldam-compile", "ldam-pil", "simsiam", "rwsam",
                                  "simsiam-pil"}
    assert all(r["seconds_per_epoch"] > 0 and r["log"] is None for r in bench["runs"].values())
    assert bench["kde"]["n"] == 2000 and math.isfinite(bench["kde"]["seconds"])
    assert rows["bench"]["detail"].startswith("s/epoch: ldam-eager ")
    ldam = json.loads((out / "bench" / "ldam-eager" / "args.json").read_text())
    assert (ldam["batch_size"], ldam["loss"], ldam["rule"]) == (16, "ldam", "drw")


@pytest.mark.parametrize("env,archive_path,message", [
    ({}, "missing.tar.xz", "no archive at"),
    ({"BUDGET": "9m"}, None, "BUDGET must be whole seconds"),
    ({"STEPS": "tests benchmark"}, None, "STEPS holds tests, bench, runs, got 'benchmark'"),
])
def test_bad_settings_are_one_line_and_exit_2(archive, tmp_path, env, archive_path, message):
    r = gpu_check(tmp_path / archive_path if archive_path else archive, tmp_path / "out", DRY="1", **env)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
