"""eval_linear.py: the probe measures the backbone (a class-separating one scores high, a random one does
not), the backbone never changes, the data is the full training split, the schedule, and Δ of Eq. (1)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import datasets_lt as D
import eval_linear as E
from conftest import run_script, write_cifar, write_file_list

PRIMARY = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def write_needles(root, per_class_train=30, per_class_test=20, distractors=(8, 14), seed=0):
    """Three classes that only a sharp colour detector tells apart: uniform noise in [30, 225], 8–13
    distractor squares (4×4) of a random near-primary colour (one channel 170–230, the others 20–70),
    and one 4×4 square of the exact primary colour that names the class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for name, colour in PRIMARY.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(30, 226, (32, 32, 3))
                for _ in range(rng.integers(*distractors)):
                    near = rng.integers(20, 71, 3)
                    near[rng.integers(3)] = rng.integers(170, 231)
                    y, x = rng.integers(0, 29, 2)
                    img[y:y + 4, x:x + 4] = near
                y, x = rng.integers(0, 29, 2)
                img[y:y + 4, x:x + 4] = colour
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.png")


def needle_detector(mean, std, threshold=0.85, gain=100.0):
    """A ResNet-32 whose feature k is nonzero only where an image holds an exact primary square:
    stem channel k = ReLU(gain · (x_k − Σ_{j≠k} x_j − threshold)) on the centre pixel (x in [0, 1],
    undoing the normalisation), every residual branch off (bn2 = 0), so the option-A shortcuts carry
    stem channel k to feature 24 + k. Noise and distractors stay below the threshold (at most 0.75)."""
    model = E.ResNet32(3)
    with torch.no_grad():
        model.conv1.weight.zero_()
        for k in range(3):
            sign = torch.tensor([1.0 if c == k else -1.0 for c in range(3)])
            model.conv1.weight[k, :, 1, 1] = sign * torch.tensor(std)
            model.bn1.weight[k] = gain
            model.bn1.bias[k] = gain * (float((sign * torch.tensor(mean)).sum()) - threshold)
        for name, module in model.named_modules():
            if name.endswith("bn2"):
                module.weight.zero_()
                module.bias.zero_()
    return model


def random_backbone(images, mean, std, seed=0):
    """Random weights with BatchNorm statistics measured on `images` (no gradient step), so its features
    have a sensible scale and a low probe accuracy is not an optimisation artefact of lr 30."""
    torch.manual_seed(seed)
    model = E.ResNet32(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None                                       # cumulative average over the pass
    model.train()
    with torch.no_grad():
        model(D.normalize(D.to_device(images, "cpu"), mean, std))
    return model


def save_ckpt(path, model, arch="resnet32", script="simsiam_rwsam.py", **args):
    torch.save({"script": script, "arch": arch, "model": model.state_dict(), "epoch": 7,
                "class_counts": args.pop("class_counts", [100, 100, 100]), "args": args}, path)


@pytest.fixture(scope="module")
def needles(tmp_path_factory):
    root = tmp_path_factory.mktemp("needles")
    write_needles(root)
    images, _, _ = D.load_split("folder", root, True)
    return root, images, D.mean_std("folder", images)


def _fails(capsys, *argv):
    """Run main() in this process; it must stop with exit code 2. Returns the stderr lines."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        E.main([*map(str, argv)])
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def _probe(tmp_path, name, ckpt, *extra):
    out = tmp_path / name
    E.main(["--ckpt", str(ckpt), "--gpu", "-1", "--out", str(out), *map(str, extra)])
    return json.loads((out / "final.json").read_text()), out


# ----- recipe --------------------------------------------------------------------------------------

def test_defaults_and_step_schedule():
    a = E.parse_args(["--ckpt", "runs/x/last.pt"])
    assert (a.epochs, a.batch_size, a.lr, a.wd, a.momentum, a.augment, a.val_frac) == \
        (100, 256, 30.0, 0.0, 0.9, False, 0.0)
    assert a.out.replace("\\", "/") == "runs/eval_linear-x-0"
    lrs = [E.probe_lr(e, a) for e in range(100)]
    assert lrs[0] == lrs[59] == 30.0
    assert lrs[60] == lrs[79] == pytest.approx(3.0) and lrs[80] == lrs[99] == pytest.approx(0.3)
    b = E.parse_args(["--ckpt", "x.pt", "--epochs", "10"])
    assert [E.probe_lr(e, b) for e in (5, 6, 8)] == pytest.approx([30.0, 3.0, 0.3])


# ----- the probe measures the backbone -------------------------------------------------------------

@pytest.mark.slow
def test_separating_backbone_scores_high_random_does_not(tmp_path, needles):
    root, images, (mean, std) = needles
    common = dict(dataset="folder", data_root=str(root), imb_type="exp", seed=0)
    save_ckpt(tmp_path / "detector.pt", needle_detector(mean, std), rho=1.0, **common)
    save_ckpt(tmp_path / "random.pt", random_backbone(images, mean, std), rho=0.01, class_counts=[200, 98, 2],
              **common)
    good, _ = _probe(tmp_path, "good", tmp_path / "detector.pt", "--protocol", "fast")
    bad, _ = _probe(tmp_path, "bad", tmp_path / "random.pt", "--protocol", "fast")
    assert good["class_counts"] == [30, 30, 30] and good["epochs"] == 100 and not good["augment"]
    assert good["top1"] >= 95 and min(good["per_class"]) >= 90                  # chance: 33.3%
    assert bad["top1"] <= 65
    # Δ (Eq. 1) from these two real result files: same n = 300, r = 1 vs r = 2/200 (from the counts)
    rows, unpaired = E.gap_rows([good, bad])
    assert not unpaired and len(rows) == 1
    assert rows[0]["delta"] == pytest.approx((good["top1"] - bad["top1"]) / good["top1"], rel=1e-12)


@pytest.mark.parametrize("augment", [False, True])
def test_backbone_unchanged_after_probing(tmp_path, needles, augment):
    root, images, (mean, std) = needles
    save_ckpt(tmp_path / "r.pt", random_backbone(images, mean, std, seed=1), dataset="folder", data_root=str(root))
    final, out = _probe(tmp_path, "p", tmp_path / "r.pt", "--epochs", 3, "--batch-size", 32, "--protocol", "fast",
                        *(["--augment"] if augment else []))
    assert final["sanity_check"] == "passed" and final["augment"] == augment
    src = torch.load(tmp_path / "r.pt", weights_only=True)["model"]
    probed = torch.load(out / "last.pt", weights_only=True)
    backbone = [k for k in src if not k.startswith("fc.")]
    assert len(backbone) == 186                               # 93 parameters + 93 BatchNorm buffers
    assert all(torch.equal(probed["model"][k], src[k]) for k in backbone)
    assert not torch.equal(probed["model"]["fc.weight"], src["fc.weight"])
    assert probed["script"] == "eval_linear.py" and probed["pretrain"]["checkpoint"].endswith("r.pt")


def test_sanity_check_catches_a_changed_buffer():
    model = E.ResNet32(3)
    before = E.backbone_state(model)
    E.sanity_check(model, before)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))                      # train-mode BN updates running statistics
    with pytest.raises(AssertionError, match="frozen backbone changed"):
        E.sanity_check(model, before)


def test_features_are_cached_once_in_eval_mode(needles):
    root, images, (mean, std) = needles
    model = random_backbone(images, mean, std)
    batches = D.GPULoader(images[:10], np.zeros(10), 4, mean, std, "cpu")
    feats, labels = E.extract_features(model, batches)
    model.eval()
    with torch.no_grad():
        direct = model.features(D.normalize(D.to_device(images[:10], "cpu"), mean, std))
    assert feats.shape == (10, 64) and torch.allclose(feats, direct, atol=1e-5) and not model.training


# ----- data: the full balanced training split of the checkpoint's dataset --------------------------

def test_cifar_resnet18_full_split_val_and_simsiam_keys(tmp_path, capsys):
    write_cifar(tmp_path / "c10", 10, per_class_train=10, per_class_test=3)
    torch.manual_seed(0)
    sd = E.ResNet18(10).state_dict()
    sd.update({"projector.0.weight": torch.zeros(2048, 512), "predictor.0.weight": torch.zeros(512, 2048)})
    torch.save({"script": "simsiam_rwsam.py", "arch": "resnet18", "model": sd, "epoch": 800,
                "class_counts": [50] * 5 + [1] * 5,
                "args": {"dataset": "cifar10", "data_root": str(tmp_path / "c10"), "rho": 0.01, "imb_type": "step",
                         "opt": "sam"}},
               tmp_path / "ss.pt")
    final, out = _probe(tmp_path, "p", tmp_path / "ss.pt", "--epochs", 4, "--val-frac", 0.2, "--protocol", "fast")
    assert "2 unexpected (projector.0.weight, predictor.0.weight)" in capsys.readouterr().out
    assert final["class_counts"] == [8] * 10 and len(final["per_class"]) == 10      # 10 per class, 2 to validation
    assert final["eval"] == "linear:cifar10"
    assert {k: final["pretrain"][k] for k in ("kind", "method", "n", "r", "imb_type")} == \
        {"kind": "SSL", "method": "simsiam_rwsam+sam", "n": 255, "r": 1 / 50, "imb_type": "step"}   # r: counts
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    best = final["best_on_val"]
    assert best["val_top1"] == max(r["val_top1"] for r in rows) and best["test"] == rows[best["epoch"] - 1]["test"]
    assert final["last"] == rows[-1]["test"]


def test_file_lists_need_the_full_lists(tmp_path, capsys):
    lst = write_file_list(tmp_path, num_classes=3, per_class=4)
    torch.save({"script": "moco_ssp.py", "arch": "resnet10", "model": E.build_backbone("resnet10", 5).state_dict(),
                "args": {"dataset": "imagenet_lt", "data_root": str(tmp_path), "train_list": str(lst)}},
               tmp_path / "m.pt")
    err = _fails(capsys, "--ckpt", tmp_path / "m.pt", "--gpu", "-1", "--out", tmp_path / "x")
    assert len(err) == 1 and "--train-list" in err[0]
    final, _ = _probe(tmp_path, "p", tmp_path / "m.pt", "--train-list", lst, "--test-list", lst, "--epochs", 2,
                      "--workers", 0)
    assert final["class_counts"] == [4, 4, 4] and final["pretrain"]["n"] is None and final["sanity_check"] == "passed"


# ----- Δ, Eq. (1) ----------------------------------------------------------------------------------

def _result(path, top1, script, counts, seed=0, eval_name="linear:cifar10", arch="resnet18", eval_seed=0, ckpt=None,
            **args):
    """A final.json as eval_linear.py / eval_ood.py write it, its "pretrain" made by pretrain_meta from a
    checkpoint dict with these class counts and args."""
    state = {"script": script, "arch": arch, "class_counts": counts, "epoch": 1,
             "args": {"dataset": "cifar10", "imb_type": "exp", "seed": seed, **args}}
    res = {"eval": eval_name, "last": {"top1": top1}, "seed": eval_seed,
           "pretrain": E.pretrain_meta(state, ckpt or str(path).replace(".json", ".pt"))}
    path.write_text(json.dumps(res))
    return path


LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]                 # CIFAR-10-LT, rho 0.01: n = 12,406
BAL = [1241] * 6 + [1240] * 4                                              # its balanced subset, same n


def test_r_comes_from_the_class_counts_not_from_rho():
    meta = lambda counts, **a: E.pretrain_meta({"script": "moco_ssp.py", "arch": "resnet50", "class_counts": counts,
                                                "args": a}, "x.pt")
    assert meta(LT, rho=0.01)["r"] == 50 / 5000 and meta(LT, rho=0.01)["n"] == 12406
    assert meta(BAL, rho=0.01, balanced=True)["r"] == 1.0                  # differ by one image: balanced
    assert meta([1280] + [500] * 998 + [5], rho=1.0)["r"] == 5 / 1280      # an ImageNet-LT list run at --rho 1
    assert meta([12, 10, 10], rho=1.0)["r"] == 10 / 12                     # two images apart: not balanced
    assert meta(None, rho=1.0)["r"] is None


def test_gap_exact_from_hand_made_files(tmp_path, capsys):
    files = [_result(tmp_path / "ssl_bal.json", 80.0, "simsiam_rwsam.py", BAL, opt="sgd", balanced=True),
             _result(tmp_path / "ssl_imb.json", 72.0, "simsiam_rwsam.py", LT, opt="sgd")]
    E.main(["--gap", *map(str, files)])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2].split()[-2] == "10.00"                        # (80 − 72) / 80
    assert out[2].split()[2:8] == ["simsiam_rwsam+sgd", "resnet18", "cifar10", "12406", "0.01", "exp"]
    rows, _ = E.gap_rows([json.loads(f.read_text()) for f in files])
    assert rows[0]["delta"] == (80.0 - 72.0) / 80.0 and rows[0]["A_balanced"] == 80.0


def test_gap_keeps_methods_apart_and_reports_runs_without_a_partner(tmp_path, capsys):
    files = [_result(tmp_path / "a.json", 90.0, "ldam_drw.py", BAL, loss="ce", rule="none", balanced=True),
             _result(tmp_path / "b.json", 81.0, "ldam_drw.py", LT, loss="ce", rule="none"),
             _result(tmp_path / "c.json", 70.0, "ldam_drw.py", LT, loss="ldam", rule="drw"),     # no balanced LDAM-DRW
             _result(tmp_path / "d.json", 60.0, "ldam_drw.py", LT, arch="resnet32", loss="ce", rule="none"),
             _result(tmp_path / "e.json", 85.0, "simsiam_rwsam.py", BAL, opt="sam", balanced=True),
             _result(tmp_path / "f.json", 10.0, "simsiam_rwsam.py", BAL, opt="sgd", balanced=True)]
    rows, unpaired = E.gap_rows([json.loads(f.read_text()) for f in files])
    assert [(r["method"], r["arch"], r["delta"]) for r in rows] == [("ldam_drw:ce-none", "resnet18", pytest.approx(0.1))]
    assert sorted((k[2], k[3]) for k, _ in unpaired) == [("ldam_drw:ce-none", "resnet32"), ("ldam_drw:ldam-drw", "resnet18"),
                                                          ("simsiam_rwsam+sam", "resnet18"), ("simsiam_rwsam+sgd", "resnet18")]
    E.main(["--gap", *map(str, files)])
    err = capsys.readouterr().err
    assert "method=ldam_drw:ldam-drw arch=resnet18 dataset=cifar10 n=12406: 1 imbalanced run(s), no balanced run" in err
    assert err.count("; left out") == 4


def test_gap_mean_and_sample_std_over_seeds(tmp_path):
    bal, imb = [80.0, 82.0, 84.0], [72.0, 72.0, 78.0]
    files = [_result(tmp_path / f"b{s}.json", a, "moco_ssp.py", BAL, seed=s, opt="sgd", balanced=True) for s, a in enumerate(bal)]
    files += [_result(tmp_path / f"i{s}.json", a, "moco_ssp.py", LT, seed=s, opt="sgd") for s, a in enumerate(imb)]
    (row,), unpaired = E.gap_rows([json.loads(f.read_text()) for f in files])
    assert not unpaired and (row["runs_balanced"], row["runs_imbalanced"], row["paired_seeds"]) == (3, 3, 3)
    assert row["A_balanced"] == 82.0 and row["A_balanced_std"] == pytest.approx(2.0)          # sample std, n − 1
    assert row["A_imbalanced"] == 74.0 and row["A_imbalanced_std"] == pytest.approx(math.sqrt(12))
    assert row["delta"] == pytest.approx(8 / 82)
    per_seed = [8 / 80, 10 / 82, 6 / 84]
    assert row["delta_std"] == pytest.approx(float(np.std(per_seed, ddof=1)))


def test_gap_ood_is_the_mean_over_the_fine_tuning_targets(tmp_path):
    targets = ("CUB_200_2011_split", "cars", "pets", "aircraft")
    kw = dict(dataset="imagenet_lt", opt="sgd")
    lt = [1280] + [1000] * 98 + [5]
    bal = [993] * 85 + [992] * 15                                          # same n = 99,285
    files = [_result(tmp_path / f"b-{t}.json", a, "moco_ssp.py", bal, eval_name=f"finetune:{t}", arch="resnet50",
                     balanced=True, ckpt="bal.pt", **kw) for t, a in zip(targets, (70.0, 88.0, 80.0, 82.0))]
    files += [_result(tmp_path / f"i-{t}.json", a, "moco_ssp.py", lt, eval_name=f"finetune:{t}", arch="resnet50",
                      ckpt="imb.pt", **kw) for t, a in zip(targets, (69.0, 88.0, 79.0, 80.0))]
    files += [_result(tmp_path / f"x-{t}.json", 50.0, "moco_ssp.py", lt, seed=1, eval_name=f"finetune:{t}",
                      arch="resnet50", ckpt="short.pt", **kw) for t in targets[:3]]                                  # one target short
    rows, unpaired = E.gap_rows([json.loads(f.read_text()) for f in files])
    (row,) = rows
    assert row["eval"] == "finetune:mean(CUB_200_2011_split+aircraft+cars+pets)" and row["r"] == 5 / 1280
    assert row["A_balanced"] == 80.0 and row["A_imbalanced"] == 79.0 and row["delta"] == pytest.approx(1 / 80)
    assert [k[0] for k, _ in unpaired] == ["finetune:mean(CUB_200_2011_split+cars+pets)"]


def test_gap_without_any_pair_fails(tmp_path, capsys):
    f = _result(tmp_path / "a.json", 80.0, "simsiam_rwsam.py", LT)
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert "Δ needs both" in _fails(capsys, "--gap", f)[-1]
    assert _fails(capsys, "--gap", tmp_path / "junk.json") == [f"error: '{tmp_path / 'junk.json'}' is not a final.json "
                                                              f"of eval_linear.py or eval_ood.py (no 'eval', "
                                                              f"'pretrain' and 'last')"]


# ----- bad input -----------------------------------------------------------------------------------

def test_command_line_without_ckpt_or_gap(tmp_path):
    r = run_script("eval_linear.py", "--gpu", "-1")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: pass --ckpt PATH to probe a checkpoint, or --gap FINAL_JSON ... for the Δ table (not both)"]


@pytest.mark.parametrize("kind", ["garbage", "keys", "arch", "flag"])
def test_bad_input_one_line_exit_2(tmp_path, needles, capsys, kind):
    path = tmp_path / "bad.pt"
    data = {"dataset": "folder", "data_root": str(needles[0])}
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif kind == "keys":
        sd = {k: v for k, v in E.ResNet32(3).state_dict().items() if not k.startswith("layer3.4")}
        torch.save({"arch": "resnet32", "model": sd, "args": data}, path)
    else:
        torch.save({"arch": "resnet34" if kind == "arch" else "resnet32", "model": E.ResNet32(3).state_dict(),
                    "args": data}, path)
    extra = ["--val-frac", "1.5"] if kind == "flag" else []
    err = _fails(capsys, "--ckpt", path, "--gpu", "-1", "--out", tmp_path / "o", *extra)
    expected = {"garbage": "not a checkpoint", "keys": "lacks 12 backbone tensors",
                "arch": "unknown architecture 'resnet34'", "flag": "--val-frac must be in [0, 1)"}[kind]
    assert len(err) == 1 and expected in err[0]
    assert not (tmp_path / "o" / "final.json").exists()


# ----- --protocol authors: the authors' main_lincls.py views ---------------------------------------

def _pil(img, ops):
    from torchvision.transforms import functional as TF
    out = Image.fromarray(img)
    for op in ops:
        out = op(TF, out)
    return np.asarray(out)


def test_authors_test_view_is_bicubic_resize_36_and_centre_crop_32():
    from torchvision.transforms import InterpolationMode
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ours = E.authors_test_view(D.to_device(imgs, "cpu")).permute(0, 2, 3, 1).numpy().astype(int)
    for img, mine in zip(imgs, ours):
        ref = _pil(img, [lambda TF, x: TF.resize(x, 36, InterpolationMode.BICUBIC),
                         lambda TF, x: TF.center_crop(x, 32)]).astype(int)
        assert ref.shape == mine.shape == (32, 32, 3) and np.abs(ref - mine).max() <= 1


def test_authors_training_view_is_pil_bicubic_resized_crop_and_flip():
    from torchvision.transforms import InterpolationMode
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    boxes = [(0, 0, 32, 32, False), (3, 1, 28, 30, True), (5, 4, 26, 27, False)]      # top, left, h, w, flip
    top, left, h, w, flip = (torch.tensor(v) for v in zip(*boxes))
    ours = E.bicubic_resized_crop(D.to_device(imgs, "cpu"), top, left, h, w, 32, flip).permute(0, 2, 3, 1).numpy()
    for img, mine, (t, l, hh, ww, f) in zip(imgs, ours.astype(int), boxes):
        ops = [lambda TF, x: TF.resized_crop(x, t, l, hh, ww, [32, 32], InterpolationMode.BICUBIC)]
        ops += [lambda TF, x: TF.hflip(x)] if f else []
        assert np.abs(_pil(img, ops).astype(int) - mine).max() <= 1


def test_authors_training_views_crop_scale_and_flip_rate():
    """On coordinate ramps (red = 8·column, green = 8·row; bicubic reproduces a linear ramp exactly) the
    slope of each view gives its crop width and height and whether it was mirrored."""
    ramp = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    ramp[0, :, :, 0] = 8 * np.arange(32)[None, :]
    ramp[0, :, :, 1] = 8 * np.arange(32)[:, None]
    x = D.to_device(ramp, "cpu").expand(4000, -1, -1, -1).contiguous()
    views = E.authors_train_view(x, torch.Generator().manual_seed(0)).float()
    mid = slice(8, 24)
    i = torch.arange(8, 24, dtype=torch.float32)
    slope = lambda v: ((v - v.mean(1, keepdim=True)) * (i - i.mean())).sum(1) / ((i - i.mean()) ** 2).sum()
    sx = slope(views[:, 0, 16, mid])                      # 8 · w / 32 per output column, negative if mirrored
    sy = slope(views[:, 1, mid, 16])
    w, h = 4 * sx.abs(), 4 * sy
    area = w * h / 1024
    assert area.min() > 0.78 and area.max() < 1.02 and area.min() < 0.82 and area.max() > 0.97
    assert ((w / h) > 0.73).all() and ((w / h) < 1.36).all()
    assert abs((sx < 0).float().mean().item() - 0.5) < 0.04


def test_authors_protocol_is_the_default_and_runs(tmp_path, needles):
    root, images, (mean, std) = needles
    assert E.parse_args(["--ckpt", "x.pt"]).protocol == "authors"
    save_ckpt(tmp_path / "r.pt", random_backbone(images, mean, std, seed=2), dataset="folder", data_root=str(root))
    final, out = _probe(tmp_path, "p", tmp_path / "r.pt", "--epochs", 2, "--batch-size", 32, "--val-frac", 0.2)
    assert final["protocol"] == "authors" and final["sanity_check"] == "passed"
    assert final["class_counts"] == [24, 24, 24] and final["best_on_val"] is not None
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_augment_belongs_to_the_fast_protocol(capsys):
    with pytest.raises(SystemExit) as e:
        E.parse_args(["--ckpt", "x.pt", "--augment"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--protocol fast" in err and len(err.strip().splitlines()) == 1
