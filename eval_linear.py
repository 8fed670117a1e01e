"""Linear probe of a frozen backbone on the full balanced training set, and paper 2's relative gap Δ.

Paper 2 (Liu et al. 2022, "Self-supervised learning is more robust to dataset imbalance"): §2.1 "In-domain
(ID) evaluation", §2.2, App. A.1 "Evaluation", Eq. (1) (§2.3). A backbone pre-trained on n images with
imbalance ratio r by any script of this project is frozen; a C-way linear head is trained on the full balanced
training split of the same dataset (CIFAR-10: all 50,000 images); its test top-1 is A(n, r). Eq. (1):
Δ(n, r) = (A(n, 1) − A(n, r)) / A(n, 1), for SSL (Δ^SSL) and supervised (Δ^SL) backbones apart.
Recipe: REFERENCE §8 (linear_probe, probe_lr). --protocol authors (default, Table 1(a)): the authors' bicubic
views every step (AuthorsViews); --protocol fast: cached features. README "Judging a representation".

    python eval_linear.py --ckpt runs/simsiam_rwsam-cifar10-0.01-0/last.pt --gpu 0    # ID probe, the authors' views
    python eval_linear.py --ckpt runs/ldam_drw-cifar10-0.01-0/last.pt --protocol fast --val-frac 0.1   # + best on val
    python eval_linear.py --ckpt runs/moco_ssp-imagenet_lt-1-0/last.pt --data-root IMNET \\
        --train-list ImageNet_train.txt --test-list ImageNet_val.txt                    # ImageNet ID probe
    python eval_linear.py --gap runs/eval_linear-*/final.json                           # Δ table, Eq. (1)
    python eval_linear.py --ckpt runs/ldam_drw-cifar10-0.01-0/last.pt --epochs 2 --gpu -1   # CPU smoke run

Paper numbers: Table 1(a), CIFAR-10 linear probe accuracy (%), SimSiam ResNet-18, r = 0.01: step 84.3
(balanced at equal n 85.8, +rwSAM 85.6), exp 81.4 (balanced 82.0, +rwSAM 82.7). Table 2 (ImageNet ID,
n = 116K, r = 0.004): MoCo v2 50.4 → 49.5 (Δ^SSL = 1.8%), supervised 54.3 → 52.9 (Δ^SL = 2.6%).

Deliberate differences from the paper and the authors' code:
1. Last epoch reported; --val-frac > 0: best epoch on a validation split of the training split (theirs: on test).
2. Batch 256 at lr 30 (MoCo's linear recipe, REFERENCE §8); App. A.1 states batch 4096: --batch-size 4096.
   Paper 2 probes SL backbones alike, though lr 30 overshoots there (a CE ResNet-32 probe's loss stayed > 2).
3. --protocol authors keeps the last partial training batch and scores every test image (they dropped the last 16).
4. The probe trains on the full training split, whatever subset pre-training used (ImageNet: pass full lists).
5. No --rho, --imb-type or --resume: the probe data are balanced, a probe is short; data flags default to the ckpt's.
6. Δ (--gap): n and r from the pre-training class counts, never --rho; pairs only at equal n (gap_rows, README).
"""
import argparse
import json
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


# ----- flags ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Linear probe of a frozen backbone (paper 2, §2.1) and the "
                                            "relative gap Δ of Eq. (1).")
    # --- shared flags (names and order of every script; the data default to the checkpoint's, and
    # --rho, --imb-type and --resume do not apply: the probe always trains on the full balanced split) ---
    p.add_argument("--dataset", default=None, choices=["cifar10", "cifar100", "svhn", "folder", "imagenet_lt", "inat"],
                   help="default: the checkpoint's pre-training dataset")
    p.add_argument("--data-root", default=None, help="dataset folder; default: the checkpoint's")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=30.0)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the data subsets (long-tailed draw, balanced/downsampled subsets, validation split); --seed varies training only")
    p.add_argument("--out", default=None, help="default: runs/eval_linear-<checkpoint's run folder>-<seed>")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--val-frac", type=float, default=0.0,
                   help="validation split carved from the training subset; 0 = report last epoch only")
    # --- this method ---
    p.add_argument("--ckpt", default=None, help="checkpoint of any script of this project; its backbone is probed")
    p.add_argument("--gap", nargs="+", default=None, metavar="FINAL_JSON",
                   help="print the Δ table of Eq. (1) from final.json files of eval_linear.py / eval_ood.py")
    p.add_argument("--protocol", default="authors", choices=["authors", "fast"],
                   help="authors: the head trains on random views through the frozen backbone every step "
                        "(CIFAR: RandomResizedCrop(32, 0.8–1, bicubic) + flip, test Resize(36) + CenterCrop(32); "
                        "file lists: RandomResizedCrop(224) + flip); fast: features computed once, no augmentation")
    p.add_argument("--augment", action="store_true", help="--protocol fast only: pad-4 crop + flip the training "
                                                          "images and run the frozen backbone every step")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--train-list", default=None, help="ImageNet / iNat: 'relative/path label' list of the "
                                                      "full balanced training set")
    p.add_argument("--test-list", default=None, help="ImageNet / iNat: test list")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers (file lists only)")
    p.add_argument("--tag", default=None,
                   help="method name in the Δ table; default: the pre-training script (+ its --opt)")
    p.add_argument("--strict-fp32", action="store_true", help="disable TF32 in cuDNN convolutions and matmuls")
    p.add_argument("--print-freq", type=int, default=0,
                   help="a progress line every N steps of an epoch; 0: at most every 10 s (none in a short epoch)")
    p.error = R.fail                                       # one line and exit 2, not the usage text
    args = p.parse_args(argv)
    if (args.ckpt is None) == (args.gap is None):
        R.fail("pass --ckpt PATH to probe a checkpoint, or --gap FINAL_JSON ... for the Δ table (not both)")
    if args.augment and args.protocol != "fast":
        R.fail("--augment is a variant of --protocol fast; --protocol authors already trains on augmented views")
    if args.ckpt and args.out is None:
        run = os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
        args.out = os.path.join("runs", f"eval_linear-{run}-{args.seed}")
    check_args(args)
    return args


def check_args(args):
    R.check_ranges(args, R.SHARED_RANGES)


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
    if arch in ("resnet32", "resnet18"):
        return (ResNet32 if arch == "resnet32" else ResNet18)(num_classes)
    if arch not in ("resnet10", "resnet50"):
        R.fail(f"unknown architecture '{arch}' in the checkpoint; this script knows resnet32, resnet18, resnet10, "
               f"resnet50")
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


# ----- the method (paper 2 §2.1 in-domain linear probe; the relative gap Δ, Eq. (1)) ---------------

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


# the Δ table, Eq. (1)
def read_result(path):
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        R.fail(f"cannot read '{path}' ({e.__class__.__name__}: {e})")
    if not isinstance(result, dict) or not {"pretrain", "last", "eval"} <= result.keys():
        R.fail(f"'{path}' is not a final.json of eval_linear.py or eval_ood.py (no 'eval', 'pretrain' and 'last')")
    return result


def ood_means(results):
    """Paper 2 App. A.1: ImageNet OOD accuracy is the mean over the fine-tuning targets (CUB-200, Cars, Pets, Aircraft):
    eval_ood.py's results of one checkpoint and seed become one, "finetune:mean(<targets>)", paired with its like."""
    out, tuned = [], {}
    for res in results:
        key = (res["pretrain"].get("checkpoint"), res.get("seed"))
        (tuned.setdefault(key, []) if str(res["eval"]).startswith("finetune:") else out).append(res)
    for group in tuned.values():
        top1 = {r["eval"].removeprefix("finetune:"): r["last"]["top1"] for r in sorted(group, key=lambda r: r["eval"])}
        if len(top1) != len(group):
            R.fail(f"checkpoint {group[0]['pretrain'].get('checkpoint')} was fine-tuned twice on one target with the "
                   f"same seed; pass each result once")
        out.append({**group[0], "eval": f"finetune:mean({'+'.join(top1)})",
                    "last": {"top1": float(np.mean([r["last"]["top1"] for r in group]))}, "targets": top1})
    return out


def gap_rows(results):
    """Paper 2, Eq. (1): Δ(n, r) = (A(n, 1) − A(n, r)) / A(n, 1) of the mean last-epoch test top-1 A, for every
    evaluation, method, arch, dataset and n (pretrain_meta) with a balanced (r = 1) and an imbalanced run;
    delta_std: the sample std of the per-seed Δ. Returns (rows, [(key, reason)] of the runs without a partner)."""
    stats = lambda v: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None)    # mean, sample std
    by_seed = lambda runs: {s: np.mean([acc for t, acc in runs if t == s]) for s, _ in runs}
    groups, rows, unpaired = {}, [], []
    for res in ood_means(results):
        m = res["pretrain"]
        key = (res["eval"], m["kind"], m["method"], m.get("arch"), m["dataset"], m["n"])
        if m["n"] is None or m["r"] is None:
            unpaired.append((key, "n or r unknown: the checkpoint has no class counts"))
            continue
        runs = groups.setdefault(key, {}).setdefault((m["r"], m["imb_type"] if m["r"] != 1 else None), [])
        runs.append((m.get("seed"), res["last"]["top1"]))
    for key, by_r in groups.items():
        balanced = by_r.pop((1, None), [])
        if not balanced or not by_r:
            have = f"{len(balanced)} balanced" if balanced else f"{sum(map(len, by_r.values()))} imbalanced"
            unpaired.append((key, f"{have} run(s), no {'imbalanced' if balanced else 'balanced'} run of equal n"))
            continue
        (a1, s1), base = stats([acc for _, acc in balanced]), by_seed(balanced)
        for (r, imb_type), runs in by_r.items():
            ar, sr = stats([acc for _, acc in runs])
            deltas = [(base[s] - acc) / base[s] for s, acc in by_seed(runs).items() if s in base]
            rows.append({"eval": key[0], "kind": key[1], "method": key[2], "arch": key[3], "dataset": key[4],
                         "n": key[5], "r": r, "imb_type": imb_type, "A_balanced": a1, "A_balanced_std": s1,
                         "A_imbalanced": ar, "A_imbalanced_std": sr, "delta": (a1 - ar) / a1,
                         "delta_std": stats(deltas)[1] if deltas else None,
                         "paired_seeds": len(deltas), "runs_balanced": len(balanced), "runs_imbalanced": len(runs)})
    rows.sort(key=lambda x: (x["eval"], x["kind"], x["method"], str(x["arch"]), str(x["dataset"]), -x["n"], -x["r"]))
    return rows, unpaired


def pm(mean, std, scale=1.0, digits=2):
    """mean±std as the Δ tables print it (reproduce.sh's too)."""
    return f"{scale * mean:.{digits}f}" + (f"±{scale * std:.{digits}f}" if std is not None else "")


def print_gap(paths):
    rows, unpaired = gap_rows([read_result(p) for p in paths])
    for key, why in unpaired:
        print(f"note: eval={key[0]} method={key[2]} arch={key[3]} dataset={key[4]} n={key[5]}: {why}; left out",
              file=sys.stderr)
    if not rows:
        R.fail("no pair of runs with the same evaluation, method, dataset and n, one balanced (r = 1) and one "
               "imbalanced; Δ needs both")
    print("A: last-epoch test top-1 %, mean±sample std over runs (a run = pre-training seed + its evaluation; "
          "the paper's std varies the evaluation seed only); Δ = (A(n,1) − A(n,r)) / A(n,1) of the means, "
          "±: sample std of the per-seed Δ; n, r from the pre-training class counts")
    print(f"{'evaluation':<22} {'kind':<4} {'method':<24} {'arch':<9} {'dataset':<11} {'n':>7} {'r':>7} {'imb':<4} "
          f"{'A(n,1)':>12} {'A(n,r)':>12} {'Δ %':>11} {'runs':>5}")
    for x in rows:
        runs = f"{x['runs_balanced']}+{x['runs_imbalanced']}"
        print(f"{x['eval']:<22} {x['kind']:<4} {x['method']:<24} {str(x['arch']):<9} {str(x['dataset']):<11} "
              f"{x['n']:7d} {x['r']:7.4g} {str(x['imb_type']):<4} {pm(x['A_balanced'], x['A_balanced_std']):>12} "
              f"{pm(x['A_imbalanced'], x['A_imbalanced_std']):>12} {pm(x['delta'], x['delta_std'], 100):>11} {runs:>5}")


# ----- data ----------------------------------------------------------------------------------------

def build_data(args, device):
    """(train_plain, train_aug, val, test, counts, C) over the full training split; unreadable data: exit 2."""
    try:
        if args.dataset in ("imagenet_lt", "inat"):
            return build_list_data(args, device)
        train_x, train_y, names = D.load_split(args.dataset, args.data_root, True, args.download)
        test_x, test_y, _ = D.load_split(args.dataset, args.data_root, False, args.download)
        batches = authors_batches if args.protocol == "authors" else probe_batches
        return (*batches(D.to_device(train_x, device), train_y, D.to_device(test_x, device), test_y, len(names),
                         *D.mean_std(args.dataset, train_x), args), len(names))
    except D.DataError as e:
        R.fail(str(e))


def build_list_data(args, device):
    if not args.train_list or not args.test_list:
        R.fail(f"--dataset {args.dataset}: the probe trains on the full balanced training set, not the "
               f"long-tailed list of pre-training; pass --train-list (e.g. all 1.28M ImageNet training "
               f"images) and --test-list")
    train_ds = D.FileListDataset(args.data_root, args.train_list, train=False)
    test_ds = D.FileListDataset(args.data_root, args.test_list, train=False)
    C = max(train_ds.num_classes, test_ds.num_classes)
    idx, val_idx = D.carve_val(np.arange(len(train_ds)), train_ds.labels, args.val_frac, args.data_seed)
    make = lambda ds, i, bs, shuffle: D.ListBatches(ds, i, bs, shuffle, args.seed, args.workers, device)
    crop_flip = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),  # main_lincls
                                    transforms.ToTensor(), transforms.Normalize(D.IMAGENET_MEAN, D.IMAGENET_STD)])
    aug = (make(D.FileListDataset(args.data_root, args.train_list, transform=crop_flip), idx, args.batch_size, True)
           if args.augment or args.protocol == "authors" else None)
    val = make(train_ds, val_idx, 256, False) if len(val_idx) else None
    test = make(test_ds, np.arange(len(test_ds)), 256, False)
    return make(train_ds, idx, 256, False), aug, val, test, np.bincount(train_ds.labels[idx], minlength=C).tolist(), C


# the authors' CIFAR probe views (Liuhong99/Imbalanced-SSL cifar/main_lincls.py)
def resize_matrix(start, length, out_size, in_size):
    """B × out_size × in_size weights of PIL's bicubic resize of the pixels [start, start + length) of one
    axis to out_size pixels: output i is centred at start + (i + ½)·length/out_size, taps inside the box
    only, the kernel widened by the scale when shrinking, each row normalised to sum 1."""
    scale = length.double() / out_size
    support = scale.clamp(min=1)
    centre = start.double()[:, None] + (torch.arange(out_size, device=start.device, dtype=torch.float64) + 0.5) \
        * scale[:, None]
    j = torch.arange(in_size, device=start.device, dtype=torch.float64)
    t, a = ((j[None, None, :] + 0.5 - centre[:, :, None]) / support[:, None, None]).abs(), -0.5
    w = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,                  # PIL's bicubic kernel (Keys)
                    torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, torch.zeros_like(t)))
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < (start + length)[:, None])
    w = w * inside[:, None, :]
    return w / w.sum(2, keepdim=True)                                     # float64: no TF32 matmul on a GPU


def bicubic_resized_crop(x, top, left, h, w, size, flip=None):
    """PIL's img.crop(box).resize((size, size), BICUBIC) [+ mirror] of every uint8 N×3×H×W image at once:
    the horizontal pass first, rounded to uint8, then the vertical pass, rounded (as PIL resamples 8-bit images);
    in float64, so that a GPU's TF32 matmuls cannot move a pixel by one."""
    B, C, H, W = x.shape
    rx = resize_matrix(left, w, size, W)                                  # B × size × W
    if flip is not None:
        rx = torch.where(flip[:, None, None], rx.flip(1), rx)
    ry = resize_matrix(top, h, size, H)                                   # B × size × H
    horizontal = torch.einsum("bchw,bxw->bchx", x.double(), rx).round_().clamp_(0, 255)
    return torch.einsum("bchx,byh->bcyx", horizontal, ry).round_().clamp_(0, 255).to(torch.uint8)


def authors_test_view(x, chunk=2048):
    """Resize(int(S·8/7), bicubic) + CenterCrop(S) of S×S uint8 images (CIFAR: 32 → 36 → the centre 32)."""
    B, C, H, W = x.shape
    big_h, big_w = int(H * 8 / 7), int(W * 8 / 7)
    top, left = int(round((big_h - H) / 2)), int(round((big_w - W) / 2))
    out = torch.empty_like(x)
    for s in range(0, B, chunk):
        zero = torch.zeros(len(x[s:s + chunk]), dtype=torch.long, device=x.device)
        ry = resize_matrix(zero, zero + H, big_h, H)[:, top:top + H]
        rx = resize_matrix(zero, zero + W, big_w, W)[:, left:left + W]
        horizontal = torch.einsum("bchw,bxw->bchx", x[s:s + chunk].double(), rx).round_().clamp_(0, 255)
        out[s:s + chunk] = torch.einsum("bchx,byh->bcyx", horizontal, ry).round_().clamp_(0, 255).to(torch.uint8)
    return out


def authors_train_view(x, generator, scale=(0.8, 1.0)):
    """RandomResizedCrop(S, scale=(0.8, 1), ratio=(3/4, 4/3), bicubic) + RandomHorizontalFlip() (uint8)."""
    B, C, H, W = x.shape
    top, left, h, w = D.sample_resized_crop(B, H, W, generator, x.device, scale)
    flip = torch.rand(B, generator=generator, device=x.device) < 0.5
    return bicubic_resized_crop(x, top, left, h, w, W, flip)


class AuthorsViews(D.GPULoader):
    """GPULoader's shuffled epochs through authors_train_view, the last partial batch kept (theirs dropped 80)."""

    def _augment(self, x, g):
        return D.normalize(authors_train_view(x, g), self.mean, self.std)


def authors_batches(images, labels, test_images, test_labels, num_classes, mean, std, args):
    """probe_batches for --protocol authors: validation and test images through the test view once."""
    idx, val_idx = D.carve_val(np.arange(len(labels)), labels, args.val_frac, args.data_seed)
    dev = images.device
    train = AuthorsViews(images[torch.as_tensor(idx, device=dev)], labels[idx], args.batch_size, mean, std, dev,
                         shuffle=True, seed=args.seed)
    val = (D.GPULoader(authors_test_view(images[torch.as_tensor(val_idx, device=dev)]), labels[val_idx], 1024,
                       mean, std, dev) if len(val_idx) else None)
    test = D.GPULoader(authors_test_view(test_images), test_labels, 1024, mean, std, dev)
    return None, train, val, test, np.bincount(labels[idx], minlength=num_classes).tolist()


# ----- main ----------------------------------------------------------------------------------------

def start_run(args):
    """No --resume: --ckpt, --dataset and --data-root from it unless given, an --out without a final.json."""
    ckpt = R.load_checkpoint(args.ckpt)
    for name in ("dataset", "data_root"):
        setattr(args, name, getattr(args, name) or (ckpt.get("args") or {}).get(name))
    if args.dataset is None or args.data_root is None:
        R.fail(f"'{args.ckpt}' does not say which data it was trained on; pass --dataset and --data-root")
    if os.path.exists(os.path.join(args.out, "final.json")):
        R.fail(f"{args.out} already holds a probe; pass another --out")
    R.claim_out(args.out, resumable=False)
    return args, ckpt


def open_run(args, meta, counts, num_classes, device):
    """args.json (with the pre-training metadata), the source copy, an empty metrics.jsonl, the line of what runs."""
    R.open_run(args, None, device, __file__, 0, extra={"pretrain": meta})
    how = "fast protocol: " + ("pad-4 crop/flip, backbone every step" if args.augment else "cached features")
    if args.protocol == "authors":
        how = ("the authors' protocol: RandomResizedCrop(224) + flip views, backbone every step"
               if args.dataset in ("imagenet_lt", "inat") else
               "the authors' protocol: RandomResizedCrop(0.8–1, bicubic) + flip views, backbone every step; "
               "test Resize(8/7) + CenterCrop, bicubic")
    print(f"linear probe of {meta['arch']} from {meta['script']} ({meta['kind']}, pre-trained on {meta['dataset']} "
          f"n={meta['n']} r={meta['r']}) on {args.dataset}: {sum(counts)} training images, {num_classes} classes, "
          f"{how}, {args.epochs} epochs on {device}")


def finish_run(args, model, meta, counts, last, best, timing, t_run):
    """<out>/last.pt (backbone and trained head), final.json, and the last line."""
    R.save_atomic({"script": "eval_linear.py", "arch": meta["arch"], "model": model.state_dict(), "epoch": args.epochs,
                   "args": vars(args), "class_counts": counts, "pretrain": meta}, os.path.join(args.out, "last.pt"))
    R.finish_run(args.out, {
        "script": "eval_linear.py", "eval": f"linear:{args.dataset}", "dataset": args.dataset, "pretrain": meta,
        "protocol": args.protocol, "augment": args.augment, "seed": args.seed, "data_seed": args.data_seed,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "class_counts": counts, "last": last,
        "top1": last["top1"], "per_class": last["per_class"], "best_on_val": best, "sanity_check": "passed",
        **timing}, t_run)
    print(f"last epoch: test top-1 {last['top1']:.2f}%, mean per-class {last['mean_class_acc']:.2f}%"
          + (f"; best on validation: epoch {best['epoch']}, test top-1 {best['test']['top1']:.2f}%" if best else "")
          + f" ({timing['feature_seconds']:.1f} s features, {timing['probe_seconds']:.1f} s in all)")


def main(argv=None):
    args = parse_args(argv)
    if args.gap:
        return print_gap(args.gap)
    args, ckpt = start_run(args)
    device = R.setup_device(args)
    *batches, counts, C = build_data(args, device)
    model = build_model(args, ckpt, C, device)
    meta = pretrain_meta(ckpt, args.ckpt, args.tag)
    open_run(args, meta, counts, C, device)
    t_run = time.time()
    last, best, timing = linear_probe(model, *batches, C, counts, args)
    print("sanity check passed: every backbone tensor (parameters and BatchNorm buffers) is unchanged")
    finish_run(args, model, meta, counts, last, best, timing, t_run)


if __name__ == "__main__":
    main()
