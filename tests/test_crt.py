"""crt.py: class-balanced sampling, a frozen backbone, and a re-trained classifier that helps the tail."""
import json

import numpy as np
import pytest
import scipy.stats
import torch

import crt
import datasets_lt as D
import ldam_drw
import run_lt
from conftest import run_script, write_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An ldam_drw.py-style checkpoint on imbalanced easy data (counts 40, 22, 12, 7, 4): a seeded random
    ResNet-32 with BatchNorm statistics measured on the training images (no gradient step, so nothing
    here hangs on a training trajectory) and a zero linear head."""
    root = tmp_path_factory.mktemp("easy")
    write_folder(root, classes=tuple("abcde"), per_class=(40,) * 5, per_class_test=8, easy=True)
    images, labels, _ = D.load_split("folder", root, True)
    idx = D.make_long_tailed(labels, 0.1, "exp", 0)
    mean, std = D.mean_std("folder", images)
    torch.manual_seed(0)
    model = ldam_drw.ResNet32(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None                                   # cumulative average over the one pass
    model.train()
    with torch.no_grad():
        model(D.normalize(D.to_device(images[idx], "cpu"), mean, std))
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    (root / "ce").mkdir()
    torch.save({"script": "ldam_drw.py", "arch": "resnet32", "model": model.state_dict(), "epoch": 12,
                "class_counts": np.bincount(labels[idx]).tolist(),
                "args": {"dataset": "folder", "data_root": str(root), "rho": 0.1, "imb_type": "exp", "seed": 0,
                         "val_frac": 0.0, "loss": "ce"}}, root / "ce" / "last.pt")
    return root, root / "ce" / "last.pt"


def _crt(tmp_path, ckpt, *extra):
    crt.main(["--ckpt", str(ckpt), "--gpu", "-1", "--out", str(tmp_path / "crt"), "--batch-size", "32",
              *map(str, extra)])
    return json.loads((tmp_path / "crt" / "final.json").read_text())


def test_an_epoch_is_int_n_over_b_full_batches_of_equal_class_counts_four_images_a_draw():
    """Kang et al.'s ClassAwareSampler (num_samples_cls 4) over run_networks.py's int(N/B) steps: every epoch each
    class gets the same number of draws give or take one, a draw is 4 images of one class in a row, and within a
    class every image comes round once before any comes again."""
    labels = torch.as_tensor(np.repeat(np.arange(5), [200, 100, 50, 25, 5]))
    batches = crt.Features(torch.zeros(len(labels), 3), labels, 64, seed=0)
    for epoch in range(3):
        order = crt.class_aware_order(labels, 64, 0, epoch)
        assert len(order) == 380 // 64 * 64
        steps = list(batches.epoch(epoch, order=order))
        assert [len(y) for _, y, _ in steps] == [64] * (380 // 64)
        drawn = labels[order].view(-1, 4)
        assert (drawn == drawn[:, :1]).all()                            # 4 of one class a draw
        per_class = torch.bincount(drawn[:, 0], minlength=5)
        assert per_class.max() - per_class.min() <= 1
        for c, n in enumerate([200, 100, 50, 25, 5]):                    # cycles: no image twice before all once
            mine = order[labels[order] == c]
            for start in range(0, len(mine) - n + 1, n):
                assert len(set(mine[start:start + n].tolist())) == n
    assert not torch.equal(crt.class_aware_order(labels, 64, 0, 1), crt.class_aware_order(labels, 64, 0, 2))
    assert torch.equal(crt.class_aware_order(labels, 64, 0, 1), crt.class_aware_order(labels, 64, 0, 1))
    plain = torch.cat([y for _, y, _ in batches.epoch(0)])
    assert torch.equal(plain, labels)


def test_crt_raises_tail_accuracy_of_a_head_biased_classifier(tmp_path, trained):
    _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    state["model"]["fc.bias"][:2] += 6.0                       # push every prediction towards the head
    torch.save(state, tmp_path / "biased.pt")
    final = _crt(tmp_path, tmp_path / "biased.pt")
    before, after = final["before"], final["last"]
    assert final["cached_features"] and final["class_counts"] == [40, 22, 12, 7, 4]
    tail_before, tail_after = np.mean(before["per_class"][2:]), np.mean(after["per_class"][2:])
    assert tail_before < 50 and tail_after > tail_before + 20
    assert after["few"] > before["few"]


def test_backbone_unchanged_and_the_check_catches_a_change(tmp_path, trained):
    _, ckpt = trained
    _crt(tmp_path, ckpt, "--epochs", 2)
    src = torch.load(ckpt, weights_only=True)["model"]
    out = torch.load(tmp_path / "crt" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(out[k], v) for k, v in src.items() if not k.startswith("fc."))
    assert out["fc.weight"].shape == src["fc.weight"].shape and not torch.equal(out["fc.weight"], src["fc.weight"])
    model = ldam_drw.ResNet32(5)
    before = crt.snapshot(model)
    crt.check_unchanged(model, before)
    model.layer2[1].bn1.running_mean += 0.1
    with pytest.raises(RuntimeError, match="layer2.1.bn1.running_mean"):
        crt.check_unchanged(model, before)
    crt.check_unchanged(model, before, buffers=False)          # --bn train: only parameters are checked


def test_bn_train_updates_statistics_but_not_weights(tmp_path, trained):
    _, ckpt = trained
    final = _crt(tmp_path, ckpt, "--bn", "train", "--epochs", 2)
    assert not final["cached_features"]
    src = torch.load(ckpt, weights_only=True)["model"]
    out = torch.load(tmp_path / "crt" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(out["bn1.running_mean"], src["bn1.running_mean"])
    assert torch.equal(out["layer3.4.conv2.weight"], src["layer3.4.conv2.weight"])


def test_augmented_features_every_step(tmp_path, trained):
    _, ckpt = trained
    final = _crt(tmp_path, ckpt, "--augment", "--epochs", 2)
    assert not final["cached_features"] and final["bn"] == "frozen" and 0 <= final["last"]["top1"] <= 100


def test_self_supervised_checkpoint_has_no_before(tmp_path, trained):
    _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    state["script"] = "rotation_ssp.py"
    state["model"]["fc.weight"] = torch.zeros(4, 64)
    state["model"]["fc.bias"] = torch.zeros(4)
    torch.save(state, tmp_path / "rot.pt")
    final = _crt(tmp_path, tmp_path / "rot.pt", "--epochs", 2)
    assert final["before"] is None and final["ckpt_script"] == "rotation_ssp.py"


@pytest.mark.parametrize("kind", ["missing", "arch"])
def test_bad_checkpoint_one_line_exit_2(tmp_path, trained, kind):
    _, ckpt = trained
    path = tmp_path / "nothing.pt"
    if kind == "arch":
        state = torch.load(ckpt, weights_only=True)
        state["arch"] = "vit_b16"
        torch.save(state, path)
    r = run_script("crt.py", "--ckpt", path, "--gpu", "-1", "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert {"missing": "does not exist", "arch": "unknown architecture 'vit_b16'"}[kind] in r.stderr


@pytest.mark.parametrize("extra", [[], ["--augment", "--bn", "train"]])
def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, trained, monkeypatch, extra):
    """A run stopped right after epoch 1's last.pt is written, then --resume, ends with the weights,
    metrics and result of the uninterrupted run, bit for bit: with cached features, and with --augment
    --bn train, whose augmentation stream and BatchNorm statistics must come back from last.pt."""
    _, ckpt = trained
    whole = _crt(tmp_path / "whole", ckpt, "--epochs", 3, *extra)
    save = run_lt.save_atomic

    def save_then_die(obj, path):
        save(obj, path)
        raise SystemExit(137)
    monkeypatch.setattr(run_lt, "save_atomic", save_then_die)
    with pytest.raises(SystemExit):
        _crt(tmp_path / "cut", ckpt, "--epochs", 3, *extra)
    monkeypatch.undo()
    cut = tmp_path / "cut" / "crt"
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 1 and not (cut / "final.json").exists()
    crt.main(["--resume", str(cut / "last.pt"), "--gpu", "-1"])
    a = torch.load(tmp_path / "whole" / "crt" / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (tmp_path / "whole" / "crt", cut)]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[1]] == [1, 2, 3]
    resumed = json.loads((cut / "final.json").read_text())
    assert (resumed["last"], resumed["before"]) == (whole["last"], whole["before"])


def test_resume_refuses_other_flags_and_other_scripts(tmp_path, trained, capsys):
    _, ckpt = trained
    _crt(tmp_path, ckpt, "--epochs", 1)
    for argv, says in ((["--resume", str(tmp_path / "crt" / "last.pt"), "--epochs", "5"], "drop --epochs"),
                       (["--resume", str(ckpt)], "not crt.py"),
                       (["--ckpt", str(ckpt), "--out", str(tmp_path / "crt")], "--resume")):
        with pytest.raises(SystemExit) as e:
            crt.main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err
