"""ldam_drw.py and crt.py under torchrun on file lists (ImageNet-LT / iNaturalist, Tables 3–4 of paper 1):
per-process shares whose union is the single-process batch (plain, resampled, class-balanced, across the
DRW / DRS switch), a 2-process CPU run (gloo) against a single-process computation with the same BatchNorm
semantics, evaluation equal to one process's, rank-0 files, kill and resume, and cRT's backbone loaded on
every process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import crt
import datasets_lt as D
import ldam_drw as L
import run_lt
from conftest import ROOT, run_script, torchrun

def write_list(root, labels, size=40):
    """A file list of random-pixel JPEGs with the given labels (ImageNet-LT's 'relative/path label')."""
    rng = np.random.default_rng(0)
    lines = []
    for i, c in enumerate(labels):
        d = Path(root) / "images" / f"n{c:05d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
        lines.append(f"images/n{c:05d}/{i}.jpg {c}")
    (Path(root) / "list.txt").write_text("\n".join(lines) + "\n")
    return Path(root) / "list.txt"


class Labels(torch.utils.data.Dataset):
    """A file list's stand-in without files: item i is (i as a 1-pixel image, its label)."""

    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.tensor([float(i)]), int(self.labels[i])


# ----- the sampling: per-process shares, union = the single-process batch ----------------------------

LABELS = np.repeat(np.arange(4), [23, 9, 4, 2])                       # 38 images: last batch of 8 holds 6


def single_process_steps(weights, epoch, batch_size=8, seed=3):
    batches = D.ListBatches(Labels(LABELS), np.arange(len(LABELS)), batch_size, True, seed, 0,
                                 torch.device("cpu"))
    return [idx for _, _, idx in batches.epoch(epoch, weights)]


@pytest.mark.parametrize("rule", ["none", "resample", "drs", "drw", "balanced"])
def test_shares_of_two_processes_are_the_single_process_batch(rule):
    """Every epoch of a 5-epoch run (the DRW / DRS switch at epoch 4): process 0's share then process 1's
    is, step for step, the batch one process draws (ListBatches), for plain shuffles, the authors'
    effective-number resampling, and crt's class-balanced sampler."""
    args = L.parse_args(["--dataset", "inat", "--epochs", "5", "--rule", "resample" if rule == "balanced" else rule])
    labels = torch.as_tensor(LABELS)
    weights = (D.balanced_sample_weights(labels) if rule == "balanced" else
               D.effective_number_sample_weights(labels, args.beta))
    switched = []
    for epoch in range(5):
        resample = L.deferred_rule(args.rule, epoch, args.epochs, None)[1]
        w = weights if resample else None
        switched.append(resample)
        single = single_process_steps(w, epoch)
        one = D.shard_batches(len(LABELS), 8, 3, epoch, w, 0, 1)
        two = [D.shard_batches(len(LABELS), 8, 3, epoch, w, r, 2) for r in range(2)]
        assert len(single) == len(one) == len(two[0]) == len(two[1]) == 5
        for s, (b, mine), (b0, p0), (b1, p1) in zip(single, one, *two):
            assert torch.equal(s, b) and torch.equal(s, mine) and torch.equal(b0, s) and torch.equal(b1, s)
            assert torch.equal(torch.cat([p0, p1]), s) and abs(len(p0) - len(p1)) <= 1
        if resample:                                              # really drawn with replacement
            assert len(torch.cat(single).unique()) < len(LABELS)
    assert switched == {"none": [False] * 5, "drw": [False] * 5, "resample": [True] * 5, "balanced": [True] * 5,
                        "drs": [False] * 4 + [True]}[rule]


@pytest.mark.parametrize("world", [2, 8])
def test_sharded_loader_yields_its_share_and_the_global_labels(world):
    """ShardedListBatches (what each process iterates): its images are its share's, in order, and it hands
    over the global batch's labels (the loss denominator). With 8 processes the last batch (6 images)
    leaves two of them an empty batch of the right shape."""
    w = D.balanced_sample_weights(torch.as_tensor(LABELS))
    empty = 0
    for r in range(world):
        b = D.ShardedListBatches(Labels(LABELS), np.arange(len(LABELS)), 8, 3, 0, torch.device("cpu"), r, world)
        got = list(b.epoch(1, w))
        want = D.shard_batches(len(LABELS), 8, 3, 1, w, r, world)
        assert len(got) == len(want) == 5
        for (x, y, share, y_batch), (batch, mine) in zip(got, want):
            assert torch.equal(x.flatten().long(), mine) and torch.equal(share, mine) and x.shape[1:] == (1,)
            assert torch.equal(y, torch.as_tensor(LABELS)[mine]) and torch.equal(y_batch, torch.as_tensor(LABELS)[batch])
            empty += len(mine) == 0
    assert empty == (2 if world == 8 else 0)


@pytest.mark.parametrize("loss", ["ce", "focal", "ldam"])
@pytest.mark.parametrize("reweight", [False, True])
def test_process_shares_of_the_loss_sum_to_the_batch_loss(loss, reweight):
    """Unequal shares (3 + 2 images) of a (weighted) batch: the shares' losses and their gradients sum to
    the single-process loss and gradient."""
    args = L.parse_args(["--loss", loss, "--gamma", "0.5"])
    counts = [30, 12, 5]
    weight = L.class_balanced_weights(counts, args.beta) if reweight else None
    margins = L.ldam_margins(counts, args.max_m)
    torch.manual_seed(0)
    logits = (torch.rand(5, 3) * 2 - 1).requires_grad_()
    y = torch.tensor([0, 2, 1, 2, 0])
    whole = {"ce": lambda: L.ce_loss(logits, y, weight), "focal": lambda: L.focal_loss(logits, y, weight, 0.5),
             "ldam": lambda: L.ldam_loss(logits, y, weight, margins, args.s)}[loss]()
    g_whole, = torch.autograd.grad(whole, logits)
    parts = [L.shard_loss(logits[s], y[s], y, weight, margins, args) for s in (slice(0, 3), slice(3, 5))]
    g_parts, = torch.autograd.grad(sum(parts), logits)
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(g_parts, g_whole, atol=1e-7)


# ----- 2-process runs (gloo, CPU) --------------------------------------------------------------------

N, BATCH = 9, 4                 # 3 steps an epoch: 2 + 2 images, 2 + 2, then 1 + none (an empty share)
TRAIN_LABELS = [0, 0, 0, 0, 0, 1, 1, 2, 2]


# torchrun sets OMP_NUM_THREADS=1 only when the caller has not set it; the by-hand references below run on
# one thread, so the processes must too, whatever the test run's own setting
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def ldam_args(root, lst, out, epochs):
    return ["ldam_drw.py", "--dataset", "inat", "--data-root", root, "--train-list", lst, "--test-list", lst,
            "--arch", "resnet10", "--epochs", epochs, "--batch-size", BATCH, "--workers", 0, "--gpu", -1,
            "--lr", 0.05, "--lr-sequence", "plain", "--out", out]


def launch(root, lst, out, epochs):
    r = subprocess.run(torchrun(*ldam_args(root, lst, out, epochs)), cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return root, write_list(root, TRAIN_LABELS)


@pytest.fixture(scope="module")
def ddp_run(data):
    """A 2-process LDAM-DRW run of 1 epoch (the switch at epoch 0: both steps re-weighted)."""
    root, lst = data
    return root, lst, launch(root, lst, root / "run", 1)


@pytest.fixture(scope="module")
def ddp_long(data):
    """An uninterrupted 2-process LDAM-DRW run of 3 epochs (the switch at epoch 2)."""
    root, lst = data
    return root, lst, launch(root, lst, root / "long", 3)


def reference_weights(root, lst):
    """One process, by hand: the model on each process's share of every global batch in train mode
    (per-process BatchNorm, as gloo runs it), the shares' losses summed, one SGD step per global batch.
    Process r's augmentations are drawn in order from the stream seeded by (seed, epoch, r). One thread,
    as each process under torchrun (OMP_NUM_THREADS=1): the kernels sum in the same order."""
    torch.set_num_threads(1)
    args = L.parse_args([str(a) for a in ldam_args(root, lst, root / "unused", 1)[1:]])
    ds = D.FileListDataset(str(root), str(lst), transform=D.imagenet_transform(True, dataset="inat"))
    labels = torch.as_tensor(ds.labels)
    counts = np.bincount(ds.labels).tolist()
    torch.manual_seed(args.seed)
    model = L.build_model("resnet10", 3, cosine=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    cb, margins = L.class_balanced_weights(counts, args.beta), L.ldam_margins(counts, args.max_m)
    model.train()
    for epoch in range(args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = L.lr_at(epoch, args)
        reweight = L.deferred_rule(args.rule, epoch, args.epochs, True)[0] is not None
        steps = [D.shard_batches(N, BATCH, args.seed, epoch, None, r, 2) for r in range(2)]
        views = []
        for r in range(2):
            torch.manual_seed(D.stream_seed(args.seed, epoch, r))
            views.append([torch.stack([ds[int(i)][0] for i in share]) if len(share) else None for _, share in steps[r]])
        for step, (batch, _) in enumerate(steps[0]):
            optimizer.zero_grad()
            for r in range(2):
                share = steps[r][step][1]
                if not len(share):                                # nothing to add
                    continue
                loss = L.shard_loss(model(views[r][step]), labels[share], labels[batch], cb if reweight else None,
                                    margins, args)
                loss.backward()
            optimizer.step()
    return model


def test_two_process_run_equals_the_single_process_update(ddp_run):
    """After 3 steps (DRW's re-weighted loss, unequal class weights; the last step's second share empty)
    the parameters equal the by-hand computation up to float summation order (the all-reduce adds the same
    two gradients)."""
    root, lst, _ = ddp_run
    saved = torch.load(root / "run" / "last.pt", weights_only=True)["model"]
    threads = torch.get_num_threads()
    try:
        ref = reference_weights(root, lst)
    finally:
        torch.set_num_threads(threads)
    params = dict(ref.named_parameters())
    assert len(params) > 0
    for k, v in params.items():
        assert torch.allclose(saved[k], v.detach(), atol=1e-5), k
    torch.manual_seed(0)
    start = L.build_model("resnet10", 3, cosine=True).state_dict()
    assert not torch.allclose(saved["conv1.weight"], start["conv1.weight"], atol=1e-3)   # the run really trained


def test_reported_accuracy_is_the_single_process_evaluation(ddp_run):
    """The processes score halves of the test list; final.json's counts are those of one process evaluating
    the saved weights on the whole list."""
    root, lst, _ = ddp_run
    ckpt = torch.load(root / "run" / "last.pt", weights_only=True)
    model = L.build_model("resnet10", 3, cosine=True)
    model.load_state_dict(ckpt["model"])
    ds = D.FileListDataset(str(root), str(lst), transform=D.imagenet_transform(False, dataset="inat"))
    single = D.evaluate(model, D.ListBatches(ds, np.arange(N), 3, False, 0, 0, torch.device("cpu")).epoch(0), 3,
                        ckpt["class_counts"])
    final = json.loads((root / "run" / "final.json").read_text())
    assert final["last"] == json.loads(json.dumps(single))


def test_rank_zero_writes_every_file_once(ddp_long):
    root, _, r = ddp_long
    rows = [json.loads(line) for line in (root / "long" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert sorted(p.name for p in (root / "long").iterdir()) == [".lock", "args.json", "final.json", "last.pt",
                                                                "ldam_drw.py", "metrics.jsonl"]
    assert r.stdout.count("last epoch:") == 1 and "2 processes × 2 images per step, BatchNorm per process" in r.stdout
    assert json.loads((root / "long" / "args.json").read_text())["world_size"] == 2


def worker(launcher, rank):
    """The pid of torchrun's worker process of `rank` (a child of the launcher with RANK=rank), once it runs."""
    for _ in range(1000):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if parent == launcher and f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.02)
    raise AssertionError(f"no worker of rank {rank}")


def test_one_process_killed_stops_the_run_in_one_line_and_it_resumes_to_the_uninterrupted_run(ddp_long, tmp_path):
    """kill -9 of process 1 after the first checkpoint: torchrun stops process 0 (SIGTERM), which says in one line
    how to go on, well within a minute; resumed on 2 processes (with the same --workers: the augmentation
    streams depend on it), the same weights and BN statistics as the uninterrupted run."""
    root, lst, _ = ddp_long
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(*ldam_args(root, lst, out, 3)), cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    rank1 = worker(proc.pid, 1)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(rank1, signal.SIGKILL)
    killed = time.time()
    err = proc.communicate(timeout=60)[1]
    assert time.time() - killed < 30 and proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: stopped by SIGTERM; continue with --resume {out / 'last.pt'}"], err[-3000:]
    killed_at = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < 3, "the run finished before it could be stopped"
    r = subprocess.run(torchrun("ldam_drw.py", "--resume", out / "last.pt", "--gpu", -1, "--workers", 0), cwd=ROOT, env=ONE_THREAD,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(root / "long" / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_crt_loads_the_backbone_on_every_process_and_equals_one_process(ddp_run, tmp_path):
    """cRT with the backbone frozen in eval mode (--bn frozen --no-augment; under torchrun the features are
    recomputed every step): the head after 2 epochs of class-aware global batches equals one process's
    computation on the checkpoint's features (float summation order only). Process 1's share enters every
    step's gradient, so a backbone not loaded there would show."""
    root, lst, _ = ddp_run
    ckpt = root / "run" / "last.pt"
    r = subprocess.run(torchrun("crt.py", "--ckpt", ckpt, "--gpu", -1, "--epochs", 2, "--batch-size", BATCH,
                                "--workers", 0, "--bn", "frozen", "--no-augment", "--lr-sequence", "plain",
                                "--out", tmp_path / "two"), cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("loaded backbone from") == 1                  # said by rank 0, done by both
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    source = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(two["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    assert torch.equal(two["bn1.running_var"], source["bn1.running_var"])

    backbone = crt.build_backbone("resnet10")
    run_lt.load_backbone(backbone, "resnet10", str(ckpt))
    backbone.fc = torch.nn.Identity()
    ds = D.FileListDataset(str(root), str(lst), transform=D.imagenet_transform(False, dataset="inat"))
    with torch.no_grad():
        feats = backbone.eval()(torch.stack([ds[i][0] for i in range(N)]))
    labels = torch.as_tensor(ds.labels)
    torch.manual_seed(0)
    head = torch.nn.Linear(feats.shape[1], 3)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)   # iNat: wd 1e-4
    for epoch in range(2):
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * (1 + np.cos(np.pi * epoch / 2))
        for batch, _ in D.shard_batches(N, BATCH, 0, epoch, None, 0, 1, crt.class_aware_order(labels, BATCH, 0, epoch)):
            optimizer.zero_grad()
            F.cross_entropy(head(feats[batch]), labels[batch]).backward()
            optimizer.step()
    assert torch.allclose(two["fc.weight"], head.weight.detach(), atol=1e-5)
    assert torch.allclose(two["fc.bias"], head.bias.detach(), atol=1e-5)
    final = json.loads((tmp_path / "two" / "final.json").read_text())
    with torch.no_grad():
        pred = head(feats).argmax(1)
    assert final["last"]["top1"] == 100 * (pred == labels).sum().item() / N


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("script", [L, crt])
def test_torchrun_refuses_in_memory_data_and_unshareable_batches_on_every_rank(tmp_path, capsys, monkeypatch, script,
                                                                                rank):
    """Checked before the process group forms, so every process exits (no hang): CIFAR-size data stays on
    one device; a global batch not divisible by the processes. Exit 2; rank 0 says it in one line, the
    others stay silent."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "stdout", sys.stdout)               # main() silences stdout on rank 1
    lst = write_list(tmp_path, [0, 0, 0, 1, 1, 2, 2])           # 7 images
    torch.manual_seed(0)
    torch.save({"script": "ldam_drw.py", "arch": "resnet10", "model": L.build_model("resnet10", 3, False).state_dict(),
                "args": {"dataset": "inat", "data_root": str(tmp_path), "train_list": str(lst), "test_list": str(lst)}},
               tmp_path / "ckpt.pt")
    cifar = ["--dataset", "cifar10", "--out", str(tmp_path / "c")]
    lists = ["--dataset", "inat", "--data-root", str(tmp_path), "--train-list", str(lst), "--test-list", str(lst)]
    if script is L:
        cases = [(cifar, "torchrun runs ldam_drw.py on file lists"),
                 (lists + ["--batch-size", "5", "--out", str(tmp_path / "a")], "--batch-size 5 (global) must be")]
    else:
        torch.save({"script": "ldam_drw.py", "arch": "resnet32", "model": L.ResNet32(10).state_dict(),
                    "args": {"dataset": "cifar10"}}, tmp_path / "cifar.pt")
        cases = [(["--ckpt", str(tmp_path / "cifar.pt"), "--out", str(tmp_path / "c")], "torchrun runs crt.py on file lists"),
                 (["--ckpt", str(tmp_path / "ckpt.pt"), "--batch-size", "5", "--out", str(tmp_path / "b")],
                  "--batch-size 5 (global) must be")]
    for flags, msg in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            script.main(["--gpu", "-1", "--workers", "0", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2
        assert err.count("error:") == (rank == 0) and (rank or msg in err and len(err.strip().splitlines()) == 1), err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_unreadable_image_under_torchrun_is_one_line_from_the_process_that_met_it(tmp_path):
    """Whichever process reads the damaged file says so (one line naming it, whatever its rank); the run
    stops without a checkpoint, not in a hang."""
    lst = write_list(tmp_path, TRAIN_LABELS)
    (tmp_path / "images" / "n00001" / "6.jpg").write_bytes(b"not a jpeg")
    r = subprocess.run(torchrun(*ldam_args(tmp_path, lst, tmp_path / "run", 1)), cwd=ROOT, env=ONE_THREAD, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "6.jpg" in lines[0] and "is not a readable image" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "run" / "last.pt").exists()
