"""eval_ood.py: STL-10 probe through the real loader (resized 96→32, or at 96), folder probe of a CIFAR
backbone, folder fine-tuning of an ImageNet backbone that starts from the checkpoint and nothing else,
and one-line failures for checkpoints and targets that do not fit."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets_lt as D
import eval_ood as O
from conftest import ROOT, run_script, write_folder, write_stl10


def _ckpt(path, arch="resnet32", script="rotation_ssp.py", model=None, seed=0, **args):
    torch.manual_seed(seed)
    model = model if model is not None else O.build_backbone(arch, 4)
    torch.save({"script": script, "arch": arch, "model": model.state_dict(), "epoch": 200,
                "class_counts": [40, 20, 10, 5], "args": {"dataset": "cifar10", "rho": 0.1, **args}}, path)
    return model.state_dict()


def _run(tmp_path, *argv):
    out = tmp_path / "out"
    O.main([*map(str, argv), "--gpu", "-1", "--out", str(out)])
    return json.loads((out / "final.json").read_text()), out


def _fails(capsys, *argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        O.main([*map(str, argv)])
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_defaults_follow_the_checkpoint_architecture():
    a = O.parse_args(["--ckpt", "runs/x/last.pt", "--target", "stl10"])
    O.set_protocol_defaults(a, "resnet18")
    assert (a.protocol, a.epochs, a.batch_size, a.lr, a.wd, a.stl_size) == ("probe", 100, 256, 30.0, 0.0, 32)
    b = O.parse_args(["--ckpt", "runs/x/last.pt", "--target", "folder"])
    O.set_protocol_defaults(b, "resnet50")
    assert (b.protocol, b.epochs, b.batch_size, b.lr, b.wd, b.backbone_lr_mult, b.norm) == \
        ("finetune", 150, 48, 0.1, 5e-4, 0.1, "pretrain")
    lrs = [O.finetune_lr(e, b) for e in range(150)]                  # ft_moco.py: ×0.1 at 25/50/75%
    assert lrs[0] == lrs[36] == 0.1 and lrs[37] == lrs[74] == pytest.approx(0.01)
    assert lrs[75] == pytest.approx(1e-3) and lrs[112] == lrs[149] == pytest.approx(1e-4)


def test_resize_is_antialiased_bilinear_rounded_to_uint8():
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    y = O.resize_images(x, 32, chunk=2)
    ref = F.interpolate(x.float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert y.dtype == torch.uint8 and y.shape == (3, 3, 32, 32)
    assert torch.equal(y, ref.round().clamp(0, 255).to(torch.uint8))
    assert (y.float() - 127.5).std() < 0.5 * (x.float() - 127.5).std()        # low-pass: noise averaged out
    flat = torch.full((1, 3, 96, 96), 77, dtype=torch.uint8)
    assert torch.equal(O.resize_images(flat, 32), torch.full((1, 3, 32, 32), 77, dtype=torch.uint8))


# ----- CIFAR backbones: linear probe ---------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 96])
def test_stl10_probe_through_the_real_loader(tmp_path, monkeypatch, size):
    write_stl10(tmp_path / "stl", per_class_train=4, per_class_test=2)
    src = _ckpt(tmp_path / "r.pt")
    seen = []
    features = O.backbone_features
    monkeypatch.setattr(O, "backbone_features", lambda m, x: seen.append(tuple(x.shape[1:])) or features(m, x))
    final, out = _run(tmp_path, "--ckpt", tmp_path / "r.pt", "--target", "stl10", "--data-root", tmp_path / "stl",
                      "--stl-size", size, "--epochs", 3)
    assert set(seen) == {(3, size, size)}
    assert final["eval"] == f"stl10@{size}" and final["protocol"] == "probe" and final["stl_size"] == size
    assert final["class_counts"] == [4] * 10 and len(final["per_class"]) == 10 and final["sanity_check"] == "passed"
    assert final["pretrain"]["kind"] == "SSL" and final["pretrain"]["n"] == 75
    assert final["pretrain"]["r"] == 5 / 40 and final["pretrain"]["rho"] == 0.1        # r from the counts, not --rho
    saved = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in src.items() if not k.startswith("fc."))


def test_stl10_normalisation_is_from_the_resized_training_images(tmp_path):
    data = write_stl10(tmp_path, per_class_train=2, per_class_test=1)
    images, labels, names = D.load_split("stl10", tmp_path, True)
    assert np.array_equal(images, data["train"][0]) and names == [f"stl{c}" for c in range(10)]
    small = O.resize_images(D.to_device(images, "cpu"), 32)
    mean, _ = D.mean_std("stl10", small.permute(0, 2, 3, 1))
    assert mean == pytest.approx((small.double() / 255).mean(dim=(0, 2, 3)).tolist())


def test_stl10_probe_normalises_with_the_checkpoints_statistics(tmp_path, monkeypatch, capsys):
    """The frozen backbone sees (x/255 − mean)/std with the mean/std stored in the checkpoint (the ones it
    was pre-trained with), not STL-10's; --norm target gives STL-10's; an old checkpoint without them falls
    back to its dataset's constants with a note, or stops when it has none."""
    data = write_stl10(tmp_path / "stl", per_class_train=2, per_class_test=1)
    _ckpt(tmp_path / "r.pt")
    ck = torch.load(tmp_path / "r.pt", weights_only=True)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    torch.save({**ck, "mean": mean, "std": std}, tmp_path / "r.pt")
    seen = []
    features = O.backbone_features
    monkeypatch.setattr(O, "backbone_features", lambda m, x: seen.append(x.clone()) or features(m, x))
    small = O.resize_images(D.to_device(data["train"][0], "cpu"), 32)
    common = ["--target", "stl10", "--data-root", tmp_path / "stl", "--epochs", 1]
    final, _ = _run(tmp_path / "a", "--ckpt", tmp_path / "r.pt", *common)
    assert torch.allclose(seen[0], D.normalize(small, mean, std), atol=1e-6)
    assert final["normalisation"] == {"mean": list(mean), "std": list(std), "source": "checkpoint"}
    seen.clear()
    final, _ = _run(tmp_path / "b", "--ckpt", tmp_path / "r.pt", *common, "--norm", "target")
    own = D.mean_std("stl10", small.permute(0, 2, 3, 1))
    assert torch.allclose(seen[0], D.normalize(small, *own), atol=1e-6) and final["normalisation"]["source"] == "target"
    torch.save(ck, tmp_path / "old.pt")                                        # cifar10, no mean/std stored
    seen.clear()
    capsys.readouterr()
    final, _ = _run(tmp_path / "c", "--ckpt", tmp_path / "old.pt", *common)
    assert "stores no mean/std" in capsys.readouterr().out and final["normalisation"]["source"] == "cifar10 constants"
    assert torch.allclose(seen[0], D.normalize(small, D.CIFAR_MEAN, D.CIFAR_STD), atol=1e-6)
    torch.save({**ck, "args": {**ck["args"], "dataset": "folder"}}, tmp_path / "old_folder.pt")
    err = _fails(capsys, "--ckpt", tmp_path / "old_folder.pt", *common, "--gpu", "-1", "--out", tmp_path / "d")
    assert len(err) == 1 and "--norm target" in err[0]


def test_finetuning_transform_is_square_resize_then_crop():
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 300, 3), dtype=np.uint8))
    test = O.finetune_transform(False, 224, D.IMAGENET_MEAN, D.IMAGENET_STD)(img)
    square = np.asarray(img.resize((256, 256), Image.BILINEAR)).astype(np.float64) / 255
    ref = (square[16:240, 16:240] - np.array(D.IMAGENET_MEAN)) / np.array(D.IMAGENET_STD)
    assert test.shape == (3, 224, 224) and np.abs(test.permute(1, 2, 0).numpy() - ref).max() < 0.05
    train = O.finetune_transform(True, 224, D.IMAGENET_MEAN, D.IMAGENET_STD)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train.transforms[0].size == (256, 256) and train(img).shape == (3, 224, 224)


def test_folder_probe_of_a_cifar_backbone(tmp_path):
    write_folder(tmp_path / "f", classes=("ant", "bee", "cat"), per_class=(6, 6, 6), per_class_test=3, easy=True)
    _ckpt(tmp_path / "r.pt", arch="resnet18", script="ldam_drw.py")
    final, _ = _run(tmp_path, "--ckpt", tmp_path / "r.pt", "--target", "folder", "--data-root", tmp_path / "f",
                    "--epochs", 2, "--val-frac", 0.2)
    assert final["eval"] == "probe:f" and final["class_counts"] == [5, 5, 5] and final["best_on_val"]["epoch"] in (1, 2)
    assert final["pretrain"]["kind"] == "SL"


# ----- ImageNet backbones: fine-tuning --------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub")
    write_folder(root, classes=("albatross", "bunting", "crow"), per_class=(8, 8, 8), per_class_test=3, easy=True)
    return root


def test_finetuning_starts_from_the_checkpoint_only(tmp_path, target):
    """With the backbone's lr at 0 its weights after fine-tuning are exactly the checkpoint's; with the
    default 0.1× they move. Either way the head is new (3 classes, not the checkpoint's 4)."""
    src = _ckpt(tmp_path / "m.pt", arch="resnet10", script="moco_ssp.py", seed=3, dataset="imagenet_lt", rho=0.004)
    common = ["--ckpt", tmp_path / "m.pt", "--target", "folder", "--data-root", target, "--size", 32, "--epochs", 2,
              "--batch-size", 8, "--workers", 0]
    frozen, out = _run(tmp_path / "a", *common, "--backbone-lr-mult", 0, "--val-frac", 0.25)
    saved = torch.load(out / "last.pt", weights_only=True)["model"]
    weights = [k for k in src if not k.startswith("fc.") and "running" not in k and "num_batches" not in k]
    assert weights and all(torch.equal(saved[k], src[k]) for k in weights)
    assert saved["fc.weight"].shape == (3, 512)
    assert frozen["protocol"] == "finetune" and frozen["eval"] == f"finetune:{target.name}"
    assert frozen["class_counts"] == [6, 6, 6] and frozen["best_on_val"] is not None
    moved, out = _run(tmp_path / "b", *common)
    saved = torch.load(out / "last.pt", weights_only=True)["model"]
    assert not torch.equal(saved["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 1e-4])


@pytest.mark.parametrize("kind", ["keys", "arch"])
def test_a_checkpoint_that_does_not_match_stops_the_run(tmp_path, target, kind):
    sd = O.build_backbone("resnet10", 4).state_dict()
    if kind == "keys":
        sd = {k: v for k, v in sd.items() if not k.startswith("layer4.")}
    torch.save({"arch": "resnet10" if kind == "keys" else "resnet50", "model": sd}, tmp_path / "bad.pt")
    r = run_script("eval_ood.py", "--ckpt", tmp_path / "bad.pt", "--target", "folder", "--data-root", target,
                   "--gpu", "-1", "--workers", 0, "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "backbone tensors of" in r.stderr
    assert not (tmp_path / "o" / "final.json").exists()


@pytest.mark.parametrize("arch,target_name,message", [
    ("resnet32", "pets", "is for ImageNet backbones"), ("resnet10", "stl10", "protocol for CIFAR backbones"),
    ("resnet10", "aircraft", "FGVCAircraft not found"), ("resnet10", "pets", "OxfordIIITPet not found"),
    ("resnet10", "cars", "StanfordCars not found")])
def test_target_that_does_not_fit_one_line(tmp_path, capsys, arch, target_name, message):
    _ckpt(tmp_path / "c.pt", arch=arch)
    err = _fails(capsys, "--ckpt", tmp_path / "c.pt", "--target", target_name, "--data-root", tmp_path / "empty",
                 "--gpu", "-1", "--out", tmp_path / "o")
    assert len(err) == 1 and message in err[0]


def test_probe_code_is_the_one_of_eval_linear():
    pattern = r"# === shared: linear_probe .*?# === end shared: linear_probe ===\n"
    copies = [re.search(pattern, (ROOT / f).read_text(), re.S) for f in ("eval_linear.py", "eval_ood.py")]
    assert all(copies) and copies[0].group(0) == copies[1].group(0) and "def linear_probe(" in copies[0].group(0)


def test_help_shows_the_defaults_each_protocol_runs_with():
    """--help's "default: A (probe), B (fine-tuning)" are the values a probe of a CIFAR backbone and a fine-tuning
    of an ImageNet one resolve to."""
    from conftest import parser_of
    helps = {a.dest: a.help for a in parser_of("eval_ood.py")._actions}
    for arch, protocol in (("resnet18", "probe"), ("resnet50", "fine-tuning")):
        args = O.parse_args(["--ckpt", "x.pt", "--target", "folder"])
        O.set_protocol_defaults(args, arch)
        for name in ("epochs", "batch_size", "lr", "wd"):
            shown = re.search(rf"([\d.e-]+) \({protocol}\)", helps[name]).group(1)
            assert float(shown) == getattr(args, name), (name, protocol, helps[name])
