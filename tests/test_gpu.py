"""The CUDA paths, on a machine with CUDA (skipped without it): every script's CUDA run with each of its GPU
switches, --compile's graphs, the GPU augmentation and the KDE equal to the CPU's, fused SGD equal to foreach SGD,
TF32 recorded, a CUDA resume equal to an uninterrupted run, and on >= 2 GPUs SyncBatchNorm over NCCL equal to one
process's BatchNorm over the global batch."""
import json
import subprocess

import pytest
import torch

import datasets_lt as D
import ldam_drw as L
import simsiam_rwsam as S
from conftest import ROOT, drive, torchrun, write_folder

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


@pytest.mark.parametrize("extra", [[], ["--amp"], ["--strict-fp32"]])     # --compile: its own test below
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


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_on_cuda_restores_the_weights_exactly(adaptive):
    """rwSAM's two passes at lr 0 (fused SGD, as the script): the weights come back to w bit for bit and the BN
    buffers are the first pass's (a model that made only that pass), the second pass's discarded."""
    import copy
    torch.manual_seed(0)
    model = S.SimSiam().cuda().train()
    first_pass = copy.deepcopy(model)
    x1, x2 = torch.randn(2, 16, 3, 32, 32, device="cuda")
    S.forward_loss(first_pass, x1, x2, False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4, fused=True)
    S.train_step(model, optimizer, x1, x2, "rwsam", rho=5.0, adaptive=adaptive,
                 weights=torch.rand(16, device="cuda") + 0.5)
    want = first_pass.state_dict()
    for k, v in model.state_dict().items():
        assert (torch.equal(v, want[k]) if "running" not in k else torch.allclose(v, want[k], atol=1e-6)), k
    assert any(optimizer.state[p]["momentum_buffer"].abs().sum() > 0 for p in model.parameters())   # a real step


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


# ----- every script, each GPU switch it offers ------------------------------------------------------

SWITCHES = {"ldam_drw.py": ["--amp"], "rotation_ssp.py": ["--amp", "--compile"]}   # ldam_drw's --compile: below
SWITCHES.update({s: ["--amp"] for s in ("moco_ssp.py", "simsiam_rwsam.py", "self_training.py", "crt.py",
                                        "eval_linear.py", "eval_ood.py")})
CASES = [f"{s} {w}".strip() for s in SWITCHES for w in ["", *SWITCHES[s]]]


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory):
    """Each case of CASES: its script for 1 epoch on cuda:0 on fake folder data (the kill sweep's commands), the
    checkpoint-taking ones from a CUDA LDAM-DRW run; processes forked from one import, several at a time."""
    from test_faults import KILLED
    root = tmp_path_factory.mktemp("cuda-runs")
    write_folder(root / "data", per_class=(6, 6, 6), per_class_test=2)
    paths = {"data": str(root / "data"), "ckpt": str(root / "ckpt" / "last.pt")}
    argv = lambda s, out: [a.format(**paths) for a in KILLED[s]] + ["--gpu", "0", "--epochs", "1", "--batch-size",
                                                                     "8", "--out", str(out)]
    first = drive({"ckpt": ["ldam_drw.py", argv("ldam_drw.py", root / "ckpt"), 0]})["ckpt"]
    assert first[0] == 0, first[1]
    runs = drive({c: [c.split()[0], argv(c.split()[0], root / c.replace(" ", "_")) + c.split()[1:], 0] for c in CASES})
    return root, runs


@pytest.mark.parametrize("case", CASES)
def test_every_script_runs_on_cuda_with_each_switch_and_keeps_the_checkpoint_contract(cuda_runs, case):
    root, runs = cuda_runs
    code, err = runs[case]
    assert code == 0, err[-3000:]
    out = root / case.replace(" ", "_")
    final, args = (json.loads((out / f).read_text()) for f in ("final.json", "args.json"))
    assert args["device"] != "cpu" and args["tf32"] is True and "warning: CUDA" not in err
    for ckpt in out.rglob("last.pt"):
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert sd["epoch"] >= 1                         # simsiam_rwsam's default: SimSiam 1 epoch, then rwSAM 1
        assert all(torch.isfinite(v).all() for v in sd["model"].values() if v.is_floating_point()), ckpt
    assert final


def test_compile_makes_one_graph_per_batch_size_and_skips_no_cuda_graph(data, tmp_path):
    """3 epochs with a short last batch: 2 graphs compiled once (no recompile per epoch), each a CUDA graph; the
    checkpoint holds the module's own keys, finite."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    final = ldam(data, tmp_path / "run", "--epochs", 3, "--compile", "--batch-size", 12)
    assert sum(final["class_counts"]) % 12 and counters["stats"]["unique_graphs"] == 2
    assert counters["inductor"]["cudagraph_skips"] == 0
    sd = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert list(sd) == list(L.build_model("resnet32", 4, cosine=True).state_dict())
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    torch._dynamo.reset()


# ----- >= 2 GPUs: SyncBatchNorm over NCCL -----------------------------------------------------------

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_syncbn_run_equals_one_process_batchnorm_over_the_global_batch(tmp_path):
    """torchrun, 2 processes on 2 GPUs (NCCL, SyncBatchNorm), 1 epoch of 3 steps, the last one's second share empty:
    the weights equal one process on the CPU updating on each global batch (both shares' views, in rank order)
    with BatchNorm's statistics over that whole batch."""
    import numpy as np
    import test_ddp_lists as T
    lst = T.write_list(tmp_path, T.TRAIN_LABELS)
    cmd = [str(a) for a in T.ldam_args(tmp_path, lst, tmp_path / "run", 1)]
    cmd[cmd.index("--gpu") + 1] = "0"
    r = subprocess.run(torchrun(*cmd, "--strict-fp32"), cwd=ROOT, env=T.ONE_THREAD, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "SyncBatchNorm" in r.stdout, r.stderr[-3000:]
    args = L.parse_args(cmd[1:])
    ds = D.FileListDataset(str(tmp_path), str(lst), transform=D.imagenet_transform(True, dataset="inat"))
    labels, counts = torch.as_tensor(ds.labels), np.bincount(ds.labels).tolist()
    torch.manual_seed(args.seed)
    model = L.build_model("resnet10", 3, cosine=True).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    cb, margins = L.class_balanced_weights(counts, args.beta), L.ldam_margins(counts, args.max_m)
    for group in optimizer.param_groups:
        group["lr"] = L.lr_at(0, args)
    steps = [D.shard_batches(T.N, T.BATCH, args.seed, 0, None, r, 2) for r in range(2)]
    views = []
    for rank in range(2):
        torch.manual_seed(D.stream_seed(args.seed, 0, rank))
        views.append([[ds[int(i)][0] for i in share] for _, share in steps[rank]])
    for step, (batch, _) in enumerate(steps[0]):
        optimizer.zero_grad()
        x = torch.stack(views[0][step] + views[1][step])
        reweight = L.deferred_rule(args.rule, 0, args.epochs, True)[0] is not None
        L.shard_loss(model(x), labels[batch], labels[batch], cb if reweight else None, margins, args).backward()
        optimizer.step()
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.allclose(saved[k].float(), v.float(), atol=1e-4), k
