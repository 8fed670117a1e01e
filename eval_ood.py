"""Out-of-domain evaluation of a pre-trained backbone: STL-10 linear probe, or fine-tuning on image folders.

Paper 2 (Liu et al. 2022, "Self-supervised learning is more robust to dataset imbalance"): §2.1 "Out-of-domain
(OOD) evaluation", §2.2 "Datasets", App. A.1 "Evaluation", Table 1(b) and Table 2. The checkpoint's architecture
picks the protocol. CIFAR backbones (resnet32, resnet18): linear probe (eval_linear.py's linear_probe) on STL-10
(App. A.1) or a folder. ImageNet backbones (resnet10, resnet50): backbone and a new linear head fine-tuned together
on CUB-200, Stanford Cars, Oxford Pets and FGVC Aircraft, the authors' ft_moco.py recipe at the paper's lr 0.1 and
150 epochs (finetune); A^OOD(n, r) is the mean test top-1 over the four. Δ (Eq. 1): eval_linear.py --gap.

    python eval_ood.py --ckpt runs/simsiam_rwsam-cifar10-0.01-0/last.pt --target stl10 --data-root ./data
    python eval_ood.py --ckpt runs/moco_ssp-imagenet_lt-1-0/last.pt --target folder --data-root CUB_200_2011_split
    python eval_ood.py --ckpt runs/moco_ssp-imagenet_lt-1-0/last.pt --target cars --data-root ./data   # link dead
    python eval_ood.py --ckpt runs/ldam_drw-cifar10-0.01-0/last.pt --target stl10 --epochs 2 --gpu -1   # CPU smoke run

Paper numbers: Table 1(b), fine-tuning of MoCo v2 ResNet-50 pre-trained on ImageNet-LT: CUB 69.9, Cars 88.4,
Aircraft 82.9, Pets 80.1, mean 80.3 (balanced at equal n: 80.2; +rwSAM 81.4). Table 2 (ImageNet OOD, n = 116K):
MoCo v2 80.3 balanced → 80.2 at r = 0.004, supervised 76.6 → 75.5. Figure 2(c): CIFAR-10 → STL-10, a plot only.

Deliberate differences from the paper and the authors' code:
1. An epoch is one pass over the target's training split (theirs: 2,000 iterations of 48 images, 20 epochs).
2. No fallback to torchvision's supervised ImageNet weights when the keys do not match: the run stops.
3. STL-10 code is new (the authors released none): all 5,000 labelled images (not the ten folds), 32×32 by
   antialiased resize (--stl-size 96 runs the fully convolutional ResNets at 9× the cost), pre-training mean/std.
4. Last epoch reported; --val-frac > 0: best epoch on a validation split of the training split (theirs: on test).
5. No --dataset, --rho, --imb-type or --resume: --target names the data, and runs are short enough to rerun.
"""
import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import transforms

import datasets_lt as D
import run_lt as R

CIFAR_ARCHS = ("resnet32", "resnet18")
IMAGENET_ARCHS = ("resnet10", "resnet50")
TORCHVISION_TARGETS = {
    "aircraft": (torchvision.datasets.FGVCAircraft, ("trainval", "test"), {"annotation_level": "variant"}),
    "pets": (torchvision.datasets.OxfordIIITPet, ("trainval", "test"), {"target_types": "category"}),
    "cars": (torchvision.datasets.StanfordCars, ("train", "test"), {})}


# ----- flags ---------------------------------------------------------------------------------------

# the protocols' defaults (REFERENCE §8): probe as eval_linear.py; fine-tuning as ft_moco.py (batch 48, wd 5e-4)
# at the paper's lr 0.1 and 150 epochs
DEFAULTS = {"probe": {"epochs": 100, "batch_size": 256, "lr": 30.0, "wd": 0.0},
            "finetune": {"epochs": 150, "batch_size": 48, "lr": 0.1, "wd": 5e-4}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Out-of-domain evaluation (paper 2, §2.1): STL-10 linear probe "
                                            "or fine-tuning on image folders.")
    # --- shared flags (names and order of every script; --target replaces --dataset, and --rho,
    # --imb-type and --resume do not apply) ---
    p.add_argument("--data-root", default="./data", help="target dataset folder")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    default = lambda k: f"default: {DEFAULTS['probe'][k]:g} (probe), {DEFAULTS['finetune'][k]:g} (fine-tuning)"
    p.add_argument("--epochs", type=int, default=None, help=default("epochs"))
    p.add_argument("--batch-size", type=int, default=None, help=default("batch_size"))
    p.add_argument("--lr", type=float, default=None, help=default("lr") + "; fine-tuning: the new head's")
    p.add_argument("--wd", type=float, default=None, help=default("wd"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the data subsets (long-tailed draw, balanced/downsampled subsets, validation split); --seed varies training only")
    p.add_argument("--out", default=None, help="default: runs/eval_ood-<target>-<checkpoint's run folder>-<seed>")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--val-frac", type=float, default=0.0,
                   help="validation split carved from the training subset; 0 = report last epoch only")
    # --- this method ---
    p.add_argument("--ckpt", required=True, help="checkpoint of any script of this project")
    p.add_argument("--target", required=True, choices=["stl10", "folder", "aircraft", "pets", "cars"],
                   help="stl10 / folder for CIFAR backbones (linear probe); folder / aircraft / pets / cars for "
                        "ImageNet backbones (fine-tuning)")
    p.add_argument("--stl-size", type=int, default=32, choices=[32, 96],
                   help="STL-10 resolution: 32 = resize 96→32 (antialiased bilinear), 96 = as stored")
    p.add_argument("--augment", action="store_true",
                   help="probe: crop/flip the training images and run the frozen backbone every step")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--backbone-lr-mult", type=float, default=0.1, help="fine-tuning: backbone lr = this × --lr")
    p.add_argument("--size", type=int, default=224,
                   help="fine-tuning: crop size (images are first resized to a square of size·256/224)")
    p.add_argument("--norm", default="pretrain", choices=["pretrain", "target"],
                   help="normalise the target with the mean/std the backbone was pre-trained with (stored in the "
                        "checkpoint) or with the target's own statistics")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers (fine-tuning)")
    p.add_argument("--tag", default=None,
                   help="method name in the Δ table; default: the pre-training script (+ its --opt)")
    p.add_argument("--strict-fp32", action="store_true", help="disable TF32 in cuDNN convolutions and matmuls")
    p.add_argument("--print-freq", type=int, default=0,
                   help="a progress line every N steps of an epoch; 0: at most every 10 s (none in a short epoch)")
    p.error = R.fail                                       # one line and exit 2, not the usage text
    args = p.parse_args(argv)
    if args.out is None:
        run = os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
        args.out = os.path.join("runs", f"eval_ood-{args.target}-{run}-{args.seed}")
    check_args(args)
    return args


def set_protocol_defaults(args, arch):
    """Probe for CIFAR backbones, fine-tuning for ImageNet ones; fills the defaults of each."""
    if arch not in CIFAR_ARCHS + IMAGENET_ARCHS:
        R.fail(f"unknown architecture '{arch}' in the checkpoint; this script knows "
               f"{', '.join(CIFAR_ARCHS + IMAGENET_ARCHS)}")
    args.protocol = "probe" if arch in CIFAR_ARCHS else "finetune"
    if args.protocol == "probe" and args.target not in ("stl10", "folder"):
        R.fail(f"--target {args.target} is for ImageNet backbones (fine-tuning at {args.size} px); a {arch} "
               f"is probed on --target stl10 or a folder of small images")
    if args.protocol == "finetune" and args.target == "stl10":
        R.fail(f"--target stl10 is the protocol for CIFAR backbones; an ImageNet {arch} is fine-tuned on "
               f"--target folder, aircraft, pets or cars")
    vars(args).update({k: v for k, v in DEFAULTS[args.protocol].items() if vars(args)[k] is None})


def check_args(args):
    R.check_ranges(args, R.SHARED_RANGES + [("backbone_lr_mult", 0, None, "[)"), ("size", 1, None, "[)")])


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


def build_backbone(arch, num_classes):
    """The checkpoint's architecture with a fresh `fc`; torchvision's ResNet-10/50 as ldam_drw.py builds them."""
    if arch in CIFAR_ARCHS:
        return (ResNet32 if arch == "resnet32" else ResNet18)(num_classes)
    block, layers = ((torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]) if arch == "resnet10" else
                     (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]))
    return torchvision.models.resnet.ResNet(block, layers, num_classes=num_classes)


def build_model(args, ckpt, num_classes, device):
    torch.manual_seed(args.seed)
    model = build_backbone(ckpt["arch"], num_classes).to(device)
    R.load_backbone(model, ckpt["arch"], args.ckpt)
    return model


# === shared: pretrain_meta (identical in eval_linear.py and eval_ood.py) ===
SSL_SCRIPTS = ("rotation_ssp.py", "moco_ssp.py", "simsiam_rwsam.py")
SUPERVISED_SCRIPTS = ("ldam_drw.py", "self_training.py", "crt.py")


def ratio_from_counts(counts):
    """r of paper 2 (§2.1): images of the rarest class over images of the most frequent, from the class
    counts the run trained on. 1 when they differ by at most one image (a balanced subset of n images
    over C classes gives n mod C classes one image more)."""
    if not counts or max(counts) == 0:
        return None
    lo, hi = min(counts), max(counts)
    return 1.0 if hi - lo <= 1 else lo / hi


def method_key(script, a, tag=None):
    """Everything that makes two pre-training runs different methods (paper 2 pairs A(n, 1) and A(n, r)
    of one method only): the script, its --recipe, its --opt (SimSiam / MoCo with SGD, SAM or rwSAM), its
    --loss and --rule (CE and LDAM-DRW are different supervised methods), and whether it started from
    --pretrained weights. --tag replaces it."""
    if tag:
        return tag
    key = script.removesuffix(".py") + (f"[{a['recipe']}]" if a.get("recipe") else "") + \
        (f"+{a['opt']}" if a.get("opt") else "")
    if a.get("loss") or a.get("rule"):
        key += f":{a.get('loss')}-{a.get('rule')}"
    return key + ("+pretrained" if a.get("pretrained") else "")


def pretrain_meta(ckpt, path, tag=None):
    """What paper 2's Δ (Eq. 1) needs to pair runs: the pre-training method (method_key) and architecture,
    whether it was self-supervised, its dataset, n (images it trained on) and imbalance ratio r, both from
    the class counts it trained on (never from --rho, which an ImageNet-LT list run does not use)."""
    a = ckpt.get("args") or {}
    script = ckpt.get("script") or "unknown"
    counts = ckpt.get("class_counts")
    return {"checkpoint": os.path.abspath(path), "script": script, "method": method_key(script, a, tag),
            "kind": "SSL" if script in SSL_SCRIPTS else "SL" if script in SUPERVISED_SCRIPTS else "?",
            "arch": ckpt["arch"], "dataset": a.get("dataset"), "rho": a.get("rho"), "imb_type": a.get("imb_type"),
            "balanced": bool(a.get("balanced")), "subsample": a.get("subsample", 1.0), "r": ratio_from_counts(counts),
            "n": int(sum(counts)) if counts else None, "seed": a.get("seed"), "data_seed": a.get("data_seed", a.get("seed")), "epoch": ckpt.get("epoch")}
# === end shared: pretrain_meta ===


# ----- the method (paper 2 §2.1 out-of-domain: linear probe, fine-tuning; App. A.1) ----------------

# === shared: linear_probe (identical in eval_linear.py and eval_ood.py) ===
def backbone_features(model, x):
    """The input of the classifier `fc`: the globally pooled feature of the backbone (64-d ResNet-32,
    512-d ResNet-18 / ResNet-10, 2048-d ResNet-50)."""
    if isinstance(model, torchvision.models.ResNet):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        return torch.flatten(model.avgpool(x), 1)
    return model.features(x)


def backbone_state(model):
    """A copy of every backbone tensor: parameters and BatchNorm buffers (running statistics, counters)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(R.HEAD_PREFIXES)}


def sanity_check(model, before):
    """Every backbone tensor is bit-identical to the copy `before` (the check of MoCo's linear
    classification script); raises AssertionError naming what changed."""
    now = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(now[k], v)]
    assert not changed, (f"the frozen backbone changed during probing: {len(changed)} tensors differ "
                         f"(first: {changed[0]})")


@torch.no_grad()
def extract_features(model, batches, amp=False):
    """Backbone features of every image of `batches`, in order, in eval mode: (float32 N×d, labels)."""
    model.eval()
    feats, labels = [], []
    for x, y, _ in batches.epoch(0):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            feats.append(backbone_features(model, x).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


class FeatureBatches:
    """Cached features with GPULoader's interface: epoch(e) → (features, labels, indices), in a
    permutation drawn from a generator seeded by (seed, epoch) when `shuffle`."""

    def __init__(self, feats, labels, batch_size, shuffle=False, seed=0):
        self.feats, self.labels, self.batch_size, self.shuffle, self.seed = feats, labels, batch_size, shuffle, seed

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, epoch):
        n, dev = len(self.labels), self.feats.device
        order = (torch.randperm(n, generator=torch.Generator(dev).manual_seed(self.seed * 100_003 + epoch), device=dev)
                 if self.shuffle else torch.arange(n, device=dev))
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.feats[idx], self.labels[idx], idx


def probe_lr(epoch, args):
    """Learning rate of 0-based `epoch`: ×0.1 at 60% and again at 80% of the epochs (REFERENCE §8:
    epochs 60 and 80 of 100)."""
    return args.lr * 0.1 ** ((epoch >= int(0.6 * args.epochs)) + (epoch >= int(0.8 * args.epochs)))


def probe_batches(images, labels, test_images, test_labels, num_classes, mean, std, args):
    """Batches for a probe on device-resident uint8 images (N×3×H×W) with numpy labels:
    (train_plain, train_augmented or None, val or None, test, training class counts). The validation
    split is carved class-stratified from the training split, never from the test set."""
    idx, val_idx = D.carve_val(np.arange(len(labels)), labels, args.val_frac, args.data_seed)
    dev = images.device
    train_x = images[torch.as_tensor(idx, device=dev)]
    plain = D.GPULoader(train_x, labels[idx], 1024, mean, std, dev)
    aug = (D.GPULoader(train_x, labels[idx], args.batch_size, mean, std, dev, augment="crop_flip", seed=args.seed)
           if args.augment else None)
    val = (D.GPULoader(images[torch.as_tensor(val_idx, device=dev)], labels[val_idx], 1024, mean, std, dev)
           if len(val_idx) else None)
    test = D.GPULoader(test_images, test_labels, 1024, mean, std, dev)
    return plain, aug, val, test, np.bincount(labels[idx], minlength=num_classes).tolist()


def linear_probe(model, plain, aug, val, test, num_classes, counts, args):
    """Paper 2 §2.1, ID evaluation: train only `model.fc` (re-initialised N(0, 0.01²), bias 0) on the frozen
    backbone in eval mode, on the cached features of `plain` or, with `aug`, on the backbone run on every
    augmented batch; validation and test features are cached. One metrics.jsonl row per epoch; returns
    (last-epoch test metrics, best epoch on validation or None, timings) after the sanity check."""
    before = backbone_state(model)
    model.eval()
    model.requires_grad_(False)
    head = model.fc
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    head.requires_grad_(True)
    t0 = time.time()
    train = None if aug is not None else FeatureBatches(*extract_features(model, plain, args.amp),
                                                        args.batch_size, True, args.seed)
    test_f = FeatureBatches(*extract_features(model, test, args.amp), 4096)
    val_f = FeatureBatches(*extract_features(model, val, args.amp), 4096) if val is not None else None
    feature_seconds = time.time() - t0
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd,
                                fused=head.weight.is_cuda)
    print(R.table_header("train", "test", "val"))
    best, seconds = None, []
    for epoch in range(args.epochs):
        t1 = time.time()
        lr = probe_lr(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        dev = head.weight.device
        loss_sum = torch.zeros((), device=dev)
        hits = torch.zeros((), device=dev, dtype=torch.long)
        first_bad = torch.full((), -1, device=dev, dtype=torch.long)
        seen, progress = 0, R.Progress(len(train if train is not None else aug), args.print_freq)
        for step, (x, y, _) in enumerate(train.epoch(epoch) if train is not None else aug.epoch(epoch)):
            if train is None:
                with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
                    x = backbone_features(model, x).float()
            logits = head(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            loss_sum += loss.detach() * len(y)
            hits += (logits.argmax(1) == y).sum()
            seen += len(y)
            progress(step, seen, lambda: loss_sum.item() / seen)
        if first_bad.item() >= 0:
            print(f"error: probe loss is not finite at epoch {epoch + 1}, step {first_bad.item() + 1} (lr {lr:g}); "
                  f"try a smaller --lr", file=sys.stderr)
            sys.exit(1)
        test_m = D.evaluate(head, test_f.epoch(0), num_classes, counts)
        val_m = D.evaluate(head, val_f.epoch(0), num_classes, counts) if val_f is not None else None
        if val_m and (best is None or val_m["top1"] > best["val_top1"]):
            best = {"epoch": epoch + 1, "val_top1": val_m["top1"], "test": test_m}
        seconds.append(time.time() - t1)
        row = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum.item() / seen, "train_top1": 100 * hits.item() / seen,
               "test": test_m, "val_top1": val_m["top1"] if val_m else None, "seconds": seconds[-1]}
        R.append_metrics(os.path.join(args.out, "metrics.jsonl"), row)
        print(f"{epoch + 1:5d} {lr:8.4f} {row['loss']:8.4f} {R.fmt(row['train_top1'])} {R.fmt(test_m['top1'])} "
              f"{R.fmt(row['val_top1'])} {row['seconds']:6.2f}", flush=True)
    sanity_check(model, before)
    timing = {"feature_seconds": feature_seconds, "seconds_per_epoch": float(np.median(seconds)),
              "probe_seconds": time.time() - t0}
    return test_m, best, timing
# === end shared: linear_probe ===


def finetune_lr(epoch, args):
    """--lr (the new head; paper 2 App. A.1: initial lr 0.1) × 0.1 at 25%, 50% and 75% of the epochs (the
    authors' ft_moco.py command: decays at epochs 5, 10, 15 of 20)."""
    return args.lr * 0.1 ** sum(epoch >= max(1, int(f * args.epochs)) for f in (0.25, 0.5, 0.75))


def finetune(model, train, val, test, num_classes, counts, args):
    """Paper 2 §2.1, OOD evaluation: backbone φ (at --backbone-lr-mult × the lr) and a new head θ trained together on
    the target. One metrics.jsonl row per epoch; returns (last-epoch test metrics, best epoch on val or None, {})."""
    device = next(model.parameters()).device
    backbone = [p for name, p in model.named_parameters() if not name.startswith(R.HEAD_PREFIXES)]
    optimizer = torch.optim.SGD([{"params": backbone, "lr_mult": args.backbone_lr_mult},
                                 {"params": model.fc.parameters(), "lr_mult": 1.0}], lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd, nesterov=True, fused=device.type == "cuda")
    print(R.table_header("train", "test", "val"))
    best = None
    for epoch in range(args.epochs):
        t0, lr = time.time(), finetune_lr(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        model.train()
        loss_sum, hits, seen = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long), 0
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        progress = R.Progress(len(train), args.print_freq)
        for step, (x, y, _) in enumerate(train.epoch(epoch)):
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = model(x).float()
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            loss_sum += loss.detach() * len(y)
            hits += (logits.argmax(1) == y).sum()
            seen += len(y)
            progress(step, seen, lambda: loss_sum.item() / seen)
        bad, bad_tensor = first_bad.item(), R.nonfinite_tensor(model)
        if bad >= 0 or bad_tensor:
            print(f"error: loss is not finite at epoch {epoch + 1}, step {bad + 1}; stopped, nothing saved" if bad >= 0
                  else f"error: '{bad_tensor}' is not finite after epoch {epoch + 1}, step {step + 1}; stopped, "
                  f"nothing saved (try a lower --lr)", file=sys.stderr)
            sys.exit(1)
        test_m = D.evaluate(model, test.epoch(0), num_classes, counts)
        val_m = D.evaluate(model, val.epoch(0), num_classes, counts) if val is not None else None
        if val_m and (best is None or val_m["top1"] > best["val_top1"]):
            best = {"epoch": epoch + 1, "val_top1": val_m["top1"], "test": test_m}
        row = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum.item() / seen, "train_top1": 100 * hits.item() / seen,
               "test": test_m, "val_top1": val_m["top1"] if val_m else None, "seconds": time.time() - t0}
        R.append_metrics(os.path.join(args.out, "metrics.jsonl"), row)
        print(R.table_row(epoch + 1, lr, row["loss"], [row["train_top1"], test_m["top1"], row["val_top1"]],
                          row["seconds"]), flush=True)
    return test_m, best, {}                                # seconds per epoch: R.finish_run, from metrics.jsonl


# ----- data ----------------------------------------------------------------------------------------

def build_data(args, device):
    """Probe: (train_plain, train_aug, val, test, counts, C); fine-tuning: (train, val, test, counts, C); exit 2."""
    try:
        if args.protocol == "finetune":
            return finetune_data(args, device)
        dataset = "stl10" if args.target == "stl10" else "folder"
        train_x, train_y, names = D.load_split(dataset, args.data_root, True, args.download)
        test_x, test_y, _ = D.load_split(dataset, args.data_root, False, args.download)
        train_t, test_t = D.to_device(train_x, device), D.to_device(test_x, device)
        if dataset == "stl10" and args.stl_size != train_t.shape[-1]:
            train_t, test_t = resize_images(train_t, args.stl_size), resize_images(test_t, args.stl_size)
        if args.norm == "target":
            args.mean, args.std = D.mean_std(dataset, train_t.permute(0, 2, 3, 1).cpu())
        return (*probe_batches(train_t, train_y, test_t, test_y, len(names), args.mean, args.std, args), len(names))
    except D.DataError as e:
        R.fail(str(e))


def finetune_data(args, device):
    """A fine-tuning target through DataLoaders: (train, val, test, counts, C); val: training images, test view."""
    train_tf, test_tf = (finetune_transform(train, args.size, args.mean, args.std) for train in (True, False))
    if args.target == "folder":
        paths = [os.path.join(args.data_root, split) for split in ("train", "test")]
        for path in (p for p in paths if not os.path.isdir(p)):
            raise D.DataError(f"--target folder needs '{path}/<class>/<image>', but '{path}' does not exist")
        try:
            train_ds, val_ds, test_ds = (torchvision.datasets.ImageFolder(path, tf, loader=D.open_image) for path, tf in
                                         ((paths[0], train_tf), (paths[0], test_tf), (paths[1], test_tf)))
        except FileNotFoundError as e:
            raise D.DataError(f"no images under '{args.data_root}': {e}") from None
        if train_ds.classes != test_ds.classes:
            raise D.DataError(f"'{paths[0]}' and '{paths[1]}' hold different class folders")
        labels, test_labels, C = train_ds.targets, test_ds.targets, len(train_ds.classes)
    else:
        cls, (train_split, test_split), kw = TORCHVISION_TARGETS[args.target]
        try:
            train_ds = cls(args.data_root, split=train_split, transform=train_tf, download=args.download, **kw)
            val_ds = cls(args.data_root, split=train_split, transform=test_tf, **kw)
            test_ds = cls(args.data_root, split=test_split, transform=test_tf, download=args.download, **kw)
        except (RuntimeError, ValueError) as e:
            how = "pass --download on a machine with internet access, or " if args.target != "cars" else ""
            raise D.DataError(f"{cls.__name__} not found under '{args.data_root}' ({str(e).splitlines()[0]}): "
                              f"{how}point --data-root at a folder that holds it") from None
        of = lambda ds: ds._labels if hasattr(ds, "_labels") else [label for _, label in ds._samples]  # no decoding
        labels, test_labels, C = of(train_ds), of(test_ds), len(train_ds.classes)
    train_ds.labels = val_ds.labels = labels = np.asarray(labels, dtype=np.int64)       # what ListBatches reads
    test_ds.labels = np.asarray(test_labels, dtype=np.int64)
    idx, val_idx = D.carve_val(np.arange(len(labels)), labels, args.val_frac, args.data_seed)
    make = lambda ds, i, bs, train: D.ListBatches(ds, i, bs, train, args.seed, args.workers, device)
    val = make(val_ds, val_idx, 256, False) if len(val_idx) else None
    test = make(test_ds, np.arange(len(test_ds.labels)), 256, False)
    return make(train_ds, idx, args.batch_size, True), val, test, np.bincount(labels[idx], minlength=C).tolist(), C


def resize_images(x, size, chunk=1024):
    """uint8 N×3×H×W → uint8 N×3×size×size: antialiased bilinear (PIL's low-pass when shrinking), rounded."""
    out = torch.empty(len(x), 3, size, size, dtype=torch.uint8, device=x.device)
    for s in range(0, len(x), chunk):
        y = F.interpolate(x[s:s + chunk].float(), (size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def pretrain_norm(ckpt, path):
    """The pre-training mean/std, which the frozen BN expects: the checkpoint's, else (with a note) its dataset's."""
    if ckpt.get("mean") is not None and ckpt.get("std") is not None:
        return tuple(ckpt["mean"]), tuple(ckpt["std"]), "checkpoint"
    dataset = (ckpt.get("args") or {}).get("dataset")
    if dataset not in ("cifar10", "cifar100", "svhn", "imagenet_lt", "inat"):
        with contextlib.redirect_stdout(None):             # quietly: a checkpoint that does not fit says so first
            R.load_backbone(build_backbone(ckpt["arch"], 1), ckpt["arch"], path)
        R.fail(f"'{path}' stores no mean/std (written before checkpoints carried them) and its pre-training data "
               f"({dataset}) has no fixed constants; pass --norm target to use the target's own statistics")
    mean, std = D.mean_std(dataset)
    print(f"note: '{path}' stores no mean/std (written before checkpoints carried them); normalising with the "
          f"constants of its pre-training dataset {dataset}: mean {mean}, std {std}")
    return mean, std, f"{dataset} constants"


def finetune_transform(train, size, mean, std):
    """The authors' ft_moco.py: square resize to size·256/224 (their ResizeImage(256)), then train: RandomResizedCrop
    + flip, no colour jitter; test: CenterCrop."""
    crop = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if train else \
        [transforms.CenterCrop(size)]
    return transforms.Compose([transforms.Resize((int(size * 256 / 224),) * 2), *crop, transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


# ----- main ----------------------------------------------------------------------------------------

def start_run(args):
    """No --resume: --ckpt, its protocol (set_protocol_defaults), normalisation (pretrain_norm), a free --out."""
    ckpt = R.load_checkpoint(args.ckpt)
    set_protocol_defaults(args, ckpt["arch"])
    if args.norm == "target" and args.protocol == "finetune":
        R.fail("--norm target applies to the probe of CIFAR backbones; fine-tuning normalises with the "
               "pre-training statistics (drop --norm)")
    if args.protocol == "finetune" and args.momentum <= 0:
        R.fail(f"--momentum {args.momentum:g}: fine-tuning uses Nesterov SGD, which needs a momentum > 0")
    args.mean, args.std, args.norm_source = pretrain_norm(ckpt, args.ckpt) if args.norm == "pretrain" else \
        (None, None, "target")
    if os.path.exists(os.path.join(args.out, "final.json")):
        R.fail(f"{args.out} already holds a result; pass another --out")
    R.claim_out(args.out, resumable=False)
    return args, ckpt


def open_run(args, meta, counts, num_classes, device):
    """args.json (with the pre-training metadata), the source copy, an empty metrics.jsonl, the line of what runs."""
    R.open_run(args, None, device, __file__, 0, extra={"pretrain": meta})
    what = (f"linear probe ({'crop/flip, backbone every step' if args.augment else 'cached features'}"
            f"{f', STL-10 at {args.stl_size} px' if args.target == 'stl10' else ''})" if args.protocol == "probe" else
            f"fine-tuning (head lr {args.lr:g}, backbone lr {args.lr * args.backbone_lr_mult:g}, {args.size} px)")
    print(f"{what} of {meta['arch']} from {meta['script']} ({meta['kind']}, pre-trained on {meta['dataset']} "
          f"n={meta['n']} r={meta['r']}) on {args.target}: {sum(counts)} training images, {num_classes} classes, "
          f"{args.epochs} epochs on {device}")


def finish_run(args, model, meta, counts, last, best, timing, t_run):
    """<out>/last.pt (backbone and trained head), final.json, and the last line."""
    R.save_atomic({"script": "eval_ood.py", "arch": meta["arch"], "model": model.state_dict(), "epoch": args.epochs,
                   "args": vars(args), "class_counts": counts, "pretrain": meta}, os.path.join(args.out, "last.pt"))
    name = args.target if args.target != "folder" else os.path.basename(os.path.normpath(args.data_root))
    name = f"stl10@{args.stl_size}" if args.target == "stl10" else f"{args.protocol}:{name}"     # in the Δ table
    R.finish_run(args.out, {
        "script": "eval_ood.py", "eval": name, "target": args.target, "protocol": args.protocol,
        "stl_size": args.stl_size if args.target == "stl10" else None, "pretrain": meta,
        **{k: vars(args)[k] for k in ("augment", "seed", "data_seed", "epochs", "lr", "batch_size", "wd")},
        "normalisation": {"mean": args.mean, "std": args.std, "source": args.norm_source}, "class_counts": counts,
        "last": last, "top1": last["top1"], "per_class": last["per_class"], "best_on_val": best,
        "sanity_check": "passed" if args.protocol == "probe" else None, **timing}, t_run)
    print(f"last epoch: test top-1 {last['top1']:.2f}%, mean per-class {last['mean_class_acc']:.2f}%"
          + (f"; best on validation: epoch {best['epoch']}, test top-1 {best['test']['top1']:.2f}%" if best else ""))


def main(argv=None):
    args = parse_args(argv)
    args, ckpt = start_run(args)
    device = R.setup_device(args)
    *batches, counts, C = build_data(args, device)
    model = build_model(args, ckpt, C, device)
    meta = pretrain_meta(ckpt, args.ckpt, args.tag)
    open_run(args, meta, counts, C, device)
    t_run = time.time()
    last, best, timing = (linear_probe if args.protocol == "probe" else finetune)(model, *batches, C, counts, args)
    if args.protocol == "probe":
        print("sanity check passed: every backbone tensor (parameters and BatchNorm buffers) is unchanged")
    finish_run(args, model, meta, counts, last, best, timing, t_run)


if __name__ == "__main__":
    main()
