"""Bad input × every script, as a user meets it: exit code 2, exactly one line on stderr, no traceback, and
nothing written to --out. Every check must fire before any training.

Each script is imported once in a subprocess (tests/bad_input_driver.py); each case then runs in a process
forked from it, so a case has its own exit code and stderr while torch is imported only once per script.
"""
import re
import sys

import pytest
import torch

from conftest import ROOT, drive, parser_of, write_folder

pytestmark = pytest.mark.slow                  # the fixtures run ~250 cases and two short trainings

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
          ["--gpu", "-2"], ["--print-freq", "-1"]]
OWN = {
    "ldam_drw.py": [["--beta", "1"], ["--beta", "-0.5"], ["--gamma", "-1"], ["--s", "0"], ["--max-m", "-0.1"],
                    ["--warmup", "-1"], ["--warmup", "5"], ["--workers", "-1"], ["--rho", "0"], ["--rho", "100"],
                    ["--subsample", "0.3"]],
    "rotation_ssp.py": [["--warmup", "-1"], ["--warmup", "3"], ["--rho", "0"]],
    "moco_ssp.py": [["--moco-m", "1"], ["--moco-t", "0"], ["--moco-dim", "0"], ["--bn-splits", "0"], ["--queue", "0"],
                    ["--knn-every", "-1"], ["--knn-k", "0"], ["--knn-t", "0"], ["--workers", "-1"], ["--rho", "1.5"],
                    ["--sam-rho", "-1"], ["--alpha", "-1"], ["--bandwidth", "0"], ["--subsample", "2"]],
    "simsiam_rwsam.py": [["--sam-rho", "-1"], ["--alpha", "-1"], ["--bandwidth", "0"], ["--stage1-epochs", "0"],
                         ["--knn-every", "-2"], ["--knn-k", "0"], ["--knn-t", "0"], ["--knn-val-frac", "0"],
                         ["--knn-val-frac", "1"], ["--rho", "0"], ["--gap-views", "0"], ["--workers", "-1"],
                         ["--crop-size", "7"], ["--subsample", "0"]],
    "self_training.py": [["--rho", "0"], ["--rho", "2"], ["--st-batch-size", "0"], ["--unlabeled-mult", "-1"],
                         ["--labeled-frac", "0"], ["--labeled-frac", "1.5"], ["--rho-u", "0"], ["--relevance", "1.5"],
                         ["--omega", "-1"],
                         ["--threshold", "1.5"], ["--beta", "1"], ["--gamma", "-1"], ["--s", "0"], ["--max-m", "-1"],
                         ["--warmup", "-1"], ["--warmup", "2"]],
    "crt.py": [["--workers", "-1"], ["--rho", "2"]],
    "eval_linear.py": [["--workers", "-1"]],
    "eval_ood.py": [["--backbone-lr-mult", "-1"], ["--size", "0"], ["--workers", "-1"], ["--stl-size", "64"]],
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
            if script in TRAINERS + ["crt.py"]:
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
    # every case, one forked process each, from one subprocess that imported the scripts
    return root, drive({str(i): [s, _argv(s, bad, paths, root / "out" / str(i))] for i, (s, _, bad) in enumerate(CASES)})


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


def test_every_numeric_flag_of_every_script_has_a_bad_input_case():
    """A new int / float flag (a range, or a list of choices) fails here until the table above tries a bad value."""
    for script in SCRIPTS:
        tried = {bad[0] for bad in SHARED + OWN[script]}
        numeric = [a.option_strings[-1] for a in parser_of(script)._actions if a.type in (int, float)]
        assert [f for f in numeric if f not in tried] == [], f"{script}: numeric flags without a bad-input case"


def test_a_flag_a_message_suggests_is_a_flag_of_that_script_with_a_valid_value(inputs):
    """`--flag value` in a message of the table: the script has --flag, and `value` (where one follows) parses."""
    _, results = inputs
    suggested = 0
    for i, (script, _, bad) in enumerate(CASES):
        parser, message = parser_of(script), results[str(i)][1]
        flags = {o: a for a in parser._actions for o in a.option_strings}
        for flag, value in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?: ([^\s,;:)]+))?", message):
            if flag == bad[0] or flag == "--resume":
                continue
            assert flag in flags, f"{script}: '{message.strip()}' names {flag}, which {script} does not have"
            action, suggested = flags[flag], suggested + 1
            if action.nargs == 0 or not value or not (action.choices or re.fullmatch(r"-?[\d.]+(e-?\d+)?", value)):
                continue                                         # a switch, or prose after the flag
            try:
                ok = (action.type or str)(value) in (action.choices or [(action.type or str)(value)])
            except ValueError:
                ok = False
            assert ok, f"{script}: '{message.strip()}' suggests {flag} {value}, which {script} refuses"
    assert suggested >= 5                                        # the table does produce suggestions to check


# ----- file lists (ImageNet-LT / iNat): a listed file that is missing (checked before anything starts) or
# unreadable (met mid-epoch: one line naming it and its list, exit 2, the last good last.pt untouched) -----
LIST_BASE = {
    "ldam_drw.py": ["--dataset", "imagenet_lt", "--arch", "resnet10", "--loss", "ce", "--batch-size", "6"],
    "crt.py": ["--ckpt", "{ldam_drw_run}", "--batch-size", "9"],     # one round of the 3 classes: class 1 is drawn
    "moco_ssp.py": ["--dataset", "imagenet_lt", "--rho", "1", "--arch", "resnet10", "--batch-size", "4", "--queue", "4",
                    "--bn-splits", "2"],
    "eval_linear.py": ["--ckpt", "{moco_ssp_run}"],
    "simsiam_rwsam.py": ["--dataset", "imagenet_lt", "--rho", "1", "--arch", "resnet10", "--batch-size", "4"],
}
LIST_TEST = {"ldam_drw.py": True, "crt.py": True, "moco_ssp.py": False, "eval_linear.py": True,   # takes --test-list
             "simsiam_rwsam.py": False}
LIST_CASES = [(s, kind) for s in LIST_BASE for kind in ("missing", "unreadable")] + \
    [("ldam_drw.py", "unreadable_in_a_worker"), ("ldam_drw.py", "resume"), ("moco_ssp.py", "resume")]




def _list_argv(script, paths, train_list, out, workers=0):
    argv = [a.format(**paths) for a in LIST_BASE[script]] + [
        "--data-root", str(paths["lists"]), "--train-list", str(train_list), "--gpu", "-1", "--epochs", "1",
        "--workers", str(workers), "--out", str(out)]
    return argv + (["--test-list", str(paths["good_list"])] if LIST_TEST[script] else [])


@pytest.fixture(scope="module")
def list_inputs(tmp_path_factory):
    from conftest import write_file_list
    root = tmp_path_factory.mktemp("lists")
    paths = {"lists": root, "good_list": write_file_list(root, num_classes=3, per_class=2, size=24)}
    good = paths["good_list"].read_text().splitlines()
    (root / "images" / "bad").mkdir()
    jpg = (root / "images" / "n00001" / "0.jpg").read_bytes()
    (root / "images" / "bad" / "0.jpg").write_bytes(jpg[:len(jpg) // 3])           # truncated
    paths["missing"] = root / "missing.txt"
    paths["missing"].write_text("\n".join(good[:2] + ["images/gone/a.jpg 1", "images/gone/b.jpg 2"] + good[2:]) + "\n")
    paths["unreadable"] = root / "unreadable.txt"
    # listed 3 times: moco_ssp's epoch drops the images after the last full batch, at most 1 of these 9
    paths["unreadable"].write_text("\n".join(good + ["images/bad/0.jpg 1"] * 3) + "\n")
    # a 2-epoch run of each trainer stopped after epoch 1, on a list that then gains an unreadable image
    resumable = root / "resumable.txt"
    resumable.write_text("\n".join(good) + "\n")
    runs = {s: root / ("run_" + s[:-3]) for s in ("ldam_drw.py", "moco_ssp.py")}
    for s, (code, err) in drive({s: [s, _list_argv(s, paths, resumable, run)] for s, run in runs.items()}).items():
        assert code == 0, err
    for script, run in runs.items():
        ck = torch.load(run / "last.pt", weights_only=True)
        ck["args"]["epochs"] = 2
        torch.save(ck, run / "last.pt")
        (run / "final.json").unlink()
        paths[script[:-3] + "_run"] = run / "last.pt"
        paths[script[:-3] + "_bytes"] = (run / "last.pt").read_bytes()
    resumable.write_text(paths["unreadable"].read_text())
    todo = {}
    for i, (script, kind) in enumerate(LIST_CASES):
        if kind == "resume":
            todo[str(i)] = [script, ["--resume", str(paths[script[:-3] + "_run"]), "--gpu", "-1", "--workers", "0"]]
        else:
            todo[str(i)] = [script, _list_argv(script, paths, paths[kind.removesuffix("_in_a_worker")],
                                               root / "out" / str(i), workers=1 if kind.endswith("worker") else 0)]
    return paths, drive(todo)


@pytest.mark.parametrize("script,kind", LIST_CASES, ids=[f"{s}:{k}" for s, k in LIST_CASES])
def test_bad_file_list_is_one_line_exit_2_no_work_lost(list_inputs, script, kind):
    paths, results = list_inputs
    i = LIST_CASES.index((script, kind))
    code, err = results[str(i)]
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) <= 300, err
    out = paths["lists"] / "out" / str(i)
    if kind == "missing":                                     # found before anything is written
        assert not out.exists()
        assert "2 of the 8 images listed in" in lines[0] and "missing.txt" in lines[0]
        assert "gone/a.jpg" in lines[0] and "(line 3)" in lines[0]
    elif kind == "resume":                                    # the epoch-1 checkpoint is still there, as it was
        run = paths[script[:-3] + "_run"]
        assert "bad/0.jpg" in lines[0] and "resumable.txt" in lines[0]
        assert run.read_bytes() == paths[script[:-3] + "_bytes"]
        assert len((run.parent / "metrics.jsonl").read_text().splitlines()) == 1
        assert not (run.parent / "final.json").exists()
    else:
        assert "bad/0.jpg" in lines[0] and "unreadable.txt" in lines[0] and "not a readable image" in lines[0]
        assert not (out / "last.pt").exists() and not (out / "final.json").exists()
