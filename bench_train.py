"""Benchmark: seconds per epoch of ldam_drw.py and simsiam_rwsam.py as a user runs them, beside a plain
torchvision DataLoader + PIL loop of the same model and recipe, and rwSAM's KDE at ImageNet-LT size.

    python bench_train.py --gpu 0 --data-root .data/cifar10_jpg    # CIFAR-10-LT rho 0.01 from the JPEG copy
    python bench_train.py --gpu -1 --tiny                          # CPU, fake images, tiny sizes (a few seconds)

Each script run is a process of its own (its log and run folder in --out) training --epochs epochs; its figure
is the median of the seconds it logs per epoch, the first epoch of a stage left out (warm-up: cuDNN's autotune,
torch.compile, rwSAM's KDE).
  ldam_drw.py       LDAM-DRW, ResNet-32, batch 128: eager, --amp, --compile; each epoch's test evaluation included
  simsiam_rwsam.py  batch 512, --knn-every -1 (training only): --opt sgd (SimSiam), and rwSAM's stage 2 after a
                    1-epoch stage 1
  baselines         the script's own model, loss and optimiser step, fed by a DataLoader of PIL transforms
                    (RandomCrop(32, 4) + flip; SimSiam: bench_pipeline.py's two views) with --workers processes,
                    as the authors' code feeds them; the same training images
  KDE               simsiam_rwsam.kde_weights on random unit features of 115,846 x 2048 (ImageNet-LT, ResNet-50
                    features): seconds and peak memory (CUDA: max_memory_allocated; CPU: the growth of max RSS)
Prints one table and writes <out>/bench.json; a run that fails is reported with its log and the others go on
(exit 1 at the end). This file imports the scripts it measures; the scripts share nothing with it.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

import datasets_lt as D
import ldam_drw as L
import run_lt as R
import simsiam_rwsam as S

TINY = dict(images=(8, 2), rho=0.25, epochs=2, batch=(16, 16), kde=(2000, 64), workers=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    p.add_argument("--data-root", default=None, help="folder dataset (train/<class>/, test/<class>/); default: "
                                                     "fake random images written to --out")
    p.add_argument("--rho", type=float, default=0.01, help="tail/head ratio of the training set")
    p.add_argument("--epochs", type=int, default=5, help="epochs each run trains (each stage: its first is warm-up)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the baselines (the authors': 4)")
    p.add_argument("--kde-size", type=int, nargs=2, default=(115_846, 2048), metavar=("N", "DIM"))
    p.add_argument("--tiny", action="store_true", help=f"CPU-sized: {TINY}")
    p.add_argument("--out", default="runs/bench", help="logs, run folders, bench.json")
    args = p.parse_args(argv)
    args.batch = (128, 512)
    if args.tiny:
        args.rho, args.epochs, args.batch, args.kde_size, args.workers = (TINY[k] for k in
                                                                          ("rho", "epochs", "batch", "kde", "workers"))
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is warm-up)")
    return args


def fake_folder(root, per_class, classes=10):
    """root/{train,test}/<class>/*.png of random pixels: what --data-root points to when none is given."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            os.makedirs(f"{root}/{split}/c{c}", exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"{root}/{split}/c{c}/{i}.png")
    return root


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- the scripts, as a user runs them ------------------------------------------------------------

def script_seconds(args, name, script, *flags):
    """(median seconds per epoch of the run's last stage, its first epoch left out; None) or (None, its log)."""
    out, log = os.path.join(args.out, name), os.path.join(args.out, name + ".log")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, script, "--dataset", "folder", "--data-root", args.data_root, "--rho", str(args.rho),
           "--gpu", str(args.gpu), "--epochs", str(args.epochs), "--out", out, *map(str, flags)]
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        print(f"error: {name} exited {code}; see {log}", file=sys.stderr)
        return None, log
    rows = R.read_metrics(os.path.join(out, "metrics.jsonl"))
    last = [r["seconds"] for r in rows if r.get("opt") == rows[-1].get("opt")]       # simsiam_rwsam: its stage
    return statistics.median(last[1:]), None


# ----- the baselines: DataLoader + PIL ---------------------------------------------------------------

class PILImages(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform, views=1):
        self.images, self.labels, self.transform, self.views = images, labels, transform, views

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        views = [self.transform(img) for _ in range(self.views)]
        return (views[0] if self.views == 1 else views), int(self.labels[i])


def loader(args, dataset, batch, device, train=True):
    return torch.utils.data.DataLoader(dataset, batch, shuffle=train, drop_last=False, num_workers=args.workers,
                                       pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)


def timed_epochs(args, device, epoch_fn):
    seconds = []
    for epoch in range(args.epochs):
        t = time.perf_counter()
        epoch_fn(epoch)
        sync(device)
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds[1:])


def ldam_baseline(args, device, data):
    """LDAM-DRW as ldam_drw.py runs it (ResNet-32, cosine classifier, SGD, DRW at 80 %), data by DataLoader + PIL."""
    (train_x, train_y), (test_x, test_y), mean, std, counts = data
    la = L.parse_args(["--epochs", str(args.epochs), "--batch-size", str(args.batch[0])])
    norm = T.Normalize(mean, std)
    train = loader(args, PILImages(train_x, train_y, T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                                                T.ToTensor(), norm])), la.batch_size, device)
    test = loader(args, PILImages(test_x, test_y, T.Compose([T.ToTensor(), norm])), 1000, device, train=False)
    model = L.build_model("resnet32", len(counts), cosine=True).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=la.lr, momentum=la.momentum, weight_decay=la.wd,
                                fused=device.type == "cuda")
    cb, margins = L.class_balanced_weights(counts, la.beta).to(device), L.ldam_margins(counts, la.max_m).to(device)

    def epoch_fn(epoch):
        for group in optimizer.param_groups:
            group["lr"] = L.lr_at(epoch, la)
        weight = L.deferred_rule("drw", epoch, la.epochs, cb)[0]
        model.train()
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = L.ldam_loss(model(x), y, weight, margins, la.s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            [model(x.to(device, non_blocking=True)).argmax(1).cpu() for x, _ in test]
    return timed_epochs(args, device, epoch_fn), None


def simsiam_baseline(args, device, data):
    """SimSiam as simsiam_rwsam.py runs it (CIFAR ResNet-18, its train_step with --opt sgd), two PIL views."""
    (train_x, train_y), _, mean, std, _ = data
    sa = S.parse_args(["--batch-size", str(args.batch[1]), "--epochs", str(args.epochs)])
    views = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                       T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                       T.ToTensor(), T.Normalize(mean, std)])
    train = loader(args, PILImages(train_x, train_y, views, views=2), sa.batch_size, device)
    model = S.build_simsiam("resnet18").to(device)
    optimizer = S.make_optimizer(model, sa, device)

    def epoch_fn(epoch):
        for group in optimizer.param_groups:
            group["lr"] = sa.lr if group.get("fix_lr") else S.lr_at(epoch, sa.epochs, sa.lr)
        model.train()
        for (x1, x2), _ in train:
            S.train_step(model, optimizer, x1.to(device, non_blocking=True), x2.to(device, non_blocking=True), "sgd")
    return timed_epochs(args, device, epoch_fn), None


def kde_figures(args, device):
    n, dim = args.kde_size
    feats = torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    feats = feats.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sync(device)
    t = time.perf_counter()
    S.kde_weights(feats, 1.2)
    sync(device)
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024 + feats.numel() * 4)
    return seconds, peak / 2 ** 30


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(f"cuda:{args.gpu}" if args.gpu >= 0 and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.gpu = args.gpu if device.type == "cuda" else -1
    os.makedirs(args.out, exist_ok=True)
    if args.data_root is None:
        args.data_root = fake_folder(os.path.join(args.out, "fake-data"), TINY["images"] if args.tiny else (500, 100))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}   torch {torch.__version__}   data: {args.data_root}, rho {args.rho:g}   "
          f"{args.epochs} epochs a run   baselines: DataLoader + PIL, {args.workers} workers")

    try:
        train_x, train_y, names = D.load_split("folder", args.data_root, True)
        test = D.load_split("folder", args.data_root, False)[:2]
        idx, _ = D.training_subset(train_y, L.parse_args(["--dataset", "folder", "--rho", str(args.rho)]))
    except D.DataError as e:
        R.fail(str(e))
    mean, std = D.mean_std("folder", train_x)
    data = ((train_x[idx], train_y[idx]), test, mean, std, np.bincount(train_y[idx], minlength=len(names)).tolist())
    ldam, ssl = (["--batch-size", b] for b in args.batch)
    script = lambda name, *flags: lambda: script_seconds(args, name, *flags)
    runs = [("ldam-eager", "ldam_drw.py LDAM-DRW", 0, script("ldam-eager", "ldam_drw.py", *ldam)),
            ("ldam-amp", "  --amp", 0, script("ldam-amp", "ldam_drw.py", *ldam, "--amp")),
            ("ldam-compile", "  --compile", 0, script("ldam-compile", "ldam_drw.py", *ldam, "--compile")),
            ("ldam-pil", "  DataLoader + PIL", 0, lambda: ldam_baseline(args, device, data)),
            ("simsiam", "simsiam_rwsam.py SimSiam", 1, script("simsiam", "simsiam_rwsam.py", *ssl, "--opt", "sgd",
                                                              "--knn-every", -1)),
            ("rwsam", "  rwSAM (stage 2)", 1, script("rwsam", "simsiam_rwsam.py", *ssl, "--stage1-epochs", 1,
                                                     "--knn-every", -1)),
            ("simsiam-pil", "  DataLoader + PIL", 1, lambda: simsiam_baseline(args, device, data))]
    rows = [(key, label, args.batch[b], *measure()) for key, label, b, measure in runs]
    kde_s, kde_gib = kde_figures(args, device)

    print(f"{'run':<26} {'batch':>5} {'s/epoch':>8}")
    for _, label, batch, sec, log in rows:
        print(f"{label:<26} {batch:>5} " + (f"{sec:>8.3f}" if log is None else f"{'failed':>8}  {log}"))
    print(f"KDE {args.kde_size[0]:,} x {args.kde_size[1]} (float64): {kde_s:.2f} s, peak {kde_gib:.2f} GiB")
    print("s/epoch: " + ", ".join(f"{key} " + ("failed" if log else f"{sec:.3f}") for key, _, _, sec, log in rows)
          + f"; KDE {kde_s:.2f} s, {kde_gib:.2f} GiB")
    result = {"device": name, "torch": torch.__version__, "epochs": args.epochs, "rho": args.rho,
              "runs": {key: {"batch": batch, "seconds_per_epoch": sec, "log": log} for key, _, batch, sec, log in rows},
              "kde": {"n": args.kde_size[0], "dim": args.kde_size[1], "seconds": kde_s, "peak_gib": kde_gib}}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    sys.exit(1 if any(log for *_, log in rows) else 0)


if __name__ == "__main__":
    main()
