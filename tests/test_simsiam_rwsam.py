"""simsiam_rwsam.py: the SAM / rwSAM step against its definition, BatchNorm statistics, KDE weights,
the kNN monitor, data subsets, runs (one process and torchrun with gloo), resume and bad input.

Runs use 8×8 fake images (a CIFAR ResNet-18 handles them: layer4 sees 1×1) so that a SAM step of
ResNet-18 takes a fraction of a second on a busy 2-core machine, and one thread per process: with two
OpenMP threads on a machine shared with other work, ResNet-18 on the CPU ran about 10× slower.
"""
import copy
import gc
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import datasets_lt as D
import run_lt as R
import simsiam_rwsam as S
from conftest import ROOT, run_script, torchrun, write_file_list, write_folder

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"                          # subprocesses and spawned workers
    yield
    torch.set_num_threads(threads)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


class Tiny(nn.Module):
    """A SimSiam-shaped model small enough to differentiate by hand: forward(x1, x2) → z1, z2, p1, p2."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
        self.projector = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        self.predictor = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 8))

    def forward(self, x1, x2):
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        return z1, z2, self.predictor(z1), self.predictor(z2)


def _tiny_batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 2, generator=g), torch.randn(n, 3, 2, 2, generator=g)


def _sgd(model, lr=0.5, wd=5e-4):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)


def _expected_sam_params(model, x1, x2, rho, lr, wd, weights=None):
    """Paper 2 Algorithm 1 lines 12–13 written out with autograd: ε = ρ·∇L_w/‖∇L_w‖₂ over all parameters,
    then the first SGD step (zero momentum buffer) at w with ∇L(w + ε) of the unweighted mean loss."""
    m = copy.deepcopy(model)
    params = list(m.parameters())
    per_example = S.simsiam_loss(*m(x1, x2))
    lw = (per_example * (1.0 if weights is None else weights)).mean()
    g = torch.autograd.grad(lw, params)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p += rho * gi / norm
    g2 = torch.autograd.grad(S.simsiam_loss(*m(x1, x2)).mean(), params)
    return [p0.detach() - lr * (gi + wd * p0.detach()) for p0, gi in zip(model.parameters(), g2)]


# ----- loss, SAM, rwSAM ----------------------------------------------------------------------------

def test_simsiam_loss_by_hand_and_stop_gradient():
    g = torch.Generator().manual_seed(0)
    z1, z2, p1, p2 = (torch.randn(5, 7, generator=g, requires_grad=True) for _ in range(4))
    loss = S.simsiam_loss(z1, z2, p1, p2)
    cos = lambda a, b: (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert torch.allclose(loss, -0.5 * cos(p1, z2) - 0.5 * cos(p2, z1), atol=1e-6)
    loss.mean().backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None


def test_model_layout_is_the_project_backbone():
    m = S.SimSiam()
    own = m.state_dict()
    backbone = [k for k in S.ResNet18().state_dict() if not k.startswith("fc.")]
    heads = [k for k in own if k not in backbone]
    assert all(k in own for k in backbone) and all(k.startswith(("projector.", "predictor.")) for k in heads)
    assert [tuple(l.weight.shape) for l in m.projector if isinstance(l, nn.Linear)] == [(2048, 512), (2048, 2048)]
    assert [tuple(l.weight.shape) for l in m.predictor if isinstance(l, nn.Linear)] == [(512, 2048), (2048, 512)]
    assert not m.projector[-1].affine and isinstance(m.predictor[-1], nn.Linear)
    z1, z2, p1, p2 = m(torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8))
    assert z1.shape == p2.shape == (3, 2048)


def test_sam_with_rho_zero_is_the_sgd_step():
    torch.manual_seed(0)
    a = Tiny()
    b = copy.deepcopy(a)
    x1, x2 = _tiny_batch()
    opt_a, opt_b = _sgd(a), _sgd(b)
    S.train_step(a, opt_a, x1, x2, "sam", rho=0.0)
    S.train_step(b, opt_b, x1, x2, "sgd")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), Tiny().parameters()))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])


@pytest.mark.parametrize("adaptive", [False, True])
def test_rwsam_with_equal_weights_is_sam(adaptive):
    torch.manual_seed(1)
    a = Tiny()
    b = copy.deepcopy(a)
    x1, x2 = _tiny_batch(1)
    S.train_step(a, _sgd(a), x1, x2, "rwsam", rho=0.7, adaptive=adaptive, weights=torch.full((6,), 2.5))
    S.train_step(b, _sgd(b), x1, x2, "sam", rho=0.7, adaptive=adaptive)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_sam_and_rwsam_steps_match_algorithm_1_and_weights_change_the_step():
    torch.manual_seed(2)
    base = Tiny()
    x1, x2 = _tiny_batch(2)
    w = torch.tensor([6.0, 0.1, 0.1, 0.1, 0.1, 6.0])
    results = {}
    for name, weights in (("sam", None), ("rwsam", w)):
        m = copy.deepcopy(base)
        S.train_step(m, _sgd(m), x1, x2, name, rho=0.7, weights=weights)
        expected = _expected_sam_params(base, x1, x2, 0.7, 0.5, 5e-4, weights)
        assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(m.parameters(), expected))
        results[name] = [p.detach() for p in m.parameters()]
    gap = max((p - q).abs().max().item() for p, q in zip(results["sam"], results["rwsam"]))
    step = max((p - q.detach()).abs().max().item() for p, q in zip(results["sam"], base.parameters()))
    assert gap > 0.01 * step                                     # the weights moved the perturbation point


def test_perturbation_by_hand():
    params = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[-4.0]])]
    e = S.sam_perturbation(params, grads, 2.0, adaptive=False)          # ‖g‖ = 5
    assert torch.allclose(e[0], torch.tensor([1.2, 0.0])) and torch.allclose(e[1], torch.tensor([[-1.6]]))
    e = S.sam_perturbation(params, grads, 2.0, adaptive=True)           # |w|·g = (3, 0, -12), norm √153
    n = math.sqrt(153)
    assert torch.allclose(e[0], torch.tensor([2.0 * 1 * 3 / n, 0.0]))
    assert torch.allclose(e[1], torch.tensor([[2.0 * 9 * -4 / n]]))


@pytest.mark.parametrize("flags", [[], ["--no-adaptive"]])
def test_default_perturbation_is_asam_by_hand(flags):
    """Default (the authors' ASAM): the point of the second pass is w + ε with ε_i = ρ·T_i²·g_i/‖T·g‖₂,
    T = |w| element-wise, over all parameters; --no-adaptive: ε = ρ·g/‖g‖₂."""
    args = S.parse_args(["--opt", "sam", *flags])
    assert args.adaptive == (flags == []) and args.sam_rho == 5.0
    torch.manual_seed(4)
    m = Tiny()
    x1, x2 = _tiny_batch(4)
    w = [p.detach().clone() for p in m.parameters()]
    c = copy.deepcopy(m)
    g = torch.autograd.grad(S.simsiam_loss(*c(x1, x2)).mean(), list(c.parameters()))
    t = [wi.abs() if args.adaptive else torch.ones_like(wi) for wi in w]
    norm = math.sqrt(sum(((ti * gi) ** 2).sum().item() for ti, gi in zip(t, g)))
    expected = [args.sam_rho * ti ** 2 * gi / norm for ti, gi in zip(t, g)]
    seen = []
    m.register_forward_pre_hook(lambda mod, inp: seen.append([p.detach().clone() for p in mod.parameters()]))
    S.train_step(m, _sgd(m), x1, x2, "sam", rho=args.sam_rho, adaptive=args.adaptive)
    eps = [p2 - p1 for p1, p2 in zip(seen[0], seen[1])]
    assert all(torch.equal(a, b) for a, b in zip(seen[0], w))
    assert all(torch.allclose(e, x, rtol=1e-4, atol=1e-6) for e, x in zip(eps, expected))
    scaled = [torch.where(ti > 0, e / ti, torch.zeros_like(e)) for e, ti in zip(eps, t)]   # ‖ε/T‖₂ = ρ
    assert math.isclose(math.sqrt(sum(x.pow(2).sum().item() for x in scaled)), 5.0, rel_tol=1e-4)


def test_batchnorm_statistics_change_in_the_first_pass_only():
    torch.manual_seed(3)
    m = S.SimSiam()
    one_pass = copy.deepcopy(m)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    before = [b.clone() for b in S.bn_buffers(m)]
    S.train_step(m, _sgd(m, lr=0.05), x1, x2, "sam", rho=5.0)
    with torch.no_grad():
        one_pass(x1, x2)
    after, expected = S.bn_buffers(m), S.bn_buffers(one_pass)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(torch.equal(a, e) for a, e in zip(after, expected))
    assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), one_pass.parameters()))


# ----- KDE weights ---------------------------------------------------------------------------------

def test_kde_by_hand_in_chunks():
    f = torch.randn(23, 3, generator=torch.Generator().manual_seed(4))
    w, density, h = S.kde_weights(f, alpha=1.2, bandwidth=0.8, chunk=7)
    x = f.double().numpy()
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    ref = np.exp(-d2 / (2 * 0.8 ** 2)).mean(1)
    assert h == 0.8 and np.allclose(density.numpy(), ref, rtol=1e-10)
    ref_w = ref ** -1.2
    assert np.allclose(w.numpy(), ref_w / ref_w.mean(), rtol=1e-5) and w.mean().item() == pytest.approx(1, rel=1e-6)
    whole = S.kde_weights(f, alpha=1.2, bandwidth=0.8)                   # default: one 1 GiB block holds all 23
    assert torch.allclose(whole[1], density, rtol=1e-12) and torch.allclose(whole[0], w, rtol=1e-6)


def test_kde_gives_isolated_points_larger_weights():
    g = torch.Generator().manual_seed(5)
    cluster = 0.1 * torch.randn(40, 2, generator=g)
    far = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    sparse = torch.tensor([[1.0, 0.0], [1.05, 0.0]])                # two points away from the cluster
    w, _, _ = S.kde_weights(torch.cat([cluster, sparse, far]), alpha=1.2)
    assert w[-3:].min() > w[40:42].max() > w[:40].max()


def test_median_bandwidth():
    assert S.kde_weights(torch.eye(6, dtype=torch.float64), 1.0)[2] == pytest.approx(math.sqrt(2))
    assert S.kde_weights(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), 1.0)[2] == pytest.approx(5.0)
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(6))
    assert S.kde_weights(f, 1.0, seed=1)[2] == S.kde_weights(f, 1.0, seed=1)[2]


def test_kde_weights_read_features_not_labels():
    torch.manual_seed(7)
    model = S.SimSiam()
    images = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8)
    labels = np.repeat(np.arange(3), 10)
    scrambled = np.random.default_rng(0).permutation(labels)
    a = S.weights_from_training_set(model, D.GPULoader(images, labels, 7, MEAN, STD, "cpu"), 1.2, None, 0)
    b = S.weights_from_training_set(model, D.GPULoader(images, scrambled, 7, MEAN, STD, "cpu"), 1.2, None, 0)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    assert a[0].std() > 0


# ----- monitors and data ---------------------------------------------------------------------------

def test_knn_weighted_vote_by_hand():
    unit = lambda a: torch.tensor([[math.cos(a), math.sin(a)]])
    mem = torch.cat([unit(0.1), unit(0.2), unit(-0.2)])
    mem_y = torch.tensor([0, 1, 1])
    q, q_y = unit(0.0), torch.tensor([1])
    # k = 3, t = 0.1: class 1 gets 2·e^{cos 0.2 / 0.1} = e^{10.49} > class 0's e^{cos 0.1 / 0.1} = e^{9.95}
    assert S.knn_top1(mem, mem_y, q, q_y, 2, k=3, t=0.1) == 100.0
    assert S.knn_top1(mem, mem_y, q, q_y, 2, k=1, t=0.1) == 0.0          # 1-NN: class 0
    assert S.knn_top1(mem, mem_y, q, q_y, 2, k=3, t=0.01) == 0.0         # sharp votes: class 0 wins


def test_generalization_gap_groups():
    gap = S.generalization_gap([0.1, 0.2, 0.3, 0.4], [0.15, 0.25, 0.5, float("nan")], [0, 1], [2, 3])
    assert gap["frequent"]["gap"] == pytest.approx(0.05) and gap["rare"]["gap"] == pytest.approx(0.5 - 0.35)


def test_gap_is_averaged_over_view_draws_with_its_standard_error():
    """--gap-views V: the gap is the mean over V seeded draws of view pairs (draw v = epoch v of the seeded
    loaders, so draws are nested across V), reported with std(ddof=1)/√V, which shrinks as V grows."""
    g = torch.Generator().manual_seed(0)
    imgs = lambda n: torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    tr_y, ho_y = np.arange(20) % 5, np.arange(15) % 5
    tr = D.GPULoader(imgs(20), tr_y, 8, MEAN, STD, "cpu", augment="ssl", shuffle=False, seed=1)
    ho = D.GPULoader(imgs(15), ho_y, 8, MEAN, STD, "cpu", augment="ssl", shuffle=False, seed=1)
    torch.manual_seed(0)
    model = S.SimSiam()
    few = S.gap_over_views(model, tr, ho, 5, [0, 1], [2, 3, 4], 3)
    many = S.gap_over_views(model, tr, ho, 5, [0, 1], [2, 3, 4], 8)
    one = S.generalization_gap(S.class_mean_loss(model, tr, 5, draw=2), S.class_mean_loss(model, ho, 5, draw=2),
                               [0, 1], [2, 3, 4])
    for name in ("frequent", "rare"):
        v = np.array(many[name]["per_view"])
        assert many[name]["gap"] == pytest.approx(v.mean()) and many[name]["views"] == 8
        assert many[name]["se"] == pytest.approx(v.std(ddof=1) / math.sqrt(8))
        assert few[name]["per_view"] == pytest.approx(list(v[:3])) and v[2] == pytest.approx(one[name]["gap"])
        assert len(set(v.round(8))) == 8                         # every draw is a new pair of views
        assert 0 < many[name]["se"] < few[name]["se"]
    assert S.gap_over_views(model, tr, ho, 5, [0, 1], [2, 3, 4], 1)["rare"]["se"] is None


def test_paper_2_subsets():
    labels = np.repeat(np.arange(10), 5000)
    sizes = {}
    for flags in ([], ["--balanced"], ["--imb-type", "step"], ["--subsample", "0.125"],
                  ["--subsample", "0.125", "--balanced"]):
        idx, val = D.training_subset(labels, S.parse_args(["--rho", "0.01", *flags]))
        counts = np.bincount(labels[idx], minlength=10)
        sizes[" ".join(flags)] = (len(idx), counts.min(), counts.max())
        assert len(val) == 0 and len(np.unique(idx)) == len(idx)
    assert sizes[""] == (12406, 50, 5000) and sizes["--balanced"] == (12406, 1240, 1241)
    assert sizes["--imb-type step"] == (25250, 50, 5000)
    small = sum(int(c * 0.125) for c in D.lt_counts(5000, 10, 0.01))
    assert sizes["--subsample 0.125"] == (small, 6, 625)
    assert sizes["--subsample 0.125 --balanced"][0] == small


def test_ssl_batches_are_gpuloader_batches_and_shard_across_ranks():
    images = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8)
    ref = list(D.GPULoader(images, np.zeros(37), 8, MEAN, STD, "cpu", augment="ssl", drop_last=True,
                           seed=3).epoch(5))
    mine = list(S.ssl_batches(images, 8, MEAN, STD, 5, 3))
    assert len(mine) == len(ref) == 4
    for (views, idx), (ref_views, _, ref_idx) in zip(mine, ref):
        assert torch.equal(idx, ref_idx) and all(torch.equal(a, b) for a, b in zip(views, ref_views))
    ranks = [list(S.ssl_batches(images, 8, MEAN, STD, 5, 3, rank=r, world=2)) for r in (0, 1)]
    for b, (_, ref_idx) in enumerate(mine):
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), ref_idx)
    assert not torch.equal(ranks[0][0][0][0], ranks[1][0][0][0])


# ----- DDP: first pass per rank, second pass all-reduced ------------------------------------------

def _ddp_worker(rank, port):
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    torch.manual_seed(0)
    base = Tiny()
    model = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    x1, x2 = _tiny_batch(10 + rank)
    seen = []
    perturb = S.sam_perturbation

    def record(params, grads, rho, adaptive):
        e = perturb(params, grads, rho, adaptive)
        seen.append(torch.cat([t.flatten() for t in e]))
        return e

    S.sam_perturbation = record
    S.train_step(model, _sgd(model.module, wd=0.0), x1, x2, "sam", rho=0.7)
    # ε from this rank's own gradient (no all-reduce in the first pass)
    m = copy.deepcopy(base)
    g = torch.autograd.grad(S.simsiam_loss(*m(x1, x2)).mean(), list(m.parameters()))
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    assert torch.allclose(seen[0], torch.cat([0.7 * gi.flatten() / norm for gi in g]), atol=1e-6)
    # the update averages the ranks' gradients at their own w + ε
    with torch.no_grad():
        for p, gi in zip(m.parameters(), g):
            p += 0.7 * gi / norm
    g2 = torch.cat([t.flatten() for t in torch.autograd.grad(S.simsiam_loss(*m(x1, x2)).mean(),
                                                               list(m.parameters()))])
    dist.all_reduce(g2)
    w0 = torch.cat([p.detach().flatten() for p in base.parameters()])
    now = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    assert torch.allclose(now, w0 - 0.5 * g2 / 2, atol=1e-6)
    from_rank0 = seen[0].clone()
    dist.broadcast(from_rank0, src=0)
    if rank == 1:
        assert not torch.allclose(from_rank0, seen[0])             # the two ranks perturbed differently
    dist.barrier()
    del model                                    # as simsiam_rwsam.main: the reducer must not free the group
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sam_first_pass_is_per_rank_second_is_synced():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)   # outlives both workers
    mp.spawn(_ddp_worker, args=(store.port,), nprocs=2)


# ----- runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    write_folder(root, classes=tuple("abcde"), per_class=(8,) * 5, per_class_test=2, size=8, easy=True)
    return root


def _args(root, out, *extra):
    """A small run; 2 view draws for the generalization gap (the default, 16, is test_gap_views_default's)."""
    return ["--dataset", "folder", "--data-root", str(root), "--gpu", "-1", "--rho", "0.5", "--batch-size", "8",
            "--gap-views", "2", "--out", str(out), *map(str, extra)]


def test_gap_views_default():
    assert S.parse_args([]).gap_views == 16


@pytest.fixture(scope="module")
def rwsam_run(data, tmp_path_factory):
    """The 2-epoch CPU smoke run: 1 epoch of SimSiam (stage 1), KDE weights, 1 epoch of rwSAM."""
    out = tmp_path_factory.mktemp("run") / "rwsam"
    S.main(_args(data, out, "--stage1-epochs", 1, "--epochs", 1))
    return out


def _model(path):
    return torch.load(path, weights_only=True)["model"]


def test_smoke_run_outputs(rwsam_run):
    out = rwsam_run
    assert {"args.json", "metrics.jsonl", "last.pt", "stage1.pt", "kde_weights.pt", "final.json",
            "simsiam_rwsam.py"} <= set(os.listdir(out))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["opt"], r["stage_epoch"]) for r in rows] == [(1, "sgd", 1), (2, "rwsam", 1)]
    assert all(math.isfinite(r["loss"]) and r["z_std"] > 0 and r["knn_top1"] is not None for r in rows)
    assert rows[1]["loss_perturbed"] is not None and rows[0]["loss_perturbed"] is None
    final = json.loads((out / "final.json").read_text())
    assert final["class_counts"] == [8, 6, 5, 4, 4] and final["n_train"] == 27
    for result in (final["last"], final["stage1_result"]):
        assert set(result["gap"]) == {"frequent", "rare"} and 0 <= result["knn_top1"] <= 100
        assert result["gap"]["rare"]["views"] == 2 and result["gap"]["rare"]["se"] > 0
    assert final["best_knn_on_val"]["epoch"] == 2 and final["kde"]["alpha"] == 1.2


def test_checkpoints_follow_the_contract(rwsam_run, data, capsys):
    last = torch.load(rwsam_run / "last.pt", weights_only=True)
    stage1 = torch.load(rwsam_run / "stage1.pt", weights_only=True)
    assert (last["script"], last["arch"], last["epoch"], stage1["epoch"]) == ("simsiam_rwsam.py", "resnet18", 2, 1)
    assert {"model", "optimizer", "args", "class_counts", "rng", "kde_weights"} <= set(last)
    assert stage1["kde_weights"] is None and (stage1["args"]["opt"], stage1["args"]["epochs"]) == ("sgd", 1)
    assert last["args"]["opt"] == "rwsam"
    images = D.load_split("folder", data, True)[0]                              # the normalisation used
    assert last["mean"] == stage1["mean"] == D.mean_std("folder", images)[0] and len(last["std"]) == 3
    kde = torch.load(rwsam_run / "kde_weights.pt", weights_only=True)
    assert torch.equal(kde["weights"], last["kde_weights"]["weights"]) and len(kde["weights"]) == 27
    assert kde["weights"].mean().item() == pytest.approx(1, rel=1e-5) and kde["bandwidth"] > 0
    labels = np.asarray([c for c, n in enumerate([8] * 5) for _ in range(n)])
    assert torch.equal(kde["indices"], torch.as_tensor(D.training_subset(labels, S.parse_args(
        ["--dataset", "folder", "--rho", "0.5"]))[0]))
    backbone = S.ResNet18()
    R.load_backbone(backbone, "resnet18", rwsam_run / "last.pt")
    own = backbone.state_dict()
    assert all(torch.equal(own[k], last["model"][k]) for k in own if not k.startswith("fc."))
    heads = len([k for k in S.SimSiam().state_dict() if k.startswith(("projector.", "predictor."))])
    report = capsys.readouterr().out
    assert f"{len(own) - 2} tensors matched, 2 missing (fc.weight, fc.bias), {heads} unexpected" in report


@pytest.mark.parametrize("init", ["scratch", "stage1"])
def test_stage_2_starts_from_a_fresh_model_or_from_stage_1(data, tmp_path, monkeypatch, init):
    """Default (the authors' main_sam_weight.py): stage 2 starts from the initial weights of a fresh model
    of the same seed; --stage2-init stage1: from the stage-1 model, bit for bit."""
    start = {}
    begin = S.stage2

    def spy(args, run, *rest):
        begin(args, run, *rest)
        start.update({k: v.clone() for k, v in run.net.state_dict().items()})

    monkeypatch.setattr(S, "stage2", spy)
    extra = [] if init == "scratch" else ["--stage2-init", "stage1"]
    S.main(_args(data, tmp_path, "--stage1-epochs", 1, "--epochs", 1, "--knn-every", -1, "--seed", 3, *extra))
    fresh, stage1 = S.init_state(3), _model(tmp_path / "stage1.pt")
    same = lambda ref: all(torch.equal(start[k], ref[k]) for k in ref)
    assert set(start) == set(fresh) == set(stage1)
    assert (same(fresh), same(stage1)) == ((True, False) if init == "scratch" else (False, True))


def test_resume_at_the_stage_boundary_equals_the_whole_run(rwsam_run, tmp_path):
    """A run stopped after stage 1 resumes with the KDE and stage 2 and ends where the whole run ended."""
    state = torch.load(rwsam_run / "stage1.pt", weights_only=True)       # last.pt after epoch 1, with the
    run_args = torch.load(rwsam_run / "last.pt", weights_only=True)["args"]   # run's args, not stage 1's
    state["args"] = {**run_args, "out": str(tmp_path)}
    torch.save(state, tmp_path / "last.pt")
    first = (rwsam_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text("".join(first))                  # the second line is dropped
    (tmp_path / "stage1.pt.tmp").write_bytes(b"half a file")                 # killed while writing stage1.pt
    S.main(["--resume", str(tmp_path / "last.pt"), "--gpu", "-1"])
    a, b = _model(rwsam_run / "last.pt"), _model(tmp_path / "last.pt")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert [json.loads(l)["epoch"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    stage1 = torch.load(tmp_path / "stage1.pt", weights_only=True)           # written again from last.pt
    assert stage1["epoch"] == 1 and stage1["kde_weights"] is None
    assert all(torch.equal(stage1["model"][k], state["model"][k]) for k in state["model"])
    assert (tmp_path / "kde_weights.pt").exists() and not (tmp_path / "stage1.pt.tmp").exists()


def test_stage1_from_a_checkpoint_gives_the_same_weights(rwsam_run, data, tmp_path, capsys):
    S.main(_args(data, tmp_path, "--stage1", rwsam_run / "stage1.pt", "--epochs", 1, "--knn-every", -1))
    assert "tensors matched" in capsys.readouterr().out
    a = torch.load(rwsam_run / "kde_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "kde_weights.pt", weights_only=True)
    assert torch.equal(a["weights"], b["weights"]) and a["bandwidth"] == b["bandwidth"]
    assert b["source"] == str(rwsam_run / "stage1.pt")


def test_stage2_from_scratch_takes_only_the_backbone(data, tmp_path, capsys):
    torch.save({"script": "crt.py", "arch": "resnet18", "model": S.ResNet18().state_dict()}, tmp_path / "r18.pt")
    with pytest.raises(SystemExit) as e:
        S.main(_args(data, tmp_path / "a", "--stage1", tmp_path / "r18.pt", "--stage2-init", "stage1", "--epochs", 1))
    assert e.value.code == 2 and "--stage2-init scratch" in capsys.readouterr().err
    S.main(_args(data, tmp_path / "b", "--stage1", tmp_path / "r18.pt", "--epochs", 1, "--knn-every", -1))
    last, init = _model(tmp_path / "b" / "last.pt"), S.init_state(0)
    r18 = torch.load(tmp_path / "r18.pt", weights_only=True)["model"]
    dist_to = lambda ref: sum((last[k].float() - ref[k].float()).norm() ** 2 for k in r18 if k in last
                              and "running" not in k)
    assert dist_to(init) < dist_to(r18)


@pytest.mark.parametrize("same", [False, True])
def test_subsample_trains_more_epochs_for_the_same_steps(tmp_path, monkeypatch, same):
    """App. A.1: --subsample 0.25 trains 4× --epochs, the optimizer steps of the full variant (±1 batch);
    --same-epochs keeps --epochs (a quarter of the steps)."""
    root = tmp_path / "data"
    write_folder(root, classes=tuple("abcd"), per_class=(16,) * 4, per_class_test=1, size=8)
    steps = []
    step = S.train_step
    monkeypatch.setattr(S, "train_step", lambda *a, **k: steps.append(1) or step(*a, **k))
    runs = {}
    for name, extra in (("full", []), ("quarter", ["--subsample", 0.25] + (["--same-epochs"] if same else []))):
        steps.clear()
        S.main(_args(root, tmp_path / name, "--rho", 1, "--opt", "sgd", "--epochs", 1, "--knn-every", -1, *extra))
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = (len(rows), len(steps), json.loads((tmp_path / name / "final.json").read_text())["n_train"])
    assert runs["full"] == (1, 64 // 8, 64) and runs["quarter"][2] == 16
    if same:
        assert runs["quarter"][:2] == (1, 16 // 8)
    else:
        assert runs["quarter"][0] == 4 and abs(runs["quarter"][1] - runs["full"][1]) <= 1


def test_size_sweep_rule():
    rule = lambda *argv: S.run_epochs(S.parse_args(list(argv)), 1600)
    assert (rule(), rule("--subsample", "0.75"), rule("--subsample", "0.125")) == (1600, 2133, 12800)
    assert rule("--subsample", "0.5", "--same-epochs") == 1600


def test_val_frac_scores_knn_on_the_held_out_split_only(data, tmp_path, monkeypatch):
    """--val-frac: the kNN queries are exactly the validation images left out of pre-training (the score of
    the cross-validation group), the memory bank every other image of the training split."""
    seen = []
    knn = S.knn_top1
    monkeypatch.setattr(S, "knn_top1", lambda m, my, q, qy, *a, **k: seen.append((len(my), qy.tolist())) or
                        knn(m, my, q, qy, *a, **k))
    S.main(_args(data, tmp_path, "--opt", "sgd", "--epochs", 1, "--val-frac", 0.25, "--gap-views", 1))
    final = json.loads((tmp_path / "final.json").read_text())
    idx, val_idx = D.training_subset(np.repeat(np.arange(5), 8), S.parse_args(
        ["--dataset", "folder", "--rho", "0.5", "--val-frac", "0.25"]))
    assert final["n_train"] == len(idx) and len(val_idx) > 0 and final["knn_queries"].startswith("--val-frac")
    labels = D.load_split("folder", data, True)[1]
    assert seen == [(40 - len(val_idx), labels[np.asarray(val_idx)].tolist())]
    assert 0 <= final["last"]["knn_class_mean"] <= 100


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(data, tmp_path):
    r = subprocess.run(torchrun("simsiam_rwsam.py", *_args(data, tmp_path, "--stage1-epochs", 1, "--epochs", 1,
                                                           "--knn-every", -1)), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done:") == 1                                     # rank 0 alone reports and writes
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["opt"] for r in rows] == ["sgd", "rwsam"] and all(math.isfinite(r["loss"]) for r in rows)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["world_size"] == 2 and final["n_train"] == 27
    kde = torch.load(tmp_path / "kde_weights.pt", weights_only=True)
    assert len(kde["weights"]) == 27


# ----- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,msg", [
    (["--rho", "100"], "--rho 0.01"),
    (["--opt", "adam"], "invalid choice"),
    (["--subsample", "0.3"], "invalid choice"),
    (["--sam-rho", "-1"], "--sam-rho"),
    (["--gap-views", "0"], "--gap-views"),
    (["--opt", "sam", "--stage1", "x.pt"], "--opt rwsam"),
    (["--stage1", "missing.pt"], "does not exist"),
    (["--dataset", "imagenet_lt"], "needs --train-list"),
    (["--dataset", "inat", "--train-list", "x.txt", "--knn-every", "0"], "pass --knn-every -1"),
    (["--arch", "resnet50"], "--arch resnet50 is for file lists"),
    (["--dataset", "imagenet_lt", "--arch", "resnet18", "--knn-every", "-1"], "use resnet50 or resnet10"),
    (["--train-list", "x.txt"], "--train-list is for --dataset imagenet_lt or inat"),
    (["--crop-size", "4"], "--crop-size"),
    (["--batch-size", "64"], "lower --batch-size"),
])
def test_bad_input_one_line_exit_2(data, tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        S.main(_args(data, tmp_path / "o", *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_cli_error_and_no_overwrite(rwsam_run, data):
    before = (rwsam_run / "last.pt").read_bytes()
    r = run_script("simsiam_rwsam.py", *_args(data, rwsam_run))
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (rwsam_run / "last.pt").read_bytes() == before
    torch.save({"script": "ldam_drw.py", "arch": "resnet32", "model": {}}, rwsam_run.parent / "other.pt")
    r = run_script("simsiam_rwsam.py", "--resume", rwsam_run.parent / "other.pt", "--gpu", "-1")
    assert r.returncode == 2 and "written by ldam_drw.py" in r.stderr


# ----- ImageNet-LT / iNat file lists ---------------------------------------------------------------

def test_file_list_defaults_are_the_imagenet_recipe():
    """Chen & He's ImageNet SimSiam with paper 2's App. A.1 schedule and App. C.1's ρ, α; CIFAR unchanged."""
    a = S.parse_args(["--dataset", "imagenet_lt", "--train-list", "l.txt"])
    assert (a.arch, a.epochs, a.batch_size, a.lr, a.wd, a.momentum, a.fix_pred_lr) == \
        ("resnet50", 300, 256, 0.025, 1e-4, 0.9, True)
    assert (a.sam_rho, a.alpha, a.adaptive, a.opt, a.knn_every, a.crop_size) == (2.0, 0.5, True, "rwsam", -1, 224)
    b = S.parse_args(["--dataset", "inat", "--batch-size", "512", "--arch", "resnet10", "--no-fix-pred-lr"])
    assert (b.lr, b.arch, b.fix_pred_lr, b.epochs) == (0.05, "resnet10", False, 300)        # 0.025 per 256 images
    c = S.parse_args([])
    assert (c.arch, c.epochs, c.batch_size, c.lr, c.wd, c.sam_rho, c.alpha, c.knn_every, c.fix_pred_lr) == \
        ("resnet18", 1600, 512, 0.06, 5e-4, 5.0, 1.2, 10, False)
    epochs = lambda *argv: S.run_epochs(S.parse_args(["--dataset", "imagenet_lt", *argv]), 300)
    assert (epochs("--subsample", "0.25"), epochs("--subsample", "0.75"), epochs("--subsample", "0.25", "--same-epochs")) \
        == (1200, 400, 300)                                   # App. A.1: the full list's optimizer steps


def test_imagenet_model_is_chen_and_he_on_the_project_backbone():
    m = S.SimSiamResNet("resnet50")
    own = m.state_dict()
    tv = __import__("torchvision").models.resnet50().state_dict()
    assert {k for k in own if not k.startswith(("projector.", "predictor."))} == {k for k in tv if not k.startswith("fc.")}
    shapes = [tuple(l.weight.shape) for l in m.projector if isinstance(l, nn.Linear)]
    assert shapes == [(2048, 2048)] * 3 and not m.projector[-1].affine
    assert [tuple(l.weight.shape) for l in m.predictor if isinstance(l, nn.Linear)] == [(512, 2048), (2048, 512)]
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for layer in (m.layer1, m.layer4) for b in layer)  # zero_init_residual
    z1, z2, p1, p2 = S.SimSiamResNet("resnet10").eval()(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    assert z1.shape == p2.shape == (2, 2048)


@pytest.fixture(scope="module")
def file_list(tmp_path_factory):
    root = tmp_path_factory.mktemp("list")
    return root, write_file_list(root, num_classes=3, per_class=4)


def _list_args(root, lst, out, *extra):
    return ["--dataset", "imagenet_lt", "--data-root", str(root), "--train-list", str(lst), "--rho", "1", "--gpu", "-1",
            "--arch", "resnet10", "--batch-size", "4", "--crop-size", "32", "--workers", "0", "--out", str(out),
            *map(str, extra)]


def test_file_list_views_are_the_ones_of_datasets_lt(file_list, tmp_path):
    """The SSL list views (MoCo v2's augmentation twice, per-position items, the KDE's plain batches) live once,
    in datasets_lt, shared with moco_ssp.py: the run trains and embeds with them and keeps no copy of its own."""
    root, lst = file_list
    args = S.parse_args(_list_args(root, lst, tmp_path, "--opt", "sgd"))
    data = S.build_list_data(args, torch.device("cpu"), 0, 1)
    assert type(data.train) is D.ListViews and type(data.train.subset) is D.Positions
    assert type(data.train.subset.dataset.transform) is D.TwoViews and data.train.subset.indices == list(range(12))
    mine, shared = list(data.train_eval.epoch(0)), list(D.list_plain_batches(args, data.idx, torch.device("cpu")))
    assert len(mine) == len(shared) > 0
    assert all(torch.equal(a, b) for m, s in zip(mine, shared) for a, b in zip(m, s))
    assert not any(hasattr(S, n) for n in ("stream_seed", "TwoViews", "Positions", "ListViews", "list_plain_batches"))


def test_file_list_sgd_then_rwsam_then_linear_probe(file_list, tmp_path, capsys):
    """SimSiam (sgd, fixed predictor lr), then rwSAM with its KDE weights from that run's backbone (Algorithm 1
    line 8, recomputed here by hand) and a fresh model, then eval_linear.py on the same list loads it."""
    root, lst = file_list
    S.main(_list_args(root, lst, tmp_path / "sgd", "--opt", "sgd", "--epochs", 2))
    sgd = torch.load(tmp_path / "sgd" / "last.pt", weights_only=True)
    assert (sgd["arch"], sgd["epoch"], sgd["class_counts"], sgd["mean"]) == ("resnet10", 2, [4, 4, 4], D.IMAGENET_MEAN)
    base = sgd["args"]["lr"]
    groups = sgd["optimizer"]["param_groups"]
    assert [g["fix_lr"] for g in groups] == [False, True] and groups[1]["lr"] == base       # predictor: no cosine
    assert groups[0]["lr"] == pytest.approx(S.lr_at(1, 2, base))
    assert len(groups[1]["params"]) == len([k for k, _ in S.SimSiamResNet("resnet10").named_parameters()
                                            if k.startswith("predictor.")])
    rows = [json.loads(l) for l in (tmp_path / "sgd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["opt"] for r in rows] == ["sgd", "sgd"] and all(math.isfinite(r["loss"]) for r in rows)

    S.main(_list_args(root, lst, tmp_path / "rw", "--stage1", tmp_path / "sgd" / "last.pt", "--epochs", 1))
    rw = torch.load(tmp_path / "rw" / "last.pt", weights_only=True)
    assert rw["args"]["opt"] == "rwsam" and rw["kde_weights"]["indices"].tolist() == list(range(12))
    backbone = S.ResNetBackbone("resnet10")
    backbone.load_state_dict({k: v for k, v in sgd["model"].items() if not k.startswith(("projector.", "predictor."))})
    ds = D.FileListDataset(str(root), str(lst), train=False)                  # Resize 256, CenterCrop 224
    with torch.no_grad():
        feats = torch.nn.functional.normalize(backbone.eval()(torch.stack([ds[i][0] for i in range(12)])), dim=1)
    w, _, h = S.kde_weights(feats, 0.5, None, 0)
    assert torch.allclose(rw["kde_weights"]["weights"], w, atol=1e-5) and rw["kde_weights"]["bandwidth"] == pytest.approx(h)
    assert [json.loads(l)["opt"] for l in (tmp_path / "rw" / "metrics.jsonl").read_text().splitlines()] == ["rwsam"]
    final = json.loads((tmp_path / "rw" / "final.json").read_text())
    assert (final["arch"], final["n_train"], final["sam_rho"], final["alpha"], final["kde"]["alpha"]) == \
        ("resnet10", 12, 2.0, 0.5, 0.5)

    import eval_linear as L
    capsys.readouterr()
    L.main(["--ckpt", str(tmp_path / "rw" / "last.pt"), "--data-root", str(root), "--train-list", str(lst),
            "--test-list", str(lst), "--gpu", "-1", "--epochs", "1", "--protocol", "fast", "--workers", "0",
            "--out", str(tmp_path / "probe")])
    assert "2 missing (fc.weight, fc.bias)" in capsys.readouterr().out
    probe = torch.load(tmp_path / "probe" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(probe[k], v) for k, v in rw["model"].items() if not k.startswith(("projector.", "predictor.")))
    meta = json.loads((tmp_path / "probe" / "final.json").read_text())["pretrain"]
    assert (meta["script"], meta["arch"], meta["n"], meta["method"]) == ("simsiam_rwsam.py", "resnet10", 12,
                                                                          "simsiam_rwsam+rwsam")

