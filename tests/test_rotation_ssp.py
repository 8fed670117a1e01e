"""rotation_ssp.py: rotation and balanced labels, ldam_drw.py's data and recipe, outputs, resume, and that
ldam_drw.py --pretrained loads its checkpoint."""
import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import datasets_lt as D
import ldam_drw as L
import rotation_ssp as R
import run_lt
from conftest import ROOT, run_script, write_folder

CPU = torch.device("cpu")


# ----- rotation and its labels ---------------------------------------------------------------------

def test_rotate_by_hand_and_as_torchvision():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(4, 1, 1, 1)
    out = R.rotate(x, torch.arange(4))
    assert out[0, 0].tolist() == [[1, 2], [3, 4]]
    assert out[1, 0].tolist() == [[2, 4], [1, 3]]            # 90° counter-clockwise: the top row goes left
    assert out[2, 0].tolist() == [[4, 3], [2, 1]]
    assert out[3, 0].tolist() == [[3, 1], [4, 2]]
    imgs = torch.randn(8, 3, 32, 32)
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = R.rotate(imgs, k)
    for i in range(8):
        assert torch.equal(out[i], TF.rotate(imgs[i], 90.0 * k[i].item()))
    assert out.is_contiguous()


@pytest.mark.parametrize("n", [128, 16, 4])
def test_rotation_labels_exactly_balanced_per_batch(n):
    g = torch.Generator().manual_seed(0)
    draws = [R.rotation_labels(n, g, CPU) for _ in range(50)]
    for k in draws:
        assert torch.bincount(k, minlength=4).tolist() == [n // 4] * 4
    assert len({tuple(k.tolist()) for k in draws}) > 1                 # shuffled, not a fixed pattern
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(R.rotation_labels(n, g1, CPU), R.rotation_labels(n, g2, CPU))


def test_rotation_labels_uniform_for_every_position_when_4_does_not_divide():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([R.rotation_labels(6, g, CPU) for _ in range(4000)])       # 4000 × 6
    for k in draws[:100]:
        counts = torch.bincount(k, minlength=4)
        assert counts.max() - counts.min() <= 1
    freq = torch.stack([(draws == r).double().mean(0) for r in range(4)])           # 4 × 6
    assert (freq - 0.25).abs().max() < 0.03                                         # SE ≈ 0.007


# ----- the data and recipe of ldam_drw.py ----------------------------------------------------------

@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy")
    write_folder(root, classes=tuple("abcde"), per_class=(40,) * 5, per_class_test=8, easy=True)
    return root


@pytest.mark.parametrize("extra", [[], ["--val-frac", "0.2"]])
def test_same_training_images_as_ldam_drw(easy, extra):
    argv = ["--dataset", "folder", "--data-root", str(easy), "--rho", "0.5", "--seed", "3", "--gpu", "-1", *extra]
    r_train, r_val, r_test, r_counts, r_c = R.build_data(R.parse_args(argv), CPU)
    l_train, l_val, l_test, l_counts, l_c = L.build_data(L.parse_args(argv), CPU)
    assert torch.equal(r_train.images, l_train.images) and r_counts == l_counts and r_c == l_c
    assert torch.equal(r_test.images, l_test.images)
    assert (r_val is None) == (l_val is None)
    if r_val is not None:
        assert torch.equal(r_val.images, l_val.images)
    assert not (r_train.labels != 0).any() and (l_train.labels != 0).any()        # labels never reach training


def _shared_flags(script):
    text = (ROOT / script).read_text()
    start = text.index("    # --- shared flags")
    return text[start:text.index("    # --- this method ---", start)]


def test_shared_flags_are_ldam_drws_text():
    """Line for line, but --batch-size: ldam_drw.py's default depends on the dataset (iNat: 100), same on CIFAR."""
    drop = lambda text: [line for line in text.splitlines() if '"--batch-size"' not in line]
    assert drop(_shared_flags("rotation_ssp.py")) == drop(_shared_flags("ldam_drw.py"))
    assert R.parse_args([]).batch_size == L.parse_args([]).batch_size == 128


def test_recipe_and_schedule_are_ldam_drws():
    for argv in ([], ["--epochs", "30"]):
        r, l = R.parse_args(argv), L.parse_args(argv)
        for k in ("epochs", "lr", "wd", "batch_size", "momentum", "warmup", "rho", "seed", "val_frac"):
            assert getattr(r, k) == getattr(l, k), k
        assert [R.lr_at(e, r) for e in range(r.epochs)] == [L.lr_at(e, l) for e in range(l.epochs)]
    assert R.parse_args([]).out == "runs/rotation_ssp-cifar10-0.01-0"


# ----- a run on fake data --------------------------------------------------------------------------

def _main(out, root, *extra):
    R.main(["--dataset", "folder", "--data-root", str(root), "--gpu", "-1", "--out", str(out), *map(str, extra)])
    return json.loads((out / "final.json").read_text())


@pytest.fixture(scope="module")
def run(easy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rot") / "run"
    _main(out, easy, "--rho", "0.5", "--epochs", 2, "--batch-size", 16)
    return out


def test_run_writes_every_output(run):
    assert sorted(p.name for p in run.iterdir()) == [".lock", "args.json", "final.json", "last.pt", "metrics.jsonl",
                                                      "rotation_ssp.py"]
    assert (run / "rotation_ssp.py").read_bytes() == open(R.__file__, "rb").read()
    meta = json.loads((run / "args.json").read_text())
    assert meta["torch"] == torch.__version__ and meta["rho"] == 0.5
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    final = json.loads((run / "final.json").read_text())
    assert final["class_counts"] == D.lt_counts(40, 5, 0.5)
    acc = final["rotation_accuracy_pretext"]
    assert acc == rows[-1]["test_rotation_pretext"] and len(acc["per_rotation"]) == 4
    assert acc["top1"] == pytest.approx(np.mean(acc["per_rotation"]))
    assert final["finetune"].startswith("python ldam_drw.py --dataset folder") and str(run / "last.pt") in final["finetune"]


def test_checkpoint_follows_the_project_contract(run):
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert set(ckpt) == {"script", "arch", "model", "epoch", "optimizer", "args", "class_counts", "best", "rng",
                         "mean", "std"}
    assert (ckpt["script"], ckpt["arch"], ckpt["epoch"]) == ("rotation_ssp.py", "resnet32", 2)
    assert ckpt["class_counts"] == D.lt_counts(40, 5, 0.5)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["model"]["fc.weight"].shape == (4, 64) and ckpt["model"]["fc.bias"].shape == (4,)
    assert set(ckpt["model"]) == set(L.ResNet32(4).state_dict())
    assert not list(run.glob("*.tmp"))


@pytest.mark.parametrize("cosine", [True, False])
def test_ldam_drw_load_backbone_reproduces_every_backbone_tensor(run, capsys, cosine):
    src = torch.load(run / "last.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    model = L.ResNet32(10, cosine=cosine)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    run_lt.load_backbone(model, "resnet32", run / "last.pt")
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith("fc.")]
    assert backbone and all(torch.equal(own[k], src[k]) for k in backbone)
    assert all(torch.equal(own[k], v) for k, v in head.items())                      # the 4-way head is skipped
    assert f"{len(backbone)} tensors matched" in capsys.readouterr().out


def test_a_module_prefixed_copy_loads_the_same(run, tmp_path, capsys):
    """The authors' DataParallel checkpoints carried `module.`; ldam_drw.py strips it instead of loading nothing."""
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["model"] = {f"module.{k}": v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "dp.pt")
    a, b = L.ResNet32(10, cosine=True), L.ResNet32(10, cosine=True)
    run_lt.load_backbone(a, "resnet32", run / "last.pt")
    run_lt.load_backbone(b, "resnet32", tmp_path / "dp.pt")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items() if not k.startswith("fc."))
    assert capsys.readouterr().out.count("186 tensors matched") == 2


def test_ldam_drw_pretrained_runs_from_it(run, easy, tmp_path):
    r = run_script("ldam_drw.py", "--dataset", "folder", "--data-root", easy, "--gpu", "-1", "--epochs", 1,
                   "--batch-size", 16, "--rho", "0.5", "--out", tmp_path / "ft", "--pretrained", run / "last.pt")
    assert r.returncode == 0, r.stderr
    assert "186 tensors matched" in r.stdout and "classifier re-initialised" in r.stdout


@pytest.mark.parametrize("kind", ["arch", "keys"])
def test_mismatched_checkpoint_fails_loudly_in_ldam_drw(run, easy, tmp_path, kind):
    ckpt = torch.load(run / "last.pt", weights_only=True)
    if kind == "arch":
        ckpt["arch"], expected = "resnet18", "holds a resnet18 backbone"
    else:
        dropped = [k for k in ckpt["model"] if k.startswith("layer2.1.")]
        ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k not in dropped}
        expected = f"lacks {len(dropped)} backbone tensors"
    torch.save(ckpt, tmp_path / "bad.pt")
    r = run_script("ldam_drw.py", "--dataset", "folder", "--data-root", easy, "--gpu", "-1", "--epochs", 1,
                   "--rho", "0.5", "--out", tmp_path / "ft", "--pretrained", tmp_path / "bad.pt")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr
    assert not (tmp_path / "ft" / "last.pt").exists()


def _orient(root):
    """write_folder's easy images darkened from top to bottom: the rotation becomes visible (plain easy
    images are a colour plus isotropic noise, whose rotation nothing can predict)."""
    write_folder(root, classes=tuple("abcd"), per_class=(40,) * 4, per_class_test=8, easy=True)
    ramp = np.linspace(1.0, 0.25, 32)[:, None, None]
    for png in root.rglob("*.png"):
        Image.fromarray((np.asarray(Image.open(png)) * ramp).astype(np.uint8)).save(png)


def test_reported_pretext_accuracy_is_the_checkpoints(tmp_path):
    """final.json's rotation accuracy is what the saved model predicts for every test image under each of
    the four rotations (computed here from last.pt in the same batches, so the verdict does not hang on a
    training trajectory)."""
    _orient(tmp_path / "data")
    final = _main(tmp_path / "run", tmp_path / "data", "--rho", "0.5", "--epochs", 2, "--batch-size", 16,
                  "--warmup", 1, "--lr", 0.05)
    model = R.ResNet32(4)
    model.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"])
    model.eval()
    train_x, _, _ = D.load_split("folder", tmp_path / "data", True)
    test_x, test_y, _ = D.load_split("folder", tmp_path / "data", False)
    mean, std = D.mean_std("folder", train_x)
    hits = []
    with torch.no_grad():
        for x, _, _ in D.GPULoader(test_x, test_y, 1000, mean, std, "cpu").epoch(0):
            hits.append(torch.stack([model(torch.rot90(x, r, (2, 3)).contiguous()).argmax(1) == r for r in range(4)]))
    hits = torch.cat(hits, 1).double()
    got = final["rotation_accuracy_pretext"]
    assert got["top1"] == pytest.approx(100 * hits.mean().item())
    assert got["per_rotation"] == pytest.approx((100 * hits.mean(1)).tolist())


class _Crash(Exception):
    pass


def test_resume_continues_to_the_same_result(tmp_path, easy, monkeypatch):
    args = ("--rho", "0.5", "--epochs", 2, "--batch-size", 16)
    whole = _main(tmp_path / "whole", easy, *args)
    save, calls = run_lt.save_atomic, []

    def crash_before_second_save(obj, path):           # epoch 2 is logged, but last.pt keeps epoch 1
        calls.append(obj["epoch"])
        if len(calls) == 2:
            raise _Crash
        save(obj, path)

    monkeypatch.setattr(run_lt, "save_atomic", crash_before_second_save)
    with pytest.raises(_Crash):
        _main(tmp_path / "cut", easy, *args)
    monkeypatch.setattr(run_lt, "save_atomic", save)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 2
    R.main(["--resume", str(tmp_path / "cut" / "last.pt"), "--gpu", "-1"])
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    rows = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert json.loads((tmp_path / "cut" / "final.json").read_text())["rotation_accuracy_pretext"]["top1"] == \
        whole["rotation_accuracy_pretext"]["top1"]


# ----- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,msg", [(["--rho", "100"], "--rho 0.01"), (["--dataset", "imagenet_lt"], "MoCo"),
                                      (["--epochs", "0"], "--epochs must be in [1, inf)")])
def test_bad_input_one_line_exit_2(tmp_path, easy, args, msg):
    r = run_script("rotation_ssp.py", "--dataset", "folder", "--data-root", easy, "--gpu", "-1",
                   "--out", tmp_path / "o", *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o" / "last.pt").exists()


def test_existing_run_is_not_overwritten(run, easy, capsys):
    before = (run / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        R.main(["--dataset", "folder", "--data-root", str(easy), "--gpu", "-1", "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--resume" in err[0]
    assert (run / "last.pt").read_bytes() == before


def test_resume_refuses_another_scripts_checkpoint(run, tmp_path, capsys):
    ckpt = torch.load(run / "last.pt", weights_only=True)
    torch.save({**ckpt, "script": "ldam_drw.py"}, tmp_path / "ldam.pt")
    with pytest.raises(SystemExit) as e:
        R.main(["--resume", str(tmp_path / "ldam.pt"), "--gpu", "-1"])
    assert e.value.code == 2 and "written by ldam_drw.py" in capsys.readouterr().err
