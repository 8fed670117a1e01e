"""moco_ssp.py: momentum update, queue, InfoNCE by hand, BN splits and shuffle-BN, one process = two gloo
processes, resume, the checkpoint contract (loads into ldam_drw.py and crt.py), and one-line errors."""
import argparse
import copy
import inspect
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision

import crt
import datasets_lt as D
import ldam_drw as L
import moco_ssp as M
import run_lt
from conftest import ROOT, run_script, torchrun, write_file_list, write_folder

CPU = torch.device("cpu")
PARAMS = ("running_mean", "running_var", "num_batches_tracked")   # BN buffers: not parameters


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5))


# ----- the method's pieces -------------------------------------------------------------------------

@pytest.mark.parametrize("m", [0.999, 0.9, 0.0])
def test_momentum_update_formula(m):
    torch.manual_seed(0)
    key, query = small_net(), small_net()
    key[1].running_mean.normal_()
    before_k, before_q = copy.deepcopy(key.state_dict()), copy.deepcopy(query.state_dict())
    M.momentum_update(key, query, m)
    params = {name for name, _ in key.named_parameters()}
    for name, t in key.state_dict().items():
        if name in params:                                  # θ_k ← m·θ_k + (1 − m)·θ_q
            assert torch.allclose(t, m * before_k[name] + (1 - m) * before_q[name], atol=1e-7), name
        else:                                               # the key encoder's own BN statistics
            assert torch.equal(t, before_k[name]), name
    assert all(torch.equal(t, before_q[n]) for n, t in query.state_dict().items())


def test_queue_enqueue_order_and_pointer_wrap():
    queue = torch.zeros(6, 2)
    batches = [torch.full((2, 2), float(i)) for i in range(1, 5)]
    ptrs = []
    ptr = 0
    for batch in batches:
        ptr = M.enqueue(queue, batch, ptr)
        ptrs.append(ptr)
    assert ptrs == [2, 4, 0, 2]
    # the 4th batch replaced the oldest (the 1st); the 2nd and 3rd are still there, in order
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3]


def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    loss, logits = M.info_nce(q, k, queue, 0.5)
    # query 1: q·k₊ = 0.6, q·queue = (1, 0, −1) → logits (1.2, 2, 0, −2); query 2: (2, 0, 2, 0)
    assert torch.allclose(logits, torch.tensor([[1.2, 2, 0, -2], [2, 0, 2, 0]]))
    l1 = -1.2 + math.log(math.exp(1.2) + math.exp(2) + 1 + math.exp(-2))
    l2 = -2 + math.log(2 * math.exp(2) + 2)
    assert loss.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


def test_split_batchnorm_normalises_each_group_with_its_own_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.weight.data.normal_(), bn.bias.data.normal_()
    x = torch.randn(8, 3, 4, 4) * torch.arange(1, 9.0).view(8, 1, 1, 1)       # groups with different scales
    split = M.SplitBatchNorm(copy.deepcopy(bn), 4)
    out = split(x)
    singles = [copy.deepcopy(bn) for _ in range(4)]
    for s, single in enumerate(singles):                    # group s = rows s, s+4
        assert torch.allclose(out[s::4], single(x[s::4]), atol=1e-5)
    assert torch.allclose(split.running_mean, torch.stack([b.running_mean for b in singles]).mean(0), atol=1e-6)
    assert torch.allclose(split.running_var, torch.stack([b.running_var for b in singles]).mean(0), atol=1e-6)
    assert not torch.allclose(out, copy.deepcopy(bn)(x), atol=1e-3)             # not one batch's statistics
    split.eval(), bn.eval()
    bn.load_state_dict(split.state_dict())
    assert torch.equal(split(x), bn(x))


def test_split_forward_uses_contiguous_sub_batches():
    torch.manual_seed(0)
    net = small_net()
    split = M.split_batchnorm(copy.deepcopy(net), 2)
    assert isinstance(split[1], M.SplitBatchNorm) and split.state_dict().keys() == net.state_dict().keys()
    x = torch.randn(8, 3, 6, 6)
    expected = torch.cat([copy.deepcopy(net)(x[:4]), copy.deepcopy(net)(x[4:])])  # as two processes would
    assert torch.allclose(M.split_forward(split, x, 2), expected, atol=1e-5)


def test_shuffled_keys_one_process():
    """Keys of a permuted batch in BN groups, returned in the original order: key i belongs to image i,
    normalised with the group its image was shuffled into."""
    torch.manual_seed(0)
    net = small_net()
    split = M.split_batchnorm(copy.deepcopy(net), 2)
    x = torch.randn(8, 3, 6, 6)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    keys = M.shuffled_keys(split, x, perm, 2, 0, 1)
    shuffled = torch.cat([copy.deepcopy(net)(x[perm[:4]]), copy.deepcopy(net)(x[perm[4:]])])
    expected = torch.empty_like(shuffled)
    expected[perm] = shuffled
    assert torch.allclose(keys, expected, atol=1e-5)
    assert not torch.allclose(keys, M.split_forward(split, x, 2), atol=1e-3)     # the groups did change


@pytest.mark.parametrize("arch,width,reference", [
    ("resnet18", 512, lambda: crt.ResNet18(10)),
    ("resnet50", 2048, lambda: torchvision.models.resnet50()),
])
def test_encoder_keys_are_the_backbone_contract(arch, width, reference):
    enc = M.split_batchnorm(M.Encoder(arch, 128), 8)
    state = M.contract_state(enc)
    backbone = {k for k in reference().state_dict() if not k.startswith("fc.")}
    assert {k for k in state if not k.startswith("head.")} == backbone
    assert [tuple(state[f"head.{i}.weight"].shape) for i in (0, 2)] == [(width, width), (128, width)]
    assert enc.eval()(torch.randn(2, 3, 32, 32)).norm(dim=1).tolist() == pytest.approx([1, 1])
    other = M.Encoder(arch, 128)
    M.load_contract_state(other, state)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), enc.state_dict().values()))


def test_knn_similarities_stay_float32_under_autocast():
    """--amp wraps the kNN monitor in bf16 autocast (CUDA); CPU autocast also lowers matmul to bf16, so it
    checks that the votes are the float32 ones."""
    torch.manual_seed(0)
    bank = nn.functional.normalize(torch.randn(300, 64), dim=1)
    knn = M.KNN(nn.Identity(), bank, torch.randint(0, 4, (300,)), 4, 20, 0.1)
    x = bank[:50] + 0.05 * torch.randn(50, 64)
    expected = knn(x)
    with torch.autocast("cpu", torch.bfloat16):
        scores = knn(x)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, expected, rtol=1e-6)


def test_queue_checks():
    assert M.default_queue(M.parse_args([]), 12406) == 4096                      # CIFAR-10-LT rho 0.01
    assert M.default_queue(M.parse_args(["--dataset", "svhn"]), 2478) == 1024    # ≤ half of SVHN-LT
    assert M.default_queue(M.parse_args(["--dataset", "imagenet_lt"]), 115846) == 65536
    im = M.parse_args(["--dataset", "imagenet_lt"])                                # paper 2's smaller variants
    for n in (57923, 14481, 10000):
        K = M.default_queue(im, n)
        assert K % 256 == 0 and K <= n / 2 < K + 256                                # largest multiple ≤ n/2
        M.check_queue(K, 256, n)                                                    # and it runs
    assert M.default_queue(im, 57923) == 28928 and M.default_queue(im, 65536) == 32768
    a = M.parse_args([])
    assert (a.batch_size, a.wd, a.epochs, a.moco_m, a.moco_t, a.arch) == (512, 1e-4, 200, 0.999, 0.2, "resnet18")
    b = M.parse_args(["--dataset", "inat"])
    assert (b.batch_size, b.arch, b.knn_every) == (256, "resnet50", 0)
    assert (a.lr, b.lr, b.epochs) == (pytest.approx(0.06), pytest.approx(0.025), 300)   # paper 2 App. A.1 on ImageNet
    assert M.lr_at(0, a) == 0.06 and M.lr_at(100, a) == pytest.approx(0.03)


# ----- runs on tiny data -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_folder(root, classes=tuple("abcd"), per_class=(16,) * 4, per_class_test=2, easy=True)
    return root


def run_args(root, out, *extra):
    """64 images, batch 16 (4 steps), queue 48: the pointer ends epoch 1 at 64 mod 48 = 16, epoch 2 at 32.
    (Batches of 8 on ResNet-10's 1×1 last stage leave BN 4 values per channel and group: ill-conditioned
    enough that float rounding, not the method, decides whether two runs agree to 1e-5.)"""
    return ["--dataset", "folder", "--data-root", str(root), "--rho", "1", "--gpu", "-1", "--arch", "resnet10",
            "--batch-size", "16", "--queue", "48", "--epochs", "2", "--knn-every", "2", "--out", str(out),
            *map(str, extra)]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny):
    """One process, BN in two sub-batches: the run that two processes must reproduce."""
    out = tmp_path_factory.mktemp("single")
    M.main(run_args(tiny, out, "--bn-splits", 2))
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(a, b, atol=1e-5, buffers=True):
    for field in ("model", "key_model"):
        assert a[field].keys() == b[field].keys()
        for k in a[field]:
            if buffers or not k.endswith(PARAMS):
                assert torch.allclose(a[field][k].float(), b[field][k].float(), atol=atol), (field, k)
    assert torch.allclose(a["queue"], b["queue"], atol=atol)
    assert a["queue_ptr"] == b["queue_ptr"] and a["epoch"] == b["epoch"]


def test_run_outputs_and_checkpoint(single):
    rows = [json.loads(l) for l in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["knn_test"] is None and 0 <= rows[1]["knn_test"]["top1"] <= 100
    meta = json.loads((single / "args.json").read_text())
    assert (meta["world_size"], meta["bn_splits"], meta["queue"], meta["lr"]) == (1, 2, 48, 0.03 * 16 / 256)
    final = json.loads((single / "final.json").read_text())
    assert final["class_counts"] == [16] * 4 and final["processes"] == 1
    assert (single / "moco_ssp.py").read_text() == Path(M.__file__).read_text()
    ck = load(single / "last.pt")
    assert {"script", "arch", "model", "epoch", "optimizer", "args", "class_counts", "rng", "key_model", "queue",
            "queue_ptr"} <= ck.keys()
    assert (ck["script"], ck["arch"], ck["epoch"]) == ("moco_ssp.py", "resnet10", 2)
    assert ck["queue_ptr"] == (2 * (64 // 16) * 16) % 48
    assert ck["queue"].shape == (48, 128) and torch.allclose(ck["queue"].norm(dim=1), torch.ones(48), atol=1e-5)
    assert not any(k.startswith(("backbone.", "module.", "fc.")) for k in ck["model"])


def test_queue_holds_the_last_keys_before_the_pointer(single, tiny):
    """Recompute the last step's keys from the stored key encoder (its parameters are the ones that
    made them: the momentum update precedes the keys) and find them in rows ptr − 16 … ptr − 1."""
    ck = load(single / "last.pt")
    args = M.parse_args(run_args(tiny, single, "--bn-splits", 2))
    train = M.build_data(args, CPU, 0, 1).train
    *_, (views, _, _) = train.epoch(1)
    g = torch.Generator().manual_seed(D.stream_seed(args.seed, 1, 1))
    for _ in range(len(train)):
        perm = M.shuffle_order(16, g, CPU, 1)
    key = M.split_batchnorm(M.Encoder("resnet10", 128), 2)
    M.load_contract_state(key, ck["key_model"])
    keys = M.shuffled_keys(key.train(), views[1], perm, 2, 0, 1)
    ptr = ck["queue_ptr"]
    assert torch.allclose(ck["queue"][ptr - 16:ptr], keys, atol=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_model_as_one_with_two_bn_splits(tmp_path, tiny, single):
    r = subprocess.run(torchrun("moco_ssp.py", *run_args(tiny, tmp_path / "ddp")), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch       lr") == 1                                  # rank 0 prints, alone
    meta = json.loads((tmp_path / "ddp" / "args.json").read_text())
    assert (meta["world_size"], meta["bn_splits"], meta["batch_size"]) == (2, 1, 16)
    rows = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # BN running statistics differ (rank 0's vs the mean over splits); everything that trains is equal up to
    # float summation order (gloo all-reduce vs one backward pass), about 1e-6 on this data
    assert_same_run(load(tmp_path / "ddp" / "last.pt"), load(single / "last.pt"), atol=1e-4, buffers=False)


def _key_encoder_worker(rank, port):
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    args = M.parse_args(["--dataset", "folder", "--data-root", "unused", "--rho", "1", "--gpu", "-1", "--arch", "resnet10",
                         "--batch-size", "16", "--queue", "48", "--bn-splits", "1"])
    torch.manual_seed(args.seed)
    if rank == 0:
        torch.randn(1000)                   # rwSAM: rank 0 alone built stage1's backbone (Algorithm 1 line 8)
    run, _ = M.build_model(args, None, 64, torch.device("cpu"), rank, 2)
    flat = lambda m: torch.cat([t.flatten().float() for t in m.state_dict().values()])
    key, query = flat(run.key), flat(run.net)
    keys = [torch.empty_like(key) for _ in range(2)]
    dist.all_gather(keys, key)
    dist.destroy_process_group()
    assert torch.equal(key, query) and torch.equal(keys[0], keys[1]), f"rank {rank}: θ_k is not rank 0's θ_q"


@pytest.mark.slow
def test_every_process_starts_with_rank_zeros_query_and_key_encoders():
    """MoCo Algorithm 1 starts θ_k = θ_q. Under torchrun DDP gives every process rank 0's θ_q; θ_k must be copied
    after that, or a process whose random stream differs (rwSAM's rank 0) keeps a key encoder of its own."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(_key_encoder_worker, args=(store.port,), nprocs=2)


class Crash(Exception):
    pass


def test_resume_after_a_crash_is_the_same_run(tmp_path, tiny, single, monkeypatch):
    """The worst moment to die: epoch 2 is logged but its checkpoint not yet written. Resuming through
    the command line must drop that line and redo epoch 2 from epoch 1's queue, pointer and encoders."""
    save = run_lt.save_atomic

    def save_until_epoch_2(state, path):
        if state["epoch"] == 2:
            raise Crash
        save(state, path)

    monkeypatch.setattr(run_lt, "save_atomic", save_until_epoch_2)
    with pytest.raises(Crash):
        M.main(run_args(tiny, tmp_path, "--bn-splits", 2))
    monkeypatch.undo()
    run_lt.release_out()                                       # the crashed process's lock dies with it
    assert load(tmp_path / "last.pt")["epoch"] == 1 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    r = run_script("moco_ssp.py", "--resume", tmp_path / "last.pt", "--gpu", "-1")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert_same_run(load(tmp_path / "last.pt"), load(single / "last.pt"))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]


def test_checkpoint_loads_into_ldam_drw(single, capsys):
    model = L.build_model("resnet10", 3, cosine=True)
    run_lt.load_backbone(model, "resnet10", single / "last.pt")
    out = capsys.readouterr().out
    src = load(single / "last.pt")["model"]
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith("fc.")]
    assert all(torch.equal(own[k], src[k]) for k in backbone)
    assert f"{len(backbone)} tensors matched, 1 missing (fc.weight), 4 unexpected (head.0.weight" in out


def test_cifar_resnet18_run_loads_into_crt(tmp_path):
    write_folder(tmp_path / "data", classes=tuple("abc"), per_class=(8,) * 3, per_class_test=2, size=16, easy=True)
    M.main(["--dataset", "folder", "--data-root", str(tmp_path / "data"), "--rho", "1", "--gpu", "-1",
            "--batch-size", "8", "--queue", "16", "--epochs", "1", "--knn-every", "1", "--out", str(tmp_path / "r18")])
    ck = load(tmp_path / "r18" / "last.pt")
    assert ck["arch"] == "resnet18" and ck["args"]["bn_splits"] == 8
    backbone = crt.build_backbone("resnet18")
    run_lt.load_backbone(backbone, "resnet18", tmp_path / "r18" / "last.pt")
    assert all(torch.equal(v, ck["model"][k]) for k, v in backbone.state_dict().items() if not k.startswith("fc."))
    final = json.loads((tmp_path / "r18" / "final.json").read_text())
    assert 0 <= final["knn_test"]["top1"] <= 100


@pytest.mark.slow
def test_imagenet_lt_file_lists(tmp_path):
    lst = write_file_list(tmp_path, num_classes=3, per_class=4)
    M.main(["--dataset", "imagenet_lt", "--data-root", str(tmp_path), "--train-list", str(lst), "--rho", "1",
            "--gpu", "-1", "--arch", "resnet10", "--batch-size", "4", "--queue", "8", "--epochs", "1",
            "--workers", "1", "--bn-splits", "2", "--out", str(tmp_path / "run")])
    ck = load(tmp_path / "run" / "last.pt")
    assert ck["queue_ptr"] == (12 // 4 * 4) % 8 and ck["class_counts"] == [4, 4, 4]
    model = L.build_model("resnet10", 3, cosine=False)
    run_lt.load_backbone(model, "resnet10", tmp_path / "run" / "last.pt")
    assert torch.equal(model.state_dict()["layer4.0.conv2.weight"], ck["model"]["layer4.0.conv2.weight"])
    M.main(["--dataset", "imagenet_lt", "--data-root", str(tmp_path), "--train-list", str(lst), "--rho", "1",
            "--gpu", "-1", "--arch", "resnet10", "--batch-size", "4", "--queue", "8", "--epochs", "1",
            "--workers", "0", "--bn-splits", "2", "--opt", "rwsam", "--stage1", str(tmp_path / "run" / "last.pt"),
            "--out", str(tmp_path / "rw")])
    rw = load(tmp_path / "rw" / "last.pt")
    assert rw["kde_weights"]["indices"].tolist() == list(range(12)) and rw["args"]["sam_rho"] == 2.0   # App. C.1
    assert rw["kde_weights"]["weights"].mean().item() == pytest.approx(1.0, abs=1e-5)


def test_list_views_shard_one_permutation(tmp_path):
    """Two processes' shares of an epoch are disjoint and together are one process's epoch."""
    lst = write_file_list(tmp_path, num_classes=3, per_class=4)
    ds = D.FileListDataset(str(tmp_path), str(lst), train=False)

    def order(rank, world, epoch):
        views = D.ListViews(ds, np.arange(12), 6 // world, 0, 0, CPU, rank, world)
        views.sampler.set_epoch(epoch)
        return list(views.sampler)

    one = order(0, 1, 3)
    assert sorted(one) == list(range(12)) and one != list(range(12))
    assert (order(0, 2, 3), order(1, 2, 3)) == (one[0::2], one[1::2])              # disjoint shares of it
    assert one != order(0, 1, 4)                                                   # set_epoch reshuffles


# ----- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--queue", "20"], "--queue 20 must be a multiple of the global batch 16 and smaller than the 64 training "
                        "images; use one of 16, 32, 48"),
    (["--queue", "64"], "use one of 16, 32, 48"),
    (["--batch-size", "8", "--queue", "20"], "use one of 8, 16, 24, 32, …, 56"),
    (["--bn-splits", "3"], "--bn-splits 3 must divide the 16 images"),
    (["--rho", "100"], "--rho 0.01"),
    (["--moco-t", "0"], "--moco-t must be in (0, inf)"),
    (["--arch", "vit"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(tmp_path, tiny, capsys, extra, message):
    args = run_args(tiny, tmp_path / "o")
    with pytest.raises(SystemExit) as e:
        M.main(args + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_existing_run_and_foreign_checkpoints_are_refused(tmp_path, tiny, single, capsys):
    before = (single / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        M.main(run_args(tiny, single))
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert (single / "last.pt").read_bytes() == before
    torch.save({"script": "ldam_drw.py", "arch": "resnet32", "model": {}}, tmp_path / "sup.pt")
    with pytest.raises(SystemExit) as e:
        M.main(["--resume", str(tmp_path / "sup.pt"), "--gpu", "-1"])
    assert e.value.code == 2 and "written by ldam_drw.py" in capsys.readouterr().err


# ----- paper 2: balanced control, size sweep, SAM / rwSAM ------------------------------------------

def test_paper2_defaults_and_epoch_scaling():
    a = M.parse_args(["--dataset", "imagenet_lt", "--subsample", "0.25"])
    assert (a.epochs, a.epochs_full, a.lr, a.sam_rho, a.alpha, a.adaptive, a.opt) == (1200, 300, 0.025, 2.0, 0.5, True, "sgd")
    b = M.parse_args(["--opt", "sam", "--no-adaptive", "--subsample", "0.75", "--balanced"])
    assert (b.epochs, b.sam_rho, b.alpha, b.adaptive) == (267, 5.0, 1.2, False)                 # round(200 / 0.75)
    assert b.out.replace("\\", "/") == "runs/moco_ssp-cifar10-0.01-0-sam-balanced-sub0.75"
    assert M.parse_args(["--subsample", "0.5", "--same-epochs"]).epochs == 200


def test_paper1_recipe_is_the_released_pretrain_moco(capsys):
    """Yang & Xu's pretrain_moco.py: 200 epochs, batch 128, lr 0.015, wd 1e-4, τ 0.2, K 65536, cosine."""
    for dataset in ("imagenet_lt", "inat"):
        a = M.parse_args(["--dataset", dataset, "--recipe", "paper1"])
        assert (a.epochs, a.batch_size, a.lr, a.wd, a.moco_t, a.moco_m, a.arch) == (200, 128, 0.015, 1e-4, 0.2, 0.999,
                                                                                  "resnet50")
        b = M.parse_args(["--dataset", dataset])
        assert (b.epochs, b.batch_size, b.lr) == (300, 256, 0.025)
    with pytest.raises(SystemExit) as stop:
        M.parse_args(["--recipe", "paper1"])
    assert stop.value.code == 2 and "rotation_ssp.py" in capsys.readouterr().err


def test_sam_copies_are_simsiam_rwsams():
    import simsiam_rwsam as S
    for name in ("sam_perturbation", "bn_buffers", "kde_weights"):
        assert inspect.getsource(getattr(M, name)) == inspect.getsource(getattr(S, name)), name


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn = torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return torch.nn.functional.normalize(self.bn(self.lin(x)), dim=1)


def _sam_step(rho, weights=None, adaptive=True):
    net = _Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    x, keys = torch.randn(8, 6, generator=g), torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(16, 4, generator=g), dim=1)
    args = argparse.Namespace(amp=False, bn_splits=1, moco_t=0.2, sam_rho=rho, adaptive=adaptive)
    M.sam_moco_step(net, net, opt, x, keys, queue, args, weights)
    return net, (x, keys, queue)


def test_sam_step_with_rho_0_is_the_sgd_step_and_rwsam_weights_change_it():
    sam, (x, keys, queue) = _sam_step(0.0)
    sgd = _Net()
    opt = torch.optim.SGD(sgd.parameters(), lr=0.5)
    loss, _ = M.info_nce(sgd(x), keys, queue, 0.2)
    loss.backward()
    opt.step()
    for a, b in zip(sam.state_dict().values(), sgd.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    plain, _ = _sam_step(0.5)
    uniform, _ = _sam_step(0.5, torch.full((8,), 3.0))              # a constant weight: the same ε
    tilted, _ = _sam_step(0.5, torch.tensor([4.0, 1, 1, 1, 1, 1, 1, 0.1]))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain.parameters(), uniform.parameters()))
    assert not torch.allclose(plain.lin.weight, tilted.lin.weight, atol=1e-4)
    assert not torch.allclose(plain.lin.weight, sam.lin.weight, atol=1e-4)
    assert torch.equal(plain.bn.running_mean, sam.bn.running_mean)   # BN statistics of the first pass only


def test_rwsam_run_from_a_stage1_run(tmp_path, tiny, single):
    M.main(run_args(tiny, tmp_path / "rw", "--opt", "rwsam", "--stage1", single / "last.pt", "--epochs", 1,
                    "--knn-every", 0))
    final = json.loads((tmp_path / "rw" / "final.json").read_text())
    ck = load(tmp_path / "rw" / "last.pt")
    w = ck["kde_weights"]["weights"]
    assert (final["opt"], final["adaptive"], final["sam_rho"], final["alpha"]) == ("rwsam", True, 5.0, 1.2)
    assert len(w) == 64 and w.mean().item() == pytest.approx(1.0, abs=1e-5) and w.std() > 0
    assert ck["kde_weights"]["source"] == str(single / "last.pt") and math.isfinite(final["final_loss"])


@pytest.mark.parametrize("extra,message", [
    (["--opt", "rwsam"], "--opt rwsam needs --stage1 PATH"),
    (["--sam-rho", "-1"], "--sam-rho must be in [0, inf), got -1"),
    (["--subsample", "0.3"], "argument --subsample: invalid choice: 0.3"),
    (["--opt", "adam"], "argument --opt: invalid choice"),
])
def test_paper2_bad_input_one_line_exit_2(tmp_path, tiny, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        M.main(run_args(tiny, tmp_path / "o") + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
