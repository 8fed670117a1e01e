"""self_training.py: pseudo-labels are the base model's argmax, D_U follows rho_U, true labels never
reach the loss, ω = 0 is ldam_drw.py on D_L, relevance mixing, capping, resume."""
import json

import numpy as np
import pytest
import torch

import datasets_lt as D
import ldam_drw
import self_training as S
from conftest import run_script, write_folder


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
            "--epochs", "2", "--batch-size", "16", "--st-batch-size", "16", "--loss", "ce", "--rule", "none",
            "--pool-shortfall", "cap", *map(str, extra)]      # the task's leftovers hold nothing of class 0


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


def test_labeled_frac_keeps_part_of_each_class_of_d_l_and_the_same_d_u(data):
    """App. E.4: --labeled-frac 0.5 keeps int(0.5·n_c) of each class's D_L images (a subset of the full D_L), and
    D_U is drawn for the full D_L: the same images as without the flag."""
    pool = ["--unlabeled-root", data / "pool" / "train", "--unlabeled-mult", 1, "--rho-u", 0.5]
    runs = {}
    for frac in (1, 0.5):
        args = S.parse_args(_args(data, data / "unused", "--labeled-frac", frac, *pool))
        d = S.build_data(args)
        runs[frac] = d, S.choose_unlabeled(args, d)
    (full, (u_full, y_full, r_full)), (half, (u_half, y_half, r_half)) = runs[1], runs[0.5]
    assert half["counts_l"].tolist() == [n // 2 for n in full["counts_l"].tolist()] and sum(half["counts_l"]) > 0
    assert {x.tobytes() for x in half["x_l"]} <= {x.tobytes() for x in full["x_l"]}
    assert np.array_equal(u_half, u_full) and np.array_equal(y_half, y_full)
    assert r_half["requested_per_class"] == r_full["requested_per_class"] and r_half["size"] > 0
    assert half["n_full"] == full["n_full"] == sum(full["counts_l"])
    assert S.parse_args(_args(data, data / "x", "--labeled-frac", 0.5)).labeled_frac == 0.5
    assert S.parse_args(["--labeled-frac", "0.25"]).out.endswith("self_training-cifar10-0.01-0-dl0.25")


@pytest.mark.slow
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
    assert S.ce_loss(logits, y, None, c).item() == pytest.approx(((c * ce).sum() / c.sum()).item())
    assert S.ce_loss(logits, y, None, torch.ones(6)).item() == pytest.approx(ce.mean().item())
    w = torch.tensor([1.0, 2.0, 3.0])
    assert S.ce_loss(logits, y, w, c).item() == pytest.approx(((c * w[y] * ce).sum() / (c * w[y]).sum()).item())


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


@pytest.mark.parametrize("args,msg", [(["--rho-u", "50"], "--rho-u 0.02"), (["--irrelevant-classes", "9"], "0..4"),
                                      (["--omega", "-1"], "--omega must be in [0, inf)")])
def test_bad_input(tmp_path, data, args, msg):
    r = run_script("self_training.py", *_args(data, tmp_path / "st", *args))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_empty_unlabeled_set_trains_on_d_l(tmp_path, data):
    S.main(_args(data, tmp_path / "st", "--base", data / "base" / "last.pt", "--unlabeled-mult", 0, "--epochs", 1))
    final = _final(tmp_path / "st")
    assert final["unlabeled"]["pseudo_labels"]["n"] == 0 and final["training_counts"] == final["labeled_counts"]


def test_base_trained_on_another_d_l_is_refused(tmp_path, data):
    """A base that saw other images of the dataset would pseudo-label D_U from memory: one line, exit 2."""
    ldam_drw.main(["--dataset", "folder", "--data-root", str(data / "task"), "--gpu", "-1", "--out",
                   str(tmp_path / "other"), "--rho", "0.2", "--epochs", "1", "--batch-size", "16", "--loss", "ce",
                   "--rule", "none", "--data-seed", "1"])
    other = tmp_path / "other" / "last.pt"
    r = run_script("self_training.py", *_args(data, tmp_path / "st", "--base", other))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--data-seed 1, this run 0" in r.stderr and not (tmp_path / "st" / "last.pt").exists()
    ckpt = torch.load(other, weights_only=True)                 # same flags, other images: the digest says so
    ckpt["args"]["data_seed"] = 0
    torch.save(ckpt, tmp_path / "forged.pt")
    r = run_script("self_training.py", *_args(data, tmp_path / "st2", "--base", tmp_path / "forged.pt"))
    assert r.returncode == 2 and "other images than this run's D_L" in r.stderr, r.stderr
    r = run_script("self_training.py", *_args(data, tmp_path / "st3", "--base", other, "--data-seed", 1, "--epochs", 1,
                                              "--unlabeled-mult", 0.2))
    assert r.returncode == 0, r.stderr


def _write_svhn(root, counts_by_split, seed=0):
    """SVHN .mat files with the given images per digit (digit 0 stored as label 10)."""
    import scipy.io
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, counts in counts_by_split.items():
        y = np.repeat(np.arange(10), counts)
        x = rng.integers(0, 256, (32, 32, 3, len(y)), dtype=np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)})


@pytest.fixture(scope="module")
def svhn(tmp_path_factory):
    root = tmp_path_factory.mktemp("svhn")
    lt = D.lt_counts(1000, 10, 0.01)                        # digit 1 is the head, digit 0 the tail
    train = [0] * 10
    for digit, n in zip(D.CLASS_ORDER["svhn"], lt):
        train[digit] = n
    _write_svhn(root, {"train": train, "test": [3, 12, 9, 7, 6, 5, 4, 4, 3, 3], "extra": [250] * 10})
    return root


def test_svhn_unlabeled_set_follows_the_rotated_class_order(svhn):
    """Digit 1 (head of D_L) gets the most unlabeled images, digit 0 (tail) the fewest, at rho_U = rho."""
    args = S.parse_args(["--dataset", "svhn", "--data-root", str(svhn), "--rho", "0.01", "--rho-u", "0.01",
                         "--unlabeled-mult", "0.2"])
    d = S.build_data(args)
    assert np.bincount(d["y_l"], minlength=10)[[1, 0]].tolist() == [1000, 10]
    _, y_u, rep = S.choose_unlabeled(args, d)
    counts = np.bincount(y_u, minlength=10)
    assert counts.argmax() == 1 and counts.argmin() == 0 and rep["size"] == counts.sum()
    profile = D.lt_counts(round(0.2 * 2478) // 10, 10, 0.01)
    assert counts[D.CLASS_ORDER["svhn"]].tolist() == [int(b * round(0.2 * 2478) / sum(profile)) for b in profile]


def test_svhn_headline_error_is_from_mean_per_class_accuracy(tmp_path, capsys, monkeypatch):
    svhn = tmp_path / "svhn"                          # a small balanced train split: only the test set matters here
    _write_svhn(svhn, {"train": [8] * 10, "test": [3, 12, 9, 7, 6, 5, 4, 4, 3, 3]})
    monkeypatch.setitem(D.N_MAX, "svhn", 8)
    ldam_drw.main(["--dataset", "svhn", "--data-root", str(svhn), "--gpu", "-1", "--out", str(tmp_path / "r"),
                   "--rho", "1", "--epochs", "1", "--batch-size", "32", "--loss", "ce", "--rule", "none"])
    out = capsys.readouterr().out
    final = json.loads((tmp_path / "r" / "final.json").read_text())
    per_class = final["last"]["per_class"]
    assert final["headline"] == "mean_class_acc"
    assert final["test_error"] == pytest.approx(100 - np.mean(per_class), abs=0.01)
    test_counts = [3, 12, 9, 7, 6, 5, 4, 4, 3, 3]
    assert final["test_error_top1"] == pytest.approx(100 - np.dot(per_class, test_counts) / sum(test_counts), abs=0.01)
    assert "from mean per-class accuracy (top-1 error" in out
    assert D.headline_metric("svhn") == "mean_class_acc" and D.headline_metric("cifar10") == "top1"


def write_cinic10(root, classes, imagenet_per_split=40, cifar_per_split=5, seed=0):
    """CINIC-10's layout: root/{train,valid,test}/<class>/, ImageNet-sourced files named like n02690373_12.png and
    CIFAR-10's own files named cifar10-<split>-<n>.png (written all white here, so they can be recognised)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("train", "valid", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(imagenet_per_split):
                Image.fromarray(rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)).save(d / f"n0{c[:4]}_{i}.png")
            for i in range(cifar_per_split):
                Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(d / f"cifar10-{split}-{i}.png")


@pytest.mark.parametrize("rho_u", [1.0, 0.5])
def test_cinic10_pool_skips_cifar_files_and_follows_rho_u(tmp_path, rho_u):
    classes = ("airplane", "automobile", "bird")
    write_folder(tmp_path / "task", classes=classes, per_class=(20, 20, 20), per_class_test=2)
    write_cinic10(tmp_path / "cinic", classes)
    paths, labels, names = D.cinic10_files(tmp_path / "cinic")
    assert names == list(classes) and len(paths) == 3 * 3 * 40 and not any("cifar10-" in p for p in paths)
    args = S.parse_args(["--dataset", "folder", "--data-root", str(tmp_path / "task"), "--rho", "0.5", "--rho-u",
                         str(rho_u), "--pool", "cinic10", "--pool-root", str(tmp_path / "cinic")])
    d = S.build_data(args)
    x_u, y_u, rep = S.choose_unlabeled(args, d)
    n_l = sum(D.lt_counts(20, 3, 0.5))
    base = D.lt_counts(5 * n_l // 3, 3, rho_u)
    assert np.bincount(y_u, minlength=3).tolist() == [int(b * 5 * n_l / sum(base)) for b in base] == rep["supplied_per_class"]
    assert len(x_u) == len(y_u) and not (x_u == 255).all(axis=(1, 2, 3)).any()     # no CIFAR-10 file in D_U
    assert rep["achieved_mult"] == pytest.approx(len(y_u) / n_l)


def test_cinic10_pool_needs_its_folders(tmp_path):
    write_folder(tmp_path / "task", classes=("airplane", "bird"), per_class=(10, 10))
    r = run_script("self_training.py", "--dataset", "folder", "--data-root", tmp_path / "task", "--gpu", "-1",
                   "--rho", "0.5", "--pool", "cinic10", "--pool-root", tmp_path / "nothing", "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "is not a CINIC-10 folder" in r.stderr


def test_relevance_sweep_uses_cifar100_and_keeps_the_ten_class_task(tmp_path):
    """Fig. 2: CIFAR-100 images are the irrelevant part; ratio within one image, |D_U| fixed, task unchanged."""
    from conftest import write_cifar
    write_folder(tmp_path / "task", classes=("airplane", "bird", "cat"), per_class=(20, 20, 20), per_class_test=2)
    write_cinic10(tmp_path / "cinic", ("airplane", "bird", "cat"))
    write_cifar(tmp_path / "c100", 100, per_class_train=3, per_class_test=1)
    sizes = set()
    for r in (0.2, 0.4, 0.6, 0.8):
        args = S.parse_args(["--dataset", "folder", "--data-root", str(tmp_path / "task"), "--rho", "0.5", "--rho-u",
                             "0.5", "--pool", "cinic10", "--pool-root", str(tmp_path / "cinic"), "--relevance", str(r),
                             "--irrelevant-root", str(tmp_path / "c100"), "--unlabeled-mult", "3"])
        d = S.build_data(args)
        assert d["names"] == ["airplane", "bird", "cat"] and len(d["irr_x"]) == 300
        x_u, y_u, rep = S.choose_unlabeled(args, d)
        sizes.add(len(y_u))
        assert abs((y_u >= 0).sum() - r * len(y_u)) <= 1 and rep["achieved_relevance"] == (y_u >= 0).mean()
    assert sizes == {3 * sum(D.lt_counts(20, 3, 0.5))}


def test_a_pool_too_small_for_any_d_u_names_the_flag_that_caps_instead(tmp_path, capsys):
    """D_L takes all 8 images of the head class: no D_U keeps the rho_U = 1 profile, and the one line names
    the real flag that caps each class instead (and that flag is one the parser accepts)."""
    write_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=(8, 12, 12), per_class_test=2)
    with pytest.raises(SystemExit) as e:
        S.main(["--dataset", "folder", "--data-root", str(tmp_path / "d"), "--rho", "0.5", "--gpu", "-1",
                "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "cannot supply any D_U" in err[0], err
    assert "(--pool-shortfall cap)" in err[0] and "shortfall 'cap'" not in err[0]
    assert S.parse_args(["--pool-shortfall", "cap"]).pool_shortfall == "cap"


def test_unlabeled_set_is_exp_whatever_the_labeled_profile_as_the_authors(tmp_path, data):
    """A step D_L (--imb-type step) still gets an exp D_U (the authors' SemiSupervisedImbalanceCIFAR10);
    --imb-type-u step gives a step one. ρ_U = 0.5 over 5 classes, from the separate pool folder."""
    got = {}
    for profile in ("exp", "step"):
        S.main(_args(data, tmp_path / profile, "--imb-type", "step", "--epochs", 1, "--unlabeled-root",
                     data / "pool" / "train", "--rho-u", 0.5, "--unlabeled-mult", 0.5, "--imb-type-u", profile))
        got[profile] = _final(tmp_path / profile)["unlabeled"]["requested_per_class"]
    exp, step = got["exp"], got["step"]
    assert all(a > b for a, b in zip(exp[:3], exp[1:4])) and exp[-1] == round(exp[0] * 0.5)   # 14 11 10 7 7
    assert step[0] == step[1] > step[2] == step[3] == step[4] and sum(exp) == sum(step)
    assert S.parse_args(["--imb-type", "step"]).imb_type_u == "exp"
