"""Self-training with extra unlabeled data: paper 1 (Yang & Xu 2020), §2.2–3, Table 1, Figs. 2–3.

Imbalanced labels are valuable: (a) train a classifier on the long-tailed labeled set D_L (base_model), (b) let
it pseudo-label an extra unlabeled set D_U (pseudo_label), (c) train a fresh model on D_L ∪ D_U with the same
recipe (self_train; (a) and (c) both run fit), minimising paper 1's L(D_L) + ω·L(D_U) (§3; ω: the losses' c).

    python self_training.py --rho 0.01 --pool cinic10 --pool-root CINIC --gpu 0   # Table 1: LDAM-DRW, D_U@5x, rho_U = 1
    python self_training.py --rho 0.01 --pool cinic10 --pool-root CINIC --loss ce --rule none --rho-u 0.005  # CE, 2ρ
    python self_training.py --rho 0.01 --base runs/ldam_drw-cifar10-0.01-0/last.pt ...  # reuse a base model
    python self_training.py --dataset svhn --rho 0.01                   # Table 1(b): D_U from SVHN's extra split
    python self_training.py --rho 0.02 --rho-u 0.02 --pool cinic10 --pool-root CINIC --relevance 0.6 \\
        --unlabeled-mult 4                                              # Figs. 2-3: CIFAR-100 as irrelevant data

D_U: --unlabeled-mult · |D_L| images of --pool or --unlabeled-root, exp profile --rho-u in the task's class order;
--pool rest is NOT the paper's pool for CIFAR-10. Paper numbers (CIFAR-10-LT ρ=100, top-1 error, 80M TI pool,
lossless): CE 29.64 → 17.48, LDAM-DRW 22.97 → 14.96 with D_U@5x, ρ_U = 1 (CINIC-10 is another source than 80M TI).

Deliberate differences from the paper and the authors' code:
1. D_U comes from existing data (80M Tiny Images was withdrawn); a short pool keeps its profile and shrinks
   (CINIC-10's ~21,000 images per class cannot fill the 24,999 head images that ρ_U = ρ asks at 5x).
2. --omega is a per-example weight; ω = 1 is the authors' merged set (ω' = |D_U|/|D_L| per-set).
3. --threshold on pseudo-label confidence is off by default, as in the paper.
4. Class counts include the pseudo-labels, as the authors did (--labeled-counts: D_L's only).
5. Irrelevant images are CIFAR-100's (the paper's: other 80M TI classes).
6. Every stage reports on the balanced test set at the last epoch; selection only with --val-frac.
7. Batch 128 in stage (a) and --st-batch-size 256 in stage (c), as the authors' train.py / train_semi.py.
8. --base must come from a run on this D_L (same data flags, counts and image digest), else refused.
9. D_U's profile is exp whatever --imb-type, as the authors' SemiSupervisedImbalanceCIFAR10; --imb-type-u step
   gives a step D_U (our earlier default: D_U following a step D_L).
10. App. E.4 (amount of D_L) gives no recipe in the text and no flag in the released code: --labeled-frac f
    keeps int(f·n_c) images of each class of D_L (datasets_lt.downsample, --data-seed) and holds |D_U| at
    --unlabeled-mult × the full D_L, so only the labels change (as Oliver et al. [39] vary them); with --pool
    rest the dropped images join the pool as unlabeled images.
"""
import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import datasets_lt as D
import run_lt as R


# ----- flags ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Self-training with extra unlabeled data (paper 1, §2-3).")
    # --- shared flags (same names and order in every script; defaults and help are this method's) ---
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "svhn", "folder"])
    p.add_argument("--data-root", default="./data", help="dataset folder")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--rho", type=float, default=0.01, help="tail/head ratio in (0, 1]; 1 = balanced")
    p.add_argument("--imb-type", default="exp", choices=["exp", "step"])
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=2e-4)
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
    p.add_argument("--loss", default="ldam", choices=["ce", "focal", "ldam"])
    p.add_argument("--rule", default="drw", choices=["none", "reweight", "resample", "drw", "drs"])
    p.add_argument("--base", default=None, help="base classifier (an ldam_drw.py last.pt) instead of stage (a)")
    p.add_argument("--unlabeled-root", default=None, help="image folder DIR/<class>/* to draw D_U from")
    p.add_argument("--pool", default="rest", choices=["rest", "cinic10"],
                   help="D_U pool: rest = the training images outside D_L (SVHN: its extra split); cinic10 = "
                        "CINIC-10's ImageNet-sourced images under --pool-root (the pool Table 1 needs)")
    p.add_argument("--pool-root", default=None, help="CINIC-10 folder (train/, valid/, test/) for --pool cinic10")
    p.add_argument("--pool-shortfall", default="shrink", choices=["shrink", "cap"],
                   help="pool too small: shrink |D_U| keeping the rho_U profile (default), or cap each class")
    p.add_argument("--unlabeled-mult", type=float, default=5.0, help="|D_U| / |D_L| (paper: 5)")
    p.add_argument("--labeled-frac", type=float, default=1.0,
                   help="App. E.4: keep this fraction of each class of D_L (the profile stays); |D_U| stays "
                        "--unlabeled-mult x the full D_L")
    p.add_argument("--rho-u", type=float, default=1.0, help="class ratio of D_U, tail/head in (0, 1]")
    p.add_argument("--imb-type-u", default="exp", choices=["exp", "step"],
                   help="profile of D_U; exp whatever --imb-type, as the authors' code")
    p.add_argument("--relevance", type=float, default=1.0, help="fraction of D_U from the task's classes")
    p.add_argument("--irrelevant-classes", default=None,
                   help="comma-separated classes held out of the task as irrelevant (default: CIFAR-100 images)")
    p.add_argument("--irrelevant-root", default=None,
                   help="folder holding cifar-100-python, the irrelevant images of --relevance < 1 (default --data-root)")
    p.add_argument("--omega", type=float, default=1.0,
                   help="per-example weight of the pseudo-labeled loss (1 = the authors' merged set)")
    p.add_argument("--st-batch-size", type=int, default=256,
                   help="stage (c) batch size (the authors' train_semi.py: 256; stage (a) uses --batch-size)")
    p.add_argument("--threshold", type=float, default=None, help="keep pseudo-labels with confidence ≥ this")
    p.add_argument("--labeled-counts", action="store_true", help="LDAM/DRW/resampling from D_L counts only")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup", type=int, default=5, help="linear warm-up epochs")
    p.add_argument("--beta", type=float, default=0.9999, help="class-balanced weights: effective-number β")
    p.add_argument("--resample-weights", default="effective", choices=["effective", "inverse"],
                   help="Resample / DRS draw weights: effective = (1-β)/(1-β^n_c) as the authors' "
                        "ImbalancedDatasetSampler; inverse = 1/n_c (every class equally likely)")
    p.add_argument("--gamma", type=float, default=1.0, help="focal loss γ")
    p.add_argument("--max-m", type=float, default=0.5, help="LDAM: largest margin")
    p.add_argument("--s", type=float, default=30.0, help="LDAM: logit scale")
    p.add_argument("--strict-fp32", action="store_true", help="disable TF32 in cuDNN convolutions and matmuls")
    p.add_argument("--print-freq", type=int, default=0,
                   help="a progress line every N steps of an epoch; 0: at most every 10 s (none in a short epoch)")
    p.error = R.fail                                       # one line and exit 2, not the usage text
    args = p.parse_args(argv)
    args.cli_flags = R.given_flags(p, argv)
    args.schedule, args.arch = "step", "resnet32"
    if args.out is None:
        args.out = os.path.join("runs", f"self_training-{args.dataset}-{args.rho:g}-{args.seed}"
                                + (f"-dl{args.labeled_frac:g}" if args.labeled_frac < 1 else ""))
    # the range of every numeric flag, before anything is read or written
    R.check_ranges(args, R.SHARED_RANGES + [("st_batch_size", 1, None, "[)"), ("unlabeled_mult", 0, None, "[)"),
                                            ("labeled_frac", 0, 1, "(]"),
                                            ("relevance", 0, 1, "[]"), ("omega", 0, None, "[)"),
                                            ("threshold", 0, 1, "[]"), ("warmup", 0, None, "[)"), ("beta", 0, 1, "[)"),
                                            ("gamma", 0, None, "[)"), ("max_m", 0, None, "[)"), ("s", 0, None, "()")])
    if "warmup" in args.cli_flags and 0 < args.warmup >= args.epochs:
        R.fail(f"--warmup {args.warmup} must be shorter than --epochs {args.epochs}")
    return args


RESUME_FLAGS = ("gpu", "data_root", "download")                # where the run executes: these may go with --resume


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

# ----- the method (paper 1 §2.2–3; Cao et al. 2019 Eq. (10), §3.3; Cui et al. 2019 Eq. (3)) --------

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
    inverse = 1.0 / torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)      # by `counts` (--labeled-counts)
    sample_weights = (D.effective_number_sample_weights(torch.as_tensor(labels), args.beta, counts)
                      if args.resample_weights == "effective" else inverse[torch.as_tensor(labels)])
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


@torch.no_grad()
def predict(model, x_u, mean, std, device, scale):
    """Stage (b): hard argmax of the base model (eval mode, test transform) and its softmax confidence."""
    model.eval()
    if not len(x_u):                                          # --unlabeled-mult 0: nothing to label, no batch
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    batches = D.GPULoader(x_u, np.zeros(len(x_u), dtype=np.int64), 1000, mean, std, device).epoch(0)
    confs, preds = zip(*[F.softmax(scale * model(x).float(), dim=1).max(1) for x, _, _ in batches])
    return torch.cat(preds).cpu().numpy(), torch.cat(confs).cpu().numpy()


# ----- data ----------------------------------------------------------------------------------------

def build_data(args):
    """D_L, validation, test and the candidate pool of D_U (TRUE labels: only to choose D_U and score pseudo-labels)."""
    train_x, train_y, names = D.load_split(args.dataset, args.data_root, True, args.download)
    test_x, test_y, _ = D.load_split(args.dataset, args.data_root, False, args.download)
    irr = [int(c) for c in args.irrelevant_classes.split(",")] if args.irrelevant_classes else []
    if any(not 0 <= c < len(names) for c in irr) or len(set(irr)) >= len(names) - 1:
        raise D.DataError(f"--irrelevant-classes must name distinct classes in 0..{len(names) - 1} and leave "
                          f"at least two for the task")
    task = [c for c in range(len(names)) if c not in irr]
    renumber = np.full(len(names), -1)
    renumber[task] = np.arange(len(task))
    in_task = np.flatnonzero(renumber[train_y] >= 0)
    lab = in_task[D.make_long_tailed(renumber[train_y[in_task]], args.rho, args.imb_type, args.data_seed,
                                     D.N_MAX.get(args.dataset), D.CLASS_ORDER.get(args.dataset) if not irr else None)]
    lab, val = D.carve_val(lab, renumber[train_y], args.val_frac, args.data_seed)
    n_full = len(lab)                                      # App. E.4: fewer labels, the same |D_U|
    if args.labeled_frac < 1:
        lab = D.downsample(lab, renumber[train_y], args.labeled_frac, args.data_seed)
    test_keep = renumber[test_y] >= 0
    data = {"names": [names[c] for c in task], "mean_std": D.mean_std(args.dataset, train_x),
            "x_l": train_x[lab], "y_l": renumber[train_y[lab]], "x_val": train_x[val], "y_val": renumber[train_y[val]],
            "x_test": test_x[test_keep], "y_test": renumber[test_y[test_keep]], "subset": D.subset_digest(lab),
            "counts_l": np.bincount(renumber[train_y[lab]], minlength=len(task)), "irr_x": train_x[:0].copy(),
            "n_full": n_full}
    to_task = lambda pool_names: np.array([data["names"].index(n) if n in data["names"] else -1 for n in pool_names])
    if args.pool == "cinic10":
        if args.dataset not in ("cifar10", "folder") or args.unlabeled_root:
            raise D.DataError("--pool cinic10 is a pool for CIFAR-10 (--dataset cifar10 or its folder copy), "
                              "without --unlabeled-root")
        if not args.pool_root:
            raise D.DataError("--pool cinic10 needs --pool-root PATH (the CINIC-10 folder with train/, valid/, test/)")
        paths, py, pnames = D.cinic10_files(args.pool_root)
        missing = [n for n in data["names"] if n not in pnames]
        if missing:
            raise D.DataError(f"CINIC-10 under '{args.pool_root}' has no class {', '.join(missing)} of this task "
                              f"(its classes: {', '.join(pnames)})")
        py = to_task(pnames)[py]
        data["pool_paths"], data["pool_y"] = [paths[i] for i in np.flatnonzero(py >= 0)], py[py >= 0]
    elif args.unlabeled_root or args.dataset == "svhn":    # an image folder DIR/<class>/*, else SVHN's extra split
        px, py, pnames = (D.load_split("folder", *os.path.split(os.path.abspath(args.unlabeled_root)))
                          if args.unlabeled_root else D.load_split("svhn", args.data_root, "extra", args.download))
        py = to_task(pnames)[py]
        data["pool_x"], data["pool_y"], data["irr_x"] = px[py >= 0], py[py >= 0], px[py < 0]
    else:
        rest = np.setdiff1d(np.arange(len(train_y)), np.concatenate([lab, val]))
        relevant = rest[renumber[train_y[rest]] >= 0]
        data["pool_x"], data["pool_y"] = train_x[relevant], renumber[train_y[relevant]]
        data["irr_x"] = train_x[rest[renumber[train_y[rest]] < 0]]
    if args.relevance < 1 and not irr:
        # Fig. 2-3's irrelevant images: CIFAR-100's classes are disjoint from CIFAR-10's and come from the same
        # 80M Tiny Images source as the paper's irrelevant data; the 10-class task stays as it is.
        try:
            data["irr_x"], _, _ = D.load_split("cifar100", args.irrelevant_root or args.data_root, True, args.download)
        except D.DataError as e:
            raise D.DataError(f"--relevance {args.relevance:g} draws irrelevant images from CIFAR-100 "
                              f"(--irrelevant-root, default --data-root): {e}") from None
    return data


def check_base(path, ckpt, args, data):
    """--base must have been trained on this run's D_L (data flags, class counts, digest of the training subset): a
    base model that saw other images of the dataset may meet them in D_U and pseudo-label them from memory."""
    a = ckpt.get("args") or {}
    for key, value in (("dataset", a.get("dataset")), ("rho", a.get("rho")), ("imb_type", a.get("imb_type")),
                       ("data_seed", a.get("data_seed", a.get("seed", 0))), ("val_frac", a.get("val_frac", 0.0))):
        if value != getattr(args, key):
            R.fail(f"--base '{path}' was trained on another D_L (--{key.replace('_', '-')} {value}, this run "
                   f"{getattr(args, key)}): its pseudo-labels would leak true labels; train the base with this "
                   f"run's data flags or drop --base")
    if list(ckpt.get("class_counts") or []) != data["counts_l"].tolist():
        R.fail(f"--base '{path}' was trained on other class counts ({ckpt.get('class_counts')}, this run's D_L "
               f"{data['counts_l'].tolist()}); train the base on this run's D_L or drop --base")
    if ckpt.get("train_subset") != data["subset"]:
        R.fail(f"--base '{path}' " + ("does not record its training subset (an older checkpoint)" if not
               ckpt.get("train_subset") else "was trained on other images than this run's D_L") +
               "; train the base with this version of ldam_drw.py and this run's data flags, or drop --base")


def choose_unlabeled(args, data):
    """D_U: (images, true labels with -1 for irrelevant images, report)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rel, irr, report = D.unlabeled_pool(data["pool_y"], data["n_full"], args.unlabeled_mult, args.rho_u,
                                                args.imb_type_u, args.data_seed, np.arange(len(data["irr_x"])),
                                                args.relevance, D.CLASS_ORDER.get(args.dataset)
                                                if not args.irrelevant_classes else None, args.pool_shortfall)
        except D.DataError as e:                           # the flag datasets_lt's message cannot name
            raise D.DataError(str(e).replace("shortfall 'cap'", "--pool-shortfall cap")) from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    report["capped"] = [str(w.message) for w in caught]
    pool_x = data["pool_x"][rel] if "pool_x" in data else D.load_images([data["pool_paths"][i] for i in rel])
    x_u = np.concatenate([pool_x, data["irr_x"][irr]])
    full = " before --labeled-frac" if args.labeled_frac < 1 else ""
    print(f"D_U: {report['size']} images = {report['achieved_mult']:.2f}x |D_L|{full} "
          f"(asked {args.unlabeled_mult:g}x), relevance {report['achieved_relevance'] or 0:.4f} (asked {args.relevance:g}), per class "
          f"{report['supplied_per_class']} + {report['irrelevant']} irrelevant")
    return x_u, np.concatenate([data["pool_y"][rel], np.full(len(irr), -1)]), report


# ----- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, train, epoch, args, weights, c):
    """One epoch of SGD under the epoch's rule: (row: lr, loss, train top-1; first non-finite step or -1; last step)."""
    cb_weights, margins, sample_weights = weights
    device = cb_weights.device
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    weight, resample = deferred_rule(args.rule, epoch, args.epochs, cb_weights)   # DRW / DRS: at 80% of the run
    model.train()
    loss_sum, hits = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    first_bad, seen = torch.full((), -1, device=device, dtype=torch.long), 0
    progress = R.Progress(len(train), args.print_freq)
    for step, (x, y, idx) in enumerate(train.epoch(epoch, sample_weights if resample else None)):
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            logits = model(x).float()
        cb = None if c is None else c[idx]                 # c_i: 1 for D_L, ω for D_U (None: all 1)
        if args.loss == "ce":
            loss = ce_loss(logits, y, weight, cb)
        elif args.loss == "focal":
            loss = focal_loss(logits, y, weight, args.gamma, cb)
        else:
            loss = ldam_loss(logits, y, weight, margins, args.s, cb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss.detach() * len(y)
        hits += (logits.argmax(1) == y).sum()
        seen += len(y)
        progress(step, seen, lambda: loss_sum.item() / seen)
    row = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum.item() / seen, "train_top1": 100 * hits.item() / seen}
    return row, first_bad, step


# ----- stages --------------------------------------------------------------------------------------

def init_state(args, ckpt, C, device):
    """The model, SGD, and (start epoch, best) from the --resume checkpoint."""
    model = ResNet32(C, cosine=args.loss == "ldam").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd,
                                fused=device.type == "cuda")
    start, best = R.restore(ckpt, model, optimizer)
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


def fit(args, stage, x, y, c, counts, data, device, out, ckpt=None, batch_size=None):
    """Stages (a) and (c): a fresh ResNet-32 on (x, y) with per-example loss weights c, the ldam_drw.py
    recipe; metrics.jsonl and last.pt (every epoch) in `out`. Returns (model, last test metrics, best)."""
    mean, std = data["mean_std"]
    C = len(data["names"])
    torch.manual_seed(args.seed)
    model, optimizer, start, best = init_state(args, ckpt, C, device)
    train = D.GPULoader(x, y, batch_size or args.batch_size, mean, std, device, "crop_flip", seed=args.seed)
    test = D.GPULoader(data["x_test"], data["y_test"], 1000, mean, std, device)
    val = D.GPULoader(data["x_val"], data["y_val"], 1000, mean, std, device) if len(data["y_val"]) else None
    score = lambda m, batches: D.evaluate(m, batches.epoch(0), C, data["counts_l"])   # many/medium/few by D_L
    c = None if c is None else torch.as_tensor(c, dtype=torch.float32, device=device)
    weights = class_weights(args, counts, y, device)
    saved = {"script": "self_training.py", "stage": stage, "arch": "resnet32", "class_counts": [int(n) for n in counts],
             "train_subset": data["subset"] if stage == "base" else None, "mean": mean, "std": std}
    R.cut_metrics(out, start)
    print(f"stage {stage}: {len(y)} training images, counts {[int(n) for n in counts]}, "
          f"loss={args.loss} rule={args.rule}, {args.epochs} epochs on {device}")
    print(R.table_header("train", "test", "many", "med", "few", "val"))
    for epoch in range(start, args.epochs):
        t0 = time.time()
        row, first_bad, step = train_one_epoch(model, optimizer, train, epoch, args, weights, c)
        R.stop_if_diverged(out, [model], epoch, first_bad, step + 1, stage=stage)
        row["test"] = score(model, test)
        val_m = score(model, val) if val else None
        best = end_epoch(args, out, model, optimizer, epoch, row, val_m, best, t0, saved)
    test_m = score(model, test) if start >= args.epochs else row["test"]
    return model, test_m, best


def base_model(args, data, device, ckpt, base_ckpt):
    """Stage (a): the classifier on D_L (--base's, a resumed run's, or fit's): (model, its test metrics, its loss)."""
    C = len(data["names"])
    if not args.base and (ckpt is None or ckpt["stage"] == "base"):
        base, base_m, _ = fit(args, "base", data["x_l"], data["y_l"], None, data["counts_l"], data, device,
                              os.path.join(args.out, "base"), ckpt)
        return base, base_m, args.loss
    if args.base:
        if base_ckpt.get("arch") != "resnet32" or base_ckpt["model"].get("fc.weight", torch.empty(0)).shape[:1] != (C,):
            R.fail(f"'{args.base}' is not a ResNet-32 classifier with {C} classes (an ldam_drw.py run on this task)")
        cosine, base_loss = "fc.bias" not in base_ckpt["model"], (base_ckpt.get("args") or {}).get("loss", "ce")
    else:
        base_ckpt = R.load_checkpoint(os.path.join(args.out, "base", "last.pt"))
        cosine, base_loss = args.loss == "ldam", args.loss
    base = ResNet32(C, cosine=cosine).to(device)
    base.load_state_dict({k.removeprefix("module."): v for k, v in base_ckpt["model"].items()})
    test = D.GPULoader(data["x_test"], data["y_test"], 1000, *data["mean_std"], device)
    return base, D.evaluate(base, test.epoch(0), C, data["counts_l"]), base_loss


def pseudo_label(args, base, base_loss, x_u, y_u_true, data, device):
    """Stage (b): D_U's labels, those --threshold keeps, their accuracy (reported only): (labels, kept mask, report)."""
    C = len(data["names"])
    pseudo, conf = predict(base, x_u, *data["mean_std"], device, args.s if base_loss == "ldam" else 1.0)
    keep = np.ones(len(x_u), bool) if args.threshold is None else conf >= args.threshold
    relevant = y_u_true >= 0
    per_class = [float(100 * np.mean(pseudo[y_u_true == k] == k)) if np.any(y_u_true == k) else None for k in range(C)]
    pl_report = {"n": int(len(x_u)), "kept": int(keep.sum()),
                 "accuracy": float(100 * np.mean(pseudo[relevant] == y_u_true[relevant])) if relevant.any() else None,
                 "accuracy_per_true_class": per_class,
                 "true_counts": np.bincount(y_u_true[relevant], minlength=C).tolist(),
                 "pseudo_counts": np.bincount(pseudo[keep], minlength=C).tolist(), "irrelevant": int((~relevant).sum())}
    R.save_atomic({"pseudo_labels": torch.as_tensor(pseudo), "confidence": torch.as_tensor(conf),
                   "kept": torch.as_tensor(keep)}, os.path.join(args.out, "pseudo_labels.pt"))
    print(f"D_U: {len(x_u)} images ({pl_report['irrelevant']} irrelevant), {keep.sum()} pseudo-labels kept, "
          f"pseudo-label accuracy on the relevant ones: {R.fmt(pl_report['accuracy'])}%")
    return pseudo, keep, pl_report


def self_train(args, data, x_u, pseudo, keep, device, ckpt):
    """Stage (c): fit on D_L ∪ D_U, the unlabeled term weighted by ω: (test metrics, best, the rules' counts)."""
    use_u = args.omega > 0
    x = np.concatenate([data["x_l"], x_u[keep]]) if use_u else data["x_l"]
    y = np.concatenate([data["y_l"], pseudo[keep]]) if use_u else data["y_l"]
    c = None if not use_u or args.omega == 1 else np.concatenate([np.ones(len(data["y_l"])), np.full(keep.sum(), args.omega)])
    counts = data["counts_l"] if args.labeled_counts or not use_u else np.bincount(y, minlength=len(data["names"]))
    resumed = ckpt if ckpt is not None and ckpt["stage"] == "self_training" else None         # not stage (a)'s
    _, test_m, best = fit(args, "self_training", x, y, c, counts, data, device, args.out, resumed, args.st_batch_size)
    return test_m, best, counts


# ----- main ----------------------------------------------------------------------------------------

def resume_run(args):
    """--resume: the saved run's arguments; without it, an --out that already holds a run is refused."""
    old = {"resample_weights": "inverse", "pool": "rest", "pool_root": None, "pool_shortfall": "cap",
           "irrelevant_root": None}                                                 # of runs saved before these flags
    args, ckpt = R.resume_run(args, "self_training.py", RESUME_FLAGS, old, say=False)
    if ckpt is not None:
        args.st_batch_size = ckpt["args"].get("st_batch_size", args.batch_size)     # older runs: their --batch-size
        args.imb_type_u = ckpt["args"].get("imb_type_u", args.imb_type)             # and D_U as their D_L
        if ckpt.get("stage") == "base":                   # <out>/base/last.pt: the run is <out>
            args.out = os.path.dirname(args.out)
        print(f"resuming {args.out} in stage {ckpt['stage']} after epoch {ckpt['epoch']}")
    D.check_rho(args.rho)
    D.check_rho(args.rho_u, "rho_u")
    R.refuse_occupied(args.out, args.resume, ("last.pt", "base/last.pt"))
    return args, ckpt


def finish_run(args, data, counts, pool_report, pl_report, base_m, test_m, best, t_run):
    """final.json and the last printed line."""
    headline = D.headline_metric(args.dataset)
    final = R.finish_run(args.out, {
        "script": "self_training.py", "dataset": args.dataset, "rho": args.rho, "rho_u": args.rho_u,
        "pool": "folder" if args.unlabeled_root else args.pool, "relevance": args.relevance, "loss": args.loss,
        "rule": args.rule, "omega": args.omega, "labeled_frac": args.labeled_frac, "seed": args.seed,
        "data_seed": args.data_seed, "epochs": args.epochs, "labeled_counts": data["counts_l"].tolist(),
        "training_counts": [int(n) for n in counts],
        "unlabeled": {**pool_report, "pseudo_labels": pl_report}, "base": base_m, "last": test_m, "headline": headline,
        "base_error": 100 - base_m[headline], "test_error": 100 - test_m[headline],
        "base_error_top1": 100 - base_m["top1"], "test_error_top1": 100 - test_m["top1"], "best_on_val": best},
        t_run, per_epoch=False)
    what = "test error" if headline == "top1" else "test error from mean per-class accuracy"
    print(f"{what}: base {final['base_error']:.2f}% → self-trained {final['test_error']:.2f}% "
          f"(top-1 error {final['base_error_top1']:.2f}% → {final['test_error_top1']:.2f}%; many "
          f"{R.fmt(test_m['many'])}, medium {R.fmt(test_m['medium'])}, few {R.fmt(test_m['few'])})")


def main(argv=None):
    args = parse_args(argv)
    try:
        args, ckpt = resume_run(args)
        device = R.setup_device(args)
        data = build_data(args)
        base_ckpt = R.load_checkpoint(args.base) if args.base else None
        if args.base:                                      # before anything is chosen or written
            check_base(args.base, base_ckpt, args, data)
        x_u, y_u_true, pool_report = choose_unlabeled(args, data)
    except D.DataError as e:
        R.fail(str(e))
    R.open_run(args, ckpt, device, __file__, None)         # args.json and the source; fit cuts each stage's metrics

    t_run = time.time()
    base, base_m, base_loss = base_model(args, data, device, ckpt, base_ckpt)                   # stage (a)
    pseudo, keep, pl_report = pseudo_label(args, base, base_loss, x_u, y_u_true, data, device)   # stage (b)
    test_m, best, counts = self_train(args, data, x_u, pseudo, keep, device, ckpt)               # stage (c)
    finish_run(args, data, counts, pool_report, pl_report, base_m, test_m, best, t_run)


if __name__ == "__main__":
    main()
