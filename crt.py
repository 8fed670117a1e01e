"""Classifier re-training (cRT) on a frozen backbone: Kang et al. 2020, "Decoupling representation and
classifier for long-tailed recognition", §4; the strongest baseline of paper 1 (Yang & Xu 2020,
Tables 3–4, where "cRT + SSP" is cRT on top of a self-supervised initialisation).

Take any backbone checkpoint of this project and freeze it (frozen_backbone), cache its features
(cache_features), re-initialise the linear classifier (init_state; Classifier: frozen backbone + new head)
and train only the classifier with class-balanced sampling (train_one_epoch) on the same long-tailed
training subset: the data flags default to the checkpoint's own. README "Classifier re-training" has the
recipe per dataset, DDP and the reasons below.

    python crt.py --ckpt runs/ldam_drw-cifar10-0.01-0/last.pt --gpu 0          # CE → CE + cRT
    python crt.py --ckpt runs/ldam_drw-imagenet_lt-1-0/last.pt --val-list ImageNet_LT_val.txt   # Table 3
    python crt.py --ckpt runs/ldam_drw-cifar10-0.01-0/last.pt --bn train --augment   # the original's BN
    torchrun --nproc_per_node 8 crt.py --ckpt runs/ldam_drw-inat-0.01-0/last.pt --val-list iNaturalist18_val.txt
    python crt.py --resume runs/crt-inat-0.01-0/last.pt                       # continue a stopped run

Recipe (REFERENCE §7, Kang et al. on ImageNet-LT): SGD momentum 0.9, batch 512, lr 0.2 cosine over 10
epochs, wd 5e-4, len(train set) class-balanced draws per epoch; also the default on CIFAR, SVHN and
folders. ImageNet-LT / iNat as released (cls_crt.yaml): --bn train, --augment, --lr-sequence kang; iNat:
30 epochs, wd 1e-4. Paper 1, top-1 error: ImageNet-LT (Table 3, ResNet-10 / ResNet-50) cRT 58.2 / 52.7,
cRT + SSP 56.8 / 48.7; iNaturalist 2018 (Table 4, ResNet-50) cRT 34.8, cRT + SSP 31.9.

Deliberate differences from Kang et al.'s code (on CIFAR, SVHN and folders; file lists as released):
1. --bn frozen (default there): BatchNorm keeps its running statistics; --bn train is the original.
2. --bn frozen --no-augment: features cached once with the test transform; --augment recomputes them.
3. Class-balanced draws with replacement (1/n_y weights): the ClassAwareSampler's class distribution.
4. Every backbone tensor is compared with its value before, after training (a sanity check).
5. The report is the last epoch (and the best on a --val-frac / --val-list split), never the test set.
6. --resume continues from last.pt (with --augment every epoch re-runs the backbone on every image).
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import datasets_lt as D


# ----- flags ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classifier re-training on a frozen backbone (Kang et al. 2020).")
    # --- shared flags (same names and order in every script; data flags default to the checkpoint's) ---
    p.add_argument("--dataset", default=None,
                   choices=["cifar10", "cifar100", "svhn", "folder", "imagenet_lt", "inat"])
    p.add_argument("--data-root", default=None, help="dataset folder")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--rho", type=float, default=None, help="tail/head ratio in (0, 1]; 1 = balanced")
    p.add_argument("--imb-type", default=None, choices=["exp", "step"])
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    p.add_argument("--epochs", type=int, default=None, help="default: 10 (iNaturalist: 30)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--wd", type=float, default=None, help="default: 5e-4 (iNaturalist: 1e-4)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the data subsets; default: the checkpoint's (its --seed for older checkpoints)")
    p.add_argument("--out", default=None, help="default: runs/<script>-<dataset>-<rho>-<seed>")
    p.add_argument("--resume", default=None,
                   help="continue the run saved in this last.pt, in its folder, with its arguments; only --gpu, "
                        "--data-root, --download (and --workers) may be given with it, any other flag is refused")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--val-frac", type=float, default=None,
                   help="validation split carved from the training subset; 0 = report last epoch only")
    # --- this method ---
    p.add_argument("--ckpt", default=None, help="backbone checkpoint of this project (required)")
    p.add_argument("--bn", default=None, choices=["frozen", "train"],
                   help="frozen: backbone in eval mode; train: BN statistics keep updating (original cRT). "
                        "Default: train on ImageNet-LT / iNat (as released), frozen elsewhere")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="training augmentation, features recomputed every step; default: on for ImageNet-LT / "
                        "iNat (as released), off elsewhere")
    p.add_argument("--train-list", default=None, help="ImageNet-LT / iNat: 'relative/path label' list")
    p.add_argument("--test-list", default=None, help="ImageNet-LT / iNat: test list")
    p.add_argument("--val-list", default=None,
                   help="ImageNet-LT / iNat: official validation list (ImageNet_LT_val.txt) for model selection")
    p.add_argument("--lr-sequence", default=None, choices=["kang", "plain"],
                   help="kang: cosine stepped before each epoch as Kang et al.'s run_networks.py (epoch e of E, "
                        "1-based, at lr·(1+cos(π e/E))/2, the last at 0); plain: lr·(1+cos(π (e-1)/E))/2. "
                        "Default: kang on ImageNet-LT / iNat, plain elsewhere")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers (ImageNet-LT / iNat only)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.error = fail
    args = p.parse_args(argv)
    args.cli_flags = given_flags(p, argv)
    if not args.ckpt and not args.resume:
        fail("the following arguments are required: --ckpt")
    check_args(args)
    return args


def check_args(args):
    """Range of every numeric flag, before anything is read or written."""
    check_ranges(args, SHARED_RANGES)                      # --rho: D.check_rho in resume_run(), with its hint


# --resume continues a run with its own arguments; only these (where the run executes) may be given with it
RESUME_FLAGS = ("gpu", "workers", "data_root", "download")


def fail(msg):
    if int(os.environ.get("RANK", "0")) == 0:             # under torchrun every process fails alike: say it once
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def fmt(v):
    return f"{v:6.2f}" if v is not None else f"{'-':>6}"


def checkpoint_defaults(args, trained):
    """Flags left unset: the data flags from `trained`, the --ckpt run's arguments; the recipe's from the
    dataset (Kang et al.'s released configs on ImageNet-LT / iNat)."""
    for name, default in (("dataset", "cifar10"), ("data_root", "./data"), ("rho", 0.01), ("imb_type", "exp"),
                          ("seed", 0), ("data_seed", trained.get("data_seed", trained.get("seed", 0))),
                          ("val_frac", 0.0), ("train_list", None), ("test_list", None)):
        if getattr(args, name) is None:
            setattr(args, name, trained.get(name, default))
    released = args.dataset in ("imagenet_lt", "inat")        # Kang et al.'s / paper 1's released configs
    for name, plain, config in (("epochs", 10, 30 if args.dataset == "inat" else 10),
                                ("wd", 5e-4, 1e-4 if args.dataset == "inat" else 5e-4),
                                ("bn", "frozen", "train"), ("augment", False, True), ("lr_sequence", "plain", "kang")):
        if getattr(args, name) is None:
            setattr(args, name, config if released else plain)
    if args.out is None:
        args.out = os.path.join("runs", f"crt-{args.dataset}-{args.rho:g}-{args.seed}")


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


def build_backbone(arch):
    """The architecture named in a checkpoint, with `fc` as its (to be replaced) head."""
    if arch == "resnet32":
        return ResNet32(1)
    if arch == "resnet18":
        return ResNet18(1)
    if arch in ("resnet10", "resnet50"):
        block, layers = ((torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]) if arch == "resnet10" else
                         (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]))
        return torchvision.models.resnet.ResNet(block, layers, num_classes=1)
    fail(f"unknown architecture '{arch}' in the checkpoint")


def previous_classifier(ckpt, C):
    """The checkpoint's own classifier, when it is one for this task (a supervised run): for the
    'before' column."""
    if ckpt.get("script") not in ("ldam_drw.py", "self_training.py"):
        return None
    model = build_backbone(ckpt["arch"])
    head = ckpt["model"].get("fc.weight")
    if head is None or head.shape[0] != C:
        return None
    cosine = "fc.bias" not in ckpt["model"]
    in_features = head.shape[1]
    model.fc = NormedLinear(in_features, C) if cosine else nn.Linear(in_features, C)
    model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["model"].items()})
    return model


# ----- run files -----------------------------------------------------------------------------------

# === shared: check_ranges (identical in every script) ===
def check_ranges(args, ranges):
    """Every (flag, low, high, bounds) of `ranges`: the flag's value lies in the interval, bounds "[)" meaning
    low <= value < high (None: no bound; a flag left at None is skipped). Else one line and exit 2."""
    for name, low, high, bounds in ranges:
        v = getattr(args, name, None)
        if v is None:
            continue
        ok = abs(v) <= float(np.finfo(np.float32).max) and (low is None or (v >= low if bounds[0] == "[" else v > low)) \
            and (high is None or (v <= high if bounds[1] == "]" else v < high))      # NaN, inf, 1e300 fail
        if not ok:
            interval = f"{bounds[0]}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{bounds[1]}"
            fail(f"--{name.replace('_', '-')} must be in {interval}, got {v:g}")


SHARED_RANGES = [("gpu", -1, None, "[)"), ("epochs", 1, None, "[)"), ("batch_size", 1, None, "[)"),
                 ("lr", 0, None, "()"), ("wd", 0, None, "[)"), ("seed", 0, 2 ** 32, "[)"), ("val_frac", 0, 1, "[)"),
                 ("momentum", 0, 1, "[)"), ("workers", 0, None, "[)"), ("data_seed", 0, 2 ** 32, "[)")]
# === end shared: check_ranges ===


# === shared: checkpoints (identical in every script) ===
HEAD_PREFIXES = ("fc.",)


def save_atomic(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text_atomic(path, text):
    """Temp file + rename, as save_atomic: a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def strict_json(obj, **kw):
    """JSON without the bare NaN / Infinity tokens Python writes by default: a non-finite float is null."""
    def clean(v):
        if isinstance(v, float):
            return v if np.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), allow_nan=False, **kw)


def write_json(path, obj):
    write_text_atomic(path, strict_json(obj, indent=1))


def read_metrics(path):
    """The rows of a metrics.jsonl; none when a moved or copied run lacks the file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_metrics(path, rows):
    write_text_atomic(path, "".join(strict_json(r) + "\n" for r in rows))


def append_metrics(path, row):
    write_metrics(path, read_metrics(path) + [row])


def copy_source(path, out):
    """The script's own source beside its outputs (temp file + rename)."""
    tmp = os.path.join(out, os.path.basename(path) + ".tmp")
    shutil.copy(path, tmp)
    os.replace(tmp, os.path.join(out, os.path.basename(path)))


def given_flags(parser, argv):
    """Destinations of the flags written on the command line (abbreviations included), so --resume can
    apply or refuse each of them instead of dropping it."""
    unset = object()
    seen = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    return sorted(k for k, v in vars(seen).items() if v is not unset and k != "help")


def resume_args(args, ckpt, applied):
    """--resume PATH: continue the run in dirname(PATH) with the arguments it was started with. A flag in
    `applied` given on this command line replaces the stored value (--gpu and --workers always do: they
    describe this machine); any other flag given with --resume is refused."""
    flag = lambda k: "--" + k.replace("_", "-")
    refused = [k for k in args.cli_flags if k not in applied and k != "resume"]
    if refused:
        fail(f"--resume continues a run with its own arguments; drop {' '.join(map(flag, refused))} (with "
             f"--resume only {', '.join(map(flag, applied))} may be given)")
    now = {k: getattr(args, k) for k in applied if k in args.cli_flags or k in ("gpu", "workers")}
    return argparse.Namespace(**{**vars(args), **ckpt["args"], **now, "resume": args.resume,
                                 "out": os.path.dirname(os.path.abspath(args.resume)), "cli_flags": args.cli_flags})


def nonfinite_tensor(model):
    """Name of the first parameter or buffer holding NaN / inf (a BatchNorm running_var, say), or None."""
    named = [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist() if named else []
    return next((k for (k, _), ok in zip(named, finite) if not ok), None)


def stop_diverged(what, out, epoch):
    """A non-finite loss or weight: one line naming where, nothing saved over the last good checkpoint,
    exit 1."""
    last = os.path.join(out, "last.pt")
    kept = f"{last} still holds epoch {epoch}" if os.path.exists(last) else "no checkpoint was saved"
    print(f"error: {what}; stopped, {kept} (try a lower --lr)", file=sys.stderr)
    sys.exit(1)


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                 # empty, truncated, another format, ...
        why = (str(e).splitlines() or [""])[0][:60]
        fail(f"'{path}' is not a checkpoint of this project ({e.__class__.__name__}{': ' if why else ''}{why})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        fail(f"'{path}' is not a checkpoint of this project (a dict with 'arch' and 'model')")
    return ckpt


def load_backbone(model, arch, path):
    """Copy every backbone tensor of the checkpoint at `path` into `model`; the head stays as it is.

    Prints matched / missing / unexpected counts; fails unless every backbone key of `model` was found
    with the right shape."""
    ckpt = load_checkpoint(path)
    if ckpt["arch"] != arch:
        fail(f"'{path}' holds a {ckpt['arch']} backbone but this run trains {arch}; pre-train the same "
             f"architecture or pass --arch {ckpt['arch']}")
    src = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith(HEAD_PREFIXES)]
    matched = [k for k in backbone if k in src and src[k].shape == own[k].shape]
    missing = [k for k in own if k not in matched]
    unexpected = [k for k in src if k not in own]
    skipped = [k for k in src if k in own and k not in matched]
    names = lambda keys: ", ".join(keys[:4]) + (", …" if len(keys) > 4 else "") or "-"
    print(f"loaded backbone from {path}: {len(matched)} tensors matched, {len(missing)} missing "
          f"({names(missing)}), {len(unexpected)} unexpected ({names(unexpected)}), {len(skipped)} not loaded "
          f"({names(skipped)})")
    bad = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if bad:
        fail(f"'{path}' lacks {len(bad)} backbone tensors of {arch} (first: {bad[0]}); it is not a "
             f"{arch} backbone of this project")
    own.update({k: src[k] for k in matched})
    model.load_state_dict(own)
    return ckpt
# === end shared: checkpoints ===


# ----- the method (Kang et al. 2020 §4: classifier re-training on a frozen backbone) ---------------

def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_unchanged(model, before, buffers=True):
    """Sanity check (facebookresearch linear-eval style): the frozen backbone must not have moved."""
    params = {name for name, _ in model.named_parameters()}
    for k, v in model.state_dict().items():
        if (k in params or buffers) and not torch.equal(v, before[k]):
            raise RuntimeError(f"backbone tensor '{k}' changed during cRT; the backbone is not frozen")


class Features:
    """Cached features as GPULoader-like batches: epoch(e, weights) → (features, labels, idx)."""

    def __init__(self, feats, labels, batch_size, seed):
        self.feats, self.labels, self.batch_size, self.seed = feats, labels, batch_size, seed

    def epoch(self, epoch, weights=None):
        n = len(self.labels)
        if weights is not None:
            g = torch.Generator(device=self.feats.device).manual_seed(self.seed * 100_003 + epoch)
            order = torch.multinomial(weights.to(self.feats.device, torch.double), n, replacement=True, generator=g)
        else:
            order = torch.arange(n, device=self.feats.device)
        for b in range(0, n, self.batch_size):
            idx = order[b:b + self.batch_size]
            yield self.feats[idx], self.labels[idx], idx


@torch.no_grad()
def extract(backbone, batches, amp):
    backbone.eval()
    feats, labels = [], []
    for x, y, _ in batches:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            feats.append(backbone(x).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


class Classifier(nn.Module):
    """Frozen backbone + new linear head; `cached=True` means inputs are already features."""

    def __init__(self, backbone, head, cached):
        super().__init__()
        self.backbone, self.head, self.cached = backbone, head, cached

    def forward(self, x):
        return self.head(x if self.cached else self.backbone(x))


# ----- data ----------------------------------------------------------------------------------------

def build_data(args, device, rank=0, world=1):
    """Training / validation / test batches (raw images), `plain` (the training images under the test
    transform, for cached features) and the training class counts."""
    if args.dataset in ("imagenet_lt", "inat"):
        return build_list_data(args, device, rank, world)
    train_x, train_y, names = D.load_split(args.dataset, args.data_root, True, args.download)
    test_x, test_y, _ = D.load_split(args.dataset, args.data_root, False, args.download)
    idx = D.make_long_tailed(train_y, args.rho, args.imb_type, args.data_seed, D.N_MAX.get(args.dataset),
                             D.CLASS_ORDER.get(args.dataset))
    idx, val_idx = D.carve_val(idx, train_y, args.val_frac, args.data_seed)
    mean, std = D.mean_std(args.dataset, train_x)
    C = len(names)
    counts = np.bincount(train_y[idx], minlength=C).tolist()
    train = D.GPULoader(train_x[idx], train_y[idx], args.batch_size, mean, std, device,
                        augment="crop_flip" if args.augment else None, shuffle=True, seed=args.seed)
    plain = D.GPULoader(train.images, train_y[idx], 1000, mean, std, device)
    test = D.GPULoader(test_x, test_y, 1000, mean, std, device)
    val = D.GPULoader(train_x[val_idx], train_y[val_idx], 1000, mean, std, device) if len(val_idx) else None
    return train, plain, val, test, counts, C


# === shared: list_batches (identical in every script that uses it) ===
class ListBatches:
    """DataLoader over a FileListDataset with GPULoader's interface: epoch(e, weights) → (x, y, idx)."""

    def __init__(self, dataset, indices, batch_size, train, seed, workers, device):
        self.dataset, self.indices, self.train, self.seed, self.device = dataset, indices, train, seed, device
        self.labels = torch.as_tensor(dataset.labels[indices])
        self.kw = dict(batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                       persistent_workers=workers > 0)

    def __len__(self):
        return -(-len(self.indices) // self.kw["batch_size"])

    def epoch(self, epoch, weights=None):
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if weights is not None:
            sampler = torch.utils.data.WeightedRandomSampler(weights, len(self.indices), generator=g)
        elif self.train:
            sampler = torch.utils.data.RandomSampler(range(len(self.indices)), generator=g)
        else:
            sampler = range(len(self.indices))
        order = torch.as_tensor(list(sampler))
        sub = torch.utils.data.Subset(self.dataset, [int(self.indices[i]) for i in order])
        try:
            for b, (x, y) in enumerate(torch.utils.data.DataLoader(sub, **self.kw)):
                idx = order[b * self.kw["batch_size"]:(b + 1) * self.kw["batch_size"]]
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx
        except D.DataError as e:                   # an unreadable image mid-epoch: stop before saving anything
            fail(str(e))
# === end shared: list_batches ===


# === shared: ddp_lists (identical in ldam_drw.py and crt.py) ===
def process_group():
    """(rank, world): this process and the number of processes under torchrun; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def stream_seed(*key):
    """A seed for one random stream (e.g. one process's augmentations in one epoch)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def epoch_order(n, seed, epoch, weights=None):
    """ListBatches' training order of the positions 0 … n-1 in `epoch`, seeded by (seed, epoch): a shuffle,
    or n draws with replacement by `weights` (class-balanced / resampled epochs)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is not None:
        return torch.as_tensor(list(torch.utils.data.WeightedRandomSampler(weights, n, generator=g)))
    return torch.as_tensor(list(torch.utils.data.RandomSampler(range(n), generator=g)))


def shard_batches(n, batch_size, seed, epoch, weights, rank, world):
    """[(global batch, this process's share)] of one training epoch, as positions 0 … n-1. Every process
    draws the same order (epoch_order) and cuts the same global batches; process r keeps the r-th of
    `world` contiguous parts of each (equal, except in a short last batch where they differ by at most
    one, and may be empty), so the parts in rank order are one process's batch."""
    order = epoch_order(n, seed, epoch, weights)
    return [(b, torch.tensor_split(b, world)[rank]) for b in order.split(batch_size)]


def check_shards(batch_size, world):
    """Fail unless the global batch splits evenly over the processes."""
    if batch_size % world:
        fail(f"--batch-size {batch_size} (global) must be divisible by the {world} processes")


class ShardedListBatches(ListBatches):
    """ListBatches for one of `world` processes (torchrun): epoch(e, weights) → (x, y, positions, labels
    of the whole global batch), this process's share of every global batch (shard_batches); an empty share
    (a short last batch) is an empty batch, which every layer passes through (SyncBatchNorm included).
    The augmentations draw from (seed, epoch, rank): each process its own stream, the same after --resume."""

    def __init__(self, dataset, indices, batch_size, seed, workers, device, rank, world):
        super().__init__(dataset, indices, batch_size, True, seed, workers, device)
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def epoch(self, epoch, weights=None):
        shares = shard_batches(len(self.indices), self.batch_size, self.seed, epoch, weights, self.rank, self.world)
        mine = torch.cat([s for _, s in shares])
        sub = torch.utils.data.Subset(self.dataset, [int(self.indices[i]) for i in mine])
        ends = np.cumsum([len(s) for _, s in shares]).tolist()
        steps = [list(range(a, b)) for a, b in zip([0] + ends[:-1], ends) if b > a]
        s = stream_seed(self.seed, epoch, self.rank)
        torch.manual_seed(s)                               # the transforms' stream when there are no workers
        kw = {k: v for k, v in self.kw.items() if k != "batch_size"}
        loader = iter(torch.utils.data.DataLoader(sub, batch_sampler=steps,
                                                  generator=torch.Generator().manual_seed(s), **kw))
        x = None
        for b, share in shares:
            try:
                if len(share):
                    x, y = next(loader)
                else:                                      # the image shape: the last batch's, else the first image's
                    x = (x if x is not None else self.dataset[int(self.indices[b[0]])][0][None])[:0]
                    y = torch.zeros(0, dtype=torch.long)
            except D.DataError as e:                       # an unreadable image: only this process met it, so
                print(f"error: {e}", file=sys.stderr)      # it says so whatever its rank; torchrun stops the rest
                sys.exit(2)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), share, self.labels[b]


def eval_shard(dataset, indices, seed, workers, device, rank, world):
    """Evaluation batches of this process's contiguous part of `indices`; .sizes: every part's size."""
    parts = np.array_split(np.asarray(indices), world)
    batches = ListBatches(dataset, parts[rank], 256, False, seed, workers, device)
    batches.sizes = [len(p) for p in parts]
    return batches


class Predicted(nn.Module):
    """Stands in for a model in evaluate(): its input is the predicted class, its output the one-hot scores."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, pred):
        return F.one_hot(pred, self.num_classes).float()


@torch.no_grad()
def evaluate_shards(model, shard, num_classes, train_counts, device):
    """evaluate() of a list split across the processes (`shard` from eval_shard): each predicts its part,
    predictions and labels are gathered in rank order and evaluate() counts them, so every number is the
    one a single process reports for the same weights on the whole list."""
    model.eval()
    preds, labels = [torch.zeros(0, dtype=torch.long, device=device)], [torch.zeros(0, dtype=torch.long, device=device)]
    for x, y, _ in shard.epoch(0):
        preds.append(model(x).argmax(1))
        labels.append(y.to(device))
    mine = torch.stack([torch.cat(preds), torch.cat(labels)])
    padded = torch.zeros(2, max(shard.sizes), dtype=torch.long, device=device)
    padded[:, :mine.shape[1]] = mine
    parts = [torch.empty_like(padded) for _ in shard.sizes]
    dist.all_gather(parts, padded)
    pred, y = torch.cat([p[:, :k] for p, k in zip(parts, shard.sizes)], 1)
    return evaluate(Predicted(num_classes), [(pred[i:i + 1000], y[i:i + 1000], None) for i in range(0, len(y), 1000)],
                    num_classes, train_counts)


def all_reduce_grads(params):
    """Sum the processes' gradients, as one flat buffer: each process's loss is its share of the global
    batch's loss, so the sum is the gradient of the global batch."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def broadcast_state(model):
    """Rank 0's parameters and buffers on every process (the start of a run, as DDP does)."""
    for t in model.state_dict().values():
        dist.broadcast(t, 0)


def average_bn_statistics(model, world):
    """Per-process BatchNorm (the CPU): the running means and variances averaged over the processes, so
    that every process evaluates and saves the same model. The mean of the running means is the one a
    single process keeps; the running variance misses the spread of the processes' batch means."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for t in (m.running_mean, m.running_var):
                dist.all_reduce(t)
                t.div_(world)
# === end shared: ddp_lists ===


def build_list_data(args, device, rank=0, world=1):
    """build_data of a file list; under torchrun this process's shares (ShardedListBatches for training,
    eval_shard for evaluation) and no `plain`: the features are computed every step."""
    if not args.train_list or not args.test_list:
        fail(f"--dataset {args.dataset} needs --train-list and --test-list ('relative/path label' files)")
    tf = lambda train: D.imagenet_transform(train, dataset=args.dataset)
    train_ds = D.FileListDataset(args.data_root, args.train_list, transform=tf(args.augment))
    test_ds = D.FileListDataset(args.data_root, args.test_list, transform=tf(False))
    C = max(train_ds.num_classes, test_ds.num_classes)
    idx, val_idx = D.carve_val(np.arange(len(train_ds)), train_ds.labels, args.val_frac, args.data_seed)
    counts = np.bincount(train_ds.labels[idx], minlength=C).tolist()
    if world > 1:
        check_shards(args.batch_size, world)
        train = ShardedListBatches(train_ds, idx, args.batch_size, args.seed, args.workers, device, rank, world)
        plain = lambda ds, indices: eval_shard(ds, indices, args.seed, args.workers, device, rank, world)
    else:
        train = ListBatches(train_ds, idx, args.batch_size, True, args.seed, args.workers, device)
        plain = lambda ds, indices: ListBatches(ds, indices, 256, False, args.seed, args.workers, device)
    test = plain(test_ds, np.arange(len(test_ds)))
    val = None
    if len(val_idx):
        val = plain(D.FileListDataset(args.data_root, args.train_list, transform=tf(False)), val_idx)
    if args.val_list:                                      # Kang et al. select on the official val list
        val_ds = D.FileListDataset(args.data_root, args.val_list, transform=tf(False))
        val = plain(val_ds, np.arange(len(val_ds)))
    if world > 1:
        return train, None, val, test, counts, C
    train_plain = train if not args.augment else plain(
        D.FileListDataset(args.data_root, args.train_list, transform=tf(False)), idx)
    return train, train_plain, val, test, counts, C


# ----- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, train, epoch, args, weights, world, cached):
    """SGD on the head over one epoch of class-balanced draws: (the row's lr / loss, the first step with a
    non-finite loss or -1, the last step)."""
    device = model.head.weight.device
    # Cosine, per epoch; Kang et al. step their scheduler before each epoch, one step ahead of this.
    lr = 0.5 * args.lr * (1 + math.cos(math.pi * (epoch + (args.lr_sequence == "kang")) / args.epochs))
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.backbone.train(args.bn == "train")
    model.head.train()
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    for step, (x, y, _, *y_batch) in enumerate(train.epoch(epoch, weights)):
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and not cached):
            logits = model(x).float()
        # torchrun: this process's share of the global batch's mean; the shares' gradients are summed
        n_batch = len(y_batch[0]) if world > 1 else len(y)
        loss = F.cross_entropy(logits, y, reduction="sum") / n_batch if world > 1 else F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            all_reduce_grads(list(model.head.parameters()))
        optimizer.step()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss.detach() * n_batch
        seen += n_batch
    if world > 1:
        loss_sum = loss_sum.double()
        dist.all_reduce(loss_sum)                          # the shares sum to the global batches' losses
        if device.type != "cuda" and args.bn == "train":
            average_bn_statistics(model.backbone, world)
    row = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum.item() / seen}
    return row, first_bad, step


# === shared: evaluate (identical in every script) ===
@torch.no_grad()
def evaluate(model, batches, num_classes, train_counts):
    """Top-1, mean per-class accuracy, per-class accuracy and many/medium/few-shot means.

    Always float32, also under --amp: bf16 logits tie often, and argmax gives a tie to the lowest class
    index, i.e. to the head classes."""
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    for x, y, _ in batches:
        pred = model(x).argmax(1)
        y = y.to(pred.device)
        correct += torch.bincount(y[pred == y], minlength=num_classes).cpu()
        total += torch.bincount(y, minlength=num_classes).cpu()
    per_class = (correct.double() / total.clamp(min=1)).tolist()
    seen = total > 0
    result = {"top1": 100 * correct.sum().item() / total.sum().item(),
              "mean_class_acc": 100 * float(np.mean([a for a, s in zip(per_class, seen) if s])),
              "per_class": [round(100 * a, 2) for a in per_class]}
    for group, mask in D.shot_groups(train_counts).items():
        accs = [per_class[c] for c in range(num_classes) if mask[c] and seen[c]]
        result[group] = 100 * float(np.mean(accs)) if accs else None
    return result
# === end shared: evaluate ===


# ----- main ----------------------------------------------------------------------------------------

def setup_device(args, world=1):
    """--gpu's device; under torchrun the local rank's GPU (any --gpu ≥ 0) or the CPU (--gpu -1)."""
    if args.gpu >= 0 and not torch.cuda.is_available():
        print("warning: CUDA is not available; running on the CPU", file=sys.stderr)
        args.gpu = -1
    index = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else args.gpu
    device = torch.device(f"cuda:{index}" if args.gpu >= 0 else "cpu")
    if args.amp and device.type != "cuda":
        print("warning: --amp needs CUDA; ignored on the CPU", file=sys.stderr)
        args.amp = False
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world > 1 else 0
        if max(index, local - 1) >= torch.cuda.device_count():
            fail(f"--gpu {max(index, local - 1)}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0"
                 + (" (torchrun: one process per GPU, --nproc_per_node at most that many)" if world > 1 else ""))
        torch.cuda.set_device(device)              # the DataLoader pins on the current device, not ours
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return device


def resume_run(args, world=1):
    """--resume: the saved run's arguments; then the --ckpt checkpoint, whose own arguments fill the data
    flags left unset; without --resume, an --out that already holds a run is refused. → (args, ckpt, the
    --ckpt checkpoint)."""
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if ckpt.get("script") != "crt.py":
            fail(f"'{args.resume}' was written by {ckpt.get('script', 'another program')}, not crt.py; "
                 f"pass it as --ckpt to re-train its classifier")
        args = resume_args(args, ckpt, RESUME_FLAGS)
    source = load_checkpoint(args.ckpt)
    checkpoint_defaults(args, source.get("args", {}))
    args.world_size = world
    released = args.dataset in ("imagenet_lt", "inat")
    D.check_rho(args.rho)
    if args.val_list and (not released or args.val_frac):
        fail("--val-list is for --dataset imagenet_lt / inat, without --val-frac")
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        fail("--epochs, --batch-size and --lr must be positive")
    if world > 1 and not released:
        fail(f"torchrun runs crt.py on file lists (--dataset imagenet_lt / inat); --dataset {args.dataset} "
             f"re-trains on one device: run it without torchrun")
    if not args.resume and os.path.exists(os.path.join(args.out, "last.pt")):
        fail(f"{args.out} already holds a run: continue it with --resume {args.out}/last.pt, "
             f"or pass another --out")
    return args, ckpt, source


def frozen_backbone(args, source, device, world=1):
    """Stage 1: the --ckpt backbone (every process reads the checkpoint), its head replaced by the identity,
    frozen; (backbone, feature dimension)."""
    backbone = build_backbone(source["arch"])
    load_backbone(backbone, source["arch"], args.ckpt)
    feat_dim = backbone.fc.weight.shape[1]
    backbone.fc = nn.Identity()
    if world > 1 and device.type == "cuda" and args.bn == "train":   # BN statistics over the global batch
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone.to(device).requires_grad_(False), feat_dim


def cache_features(args, backbone, train, plain, val, test, cached):
    """Stage 2: with `cached`, the training / validation / test features computed once (test transform, BN in
    eval mode) as Features batches; else the image batches, the features recomputed every step. → (train,
    val, test, seconds)."""
    t0 = time.time()
    if not cached:
        return train, val, test, time.time() - t0
    train_f, train_l = extract(backbone, plain.epoch(0), args.amp)
    test_f, test_l = extract(backbone, test.epoch(0), args.amp)
    train_b = Features(train_f, train_l, args.batch_size, args.seed)
    test_b = Features(test_f, test_l, 1000, args.seed)
    val_b = Features(*extract(backbone, val.epoch(0), args.amp), 1000, args.seed) if val else None
    return train_b, val_b, test_b, time.time() - t0


def init_state(args, ckpt, backbone, feat_dim, C, device, world=1, cached=False):
    """Stage 3: the new linear head on the frozen backbone (Classifier) and its SGD; with --resume the head,
    BN statistics, optimizer and RNG of last.pt. → (model, optimizer, start epoch, best)."""
    torch.manual_seed(args.seed)                           # the head's init: --seed alone, cached or not
    head = nn.Linear(feat_dim, C).to(device)
    if world > 1:
        broadcast_state(head)
    model = Classifier(backbone, head, cached)
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    start, best = 0, None
    if ckpt is not None:
        backbone.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith("fc.")})
        head.load_state_dict({k[3:]: v for k, v in ckpt["model"].items() if k.startswith("fc.")})
        optimizer.load_state_dict(ckpt["optimizer"])
        start, best = ckpt["epoch"], ckpt["best"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    return model, optimizer, start, best


def open_run(args, ckpt, device, source, counts, start, cached, feature_seconds, rank=0, world=1):
    """The run folder (rank 0): args.json, the source, metrics.jsonl cut back to the resumed epoch; then the
    lines printed above the epoch table."""
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if ckpt is None or not os.path.exists(os.path.join(args.out, "args.json")):
            meta = {**vars(args), "torch": torch.__version__, "cuda": torch.version.cuda,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
            write_json(os.path.join(args.out, "args.json"), meta)
            copy_source(__file__, args.out)
        # a resumed run drops the epochs logged after its checkpoint
        metrics = os.path.join(args.out, "metrics.jsonl")
        write_metrics(metrics, [r for r in (read_metrics(metrics) if ckpt else []) if r["epoch"] <= start])
    ddp = ""
    if world > 1:
        bn = {"cuda": ", SyncBatchNorm"}.get(device.type, ", BatchNorm per process") if args.bn == "train" else ""
        ddp = f", {world} processes × {args.batch_size // world} images per step{bn}"
    print(f"cRT on {source['arch']} from {args.ckpt} ({source.get('script', '?')}): {args.dataset} rho={args.rho:g}, "
          f"{sum(counts)} training images, bn={args.bn}, {'cached features' if cached else 'features every step'}"
          f" ({feature_seconds:.1f} s), {args.epochs} epochs on {device}{ddp}")
    print(f"{'epoch':>5} {'lr':>8} {'loss':>8} {'test':>6} {'many':>6} {'med':>6} {'few':>6} {'val':>6} {'s':>6}")


def stop_if_diverged(out, model, epoch, first_bad, step, rank=0, world=1):
    """The divergence guard, before the epoch is evaluated or saved: a non-finite loss in the epoch or a
    non-finite tensor after it stops the run (exit 1)."""
    if world > 1:                                          # torchrun: every process stops
        bad_tensor = nonfinite_tensor(model)
        bad = torch.stack([first_bad, torch.tensor(int(bad_tensor is not None), device=first_bad.device)])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad[0].item() >= 0 or bad[1].item() > 0:
            where = (f"loss is not finite at epoch {epoch + 1}, step {bad[0].item() + 1}" if bad[0].item() >= 0
                     else f"'{bad_tensor or 'a tensor of another process'}' is not finite after epoch "
                          f"{epoch + 1}, step {step + 1}")
            if rank == 0:
                stop_diverged(where, out, epoch)
            sys.exit(1)
    if first_bad.item() >= 0:
        stop_diverged(f"loss is not finite at epoch {epoch + 1}, step {first_bad.item() + 1}", out, epoch)
    bad_tensor = nonfinite_tensor(model)
    if bad_tensor:
        stop_diverged(f"'{bad_tensor}' is not finite after epoch {epoch + 1}, step {step + 1}", out, epoch)


def end_epoch(args, out, model, optimizer, epoch, row, val_m, best, t0, saved, rank=0):
    """The best epoch on validation, then the metrics row, the printed line and last.pt."""
    lr, test_m = row["lr"], row["test"]
    if val_m and (best is None or val_m["top1"] > best["val_top1"]):
        best = {"epoch": epoch + 1, "val_top1": val_m["top1"], "test": test_m}
    row.update({"val_top1": val_m["top1"] if val_m else None, "seconds": time.time() - t0})
    if rank != 0:                                          # rank 0 writes
        return best
    append_metrics(os.path.join(out, "metrics.jsonl"), row)
    print(f"{epoch + 1:5d} {lr:8.5f} {row['loss']:8.4f} {fmt(test_m['top1'])} {fmt(test_m['many'])} "
          f"{fmt(test_m['medium'])} {fmt(test_m['few'])} {fmt(row['val_top1'])} {row['seconds']:6.2f}",
          flush=True)
    weights = {**model.backbone.state_dict(), **{f"fc.{k}": v for k, v in model.head.state_dict().items()}}
    state = {**saved, "model": weights, "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
             "args": vars(args), "best": best, "rng": {"torch": torch.get_rng_state()}}
    save_atomic(state, os.path.join(out, "last.pt"))
    return best


def finish_run(args, counts, test_m, best, t_run, rank=0, world=1, *, backbone, frozen, report):
    """The check that the backbone did not move (`frozen`: its tensors before), final.json and the last
    printed lines."""
    try:
        check_unchanged(backbone, frozen, buffers=args.bn == "frozen")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if rank != 0:                                          # rank 0 writes; every process leaves together
        dist.barrier()                                     # leaving while rank 0 still writes hangs gloo
        dist.destroy_process_group()
        return
    before = report["before"]
    final = {"script": "crt.py", "ckpt": args.ckpt, "ckpt_script": report["ckpt_script"], "arch": report["arch"],
             "dataset": args.dataset, "rho": args.rho, "imb_type": args.imb_type, "seed": args.seed, "data_seed": args.data_seed, "bn": args.bn,
             "augment": args.augment, "cached_features": report["cached"], "epochs": args.epochs, "class_counts": counts,
             "before": before, "last": test_m, "test_error": 100 - test_m["top1"], "best_on_val": best,
             "feature_seconds": report["feature_seconds"], "wall_seconds": time.time() - t_run}
    write_json(os.path.join(args.out, "final.json"), final)
    print(f"{'':13}{'top1':>7} {'mean/cls':>8} {'many':>6} {'med':>6} {'few':>6}")
    for name, m in (("before cRT", before), ("after cRT", test_m)):
        if m:
            print(f"{name:<13}{m['top1']:7.2f} {m['mean_class_acc']:8.2f} {fmt(m['many'])} {fmt(m['medium'])} "
                  f"{fmt(m['few'])}")
    print(f"backbone unchanged ({'parameters and BN buffers' if args.bn == 'frozen' else 'parameters'}); "
          f"test error {final['test_error']:.2f}%")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    rank, world = process_group()
    if rank:                                               # rank 0 prints the log
        sys.stdout = open(os.devnull, "w")
    try:
        args, ckpt, source = resume_run(args, world)
        device = setup_device(args, world)
        torch.manual_seed(args.seed)
        train, plain, val, test, counts, C = build_data(args, device, rank, world)
    except D.DataError as e:
        fail(str(e))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        score = lambda m, batches: evaluate_shards(m, batches, C, counts, device)
    else:
        score = lambda m, batches: evaluate(m, batches.epoch(0), C, counts)
    backbone, feat_dim = frozen_backbone(args, source, device, world)
    before_model = previous_classifier(source, C)
    before = score(before_model.to(device), test) if before_model else None
    frozen = snapshot(backbone)
    # under torchrun the features are recomputed every step (no cache to split across the processes)
    cached = args.bn == "frozen" and not args.augment and world == 1
    train, val, test, feature_seconds = cache_features(args, backbone, train, plain, val, test, cached)
    model, optimizer, start, best = init_state(args, ckpt, backbone, feat_dim, C, device, world, cached)
    weights = D.balanced_sample_weights(train.labels.cpu())
    saved = {"script": "crt.py", "arch": source["arch"], "class_counts": counts}
    open_run(args, ckpt, device, source, counts, start, cached, feature_seconds, rank, world)

    t_run = time.time()
    for epoch in range(start, args.epochs):
        t0 = time.time()
        row, first_bad, step = train_one_epoch(model, optimizer, train, epoch, args, weights, world, cached)
        stop_if_diverged(args.out, model, epoch, first_bad, step, rank, world)
        row["test"] = score(model, test)
        val_m = score(model, val) if val else None
        best = end_epoch(args, args.out, model, optimizer, epoch, row, val_m, best, t0, saved, rank)
    test_m = score(model, test) if start >= args.epochs else row["test"]
    report = {"ckpt_script": source.get("script"), "arch": source["arch"], "before": before, "cached": cached,
              "feature_seconds": feature_seconds}
    finish_run(args, counts, test_m, best, t_run, rank, world, backbone=backbone, frozen=frozen, report=report)


if __name__ == "__main__":
    main()
