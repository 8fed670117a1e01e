"""Rotation self-supervised pre-training (SSP) on the long-tailed training images, labels unused.

Paper 1 (Yang & Xu 2020), §4.2 "Self-Supervised Imbalanced Learning" and the "+ SSP" rows of Table 2:
abandon the labels, pre-train the network to predict which rotation (0°, 90°, 180°, 270°; Gidaris et al.
2018 → rotation_labels, rotate) each long-tailed training image got, then fine-tune with ldam_drw.py
--pretrained (the same data flags; a run's last line prints it). Recipe: REFERENCE §4 and §2.

    python rotation_ssp.py --rho 0.01 --gpu 0                     # → runs/rotation_ssp-cifar10-0.01-0/last.pt
    python ldam_drw.py --rho 0.01 --pretrained runs/rotation_ssp-cifar10-0.01-0/last.pt           # LDAM-DRW + SSP
    python rotation_ssp.py --rho 0.01 --epochs 2 --gpu -1                                # CPU smoke run

Paper numbers (CIFAR-10-LT ρ=100, top-1 test error %, lossless data, after fine-tuning from this
checkpoint): LDAM-DRW 22.97 → 22.17, CE-DRW 24.94 → 23.04, CB-CE 27.63 → 23.47. No pretext accuracy.

Deliberate differences from the paper and the authors' code (pretrain_rot.py, utils.rotation):
1. ResNet-32 with the pretext head `fc` (the authors' default ResNet-50's fixed 7×7 pool fails on 32×32).
2. Exactly balanced rotation batches, seeded by (seed, epoch) (the authors permuted B + 4 labels, dropped 4).
3. Both lr decays scale with --epochs (the authors' first upload tested epoch > 160 before > 180, so never
   reached its ×0.0001 branch; fixed in April 2021).
4. Every test image under all four rotations, per rotation and class; the last epoch is kept.
5. Data, crop/flip and rotation on the GPU (torch.rot90 on the normalised batch, as the authors).
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import datasets_lt as D
import run_lt as R

ARCH = "resnet32"
ROTATIONS = 4


# ----- flags ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Rotation self-supervised pre-training (paper 1, §4.2).")
    # --- shared flags (same names and order in every script; defaults and help are this method's) ---
    p.add_argument("--dataset", default="cifar10",
                   choices=["cifar10", "cifar100", "svhn", "folder", "imagenet_lt", "inat"])
    p.add_argument("--data-root", default="./data", help="dataset folder")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--rho", type=float, default=0.01, help="tail/head ratio in (0, 1]; 1 = balanced")
    p.add_argument("--imb-type", default="exp", choices=["exp", "step"])
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    p.add_argument("--epochs", type=int, default=None, help="default: 200 (CIFAR, SVHN), 90 (ImageNet-LT, iNat)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 (CIFAR, SVHN), 0.2 (ImageNet-LT, iNat)")
    p.add_argument("--wd", type=float, default=None, help="default: 2e-4 (CIFAR, SVHN), 5e-4 (ImageNet-LT), 1e-4 (iNat)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the data subsets (long-tailed draw, balanced/downsampled subsets, validation split); --seed varies training only")
    p.add_argument("--out", default=None, help="default: runs/<script>-<dataset>-<rho>-<seed>")
    p.add_argument("--resume", default=None,
                   help="continue the run saved in this last.pt, in its folder, with its arguments; only --gpu, "
                        "--data-root, --download (and --workers) may be given with it, any other flag is refused")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--val-frac", type=float, default=0.0,
                   help="validation split carved from the training subset; 0 = report last epoch only")
    # --- this method ---
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup", type=int, default=5, help="linear warm-up epochs")
    p.add_argument("--compile", action="store_true", help="torch.compile(mode='reduce-overhead'): CUDA graphs")
    p.add_argument("--strict-fp32", action="store_true", help="disable TF32 in cuDNN convolutions and matmuls")
    p.add_argument("--print-freq", type=int, default=0,
                   help="a progress line every N steps of an epoch; 0: at most every 10 s (none in a short epoch)")
    p.error = R.fail                                       # one line and exit 2, not the usage text
    args = p.parse_args(argv)
    args.cli_flags = R.given_flags(p, argv)
    if args.dataset in ("imagenet_lt", "inat"):
        R.fail(f"rotation_ssp.py pre-trains on CIFAR-size images; paper 1 pre-trains {args.dataset} with MoCo "
               f"(moco_ssp.py)")
    for name, default in (("epochs", 200), ("lr", 0.1), ("wd", 2e-4)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.schedule = "step"                                 # REFERENCE §2: the CIFAR schedule of ldam_drw.py
    if args.out is None:
        args.out = os.path.join("runs", f"rotation_ssp-{args.dataset}-{args.rho:g}-{args.seed}")
    R.check_ranges(args, R.SHARED_RANGES + [("warmup", 0, None, "[)")])   # every numeric flag, before any file
    if "warmup" in args.cli_flags and 0 < args.warmup >= args.epochs:
        R.fail(f"--warmup {args.warmup} must be shorter than --epochs {args.epochs}")
    return args


# ----- model ---------------------------------------------------------------------------------------

# === shared: resnet32 (identical in every script that uses it) ===
class BasicBlock(nn.Module):
    """3×3 conv → BN → ReLU → 3×3 conv → BN, plus a parameter-free shortcut (He et al.'s option A:
    subsample by 2 and zero-pad the new channels)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.extra = cout - cin

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.extra:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra // 2))
        return F.relu(out + x)


class NormedLinear(nn.Module):
    """Cosine classifier: logits are cosines between the feature and each class's weight row.

    Init as LDAM-DRW's NormedLinear (uniform(-1, 1), then every class vector rescaled to unit norm):
    the forward pass ignores the norm, but the angular step of SGD scales as 1/norm, so the ≈4.7 norm
    of a plain uniform init would turn the classifier ~20× slower at the start."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin).uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


class ResNet32(nn.Module):
    """CIFAR ResNet-32: 16-channel stem, 3 stages × 5 basic blocks (16, 32, 64), global pool, `fc`."""

    def __init__(self, num_classes, cosine=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, cin = (16, 32, 64), 16
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin if b == 0 else w, w, 2 if (i and b == 0) else 1) for b in range(5)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.fc = NormedLinear(64, num_classes) if cosine else nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))
# === end shared: resnet32 ===


# ----- the method (paper 1 §4.2: rotation pretext task; Gidaris et al. 2018) -----------------------

def rotation_labels(n, generator, device):
    """Rotation class (k: k·90°) of each of n images: a random permutation of 0, 1, 2, 3, 0, … from a random
    phase, so n/4 of each class when 4 divides n and every position uniform for any n. One rotation per image
    per epoch, as paper 1's code (Gidaris et al. batch all four): the (image, rotation) law is an independent
    uniform draw's; only the label-count noise within a batch goes."""
    phase = torch.randint(4, (1,), generator=generator, device=device)
    return (torch.randperm(n, generator=generator, device=device) + phase) % 4


def rotate(x, k):
    """Turn image i of the N×C×H×W batch `x` (H = W) by k[i]·90° counter-clockwise, as torch.rot90 in the authors'
    code and torchvision's rotate."""
    out = x
    for r in range(1, 4):
        out = torch.where((k == r).view(-1, 1, 1, 1), torch.rot90(x, r, (2, 3)), out)
    return out.contiguous()                                # rot90's transposed strides slow the convolutions


# === shared: lr_schedule (identical in every script that uses it) ===
def lr_at(epoch, args):
    """Learning rate of 0-based `epoch`: CIFAR step schedule with warm-up, or cosine (ImageNet)."""
    e = epoch + 1
    if e <= args.warmup:
        return args.lr * e / args.warmup
    if args.schedule == "cosine":
        return 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))
    if e > int(0.9 * args.epochs):
        return args.lr * 1e-4
    if e > int(0.8 * args.epochs):
        return args.lr * 1e-2
    return args.lr
# === end shared: lr_schedule ===


# ----- data ----------------------------------------------------------------------------------------

def build_data(args, device):
    """ldam_drw.py's training subset (its --subsample 1, no --balanced), labels replaced by zeros (§4.2)."""
    train_x, train_y, names = D.load_split(args.dataset, args.data_root, True, args.download)
    test_x, test_y, _ = D.load_split(args.dataset, args.data_root, False, args.download)
    for split, x in (("training", train_x), ("test", test_x)):
        if x.shape[1] != x.shape[2]:
            raise D.DataError(f"rotation needs square images, but the {split} images are {x.shape[2]}x{x.shape[1]}; "
                              f"crop or resize them to a square first")
    idx, val_idx = D.training_subset(train_y, argparse.Namespace(**vars(args), subsample=1.0, balanced=False))
    mean, std = D.mean_std(args.dataset, train_x)
    counts = np.bincount(train_y[idx], minlength=len(names)).tolist()
    train = D.GPULoader(train_x[idx], np.zeros(len(idx), dtype=np.int64), args.batch_size, mean, std, device,
                        augment="crop_flip", seed=args.seed)
    test = D.GPULoader(test_x, test_y, 1000, mean, std, device)
    val = D.GPULoader(train_x[val_idx], train_y[val_idx], 1000, mean, std, device) if len(val_idx) else None
    return train, val, test, counts, len(names)


# ----- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, train, epoch, args, device, step_model):
    """One epoch of SGD on the pretext task: (its row, the first step with a non-finite loss or -1, the last step)."""
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    g = torch.Generator(device=device).manual_seed(D.stream_seed(args.seed, epoch, 90))   # not the loader's stream
    model.train()
    loss_sum, hits = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    first_bad, seen = torch.full((), -1, device=device, dtype=torch.long), 0
    progress = R.Progress(len(train), args.print_freq)
    for step, (x, _, _) in enumerate(train.epoch(epoch)):
        k = rotation_labels(len(x), g, device)
        x = rotate(x, k)                                   # after crop/flip, as REFERENCE §4
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            logits = step_model(x).float()
        loss = F.cross_entropy(logits, k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss.detach() * len(k)
        hits += (logits.argmax(1) == k).sum()
        seen += len(k)
        progress(step, seen, lambda: loss_sum.item() / seen)
    row = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum.item() / seen, "train_rotation_acc": 100 * hits.item() / seen}
    return row, first_bad, step


@torch.no_grad()
def rotation_accuracy(model, batches, num_classes, train_counts):
    """Pretext accuracy of every image under all four rotations: overall, per rotation, per class and many /
    medium / few-shot means (class labels only sort the results). In float32, as every evaluation, --amp or not."""
    model.eval()
    device = next(model.parameters()).device
    hits = torch.zeros(ROTATIONS, num_classes, dtype=torch.long, device=device)
    total = torch.zeros(num_classes, dtype=torch.long, device=device)
    for x, y, _ in batches:
        y = y.to(x.device)
        for r in range(ROTATIONS):
            pred = model(torch.rot90(x, r, (2, 3)).contiguous()).argmax(1)
            hits[r] += torch.bincount(y[pred == r], minlength=num_classes)
        total += torch.bincount(y, minlength=num_classes)
    hits, total = hits.cpu().double(), total.cpu().double()
    per_class = (hits.sum(0) / (ROTATIONS * total.clamp(min=1))).tolist()
    result = {"top1": 100 * hits.sum().item() / (ROTATIONS * total.sum().item()),
              "per_rotation": [100 * h / total.sum().item() for h in hits.sum(1).tolist()],
              "per_class": [round(100 * a, 2) for a in per_class]}
    for group, mask in D.shot_groups(train_counts).items():
        accs = [per_class[c] for c in range(num_classes) if mask[c] and total[c] > 0]
        result[group] = 100 * float(np.mean(accs)) if accs else None
    return result


# ----- main ----------------------------------------------------------------------------------------

def resume_run(args):
    """--resume: the saved run's arguments; without it, an --out that already holds a run is refused."""
    args, ckpt = R.resume_run(args, "rotation_ssp.py", ("gpu", "data_root", "download"),   # where the run executes
                              hint="; start a new pre-training run with another --out")
    D.check_rho(args.rho)
    R.refuse_occupied(args.out, args.resume)
    return args, ckpt


def init_state(args, ckpt, device):
    """The 4-way rotation classifier (ResNet-32, linear head `fc`), SGD, and the start epoch."""
    model = ResNet32(ROTATIONS).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd,
                                fused=device.type == "cuda")
    start, _ = R.restore(ckpt, model, optimizer)
    return model, optimizer, start


def open_run(args, ckpt, device, counts, start):
    """The run folder; then the lines printed above the epoch table."""
    R.open_run(args, ckpt, device, __file__, start)
    print(f"{args.dataset} rho={args.rho:g} ({args.imb_type}): {sum(counts)} training images {counts[:3]}…"
          f"{counts[-1]}, labels unused; rotation pretext (4-way), {ARCH}, {args.epochs} epochs on {device}")
    print("train / test / val: rotation accuracy (pretext, %); test: every test image under all 4 rotations, "
          "many / med / few: its class groups")
    print(R.table_header("train", "test", "many", "med", "few", "val"))


def end_epoch(args, model, optimizer, epoch, row, val_m, t0, saved):
    """The metrics row, the printed line and last.pt."""
    test_m = row["test_rotation_pretext"]
    row.update({"val_rotation_acc": val_m["top1"] if val_m else None, "seconds": time.time() - t0})
    line = R.table_row(epoch + 1, row["lr"], row["loss"], [row["train_rotation_acc"], test_m["top1"], test_m["many"],
                       test_m["medium"], test_m["few"], row["val_rotation_acc"]], row["seconds"])
    state = {**saved, "model": model.state_dict(), "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
             "args": vars(args), "best": None, "rng": {"torch": torch.get_rng_state()}}
    R.end_epoch(args.out, row, line, state)


def finish_run(args, counts, test_m, t_run):
    """final.json (the last epoch's pretext accuracy, the fine-tuning command) and the last printed lines."""
    last = (R.read_metrics(os.path.join(args.out, "metrics.jsonl")) or [{"val_rotation_acc": None, "loss": None}])[-1]
    finetune = (f"python ldam_drw.py --dataset {args.dataset} --data-root {args.data_root} --rho {args.rho:g} "
                f"--imb-type {args.imb_type} --seed {args.seed} --data-seed {args.data_seed}"
                + (f" --val-frac {args.val_frac:g}" if args.val_frac else "")
                + f" --pretrained {os.path.join(args.out, 'last.pt')}")
    R.finish_run(args.out, {
        "script": "rotation_ssp.py", "arch": ARCH, "dataset": args.dataset, "rho": args.rho, "imb_type": args.imb_type,
        "seed": args.seed, "data_seed": args.data_seed, "epochs": args.epochs, "class_counts": counts,
        "rotation_accuracy_pretext": test_m, "val_rotation_accuracy_pretext": last["val_rotation_acc"],
        "final_loss": last["loss"], "checkpoint": os.path.join(args.out, "last.pt"), "finetune": finetune}, t_run)
    per_rot = ", ".join(f"{90 * r}° {a:.1f}" for r, a in enumerate(test_m["per_rotation"]))
    print(f"last epoch: rotation accuracy (pretext) on the test images, each under all 4 rotations: "
          f"{test_m['top1']:.2f}% ({per_rot}; chance 25%)")
    print(f"fine-tune from it: {finetune}")


def main(argv=None):
    args = parse_args(argv)
    try:
        args, ckpt = resume_run(args)
        device = R.setup_device(args)
        torch.manual_seed(args.seed)
        train, val, test, counts, C = build_data(args, device)
    except D.DataError as e:
        R.fail(str(e))
    score = lambda m, batches: rotation_accuracy(m, batches.epoch(0), C, counts)
    model, optimizer, start = init_state(args, ckpt, device)
    # one static CUDA graph for the full batches and one for the short last batch, reused every epoch
    step_model = torch.compile(model, mode="reduce-overhead", dynamic=False) if args.compile else model
    saved = {"script": "rotation_ssp.py", "arch": ARCH, "class_counts": counts, "mean": test.mean, "std": test.std}
    open_run(args, ckpt, device, counts, start)

    t_run = time.time()
    for epoch in range(start, args.epochs):
        t0 = time.time()
        row, first_bad, step = train_one_epoch(model, optimizer, train, epoch, args, device, step_model)
        R.stop_if_diverged(args.out, [model], epoch, first_bad, step + 1)
        row["test_rotation_pretext"] = score(model, test)
        val_m = score(model, val) if val else None
        end_epoch(args, model, optimizer, epoch, row, val_m, t0, saved)
    test_m = score(model, test) if start >= args.epochs else row["test_rotation_pretext"]
    finish_run(args, counts, test_m, t_run)


if __name__ == "__main__":
    main()
