"""Bad input × every script, as a user meets it: exit code 2, exactly one line on stderr, no traceback, and
nothing written to --out. Every check must fire before any training.

Each script is imported once in a subprocess (tests/bad_input_driver.py); each case then runs in a process
forked from it, so a case has its own exit code and stderr while torch is imported only once per script.
"""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, write_folder

SCRIPTS = ["ldam_drw.py", "rotation_ssp.py", "moco_ssp.py", "simsiam_rwsam.py", "self_training.py", "crt.py",
           "eval_linear.py", "eval_ood.py"]
TRAINERS = SCRIPTS[:5]
# what each script needs besides the bad part: the rest of a valid command line ({ckpt} is a real checkpoint)
BASE = {s: ["--dataset", "folder", "--data-root", "{good}", "--rho", "1", "--gpu", "-1", "--epochs", "1"]
        for s in TRAINERS}
BASE["simsiam_rwsam.py"] += ["--batch-size", "4"]
BASE["self_training.py"] += ["--unlabeled-mult", "0"]          # rho 1 leaves no pool to draw D_U from
BASE["crt.py"] = ["--ckpt", "{ckpt}", "--dataset", "folder", "--data-root", "{good}", "--gpu", "-1", "--epochs", "1"]
BASE["eval_linear.py"] = ["--ckpt", "{ckpt}", "--dataset", "folder", "--data-root", "{good}", "--gpu", "-1",
                          "--epochs", "1"]
BASE["eval_ood.py"] = ["--ckpt", "{ckpt}", "--target", "folder", "--data-root", "{good}", "--gpu", "-1", "--epochs", "1",
                       "--norm", "target"]

# flags every script has, with a value outside its range
SHARED = [["--epochs", "0"], ["--batch-size", "0"], ["--lr", "0"], ["--lr", "-0.1"], ["--lr", "nan"], ["--lr", "inf"], ["--lr", "1e300"],
          ["--wd", "-1e-4"], ["--seed", "-1"], ["--data-seed", "-1"], ["--val-frac", "1"], ["--val-frac", "-0.1"], ["--momentum", "1"],
          ["--gpu", "-2"]]
OWN = {
    "ldam_drw.py": [["--beta", "1"], ["--beta", "-0.5"], ["--gamma", "-1"], ["--s", "0"], ["--max-m", "-0.1"],
                    ["--warmup", "-1"], ["--warmup", "5"], ["--workers", "-1"], ["--rho", "0"], ["--rho", "100"]],
    "rotation_ssp.py": [["--warmup", "-1"], ["--warmup", "3"], ["--rho", "0"]],
    "moco_ssp.py": [["--moco-m", "1"], ["--moco-t", "0"], ["--moco-dim", "0"], ["--bn-splits", "0"], ["--queue", "0"],
                    ["--knn-every", "-1"], ["--knn-k", "0"], ["--knn-t", "0"], ["--workers", "-1"], ["--rho", "1.5"]],
    "simsiam_rwsam.py": [["--sam-rho", "-1"], ["--alpha", "-1"], ["--bandwidth", "0"], ["--stage1-epochs", "0"],
                         ["--knn-every", "-2"], ["--knn-k", "0"], ["--knn-t", "0"], ["--knn-val-frac", "0"],
                         ["--knn-val-frac", "1"], ["--rho", "0"], ["--gap-views", "0"]],
    "self_training.py": [["--st-batch-size", "0"], ["--unlabeled-mult", "-1"], ["--rho-u", "0"], ["--relevance", "1.5"],
                         ["--omega", "-1"],
                         ["--threshold", "1.5"], ["--beta", "1"], ["--gamma", "-1"], ["--s", "0"], ["--max-m", "-1"],
                         ["--warmup", "-1"], ["--warmup", "2"]],
    "crt.py": [["--workers", "-1"], ["--rho", "2"]],
    "eval_linear.py": [["--workers", "-1"]],
    "eval_ood.py": [["--backbone-lr-mult", "-1"], ["--size", "0"], ["--workers", "-1"]],
}
# broken data or checkpoints: {kind} is a folder or file the fixture writes
DATA = ["{unknown_test_class}", "{one_class}", "{truncated}", "{not_an_image}", "{missing}"]
CKPT_FLAG = {"ldam_drw.py": "--pretrained", "simsiam_rwsam.py": "--stage1", "self_training.py": "--base",
             "crt.py": "--ckpt", "eval_linear.py": "--ckpt", "eval_ood.py": "--ckpt"}


def _cases():
    cases = []
    for script in SCRIPTS:
        for bad in SHARED + OWN[script]:
            cases.append((script, "flag", bad))
        for kind in DATA:
            cases.append((script, "data", ["--data-root", kind]))
        for kind in ("{empty_pt}", "{damaged_pt}"):
            if script in CKPT_FLAG:
                cases.append((script, "checkpoint", [CKPT_FLAG[script], kind]))
            if script in TRAINERS:
                cases.append((script, "resume", ["--resume", kind]))
        if script in TRAINERS:
            cases.append((script, "resume", ["--resume", "{resume_" + script[:-3] + "}", "--lr", "0.5"]))
    cases.append(("simsiam_rwsam.py", "arch", ["--stage1", "{ckpt}"]))        # a ResNet-32: no --arch to suggest
    return cases


CASES = _cases()


def _argv(script, bad, paths, out):
    """The script's valid command line with `bad` replacing (or adding) flags, and its own --out."""
    base = [a.format(**paths) for a in BASE[script]]
    bad = [a.format(**paths) for a in bad]
    if bad[0] == "--resume":                                  # --resume stands alone, plus --gpu
        return bad + ["--gpu", "-1"]
    for i in range(0, len(bad), 2):
        if bad[i] in base:
            j = base.index(bad[i])
            base[j + 1] = bad[i + 1]
        else:
            base += bad[i:i + 2]
    return base + ["--out", str(out)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    paths = {"good": root / "good"}
    write_folder(paths["good"], per_class=(6, 6, 6), per_class_test=2)
    paths["unknown_test_class"] = root / "unknown"
    write_folder(paths["unknown_test_class"], per_class=(6, 6, 6))
    (root / "unknown" / "test" / "ant").rename(root / "unknown" / "test" / "wasp")
    paths["one_class"] = root / "one"
    write_folder(paths["one_class"], classes=("cat",), per_class=(8,))
    paths["truncated"] = root / "truncated"
    write_folder(paths["truncated"], per_class=(6, 6, 6))
    png = root / "truncated" / "train" / "bee" / "0002.png"
    png.write_bytes(png.read_bytes()[:70])
    paths["not_an_image"] = root / "text"
    write_folder(paths["not_an_image"], per_class=(6, 6, 6))
    (root / "text" / "train" / "cat" / "0001.png").write_text("hello, I am not a picture\n")
    paths["missing"] = root / "nothing_here"
    paths["empty_pt"] = root / "empty.pt"
    paths["empty_pt"].write_bytes(b"")
    paths["damaged_pt"] = root / "damaged.pt"
    sys.path.insert(0, str(ROOT))
    import ldam_drw
    model = ldam_drw.ResNet32(3)
    torch.save({"script": "ldam_drw.py", "arch": "resnet32", "model": model.state_dict(), "epoch": 1,
                "args": {"dataset": "folder", "data_root": str(paths["good"]), "rho": 1.0, "imb_type": "exp",
                         "seed": 0}, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}, root / "good.pt")
    paths["ckpt"] = root / "good.pt"
    paths["damaged_pt"].write_bytes((root / "good.pt").read_bytes()[:5000])
    for script in TRAINERS:                                   # a run of each trainer, to --resume with a flag
        d = root / f"run_{script}"
        d.mkdir()
        torch.save({"script": script, "arch": "resnet32", "model": {}, "epoch": 1, "stage": "base",
                    "args": {"out": str(d), "seed": 0, "batch_size": 16}}, d / "last.pt")
        paths[f"resume_{script[:-3]}"] = d / "last.pt"
    # every case, one forked process each, in one subprocess per script
    results = {}
    for script in SCRIPTS:
        todo = {str(i): _argv(script, bad, paths, root / "out" / str(i))
                for i, (s, _, bad) in enumerate(CASES) if s == script}
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "bad_input_driver.py"), script],
                           input=json.dumps(todo), capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        results.update(json.loads(r.stdout.splitlines()[-1]))
    return root, results


@pytest.mark.parametrize("script,kind,bad", CASES, ids=[f"{s}:{' '.join(b)}" for s, _, b in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(inputs, script, kind, bad):
    root, results = inputs
    i = str(CASES.index((script, kind, bad)))
    code, err = results[i]
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert len(lines[0]) <= 300, lines[0]
    assert not (root / "out" / i).exists(), "a file was written to --out"
    if kind == "flag":
        assert bad[0] in lines[0], f"the message does not name {bad[0]}: {lines[0]}"
    elif kind in ("checkpoint", "resume") and "{resume_" not in bad[1]:
        assert bad[1].strip("{}").replace("_pt", ".pt") in lines[0]
    elif kind == "resume":
        assert "--lr" in lines[0]
    elif kind == "arch":
        assert "resnet32 backbone" in lines[0] and "--arch" not in lines[0]
    elif "missing" in bad[1]:
        assert "nothing_here" in lines[0] and "--dataset folder" not in lines[0]
    elif "truncated" in bad[1]:
        assert "0002.png" in lines[0]
    elif "not_an_image" in bad[1]:
        assert "0001.png" in lines[0]
    elif "unknown" in bad[1]:
        assert "'wasp'" in lines[0]
    else:
        assert "at least two" in lines[0]
