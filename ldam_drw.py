"""Supervised long-tailed training: CE / Focal / LDAM × None / Reweight / Resample / DRW / DRS.

Paper 1 (Yang & Xu 2020) §4.2 and Table 2, whose baselines are LDAM-DRW (Cao et al. 2019) and the class-balanced
losses (Cui et al. 2019): every row of Table 2 without SSP is one `--loss` × `--rule`; "+SSP" is `--pretrained`
with a self-supervised checkpoint. Paper 2's supervised pre-training (App. A.1) is `--recipe he`. README
"Supervised long-tail baselines" has the recipes and the DDP commands.

    python ldam_drw.py --rho 0.01 --gpu 0                          # Table 2 LDAM-DRW, CIFAR-10-LT ρ=100
    python ldam_drw.py --rho 0.01 --loss ce --rule none            # CE;  --rule reweight: CB-CE
    python ldam_drw.py --rho 0.01 --pretrained runs/rotation_ssp-cifar10-0.01-0/last.pt   # + SSP
    python ldam_drw.py --dataset imagenet_lt --data-root IMNET --train-list ImageNet_LT_train.txt \\
        --test-list ImageNet_LT_test.txt --arch resnet10                                # 90 epochs, cosine
    torchrun --nproc_per_node 4 ldam_drw.py --dataset inat ...     # Table 4 on 4 GPUs × 25 images
    python ldam_drw.py --recipe he --rho 0.01 [--balanced | --subsample 0.25]   # paper 2: SL pre-training
    python ldam_drw.py --rho 0.01 --epochs 2 --gpu -1              # CPU smoke run

The defaults are REFERENCE §2's recipe: ResNet-32, SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128, 200 epochs,
5 warm-up epochs, lr ×0.01 at 80% and 90%, crop 32 (pad 4) + flip; LDAM: largest margin 0.5, s = 30, cosine
classifier. Paper numbers (CIFAR-10-LT ρ=100, top-1 error, lossless data, best epoch): CE 29.64, CB-CE 27.63,
Focal 29.62, CE-DRW 24.94, LDAM-DRW 22.97. On the JPEG copy the authors' code gives CE 34.6, LDAM-DRW 29.3.

Deliberate differences from the paper and the authors' code:
1. The deferred switch (DRW, DRS) and the lr decays scale with --epochs (80% / 90%), not epochs 160/180.
2. DRS is implemented: plain sampling until the switch, class-balanced sampling after it.
3. The report is the last epoch (and the best on a --val-frac split); the authors picked on the test set.
4. The focal term (1 − p) is clamped at 0, so γ < 1 stays finite.
5. Data and crop/flip live on the GPU (datasets_lt.GPULoader); the distribution is torchvision's.
6. --pretrained fails unless every backbone tensor was found (the authors' loader loaded nothing).
7. ImageNet-LT / iNat as paper 1's released configs: 90 epochs, lr 0.2, --lr-sequence kang, batch 128 (iNat 100).
8. Resample / DRS draw with the authors' effective-number weights (--resample-weights inverse: 1/n_c).
9. --recipe he trains 200 epochs on CIFAR (the paper gives none); --subsample keeps the iterations equal.
   ImageNet-LT: the paper's 90 epochs, step decay (the released feat_uniform.yaml: 200, cosine), its lr 0.2 at 128.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import datasets_lt as D
import run_lt as R


# ----- flags ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Supervised long-tailed training (paper 1, Table 2).")
    # --- shared flags (same names and order in every script; defaults and help are this method's) ---
    p.add_argument("--dataset", default="cifar10",
                   choices=["cifar10", "cifar100", "svhn", "folder", "imagenet_lt", "inat"])
    p.add_argument("--data-root", default="./data", help="dataset folder")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--rho", type=float, default=0.01, help="tail/head ratio in (0, 1]; 1 = balanced")
    p.add_argument("--imb-type", default="exp", choices=["exp", "step"])
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    p.add_argument("--epochs", type=int, default=None, help="default: 200 (CIFAR, SVHN), 90 (ImageNet-LT, iNat)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 (iNat: 100, as released)")
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
    p.add_argument("--loss", default=None, choices=["ce", "focal", "ldam"], help="default: ldam; ce with --recipe he")
    p.add_argument("--rule", default=None, choices=["none", "reweight", "resample", "drw", "drs"],
                   help="default: drw; none with --recipe he")
    p.add_argument("--pretrained", default=None, help="backbone checkpoint to fine-tune from (+SSP)")
    p.add_argument("--arch", default=None, choices=["resnet32", "resnet18", "resnet10", "resnet50"],
                   help="default: resnet32 (CIFAR, SVHN, folder), resnet10 (ImageNet-LT), resnet50 (iNat); "
                        "resnet18 = CIFAR ResNet-18 of simsiam_rwsam.py / moco_ssp.py")
    p.add_argument("--train-list", default=None, help="ImageNet-LT / iNat: 'relative/path label' list")
    p.add_argument("--test-list", default=None, help="ImageNet-LT / iNat: test list")
    p.add_argument("--val-list", default=None,
                   help="ImageNet-LT / iNat: official validation list (ImageNet_LT_val.txt) for model selection")
    p.add_argument("--lr-sequence", default=None, choices=["kang", "plain"],
                   help="cosine: kang steps it before each epoch as Kang et al.'s run_networks.py (epoch e of E, "
                        "1-based, at lr·(1+cos(π e/E))/2); plain starts at lr. Default: kang on ImageNet-LT / iNat")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers (ImageNet-LT / iNat only)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up epochs; default 5 (CIFAR), 0 (ImageNet, --recipe he)")
    p.add_argument("--beta", type=float, default=0.9999, help="class-balanced weights: effective-number β")
    p.add_argument("--resample-weights", default="effective", choices=["effective", "inverse"],
                   help="Resample / DRS draw weights: effective = (1-β)/(1-β^n_c) as the authors' "
                        "ImbalancedDatasetSampler; inverse = 1/n_c (every class equally likely)")
    p.add_argument("--gamma", type=float, default=1.0, help="focal loss γ")
    p.add_argument("--max-m", type=float, default=0.5, help="LDAM: largest margin")
    p.add_argument("--s", type=float, default=30.0, help="LDAM: logit scale")
    p.add_argument("--recipe", default="ldam", choices=["ldam", "he"],
                   help="ldam: paper 1's CIFAR recipe (Cao et al.); he: paper 2's supervised pre-training (He et al. "
                        "2016): CE, no re-balancing, wd 5e-4, no warm-up; CIFAR resnet18, lr ÷10 at 50%% and 75%%; "
                        "ImageNet-LT resnet50, 90 epochs, lr 0.2 ÷10 every 30")
    p.add_argument("--balanced", action="store_true",
                   help="class-balanced subset with the same number of images as the long-tailed one (paper 2)")
    p.add_argument("--subsample", type=float, default=1.0, choices=(1.0, *D.SIZE_SWEEP),
                   help="keep this fraction of every class (paper 2's size sweep); --epochs is then the full-size "
                        "variant's budget and round(epochs / subsample) epochs are trained")
    p.add_argument("--no-flip", action="store_true",
                   help="no horizontal flip (CIFAR-size data): paper 2's semi-synthetic images (§3.2), halves apart")
    p.add_argument("--same-epochs", action="store_true",
                   help="with --subsample < 1: train --epochs epochs, not round(epochs / subsample)")
    p.add_argument("--compile", action="store_true", help="torch.compile(mode='reduce-overhead'): CUDA graphs")
    p.add_argument("--strict-fp32", action="store_true", help="disable TF32 in cuDNN convolutions and matmuls")
    p.add_argument("--print-freq", type=int, default=0,
                   help="a progress line every N steps of an epoch; 0: at most every 10 s (none in a short epoch)")
    p.error = R.fail                                       # one line and exit 2, not the usage text
    args = p.parse_args(argv)
    args.cli_flags = R.given_flags(p, argv)
    large = args.dataset in ("imagenet_lt", "inat")
    he = args.recipe == "he"                               # paper 2's supervised pre-training (§2.2, App. A)
    if he and args.dataset == "inat":
        R.fail("--recipe he is paper 2's supervised pre-training of CIFAR and ImageNet-LT; paper 2 has no iNaturalist")
    if he and (ignored := [f"--{k.replace('_', '-')}" for k in ("warmup", "lr_sequence") if k in args.cli_flags]):
        R.fail(f"--recipe he steps the lr as He et al. (no warm-up, no lr sequence): drop {' '.join(ignored)}")
    for name, cifar, imagenet in (("epochs", 200, 90), ("lr", 0.1, 0.2),
                                  ("batch_size", 128, 100 if args.dataset == "inat" else 128),
                                  ("wd", 5e-4 if he else 2e-4, 1e-4 if args.dataset == "inat" else 5e-4),
                                  ("warmup", 0 if he else 5, 0), ("lr_sequence", "plain", "plain" if he else "kang"),
                                  ("loss", *["ce" if he else "ldam"] * 2), ("rule", *["none" if he else "drw"] * 2),
                                  ("arch", "resnet18" if he else "resnet32",
                                   "resnet10" if args.dataset == "imagenet_lt" and not he else "resnet50")):
        if getattr(args, name) is None:
            setattr(args, name, imagenet if large else cifar)
    args.schedule = "he" if he else "cosine" if large else "step"
    args.epochs_full = args.epochs
    if args.subsample < 1 and not args.same_epochs:       # paper 2 App. A.1: the full variant's iterations
        args.epochs = round(args.epochs / args.subsample)
    if args.out is None:
        tags = (["he"] if args.recipe == "he" else []) + (["balanced"] if args.balanced else []) + \
               ([f"sub{args.subsample:g}"] if args.subsample < 1 else [])
        args.out = os.path.join("runs", "-".join(["ldam_drw", args.dataset, f"{args.rho:g}", str(args.seed), *tags]))
    # the range of every numeric flag, before anything is read or written
    R.check_ranges(args, R.SHARED_RANGES + [("warmup", 0, None, "[)"), ("beta", 0, 1, "[)"), ("gamma", 0, None, "[)"),
                                            ("max_m", 0, None, "[)"), ("s", 0, None, "()")])
    if "warmup" in args.cli_flags and 0 < args.warmup >= args.epochs:
        R.fail(f"--warmup {args.warmup} must be shorter than --epochs {args.epochs}")
    return args


RESUME_FLAGS = ("gpu", "workers", "data_root", "download")     # where the run executes: these may go with --resume


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


# === shared: resnet18 (identical in every script that uses it) ===
class ResBlock(nn.Module):
    """Basic block of the CIFAR ResNet-18: two 3×3 convs with BN, and a 1×1 conv + BN shortcut where
    the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (REFERENCE §6): 3×3 stride-1 stem, no max-pool, stages of two blocks with 64,
    128, 256 and 512 channels, global pool, 512-d feature, classifier `fc`."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (w, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            setattr(self, f"layer{i + 1}", nn.Sequential(ResBlock(cin, w, stride), ResBlock(w, w, 1)))
            cin = w
        self.fc = nn.Linear(512, num_classes)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))
# === end shared: resnet18 ===


def build_model(arch, num_classes, cosine):
    if arch == "resnet32":
        return ResNet32(num_classes, cosine)
    if arch == "resnet18":                                # CIFAR ResNet-18: fine-tuning SimSiam / MoCo
        model = ResNet18(num_classes)
    else:
        block, layers = ((torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]) if arch == "resnet10" else
                         (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]))
        model = torchvision.models.resnet.ResNet(block, layers, num_classes=num_classes)
    if cosine:
        model.fc = NormedLinear(model.fc.in_features, num_classes)
    return model


# ----- the method (REFERENCE §2; Cao et al. 2019 Eq. (10), (13), §3.3; Cui et al. 2019 Eq. (3)) ----

# === shared: class_balance (identical in every script that uses it) ===
def class_balanced_weights(counts, beta):
    """Cui et al. 2019, Eq. (3): w_c ∝ (1 − β) / (1 − β^{n_c}), normalised to sum to C."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta ** n)
    return (w / w.sum() * len(n)).float()


def ldam_margins(counts, max_m):
    """Cao et al. 2019, Eq. (13): Δ_c = C / n_c^{1/4}, C chosen so the largest margin is max_m."""
    m = torch.as_tensor(counts, dtype=torch.float64) ** -0.25
    return (m * (max_m / m.max())).float()
# === end shared: class_balance ===


# === shared: losses (identical in ldam_drw.py and self_training.py) ===
def ce_loss(logits, y, weight, c=None):
    """(Weighted) mean cross-entropy Σ c_i w_{y_i} CE_i / Σ c_i w_{y_i}, w per class, c per example
    (self_training.py's ω for D_U); c = None is nn.CrossEntropyLoss(weight)."""
    if c is None:
        return F.cross_entropy(logits, y, weight=weight)
    ce = F.cross_entropy(logits, y, reduction="none")
    w = c if weight is None else c * weight[y]
    return (w * ce).sum() / w.sum()


def focal_loss(logits, y, weight, gamma, c=None):
    """Lin et al. 2017 as in the LDAM-DRW code: the batch mean of c_i (1 − p)^γ · w_y·CE, p = e^{−w_y·CE}.
    The clamp: a CE rounded to just below 0 gives 0, not NaN, for γ < 1."""
    ce = F.cross_entropy(logits, y, weight=weight, reduction="none")
    term = (1 - torch.exp(-ce)).clamp(min=0) ** gamma * ce
    return (term if c is None else c * term).mean()


def ldam_loss(cosines, y, weight, margins, s, c=None):
    """Cao et al. 2019, Eq. (10): subtract Δ_y from the true-class cosine, scale all by s, weight as ce_loss."""
    logits = s * (cosines - F.one_hot(y, cosines.shape[1]) * margins[y].unsqueeze(1))
    if c is None:
        return F.cross_entropy(logits, y, weight=weight)
    ce = F.cross_entropy(logits, y, reduction="none")
    w = c if weight is None else c * weight[y]
    return (w * ce).sum() / w.sum()
# === end shared: losses ===


def shard_loss(logits, y, y_batch, weight, margins, args):
    """torchrun: this process's share of the loss of the global batch `y_batch`: its rows' terms of ce_loss /
    focal_loss / ldam_loss over the global batch's divisor (its size, or its Σ w_y as nn.CrossEntropyLoss(weight))."""
    if args.loss == "ldam":
        logits = args.s * (logits - F.one_hot(y, logits.shape[1]) * margins[y].unsqueeze(1))
    terms = F.cross_entropy(logits, y, weight=weight, reduction="none")       # w_y · CE per image
    if args.loss == "focal":
        return ((1 - torch.exp(-terms)).clamp(min=0) ** args.gamma * terms).sum() / len(y_batch)   # focal_loss's term
    return terms.sum() / (weight[y_batch].sum() if weight is not None else len(y_batch))


# === shared: deferred_rule (identical in ldam_drw.py and self_training.py) ===
def deferred_rule(rule, epoch, epochs, cb_weights):
    """The training rule at 0-based `epoch` of `epochs`: (loss weights or None, class-balanced sampling?).
    reweight / resample apply throughout; DRW / DRS (Cao et al. 2019, §3.3) train plainly until epoch
    int(0.8·epochs), then re-weight with `cb_weights` (DRW) or re-sample (DRS); none never does either."""
    deferred = epoch >= int(0.8 * epochs)
    weight = cb_weights if rule == "reweight" or (rule == "drw" and deferred) else None
    resample = rule == "resample" or (rule == "drs" and deferred)
    return weight, resample
# === end shared: deferred_rule ===


def class_weights(args, counts, labels, device):
    """The rules' weights: class-balanced loss weights (Reweight, DRW), LDAM margins, draw weights (Resample, DRS)."""
    cb_weights = class_balanced_weights(counts, args.beta).to(device)
    margins = ldam_margins(counts, args.max_m).to(device)
    sample_weights = (D.effective_number_sample_weights(labels.cpu(), args.beta)
                      if args.resample_weights == "effective" else D.balanced_sample_weights(labels.cpu()))
    return cb_weights, margins, sample_weights


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


def he_lr_at(epoch, args):
    """He et al. 2016 §4.2 (CIFAR): ÷10 at 32k and 48k of 64k iterations, here at 50% and 75% of --epochs (0-based
    epoch; paper 2 gives no length: 200 epochs as paper 1, 64k iterations of 128 are 660 epochs of 12,406 images).
    ImageNet-LT (§3.4, paper 2 App. A: 90 epochs, step decay): ÷10 every 30 epochs, at 1/3 and 2/3 of --epochs."""
    large = args.dataset == "imagenet_lt"
    steps = [args.epochs // 3, 2 * args.epochs // 3] if large else [int(f * args.epochs) for f in (0.5, 0.75)]
    return args.lr * 0.1 ** sum(epoch >= s for s in steps)


# ----- data ----------------------------------------------------------------------------------------

def build_data(args, device, rank=0, world=1):
    """Training / validation / test batches and the training class counts."""
    if args.dataset in ("imagenet_lt", "inat"):
        return build_list_data(args, device, rank, world)
    train_x, train_y, names = D.load_split(args.dataset, args.data_root, True, args.download)
    test_x, test_y, _ = D.load_split(args.dataset, args.data_root, False, args.download)
    idx, val_idx = D.training_subset(train_y, args)
    mean, std = D.mean_std(args.dataset, train_x)
    counts = np.bincount(train_y[idx], minlength=len(names)).tolist()
    train = D.GPULoader(train_x[idx], train_y[idx], args.batch_size, mean, std, device, "crop_flip", seed=args.seed,
                        flip=not args.no_flip)
    test = D.GPULoader(test_x, test_y, 1000, mean, std, device)
    val = D.GPULoader(train_x[val_idx], train_y[val_idx], 1000, mean, std, device) if len(val_idx) else None
    train.indices, train.val_indices = idx, val_idx       # <out>/train_indices.json; digest: self_training.py --base
    return train, val, test, counts, len(names)


def build_list_data(args, device, rank=0, world=1):
    """Training / validation / test batches of a file list; under torchrun this process's shares."""
    if not args.train_list or not args.test_list:
        R.fail(f"--dataset {args.dataset} needs --train-list and --test-list ('relative/path label' files)")
    if args.balanced or args.subsample < 1:
        R.fail(f"--balanced and --subsample draw CIFAR-size subsets; for {args.dataset} pass a variant list as "
               f"--train-list (python datasets_lt.py --train-list ... writes paper 2's ImageNet variants)")
    if args.val_list and args.val_frac:
        R.fail("--val-list and --val-frac both choose a validation set; pass one")
    tf = lambda train: D.imagenet_transform(train, dataset=args.dataset)     # iNat: own mean/std, no jitter
    train_ds = D.FileListDataset(args.data_root, args.train_list, transform=tf(True))
    test_ds = D.FileListDataset(args.data_root, args.test_list, transform=tf(False))
    C = max(train_ds.num_classes, test_ds.num_classes)
    idx, val_idx = D.carve_val(np.arange(len(train_ds)), train_ds.labels, args.val_frac, args.data_seed)
    counts = np.bincount(train_ds.labels[idx], minlength=C).tolist()
    R.check_shards(args.batch_size, world)
    train = (D.ShardedListBatches(train_ds, idx, args.batch_size, args.seed, args.workers, device, rank, world)
             if world > 1 else D.ListBatches(train_ds, idx, args.batch_size, True, args.seed, args.workers, device))
    plain = lambda ds, indices: D.eval_shard(ds, indices, args.seed, args.workers, device, rank, world)  # world 1: all
    test = plain(test_ds, np.arange(len(test_ds)))
    val = None
    if args.val_list or len(val_idx):                      # Kang et al. select on the official val list
        val_ds = D.FileListDataset(args.data_root, args.val_list or args.train_list, transform=tf(False))
        val = plain(val_ds, np.arange(len(val_ds)) if args.val_list else val_idx)
    return train, val, test, counts, C


# ----- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, train, epoch, args, weights, world, step_model):
    """One epoch of SGD under the epoch's rule: (row: lr, loss, train top-1; first non-finite step or -1; last step)."""
    cb_weights, margins, sample_weights = weights
    device = cb_weights.device
    lr = he_lr_at(epoch, args) if args.schedule == "he" else lr_at(epoch + (args.lr_sequence == "kang"), args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    weight, resample = deferred_rule(args.rule, epoch, args.epochs, cb_weights)   # DRW / DRS: at 80% of the run
    model.train()
    loss_sum, hits = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    first_bad, seen = torch.full((), -1, device=device, dtype=torch.long), 0
    progress = R.Progress(len(train), args.print_freq)
    for step, (x, y, _, *y_batch) in enumerate(train.epoch(epoch, sample_weights if resample else None)):
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            logits = step_model(x).float()
        if world > 1:                                      # this process's share; summed with all_reduce_grads
            y_batch = y_batch[0].to(device)
            loss = shard_loss(logits, y, y_batch, weight, margins, args)
        elif args.loss == "ce":
            loss = ce_loss(logits, y, weight)
        elif args.loss == "focal":
            loss = focal_loss(logits, y, weight, args.gamma)
        else:
            loss = ldam_loss(logits, y, weight, margins, args.s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            R.all_reduce_grads(list(model.parameters()))
        optimizer.step()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        n_batch = len(y_batch) if world > 1 else len(y)
        loss_sum += loss.detach() * n_batch
        hits += (logits.argmax(1) == y).sum()
        seen += n_batch
        progress(step, seen, lambda: loss_sum.item() / seen * world)          # torchrun: rank 0's share × world
    if world > 1:
        stats = torch.stack([loss_sum.double(), hits.double()])
        dist.all_reduce(stats)                             # the shares sum to the global batches' losses
        loss_sum, hits = stats[0], stats[1].long()
        if device.type != "cuda":
            R.average_bn_statistics(model, world)
    row = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum.item() / seen, "train_top1": 100 * hits.item() / seen}
    return row, first_bad, step


# ----- main ----------------------------------------------------------------------------------------

def init_state(args, ckpt, C, device, world=1):
    """The model, SGD, and (start epoch, best) from the --resume checkpoint."""
    model = build_model(args.arch, C, cosine=args.loss == "ldam")
    if world > 1 and device.type == "cuda":                # BN statistics over the global batch, as one GPU
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if args.pretrained and not args.resume:
        R.load_backbone(model, args.arch, args.pretrained)
        print(f"classifier re-initialised ({'cosine' if args.loss == 'ldam' else 'linear'}, {C} classes)")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd,
                                fused=device.type == "cuda")
    start, best = R.restore(ckpt, model, optimizer)
    if world > 1:
        R.broadcast_state(model)
    return model, optimizer, start, best


def end_epoch(args, out, model, optimizer, epoch, row, val_m, best, t0, saved, rank=0):
    """The best epoch on validation, then the metrics row, the printed line and last.pt."""
    test_m = row["test"]
    if val_m and (best is None or val_m["top1"] > best["val_top1"]):
        best = {"epoch": epoch + 1, "val_top1": val_m["top1"], "test": test_m}
    row.update({"val_top1": val_m["top1"] if val_m else None, "seconds": time.time() - t0})
    line = R.table_row(epoch + 1, row["lr"], row["loss"], [row["train_top1"], test_m["top1"], test_m["many"],
                       test_m["medium"], test_m["few"], row["val_top1"]], row["seconds"])
    state = {**saved, "model": model.state_dict(), "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
             "args": vars(args), "best": best, "rng": {"torch": torch.get_rng_state()}}
    R.end_epoch(out, row, line, state, rank)
    return best


def resume_run(args, world=1):
    """--resume: the saved run's arguments; without it, an --out that already holds a run is refused."""
    old = {"resample_weights": "inverse", "lr_sequence": "plain", "val_list": None, "balanced": False,
           "subsample": 1.0, "recipe": "ldam", "same_epochs": False}               # of runs saved before these flags
    args, ckpt = R.resume_run(args, "ldam_drw.py", RESUME_FLAGS, old, "; use --pretrained to start from its backbone")
    args.world_size = world
    D.check_rho(args.rho)
    if world > 1 and args.dataset not in ("imagenet_lt", "inat"):
        R.fail(f"torchrun runs ldam_drw.py on file lists (--dataset imagenet_lt / inat); --dataset {args.dataset} "
               f"trains on one device: run it without torchrun")
    R.refuse_occupied(args.out, args.resume)
    return args, ckpt


def open_run(args, ckpt, device, train, counts, start, rank=0, world=1):
    """The run folder (rank 0) with the training indices; then the lines printed above the epoch table."""
    if R.open_run(args, ckpt, device, __file__, start, rank=rank) and hasattr(train, "val_indices"):
        D.save_indices(os.path.join(args.out, "train_indices.json"), train.indices, train.val_indices)
    print(f"{args.dataset} rho={args.rho:g} ({args.imb_type}{', balanced' if args.balanced else ''}"
          f"{f', subsample {args.subsample:g}' if args.subsample < 1 else ''}): {sum(counts)} training images "
          f"{counts[:3]}…{counts[-1]}, loss={args.loss} rule={args.rule}, {args.arch}, recipe {args.recipe}, "
          f"{args.epochs} epochs on {device}" + (f", {world} processes × {args.batch_size // world} images per step, "
          f"{'SyncBatchNorm' if device.type == 'cuda' else 'BatchNorm per process'}" if world > 1 else ""))
    if args.subsample < 1:
        print(f"--subsample {args.subsample:g}: {args.epochs} epochs " + ("(--same-epochs)" if args.same_epochs else
              f"= round({args.epochs_full} / {args.subsample:g}), the full variant's optimizer steps (App. A.1); "
              f"--same-epochs keeps {args.epochs_full}"))
    print(R.table_header("train", "test", "many", "med", "few", "val"))


def finish_run(args, counts, test_m, best, t_run, rank=0, world=1):
    """final.json and the last printed line."""
    headline = D.headline_metric(args.dataset)
    final = R.finish_run(args.out, {
        "script": "ldam_drw.py", "dataset": args.dataset, "rho": args.rho, "imb_type": args.imb_type,
        "loss": args.loss, "rule": args.rule, "pretrained": args.pretrained, "seed": args.seed,
        "data_seed": args.data_seed, "epochs": args.epochs, "class_counts": counts, "arch": args.arch,
        "recipe": args.recipe, "balanced": args.balanced, "subsample": args.subsample, "n_train": sum(counts),
        "last": test_m, "headline": headline, "test_error": 100 - test_m[headline],
        "test_error_top1": 100 - test_m["top1"], "best_on_val": best}, t_run, rank)
    mean = f" from mean per-class accuracy (top-1 error {final['test_error_top1']:.2f}%)" if headline != "top1" else ""
    val = f"; best on validation: epoch {best['epoch']}, test error {100 - best['test']['top1']:.2f}%" if best else ""
    print(f"last epoch: test error {final['test_error']:.2f}%{mean} (many {R.fmt(test_m['many'])}, medium "
          f"{R.fmt(test_m['medium'])}, few {R.fmt(test_m['few'])}){val}")
    R.leave_process_group(world)


def main(argv=None):
    args = parse_args(argv)
    rank, world = R.process_group()
    if rank:                                               # rank 0 prints the log
        sys.stdout = open(os.devnull, "w")
    try:
        args, ckpt = resume_run(args, world)
        device = R.setup_device(args, world)
        if args.compile and world > 1:
            R.fail("--compile under torchrun is untested (SyncBatchNorm inside CUDA graphs); drop --compile")
        torch.manual_seed(args.seed)
        train, val, test, counts, C = build_data(args, device, rank, world)
    except D.DataError as e:
        R.fail(str(e))
    if world > 1:
        R.init_process_group(device)
        score = lambda m, batches: D.evaluate_shards(m, batches, C, counts, device)
    else:
        score = lambda m, batches: D.evaluate(m, batches.epoch(0), C, counts)
    model, optimizer, start, best = init_state(args, ckpt, C, device, world)
    # one static CUDA graph for the full batches and one for the short last batch, reused every epoch
    step_model = torch.compile(model, mode="reduce-overhead", dynamic=False) if args.compile else model
    weights = class_weights(args, counts, train.labels, device)
    saved = {"script": "ldam_drw.py", "arch": args.arch, "class_counts": counts,
             "train_subset": D.subset_digest(train.indices),
             "mean": getattr(test, "mean", D.IMAGENET_MEAN), "std": getattr(test, "std", D.IMAGENET_STD)}
    open_run(args, ckpt, device, train, counts, start, rank, world)

    t_run = time.time()
    for epoch in range(start, args.epochs):
        t0 = time.time()
        row, first_bad, step = train_one_epoch(model, optimizer, train, epoch, args, weights, world, step_model)
        R.stop_if_diverged(args.out, [model], epoch, first_bad, step + 1, rank, world)
        row["test"] = score(model, test)
        val_m = score(model, val) if val else None
        best = end_epoch(args, args.out, model, optimizer, epoch, row, val_m, best, t0, saved, rank)
    test_m = score(model, test) if start >= args.epochs else row["test"]
    finish_run(args, counts, test_m, best, t_run, rank, world)


if __name__ == "__main__":
    main()
