"""Faults a long run meets, where the run machinery lives (run_lt.py): a full disk while a run file is written, a
kill -9 at any moment of any script, a stop signal. Each leaves files that load and a run that goes on to the
result an uninterrupted run gives."""
import errno
import io
import json
import os

import pytest
import torch

import ldam_drw as L
import run_lt
from conftest import write_folder

def result(out):
    """final.json without its timings, its run folder written as <out>."""
    final = json.loads((out / "final.json").read_text().replace(str(out), "<out>"))
    return {k: v for k, v in final.items() if "seconds" not in k}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_folder(root / "data", per_class=(6, 6, 6), per_class_test=2)
    return root


def ldam_args(data, out):
    return ["--dataset", "folder", "--data-root", str(data / "data"), "--rho", "1", "--gpu", "-1", "--epochs", "2",
            "--batch-size", "8", "--out", str(out)]


@pytest.fixture(scope="module")
def whole(data):
    L.main(ldam_args(data, data / "whole"))
    return result(data / "whole")


def full_disk(monkeypatch, name, nth):
    """The `nth` write of a file called `name` (metrics.jsonl: the first is the cut of open_run) fails with ENOSPC after half of it reached the disk."""
    count = {"n": 0}

    def hit(path):
        if os.path.basename(str(path)) == name + ".tmp":
            count["n"] += 1
            return count["n"] == nth
        return False

    def half(path, data):
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_save, real_open = torch.save, open

    def save(obj, path, *a, **k):
        if not hit(path):
            return real_save(obj, path, *a, **k)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        half(path, buffer.getvalue())

    class Full(io.StringIO):
        def __init__(self, path):
            super().__init__()
            self.path = path

        def __exit__(self, *exc):
            half(self.path, self.getvalue().encode())

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(run_lt, "open", lambda path, mode="r", *a, **k: Full(path) if "w" in mode and hit(path)
                        else real_open(path, mode, *a, **k), raising=False)


@pytest.mark.parametrize("name,nth,kept_epoch,rows", [("last.pt", 2, 1, 2), ("metrics.jsonl", 3, 1, 1),
                                                      ("final.json", 1, 2, 2)])
def test_a_full_disk_keeps_the_previous_file_says_one_line_and_the_run_resumes(data, whole, tmp_path, monkeypatch,
                                                                              capsys, name, nth, kept_epoch, rows):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        full_disk(m, name, nth)
        with pytest.raises(SystemExit) as stop:
            L.main(ldam_args(data, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1, err
    kept = "nothing was written" if name == "final.json" else "the previous copy is kept"
    assert err[0].startswith(f"error: cannot write {out / name} (No space left on device); {kept}")
    assert not list(out.glob("*.tmp")) and not (out / "final.json").exists()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == kept_epoch    # the last good checkpoint
    assert len(run_lt.read_metrics(out / "metrics.jsonl")) == rows
    L.main(["--resume", str(out / "last.pt"), "--gpu", "-1"])                        # the lock went with the fault
    assert result(out) == whole


# ----- kill -9 at any moment a run file appears, in every script that writes one --------------------

RESUMABLE = ["ldam_drw.py", "rotation_ssp.py", "moco_ssp.py", "simsiam_rwsam.py", "self_training.py", "crt.py"]
COMMON = ["--gpu", "-1", "--epochs", "2", "--batch-size", "8", "--print-freq", "1"]     # every progress line too
ON_DATA = ["--dataset", "folder", "--data-root", "{data}", "--rho", "1"]
KILLED = {
    "ldam_drw.py": ON_DATA,
    "rotation_ssp.py": ON_DATA,
    "moco_ssp.py": ON_DATA + ["--arch", "resnet10", "--queue", "16", "--bn-splits", "2", "--knn-every", "2"],
    "simsiam_rwsam.py": ON_DATA + ["--gap-views", "2"],
    "self_training.py": ON_DATA[:-1] + ["0.5", "--unlabeled-mult", "0.5", "--pool-shortfall", "cap", "--loss", "ce",
                                        "--rule", "none", "--st-batch-size", "8"],
    "crt.py": ["--ckpt", "{ckpt}"],
    "eval_linear.py": ["--ckpt", "{ckpt}"],
    "eval_ood.py": ["--ckpt", "{ckpt}", "--target", "folder", "--data-root", "{data}", "--norm", "target"],
}
MOMENTS = 2          # kill moments per script, drawn at random (seeded) from each half of its run's file writes


def check_loads(out):
    """Every complete file of a run folder loads; a temp file (the write the kill cut short) is ignored."""
    for path in out.iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def sweep(data):
    """Every script run whole (counting its file writes), then killed at MOMENTS of them and continued."""
    import numpy as np
    from conftest import drive
    paths = {"data": str(data / "data"), "ckpt": str(data / "whole" / "last.pt")}
    argv = lambda s, out: [a.format(**paths) for a in KILLED[s] + COMMON] + ["--out", str(out)]
    whole = drive({s: [s, argv(s, data / "sweep" / s / "whole"), 0] for s in KILLED})
    rng, todo = np.random.default_rng(0), {}
    for s, (code, err) in whole.items():
        assert code == 0, err
        n = int(err.strip().splitlines()[-1].removeprefix("replaced: "))
        for k in sorted({int(rng.integers(1, n // 2 + 1)), int(rng.integers(n // 2 + 1, n + 1))}):
            todo[f"{s} {k}"] = [s, argv(s, data / "sweep" / s / str(k)), k]
    killed = drive(todo)
    loads, again = {}, {}
    for case, (code, err) in killed.items():
        s, k = case.split()
        out = data / "sweep" / s / k
        loads[case] = check_loads(out) is None
        last = next((p for p in (out / "last.pt", out / "base" / "last.pt") if p.exists()), None)  # self-training:
        again[case] = [s, ["--resume", str(last), "--gpu", "-1"] if s in RESUMABLE and last else argv(s, out)]  # base
    return whole, killed, loads, drive(again)


@pytest.mark.slow
@pytest.mark.parametrize("script", list(KILLED))
def test_a_run_killed_at_any_moment_loads_and_goes_on_to_the_uninterrupted_result(data, whole, sweep, script):
    _, killed, loads, again = sweep
    cases = [c for c in killed if c.split()[0] == script]
    assert len(cases) == MOMENTS
    for case in cases:
        assert killed[case][0] == -9, f"{case}: not killed ({killed[case]})"
        assert loads[case]
        code, err = again[case]
        assert code == 0, f"{case}: {err}"
        out = data / "sweep" / script / case.split()[1]
        assert result(out) == result(data / "sweep" / script / "whole"), case
