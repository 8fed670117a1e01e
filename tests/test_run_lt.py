"""run_lt.py: one run per output folder, an --out that cannot be used refused before any data is read, and
messages that name only flags the script has."""
import ast
import os
import re
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest

import run_lt
from conftest import ROOT, parser_of, run_script

MISSING = ["--dataset", "folder", "--data-root", "/nonexistent-data", "--gpu", "-1"]   # the data error comes later


def hold(out):
    """A process that claims `out` as a run does and keeps it until killed; returns it once the lock is taken."""
    code = f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import run_lt; run_lt.claim_out({str(out)!r}); " \
           f"print('held', flush=True); time.sleep(120)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_on_a_held_out_is_refused_naming_the_other_runs_pid(tmp_path):
    out = tmp_path / "run"
    holder = hold(out)
    try:
        r = run_script("ldam_drw.py", *MISSING, "--out", out)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"{out} is in use by another run (pid {holder.pid})" in r.stderr
        assert sorted(os.listdir(out)) == [".lock"]              # nothing of the second run was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = run_script("ldam_drw.py", *MISSING, "--out", out)          # a killed run's lock goes with it
    assert r.returncode == 2 and "in use" not in r.stderr and "/nonexistent-data" in r.stderr


@pytest.mark.parametrize("script", ["ldam_drw.py", "rotation_ssp.py", "self_training.py", "moco_ssp.py",
                                    "simsiam_rwsam.py"])
def test_an_out_that_cannot_be_created_is_one_line_before_the_data_is_read(tmp_path, script):
    (tmp_path / "file").write_text("")
    r = run_script(script, *MISSING, "--out", tmp_path / "file" / "run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--out {tmp_path / 'file' / 'run'} cannot be used: Not a directory" in r.stderr


def test_a_process_claims_one_folder_at_a_time_and_lets_it_go_at_the_end(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_lt.claim_out(a)
    run_lt.claim_out(a)                                         # the same run claiming again: no self-deadlock
    assert (a / ".lock").read_text() == f"{os.getpid()}\n"
    run_lt.claim_out(b)                                         # a new run in this process lets the last one go
    other = hold(a)                                             # another process can take a
    other.kill()
    other.wait()
    with pytest.raises(SystemExit):
        run_lt.fail("a user's mistake")                        # every end of a run lets its folder go
    holder = hold(b)
    holder.kill()
    holder.wait()


SCRIPTS = ["ldam_drw.py", "rotation_ssp.py", "moco_ssp.py", "simsiam_rwsam.py", "self_training.py", "crt.py",
           "eval_linear.py", "eval_ood.py"]
# a flag a shared message names that a caller cannot reach: these callers pass the checkpoint's own arch
UNREACHABLE = {("load_backbone", "--arch"): {"crt.py", "eval_linear.py", "eval_ood.py"}}


def message_flags(path):
    """(function, flag) for each --flag in the text of a fail(...) or print("error: / warning: ...") in `path`."""
    def text(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):                      # f"...": a placeholder is a space
            return "".join(v.value if isinstance(v, ast.Constant) else " " for v in node.values)
        return " ".join(text(c) for c in ast.iter_child_nodes(node))
    found = []
    for fn in (n for n in ast.walk(ast.parse(Path(path).read_text())) if isinstance(n, ast.FunctionDef)):
        for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
            name, words = getattr(call.func, "attr", getattr(call.func, "id", "")), " ".join(map(text, call.args))
            if name == "fail" or name == "print" and words.startswith(("error", "warning")):
                found += [(fn.name, f) for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", words)
                          if f != "--nproc_per_node"]              # torchrun's own
    return found


def test_every_message_of_a_script_names_flags_that_script_has():
    """Each script's own messages, and each run_lt / datasets_lt message a script's calls can print."""
    flags = {s: {o for a in parser_of(s)._actions for o in a.option_strings} for s in SCRIPTS}
    wrong = [(s, fn, f) for s in SCRIPTS for fn, f in message_flags(ROOT / s) if f not in flags[s]]
    for module, alias in (("run_lt.py", "R"), ("datasets_lt.py", "D")):
        for fn, f in message_flags(ROOT / module):
            callers = [s for s in SCRIPTS if re.search(rf"\b{alias}\.{fn}\(", (ROOT / s).read_text())]
            wrong += [(s, f"{module}:{fn}", f) for s in callers
                      if f not in flags[s] and s not in UNREACHABLE.get((fn, f), ())]
    assert wrong == []
    assert ("check_shards", "--batch-size") in message_flags(ROOT / "run_lt.py")   # the scan does find flags


def test_progress_lines_every_n_steps_or_10_s_rank_0_only_never_in_metrics(tmp_path, capsys, monkeypatch):
    """--print-freq N: a line after every N-th step (step/total, images/s, running loss, ETA); 0: only once 10 s
    passed since the last line, so a short epoch prints none; other ranks print nothing; metrics.jsonl holds the
    epochs alone, and --resume may change the frequency."""
    import json
    import ldam_drw
    from conftest import write_folder
    write_folder(tmp_path / "data", per_class=(6, 6, 6), per_class_test=2)
    argv = ["--dataset", "folder", "--data-root", str(tmp_path / "data"), "--rho", "1", "--gpu", "-1", "--epochs", "2",
            "--batch-size", "4", "--out", str(tmp_path / "run")]                        # 18 images: 5 steps
    ldam_drw.main(argv + ["--print-freq", "2"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("  step ")]
    assert [l.split()[1] for l in lines] == ["2/5", "4/5"] * 2
    assert all(re.fullmatch(r"  step \d/5  \d+ img/s  loss \d+\.\d{4}  epoch eta \d+ s", l) for l in lines)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    ldam_drw.main(argv[:-2] + ["--out", str(tmp_path / "quiet")])                       # short epochs: no line
    assert "  step " not in capsys.readouterr().out
    clock = iter(range(0, 1000, 4))                                                      # 4 s a step
    monkeypatch.setattr(run_lt.time, "time", lambda: next(clock))
    progress = run_lt.Progress(10)
    for step in range(10):
        progress(step, 8 * (step + 1), lambda: 0.5)
    assert [l.split()[1] for l in capsys.readouterr().out.splitlines()] == ["3/10", "6/10", "9/10"]
    monkeypatch.setenv("RANK", "1")
    other = run_lt.Progress(10, every=1)
    for step in range(10):
        other(step, 8, lambda: 0.5)
    assert capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")
    (tmp_path / "run" / "final.json").unlink()
    with pytest.raises(SystemExit):
        ldam_drw.main(["--resume", str(tmp_path / "run" / "last.pt"), "--print-freq", "1", "--lr", "1"])
    err = capsys.readouterr().err
    assert "drop --lr (with --resume only" in err and "--print-freq" in err.split("drop --lr")[1]
    ldam_drw.main(["--resume", str(tmp_path / "run" / "last.pt"), "--gpu", "-1", "--print-freq", "1"])
    assert (tmp_path / "run" / "final.json").exists()


def test_one_tf32_policy_in_every_script_recorded_and_a_resume_on_another_device_type_warned(tmp_path, capsys):
    """Every script has --strict-fp32 and records the TF32 it ran with (args.tf32: on CUDA unless --strict-fp32,
    never on the CPU); a run resumed on another device type than it trained on says its streams differ."""
    import json
    import ldam_drw
    import torch
    from conftest import write_folder
    assert all("--strict-fp32" in {o for a in parser_of(s)._actions for o in a.option_strings} for s in SCRIPTS)
    write_folder(tmp_path / "data", per_class=(6, 6, 6), per_class_test=2)
    run = tmp_path / "run"
    ldam_drw.main(["--dataset", "folder", "--data-root", str(tmp_path / "data"), "--rho", "1", "--gpu", "-1",
                   "--epochs", "2", "--batch-size", "8", "--out", str(run)])
    assert json.loads((run / "args.json").read_text())["tf32"] is False
    assert "resumes on" not in capsys.readouterr().err
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert "saved_gpu" not in ckpt["args"]
    ckpt["args"]["gpu"], ckpt["epoch"] = 0, 1                                   # as if trained on cuda:0
    torch.save(ckpt, run / "last.pt")
    (run / "final.json").unlink()
    ldam_drw.main(["--resume", str(run / "last.pt"), "--gpu", "-1"])
    assert "warning: this run trained on CUDA and resumes on cpu" in capsys.readouterr().err
