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

TIMING = ("wall_seconds", "seconds_per_epoch")


def result(out):
    """final.json without its timings."""
    final = json.loads((out / "final.json").read_text())
    return {k: v for k, v in final.items() if k not in TIMING}


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
