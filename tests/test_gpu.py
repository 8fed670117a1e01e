"""The CUDA paths, on a machine with CUDA (skipped without it): a CUDA run with its GPU switches, the GPU
augmentation and the KDE equal to the CPU's, fused SGD equal to foreach SGD, TF32 recorded, a CUDA resume equal to
an uninterrupted run."""
import json

import pytest
import torch

import datasets_lt as D
import ldam_drw as L
import simsiam_rwsam as S
from conftest import write_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    write_folder(root, classes=tuple("abcd"), per_class=(24, 16, 12, 8), per_class_test=4, easy=True)
    return root


def ldam(data, out, *extra):
    L.main(["--dataset", "folder", "--data-root", str(data), "--rho", "1", "--gpu", "0", "--batch-size", "16",
            "--out", str(out), *map(str, extra)])
    return json.loads((out / "final.json").read_text())


@pytest.mark.parametrize("extra", [[], ["--amp"], ["--compile"], ["--strict-fp32"]])
def test_ldam_drw_on_cuda_with_each_switch_keeps_the_checkpoint_contract(data, tmp_path, extra):
    final = ldam(data, tmp_path / "run", "--epochs", 2, *extra)
    assert all(isinstance(v, float) for v in final["last"]["per_class"])
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["tf32"] is ("--strict-fp32" not in extra) and args["device"] != "cpu"
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_resume_on_cuda_equals_the_uninterrupted_run(data, tmp_path):
    """A 2-epoch run told it has 3 (CE, no deferred rule: epochs 1-2 are the same either way), resumed on CUDA."""
    flags = ["--loss", "ce", "--rule", "none", "--strict-fp32"]
    ldam(data, tmp_path / "whole", "--epochs", 3, *flags)
    ldam(data, tmp_path / "cut", "--epochs", 2, *flags)
    ckpt = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    ckpt["args"]["epochs"] = 3
    torch.save(ckpt, tmp_path / "cut" / "last.pt")
    (tmp_path / "cut" / "final.json").unlink()
    L.main(["--resume", str(tmp_path / "cut" / "last.pt"), "--gpu", "0"])
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert b["epoch"] == 3 and all(torch.allclose(a[k].float(), b["model"][k].float(), atol=1e-5) for k in a)


def test_gpu_augmentation_equals_the_cpu_for_the_same_draws():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    assert torch.equal(D.crop_flip(x, top, left, flip).cpu(), D.crop_flip(x.cuda(), top.cuda(), left.cuda(),
                                                                         flip.cuda()).cpu())
    t, l, h, w = D.sample_resized_crop(64, 32, 32, g, torch.device("cpu"), (0.2, 1.0))
    cpu = D.resized_crop(x, t, l, h, w, 32, flip)
    gpu = D.resized_crop(x.cuda(), t.cuda(), l.cuda(), h.cuda(), w.cuda(), 32, flip.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-5)


def test_kde_weights_in_float64_equal_the_cpus():
    feats = torch.nn.functional.normalize(torch.randn(500, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    w_cpu, d_cpu, h_cpu = S.kde_weights(feats, 1.2)
    w_gpu, d_gpu, h_gpu = S.kde_weights(feats.cuda(), 1.2)
    assert h_cpu == pytest.approx(h_gpu, rel=1e-12)
    assert torch.allclose(d_cpu, d_gpu.cpu(), rtol=1e-10) and torch.allclose(w_cpu, w_gpu.cpu(), rtol=1e-6)


def test_fused_sgd_equals_foreach_sgd():
    torch.manual_seed(0)
    params = [torch.randn(256, 128, device="cuda") for _ in range(3)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]
    out = []
    for fused in (True, False):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True, fused=fused,
                              foreach=None if fused else True)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        out.append(ps)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*out))
