"""self_training.py: pseudo-labels are the base model's argmax, D_U follows rho_U, true labels never
reach the loss, ω = 0 is ldam_drw.py on D_L, relevance mixing, capping, resume."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import datasets_lt as D
import ldam_drw
import self_training as S
from conftest import ROOT, run_script, write_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Task data (5 easy classes, 40 per class), a separate unlabeled folder, and a CE base model."""
    root = tmp_path_factory.mktemp("st")
    write_folder(root / "task", classes=tuple("abcde"), per_class=(40,) * 5, per_class_test=8, easy=True)
    write_folder(root / "pool", classes=tuple("abcde") + ("zzz",), per_class=(30,) * 6, splits=("train",),
                 easy=True, seed=1)
    ldam_drw.main(["--dataset", "folder", "--data-root", str(root / "task"), "--gpu", "-1", "--out",
                   str(root / "base"), "--rho", "0.2", "--epochs", "6", "--batch-size", "16", "--lr", "0.05",
                   "--loss", "ce", "--rule", "none"])
    return root


def _args(root, out, *extra):
    return ["--dataset", "folder", "--data-root", str(root / "task"), "--gpu", "-1", "--out", str(out), "--rho", "0.2",
            "--epochs", "2", "--batch-size", "16", "--loss", "ce", "--rule", "none", *map(str, extra)]


def _final(out):
    return json.loads((out / "final.json").read_text())


def test_pseudo_labels_are_the_base_models_argmax(tmp_path, data):
    args = _args(data, tmp_path / "st", "--base", data / "base" / "last.pt", "--unlabeled-mult", 0.5)
    S.main(args)
    saved = torch.load(tmp_path / "st" / "pseudo_labels.pt", weights_only=True)
    parsed = S.parse_args(args)
    d = S.build_data(parsed)
    x_u, y_true, _ = S.choose_unlabeled(parsed, d)
    model = ldam_drw.ResNet32(5)
    model.load_state_dict(torch.load(data / "base" / "last.pt", weights_only=True)["model"])
    model.eval()
    with torch.no_grad():
        argmax = model(D.normalize(D.to_device(x_u, "cpu"), *d["mean_std"])).argmax(1)
    assert torch.equal(saved["pseudo_labels"], argmax) and len(argmax) == len(y_true) > 0
    final = _final(tmp_path / "st")
    assert final["unlabeled"]["pseudo_labels"]["accuracy"] == pytest.approx(100 * (argmax.numpy() == y_true).mean())
    assert final["base"]["top1"] == pytest.approx(json.loads((data / "base" / "final.json").read_text())["last"]["top1"])


def test_unlabeled_profile_follows_rho_u(tmp_path, data):
    S.main(_args(data, tmp_path / "st", "--base", data / "base" / "last.pt", "--unlabeled-root",
                 data / "pool" / "train", "--unlabeled-mult", 1, "--rho-u", 0.5))
    u = _final(tmp_path / "st")["unlabeled"]
    assert u["pseudo_labels"]["true_counts"] == u["requested_per_class"] == u["supplied_per_class"]
    assert u["requested_per_class"] == [int(n * 102 / sum(D.lt_counts(20, 5, 0.5))) for n in D.lt_counts(20, 5, 0.5)]
    assert u["irrelevant"] == 0 and not u["capped"]


def test_true_labels_of_d_u_never_reach_the_loss(tmp_path, data, monkeypatch):
    args = _args(data, tmp_path / "a", "--base", data / "base" / "last.pt", "--unlabeled-root",
                 data / "pool" / "train", "--unlabeled-mult", 1)
    S.main(args)
    real_pool, real_load = D.unlabeled_pool, D.load_split
    chosen = {}

    def same_choice(pool_labels, *a, **k):                 # the selection made with the true labels
        if "r" not in chosen:
            chosen["r"] = real_pool(chosen["true"], *a, **k)
        return chosen["r"]

    def scrambled(dataset, root, train, download=False):
        x, y, names = real_load(dataset, root, train, download)
        if str(root).endswith("pool"):
            chosen["true"] = y[y < 5]
            y = y.copy()                                      # relabel the task-class images among themselves
            y[y < 5] = np.random.default_rng(0).permutation(y[y < 5])
        return x, y, names

    monkeypatch.setattr(D, "unlabeled_pool", same_choice)
    monkeypatch.setattr(D, "load_split", scrambled)
    S.main(args[:7] + [str(tmp_path / "b")] + args[8:])
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert a["unlabeled"]["pseudo_labels"]["accuracy"] != b["unlabeled"]["pseudo_labels"]["accuracy"]
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_omega_zero_is_ldam_drw_on_d_l(tmp_path, data):
    S.main(_args(data, tmp_path / "st", "--omega", 0, "--rule", "drw", "--loss", "ldam"))
    ldam_drw.main(["--dataset", "folder", "--data-root", str(data / "task"), "--gpu", "-1", "--out",
                   str(tmp_path / "sup"), "--rho", "0.2", "--epochs", "2", "--batch-size", "16", "--loss", "ldam",
                   "--rule", "drw"])
    st = torch.load(tmp_path / "st" / "last.pt", weights_only=True)["model"]
    sup = torch.load(tmp_path / "sup" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(st[k], sup[k]) for k in sup)
    assert _final(tmp_path / "st")["training_counts"] == D.lt_counts(40, 5, 0.2)


def test_omega_weights_the_unlabeled_loss():
    logits, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    c = torch.tensor([1, 1, 1, 0.5, 0.5, 0.5])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert S.weighted_ce(logits, y, None, c).item() == pytest.approx(((c * ce).sum() / c.sum()).item())
    assert S.weighted_ce(logits, y, None, torch.ones(6)).item() == pytest.approx(ce.mean().item())
    w = torch.tensor([1.0, 2.0, 3.0])
    assert S.weighted_ce(logits, y, w, c).item() == pytest.approx(((c * w[y] * ce).sum() / (c * w[y]).sum()).item())


def test_relevance_mix_is_exact(tmp_path, data):
    S.main(_args(data, tmp_path / "st", "--irrelevant-classes", 4, "--relevance", 0.6, "--unlabeled-mult", 1))
    final = _final(tmp_path / "st")
    u = final["unlabeled"]
    total = sum(D.lt_counts(40, 4, 0.2))
    assert u["requested"] == total and u["irrelevant"] == total - round(0.6 * total) == u["pseudo_labels"]["irrelevant"]
    assert len(final["labeled_counts"]) == 4 and len(final["last"]["per_class"]) == 4


def test_capping_is_reported(tmp_path, data):
    r = run_script("self_training.py", *_args(data, tmp_path / "st", "--base", data / "base" / "last.pt", "--epochs", 1))
    assert r.returncode == 0, r.stderr
    assert "cannot supply D_U" in r.stderr and "class 0: 102" in r.stderr      # class 0 has no image left
    assert _final(tmp_path / "st")["unlabeled"]["capped"]


def test_kill_and_resume_equals_uninterrupted(tmp_path, data):
    args = _args(data, tmp_path / "whole", "--base", data / "base" / "last.pt", "--epochs", 4, "--unlabeled-mult", 0.5)
    S.main(args)
    killed = args[:7] + [str(tmp_path / "killed")] + args[8:]
    proc = subprocess.Popen([sys.executable, "self_training.py", *killed], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (tmp_path / "killed" / "last.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"] < 4, "finished before the kill"
    r = run_script("self_training.py", "--resume", tmp_path / "killed" / "last.pt", "--gpu", "-1")
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


@pytest.mark.parametrize("args,msg", [(["--rho-u", "50"], "--rho-u 0.02"), (["--irrelevant-classes", "9"], "0..4"),
                                      (["--omega", "-1"], "non-negative")])
def test_bad_input(tmp_path, data, args, msg):
    r = run_script("self_training.py", *_args(data, tmp_path / "st", *args))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_empty_unlabeled_set_trains_on_d_l(tmp_path, data):
    S.main(_args(data, tmp_path / "st", "--base", data / "base" / "last.pt", "--unlabeled-mult", 0, "--epochs", 1))
    final = _final(tmp_path / "st")
    assert final["unlabeled"]["pseudo_labels"]["n"] == 0 and final["training_counts"] == final["labeled_counts"]
