"""ldam_drw.py: losses and weights by hand, the schedule, every loss × rule, reported accuracy, resume,
divergence, loading."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import datasets_lt as D
import ldam_drw as L
import run_lt
from conftest import run_script, write_file_list, write_folder

CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


# ----- losses, weights, margins --------------------------------------------------------------------

def test_ldam_margins():
    m = L.ldam_margins(CIFAR10_LT, 0.5)
    assert m[-1].item() == pytest.approx(0.5) and m.argmax().item() == 9
    assert m[0].item() == pytest.approx(0.5 * 0.01 ** 0.25, rel=1e-6)          # (50/5000)^{1/4} · 0.5
    assert m[4].item() == pytest.approx(0.5 * (50 / 645) ** 0.25, rel=1e-6)


@pytest.mark.parametrize("script", ["ldam_drw", "self_training", "rotation_ssp", "crt", "eval_linear", "eval_ood"])
def test_cosine_classifier_starts_with_unit_norm_class_vectors(script):
    """LDAM-DRW's init: uniform(-1, 1) then every class vector at norm 1 (a plain uniform row of 64 has ≈4.6)."""
    import importlib
    mod = importlib.import_module(script)
    torch.manual_seed(0)
    w = mod.NormedLinear(64, 10).weight.detach()
    assert w.shape == (10, 64)
    assert w.norm(dim=1).tolist() == pytest.approx([1.0] * 10, abs=1e-5)
    torch.manual_seed(0)                                  # same direction as the uniform draw it rescales
    u = torch.empty(10, 64).uniform_(-1, 1)
    assert torch.allclose(w, u / u.norm(dim=1, keepdim=True), atol=1e-6)
    assert mod.ResNet32(10, cosine=True).fc.weight.norm(dim=1).tolist() == pytest.approx([1.0] * 10, abs=1e-5)


def test_resample_weights_are_the_authors_effective_number_by_default():
    w = D.effective_number_sample_weights([0, 0, 0, 1], beta=0.5)            # (1−β)/(1−β^n): 0.5/0.875 and 0.5/0.5
    assert w.tolist() == pytest.approx([0.5 / 0.875] * 3 + [1.0])
    labels = torch.repeat_interleave(torch.arange(10), torch.tensor(CIFAR10_LT))
    w = D.effective_number_sample_weights(labels, 0.9999)
    per_class = torch.zeros(10, dtype=torch.float64).index_add_(0, labels, w)   # draw probability ∝ n_c·w_c
    assert (per_class[0] / per_class[9]).item() == pytest.approx(5000 * (1 - 0.9999 ** 50) / (50 * (1 - 0.9999 ** 5000)))
    assert (per_class[0] / per_class[9]).item() == pytest.approx(1.2676, abs=1e-4)
    inv = torch.zeros(10, dtype=torch.float64).index_add_(0, labels, D.balanced_sample_weights(labels))
    assert inv.tolist() == pytest.approx([1.0] * 10)
    assert L.parse_args([]).resample_weights == "effective"
    assert L.parse_args(["--resample-weights", "inverse"]).resample_weights == "inverse"


def test_class_balanced_weights_by_hand():
    w = L.class_balanced_weights([1, 2], beta=0.5)       # (1−β)/(1−β^n): 1 and 2/3, rescaled to sum 2
    assert w.tolist() == pytest.approx([1.2, 0.8])
    w = L.class_balanced_weights(CIFAR10_LT, 0.9999)
    assert w.sum().item() == pytest.approx(10) and (w[1:] > w[:-1]).all()
    assert (w[9] / w[0]).item() == pytest.approx((1 - 0.9999 ** 5000) / (1 - 0.9999 ** 50), rel=1e-5)
    assert L.class_balanced_weights(CIFAR10_LT, 0.0).tolist() == [1.0] * 10     # DRW before the switch


def test_ldam_loss_by_hand():
    cos = torch.tensor([[0.5, 0.2], [0.1, 0.3]])
    y = torch.tensor([0, 1])
    loss = L.ldam_loss(cos, y, None, torch.tensor([0.1, 0.3]), 30.0)
    # sample 1 (y=0): logits 30·(0.4, 0.2) = (12, 6); sample 2 (y=1): 30·(0.1, 0.0) = (3, 0)
    expected = (math.log1p(math.exp(-6)) + math.log1p(math.exp(3))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    w = torch.tensor([1.0, 3.0])
    weighted = L.ldam_loss(cos, y, w, torch.tensor([0.1, 0.3]), 30.0)
    assert weighted.item() == pytest.approx((math.log1p(math.exp(-6)) + 3 * math.log1p(math.exp(3))) / 4, rel=1e-6)


def test_focal_loss_by_hand_and_finite(monkeypatch):
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    ce = F.cross_entropy(logits, y, reduction="none")
    p = torch.exp(-ce)
    assert L.focal_loss(logits, y, None, 1.0).item() == pytest.approx(((1 - p) * ce).mean().item())
    assert L.focal_loss(logits, y, None, 0.0).item() == pytest.approx(ce.mean().item())
    # a CE rounded to just below 0 (seen in reduced precision): its term is 0, not NaN
    monkeypatch.setattr(L.F, "cross_entropy", lambda *a, **k: torch.tensor([-1e-7, 0.0, 0.3]))
    mean = L.focal_loss(logits, y, None, 0.5)
    assert torch.isfinite(mean) and mean.item() == pytest.approx((1 - math.exp(-0.3)) ** 0.5 * 0.3 / 3)
    assert torch.isnan((1 - torch.exp(-torch.tensor(-1e-7))) ** 0.5)          # what the clamp prevents


def test_lr_schedule_scales_with_epochs():
    a = L.parse_args([])
    assert (a.epochs, a.lr, a.wd, a.batch_size, a.loss, a.rule, a.arch) == (200, 0.1, 2e-4, 128, "ldam", "drw", "resnet32")
    lrs = [L.lr_at(e, a) for e in range(200)]
    assert lrs[0] == pytest.approx(0.02) and lrs[4] == pytest.approx(0.1) and lrs[159] == 0.1
    assert lrs[160] == pytest.approx(1e-3) and lrs[179] == pytest.approx(1e-3) and lrs[180] == pytest.approx(1e-5)
    b = L.parse_args(["--epochs", "100"])
    assert L.lr_at(79, b) == 0.1 and L.lr_at(80, b) == pytest.approx(1e-3) and L.lr_at(90, b) == pytest.approx(1e-5)
    c = L.parse_args(["--dataset", "imagenet_lt"])
    assert (c.epochs, c.lr, c.arch, c.schedule) == (90, 0.2, "resnet10", "cosine")
    assert L.lr_at(0, c) == 0.2 and L.lr_at(45, c) == pytest.approx(0.1)


def test_resnet32_shape_and_size():
    m = L.ResNet32(10)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(0.46e6, rel=0.02)
    assert len([k for k in m.state_dict() if not k.startswith("fc.")]) == 186


# ----- runs on fake data ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy")
    write_folder(root, classes=tuple("abcde"), per_class=(16,) * 5, per_class_test=4, easy=True)
    return root


@pytest.fixture(scope="module")
def run1(easy, tmp_path_factory):
    """One finished 1-epoch run, shared by the tests that only read it or try to resume it."""
    out = tmp_path_factory.mktemp("run1")
    _run(out, easy, "--rho", "0.5", "--epochs", 1, "--batch-size", 16)
    return out


def _run(out, root, *extra):
    L.main(["--dataset", "folder", "--data-root", str(root), "--gpu", "-1", "--out", str(out), *map(str, extra)])
    return json.loads((out / "final.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "focal", "ldam"])
@pytest.mark.parametrize("rule", ["none", "reweight", "resample", "drw", "drs"])
def test_every_loss_and_rule_runs(tmp_path, easy, loss, rule):
    final = _run(tmp_path, easy, "--rho", "0.2", "--epochs", 2, "--batch-size", 16, "--loss", loss, "--rule", rule)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert final["class_counts"] == [16, 10, 7, 4, 3] and final["loss"] == loss and final["rule"] == rule


def test_reported_accuracy_is_the_checkpoints(tmp_path, easy):
    """final.json's test accuracy is what the saved model predicts on the test folder, class by class
    (computed here from last.pt in the same batches, so the verdict does not hang on a training trajectory)."""
    final = _run(tmp_path, easy, "--rho", "0.5", "--epochs", 2, "--batch-size", 16, "--loss", "ce", "--rule", "none")
    model = L.build_model("resnet32", 5, cosine=False)
    model.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["model"])
    model.eval()
    train_x, _, _ = D.load_split("folder", easy, True)
    test_x, test_y, _ = D.load_split("folder", easy, False)
    mean, std = D.mean_std("folder", train_x)
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _, _ in D.GPULoader(test_x, test_y, 1000, mean, std, "cpu").epoch(0)])
    y = torch.as_tensor(test_y)
    assert final["last"]["top1"] == pytest.approx(100 * (pred == y).double().mean().item())
    assert final["last"]["per_class"] == [round(100 * (pred[y == c] == c).double().mean().item(), 2) for c in range(5)]


def test_val_split_and_best_on_val(tmp_path, easy):
    final = _run(tmp_path, easy, "--rho", "0.5", "--epochs", 2, "--batch-size", 16, "--val-frac", 0.2)
    lt = D.lt_counts(16, 5, 0.5)
    assert final["class_counts"] == [n - round(0.2 * n) for n in lt]
    assert final["best_on_val"]["epoch"] in (1, 2)
    best_row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[final["best_on_val"]["epoch"] - 1])
    assert final["best_on_val"]["test"] == best_row["test"]


def test_resume_continues_in_the_folder_of_the_checkpoint(tmp_path, easy, run1):
    """A copied (or moved) run resumes where its last.pt lies, not in the --out it was started with, and
    --data-root may point at the data's new place; the original run is left alone."""
    shutil.copytree(run1, tmp_path / "copy")
    shutil.copytree(easy, tmp_path / "data")
    (tmp_path / "copy" / "final.json").unlink()
    before = {p.name: p.read_bytes() for p in run1.iterdir()}
    r = run_script("ldam_drw.py", "--resume", tmp_path / "copy" / "last.pt", "--gpu", "-1", "--data-root",
                   tmp_path / "data")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "copy" / "final.json").read_text())["epochs"] == 1
    assert {p.name: p.read_bytes() for p in run1.iterdir()} == before


@pytest.mark.parametrize("flags", [["--epochs", "5"], ["--out", "elsewhere"], ["--ep", "5"], ["--amp"]])
def test_resume_refuses_flags_it_would_not_apply(run1, capsys, flags):
    before = {p.name: p.read_bytes() for p in run1.iterdir()}
    with pytest.raises(SystemExit) as e:
        L.main(["--resume", str(run1 / "last.pt"), "--gpu", "-1", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    flag = {"--ep": "--epochs"}.get(flags[0], flags[0])
    assert e.value.code == 2 and len(err) == 1 and f"drop {flag}" in err[0]
    assert {p.name: p.read_bytes() for p in run1.iterdir()} == before


def test_nan_loss_in_the_first_epoch_stops_with_exit_1_and_no_false_claim(tmp_path, easy, capsys, monkeypatch):
    """A weight turned NaN after step 2 makes the loss of step 3 NaN: exit 1 naming epoch 1, step 3, and no
    claim about a last.pt that does not exist."""
    real_step, calls = torch.optim.SGD.step, []

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, easy, "--rho", "0.5", "--epochs", 2, "--batch-size", 16, "--loss", "ce")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "loss is not finite at epoch 1, step 3" in err[0]
    assert "no checkpoint was saved" in err[0] and "holds epoch" not in err[0]
    assert not (tmp_path / "last.pt").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_nonfinite_buffer_stops_the_run_and_keeps_last_pt(tmp_path, easy, capsys, monkeypatch):
    """An inf BatchNorm running variance with a finite loss (written after the last step of epoch 2) stops
    the run with exit 1; last.pt still holds epoch 1 and metrics.jsonl stays strict JSON."""
    models, real_build, real_step = [], L.build_model, torch.optim.SGD.step
    steps_per_epoch = math.ceil(sum(D.lt_counts(16, 5, 0.5)) / 16)
    calls = []

    def build(*a, **k):
        models.append(real_build(*a, **k))
        return models[-1]

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2 * steps_per_epoch:
            models[0].layer2[0].bn1.running_var[3] = float("inf")
        return out

    monkeypatch.setattr(L, "build_model", build)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, easy, "--rho", "0.5", "--epochs", 3, "--batch-size", 16, "--loss", "ce")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert f"'layer2.0.bn1.running_var' is not finite after epoch 2, step {steps_per_epoch}" in err[0]
    assert "last.pt still holds epoch 1" in err[0]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]


def test_metrics_are_strict_json():
    text = run_lt.strict_json({"loss": float("nan"), "test": {"few": float("inf")}, "per_class": [1.5, float("-inf")]})
    assert text == '{"loss": null, "test": {"few": null}, "per_class": [1.5, null]}'


def test_damaged_checkpoints_are_one_short_line(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"arch": "resnet32", "model": L.ResNet32(3).state_dict()}, tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:3000])
    for name in ("empty.pt", "cut.pt"):
        with pytest.raises(SystemExit) as e:
            run_lt.load_checkpoint(str(tmp_path / name))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and name in err[0]
        assert len(err[0]) - len(str(tmp_path)) <= 150


# ----- --pretrained --------------------------------------------------------------------------------

def _rotation_style_checkpoint(path, arch="resnet32"):
    """What rotation_ssp.py saves: a ResNet-32 with a 4-way pretext head named fc."""
    torch.manual_seed(123)
    model = L.ResNet32(4)
    for t in model.state_dict().values():
        if t.is_floating_point():
            t.normal_()
    torch.save({"script": "rotation_ssp.py", "arch": arch, "model": model.state_dict(), "epoch": 200}, path)
    return model.state_dict()


def test_load_backbone_copies_every_backbone_tensor(tmp_path, capsys):
    src = _rotation_style_checkpoint(tmp_path / "rot.pt")
    torch.manual_seed(0)
    model = L.ResNet32(10, cosine=True)
    head = model.fc.weight.detach().clone()
    run_lt.load_backbone(model, "resnet32", tmp_path / "rot.pt")
    own = model.state_dict()
    assert all(torch.equal(own[k], src[k]) for k in own if not k.startswith("fc."))
    assert torch.equal(own["fc.weight"], head)
    assert "186 tensors matched, 1 missing (fc.weight), 1 unexpected (fc.bias), 1 not loaded (fc.weight)" in capsys.readouterr().out


def test_pretrained_run_starts_from_the_checkpoint(tmp_path, easy):
    _rotation_style_checkpoint(tmp_path / "rot.pt")
    r = run_script("ldam_drw.py", "--dataset", "folder", "--data-root", easy, "--gpu", "-1", "--epochs", 1,
                   "--batch-size", 16, "--rho", "0.5", "--out", tmp_path / "ft", "--pretrained", tmp_path / "rot.pt")
    assert r.returncode == 0, r.stderr
    assert "186 tensors matched" in r.stdout and "classifier re-initialised (cosine" in r.stdout


@pytest.mark.parametrize("kind", ["arch", "keys", "garbage"])
def test_mismatched_checkpoint_fails_loudly(tmp_path, easy, kind):
    path = tmp_path / "bad.pt"
    if kind == "arch":
        _rotation_style_checkpoint(path, arch="resnet18")
    elif kind == "keys":
        sd = {k: v for k, v in L.ResNet32(4).state_dict().items() if not k.startswith("layer3.4")}
        torch.save({"arch": "resnet32", "model": sd}, path)
    else:
        path.write_bytes(b"not a checkpoint")
    r = run_script("ldam_drw.py", "--dataset", "folder", "--data-root", easy, "--gpu", "-1", "--epochs", 1,
                   "--rho", "0.5", "--out", tmp_path / "x", "--pretrained", path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert {"arch": "resnet18 backbone", "keys": "lacks 12 backbone tensors", "garbage": "not a checkpoint"}[kind] in r.stderr


# ----- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,msg", [(["--rho", "100"], "--rho 0.01"), (["--loss", "hinge"], "invalid choice"),
                                      (["--rule", "sometimes"], "invalid choice")])
def test_bad_flags_one_line_exit_2(tmp_path, easy, args, msg):
    r = run_script("ldam_drw.py", "--dataset", "folder", "--data-root", easy, "--gpu", "-1", "--out", tmp_path / "o", *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_resume_of_another_scripts_checkpoint(tmp_path):
    _rotation_style_checkpoint(tmp_path / "rot.pt")
    r = run_script("ldam_drw.py", "--resume", tmp_path / "rot.pt", "--gpu", "-1")
    assert r.returncode == 2 and "written by rotation_ssp.py" in r.stderr


def test_existing_run_is_not_overwritten(easy, run1):
    before = (run1 / "last.pt").read_bytes()
    r = run_script("ldam_drw.py", "--dataset", "folder", "--data-root", easy, "--gpu", "-1", "--out", run1)
    assert r.returncode == 2 and "--resume" in r.stderr and (run1 / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_imagenet_lt_file_lists(tmp_path):
    """As released: cosine stepped before each epoch (Kang et al.), model selection on the official val list;
    then cRT on it with the released defaults (train-mode BN, augmentation, the same lr sequence)."""
    lst = write_file_list(tmp_path, num_classes=3, per_class=4)
    final = _run(tmp_path / "run", tmp_path, "--dataset", "imagenet_lt", "--train-list", lst, "--test-list", lst,
                 "--val-list", lst, "--arch", "resnet10", "--epochs", 2, "--batch-size", 6, "--workers", 0, "--loss", "ce")
    assert final["class_counts"] == [4, 4, 4] and 0 <= final["last"]["top1"] <= 100
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi / 2)), 0.0], abs=1e-12)      # epochs 1, 2 of 2
    assert final["best_on_val"]["val_top1"] == final["best_on_val"]["test"]["top1"]        # val list = test list here
    r = run_script("crt.py", "--ckpt", tmp_path / "run" / "last.pt", "--gpu", "-1", "--out", tmp_path / "crt",
                   "--data-root", tmp_path, "--epochs", 2, "--batch-size", 6, "--workers", 0, "--val-list", lst)
    assert r.returncode == 0, r.stderr
    crt = json.loads((tmp_path / "crt" / "final.json").read_text())
    assert crt["bn"] == "train" and crt["augment"] is True and not crt["cached_features"]
    assert [json.loads(l)["lr"] for l in (tmp_path / "crt" / "metrics.jsonl").read_text().splitlines()] == \
        pytest.approx([0.1, 0.0], abs=1e-12)
    assert crt["best_on_val"] is not None
    r = run_script("crt.py", "--ckpt", tmp_path / "run" / "last.pt", "--gpu", "-1", "--out", tmp_path / "bad",
                   "--val-list", lst, "--val-frac", 0.25)
    assert r.returncode == 2 and "--val-list" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_inaturalist_defaults_as_released():
    a = L.parse_args(["--dataset", "inat"])
    assert (a.epochs, a.lr, a.wd, a.arch, a.lr_sequence) == (90, 0.2, 1e-4, "resnet50", "kang")
    assert a.batch_size == 100 and L.parse_args(["--dataset", "imagenet_lt"]).batch_size == 128   # feat_unifrom.yaml
    assert L.parse_args([]).batch_size == 128 and L.parse_args(["--dataset", "inat", "--batch-size", "64"]).batch_size == 64
    names = [type(t).__name__ for t in D.imagenet_transform(True, dataset="inat").transforms]
    assert "ColorJitter" not in names and "ColorJitter" in [type(t).__name__ for t in D.imagenet_transform(True).transforms]
    norm = D.imagenet_transform(False, dataset="inat").transforms[-1]
    assert tuple(norm.mean) == (0.466, 0.471, 0.380) and tuple(norm.std) == (0.195, 0.194, 0.192)


@pytest.mark.slow
def test_resnet18_fine_tunes_a_cifar_resnet18_backbone(tmp_path, easy):
    torch.manual_seed(5)
    src = L.ResNet18(10)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    sd["projector.0.weight"] = torch.zeros(2048, 512)                  # an SSL head: reported as unexpected
    torch.save({"script": "simsiam_rwsam.py", "arch": "resnet18", "model": sd}, tmp_path / "ssl.pt")
    model = L.build_model("resnet18", 5, cosine=True)
    run_lt.load_backbone(model, "resnet18", tmp_path / "ssl.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items() if not k.startswith("projector"))
    final = _run(tmp_path / "run", easy, "--rho", "0.5", "--epochs", 1, "--batch-size", 16, "--arch", "resnet18",
                 "--pretrained", tmp_path / "ssl.pt")
    assert final["class_counts"] == D.lt_counts(16, 5, 0.5)


@pytest.mark.slow
def test_compiled_run_saves_the_modules_own_keys_and_makes_two_graphs(tmp_path, easy, monkeypatch):
    """--compile (CUDA only) trains through torch.compile's wrapper; the checkpoint must still hold the
    module's keys (no '_orig_mod.' prefix) so that --resume and the other scripts' --pretrained load it.
    Over 3 epochs with a short last batch (57 images, batch 16) dynamo makes exactly 2 static graphs (one CUDA graph
    each under reduce-overhead), none recompiled per epoch. On the CPU the wrapper is compiled with a backend that
    counts its graphs, and kept on past setup_device."""
    real_compile, real_setup, calls, graphs = torch.compile, run_lt.setup_device, [], []

    def counting_compile(model, mode=None, dynamic=None):
        calls.append((mode, dynamic))
        batch = lambda inputs: [len(i) for i in inputs if i.shape[1:] == (3, 32, 32)]   # the images, not the weights
        backend = lambda gm, inputs: graphs.extend(batch(inputs)) or gm.forward
        return real_compile(model, backend=backend, dynamic=dynamic)

    def keep_compile(args, *world):
        device = real_setup(args, *world)
        args.compile = True
        return device

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(run_lt, "setup_device", keep_compile)
    final = _run(tmp_path / "run", easy, "--rho", "0.5", "--epochs", 3, "--batch-size", 16, "--compile")
    assert calls == [("reduce-overhead", False)] and sum(final["class_counts"]) == 57
    assert sorted(graphs) == [9, 16]
    sd = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert list(sd) == list(L.build_model("resnet32", 5, cosine=True).state_dict())
    L.main(["--resume", str(tmp_path / "run" / "last.pt"), "--gpu", "-1"])
    torch._dynamo.reset()


def test_gpu_index_beyond_the_machine_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as e:
        run_lt.setup_device(L.parse_args(["--gpu", "3"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--gpu 3: this machine has 1 GPU(s)" in err and len(err.strip().splitlines()) == 1


# ----- paper 2: supervised pre-training (--recipe he), balanced control, size sweep ------------------

def test_paper2_recipe_defaults_schedule_and_epoch_scaling():
    a = L.parse_args(["--recipe", "he"])
    assert (a.arch, a.loss, a.rule, a.lr, a.momentum, a.wd, a.batch_size, a.warmup, a.epochs, a.schedule) == \
        ("resnet18", "ce", "none", 0.1, 0.9, 5e-4, 128, 0, 200, "he")
    assert [L.he_lr_at(e, a) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    assert a.out.replace("\\", "/") == "runs/ldam_drw-cifar10-0.01-0-he"
    b = L.parse_args(["--recipe", "he", "--subsample", "0.125", "--balanced"])
    assert (b.epochs, b.epochs_full) == (1600, 200) and b.out.endswith("-he-balanced-sub0.125")
    assert L.parse_args(["--subsample", "0.75", "--epochs", "10"]).epochs == 13                  # round(10 / 0.75)
    assert L.parse_args(["--subsample", "0.25", "--same-epochs"]).epochs == 200
    assert L.parse_args(["--recipe", "he", "--loss", "ldam"]).loss == "ldam"                     # flags still win


def test_paper2_imagenet_supervised_baseline_is_one_flag_and_ignored_flags_are_refused(capsys):
    """Paper 2 App. A: ImageNet-LT supervised pre-training is CE, ResNet-50, 90 epochs, step decay (He et al.:
    ÷10 every 30 epochs), lr 0.2 / batch 128 / wd 5e-4 of the released feat_uniform.yaml."""
    a = L.parse_args(["--recipe", "he", "--dataset", "imagenet_lt"])
    assert (a.arch, a.loss, a.rule, a.lr, a.batch_size, a.wd, a.warmup, a.epochs, a.schedule) == \
        ("resnet50", "ce", "none", 0.2, 128, 5e-4, 0, 90, "he")
    assert [L.he_lr_at(e, a) for e in (0, 29, 30, 59, 60, 89)] == pytest.approx([0.2, 0.2, 0.02, 0.02, 2e-3, 2e-3])
    c = L.parse_args(["--dataset", "imagenet_lt"])                     # paper 1's recipe is unchanged
    assert (c.arch, c.loss, c.rule, c.schedule, c.lr_sequence) == ("resnet10", "ldam", "drw", "cosine", "kang")
    for argv, msg in ((["--dataset", "inat"], "no iNaturalist"), (["--warmup", "5"], "drop --warmup"),
                      (["--dataset", "imagenet_lt", "--lr-sequence", "kang"], "drop --lr-sequence")):
        with pytest.raises(SystemExit) as stop:
            L.parse_args(["--recipe", "he", *argv])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and msg in err


def test_balanced_subsampled_run_trains_on_the_shared_subset(tmp_path, easy):
    final = _run(tmp_path, easy, "--recipe", "he", "--rho", "0.2", "--subsample", 0.5, "--balanced", "--epochs", 1,
                 "--batch-size", 16, "--same-epochs")
    train_y = D.load_split("folder", easy, True)[1]
    lt = D.make_long_tailed(train_y, 0.2, "exp", 0)
    n = len(D.downsample(lt, train_y, 0.5, 0))                     # [16, 10, 7, 4, 3] halved: [8, 5, 3, 2, 1] = 19
    saved = json.loads((tmp_path / "train_indices.json").read_text())
    assert saved["train"] == D.balanced_subset(train_y, n, 0).tolist() and saved["val"] == []
    assert final["class_counts"] == [4, 4, 4, 4, 3] and final["n_train"] == 19 and final["arch"] == "resnet18"
    assert (final["balanced"], final["subsample"], final["recipe"], final["epochs"]) == (True, 0.5, "he", 1)


@pytest.mark.parametrize("args,msg", [(["--subsample", "0.3"], "argument --subsample: invalid choice: 0.3"),
                                      (["--recipe", "kang"], "argument --recipe: invalid choice")])
def test_paper2_flags_checked(tmp_path, easy, args, msg):
    r = run_script("ldam_drw.py", "--dataset", "folder", "--data-root", easy, "--gpu", "-1", "--out", tmp_path / "o", *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
