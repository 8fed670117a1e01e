"""Classifier re-training: Kang et al. 2020, "Decoupling representation and classifier for long-tailed recognition",
§4 (cRT); paper 1's strongest baseline (Yang & Xu 2020, Tables 3–4; "cRT + SSP": on a self-supervised backbone).

Any backbone checkpoint of this project is frozen (frozen_backbone, cache_features) and a new linear head
(init_state, Classifier) trained with class-balanced sampling (train_one_epoch) on the checkpoint's own subset.

    python crt.py --ckpt runs/ldam_drw-cifar10-0.01-0/last.pt --gpu 0          # CE → CE + cRT
    python crt.py --ckpt runs/ldam_drw-imagenet_lt-1-0/last.pt --val-list ImageNet_LT_val.txt   # Table 3
    python crt.py --ckpt runs/ldam_drw-cifar10-0.01-0/last.pt --bn train --augment   # the original's BN
    torchrun --nproc_per_node 8 crt.py --ckpt runs/ldam_drw-inat-0.01-0/last.pt --val-list iNaturalist18_val.txt
    python crt.py --resume runs/crt-inat-0.01-0/last.pt                       # continue a stopped run

Recipe (REFERENCE §7, Kang et al. on ImageNet-LT; the defaults): SGD momentum 0.9, batch 512, lr 0.2 cosine over
10 epochs, wd 5e-4, an epoch of int(N/B) full batches from the ClassAwareSampler (4 images a class draw); ImageNet-LT
/ iNat as released (cls_crt.yaml):
--bn train, --augment, --lr-sequence kang; iNat: 30 epochs, wd 1e-4. Paper 1, top-1 error: ImageNet-LT (Table 3,
ResNet-10 / 50) cRT 58.2 / 52.7, + SSP 56.8 / 48.7; iNaturalist 2018 (Table 4, ResNet-50) cRT 34.8, + SSP 31.9.

Deliberate differences from Kang et al.'s code (on CIFAR, SVHN and folders; file lists as released):
1. --bn frozen --no-augment (default there): BatchNorm keeps its statistics; features cached once (test transform).
2. The ClassAwareSampler's class and image cycles restart every epoch from (seed, epoch) (the released ones run on
   across epochs): every epoch's class counts are still equal to a draw, and a resumed run draws the same batches.
3. Every backbone tensor is compared with its value before, after training (a sanity check).
4. The report is the last epoch (and the best on a --val-frac / --val-list split), never the test set.
5. --resume continues from last.pt (with --augment every epoch re-runs the backbone on every image).
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
    p = argparse.ArgumentParser(description="Classifier re-training on a frozen backbone (Kang et al. 2020).")
    # --- shared flags (same names and order in every script; data flags default to the checkpoint's) ---
    p.add_argument("--dataset", default=None, choices=["cifar10", "cifar100", "svhn", "folder", "imagenet_lt", "inat"])
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
    p.add_argument("--strict-fp32", action="store_true", help="disable TF32 in cuDNN convolutions and matmuls")
    p.add_argument("--print-freq", type=int, default=0,
                   help="a progress line every N steps of an epoch; 0: at most every 10 s (none in a short epoch)")
    p.error = R.fail                                       # one line and exit 2, not the usage text
    args = p.parse_args(argv)
    args.cli_flags = R.given_flags(p, argv)
    if not args.ckpt and not args.resume:
        R.fail("the following arguments are required: --ckpt")
    R.check_ranges(args, R.SHARED_RANGES)                  # --rho: D.check_rho in resume_run(), with its hint
    return args


# --resume continues a run with its own arguments; only these (where the run executes) may be given with it
RESUME_FLAGS = ("gpu", "workers", "data_root", "download")


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
    if arch in ("resnet32", "resnet18"):
        return (ResNet32 if arch == "resnet32" else ResNet18)(1)
    if arch in ("resnet10", "resnet50"):
        block, layers = ((torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]) if arch == "resnet10" else
                         (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]))
        return torchvision.models.resnet.ResNet(block, layers, num_classes=1)
    R.fail(f"unknown architecture '{arch}' in the checkpoint")


def previous_head(ckpt, C):
    """The checkpoint's own classifier head when it is one for this task (a supervised run): the 'before' column."""
    head = ckpt["model"].get("fc.weight")
    if ckpt.get("script") not in ("ldam_drw.py", "self_training.py") or head is None or head.shape[0] != C:
        return None
    fc = (nn.Linear if "fc.bias" in ckpt["model"] else NormedLinear)(head.shape[1], C)   # no bias: LDAM cosine
    fc.load_state_dict({k[3:]: v for k, v in ckpt["model"].items() if k.startswith("fc.")})
    return fc


# ----- the method (Kang et al. 2020 §4: classifier re-training on a frozen backbone) ---------------

def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_unchanged(model, before, buffers=True):
    """Sanity check (facebookresearch linear-eval style): the frozen backbone must not have moved."""
    params = {name for name, _ in model.named_parameters()}
    for k, v in model.state_dict().items():
        if (k in params or buffers) and not torch.equal(v, before[k]):
            raise RuntimeError(f"backbone tensor '{k}' changed during cRT; the backbone is not frozen")


SAMPLES_PER_CLASS = 4                                      # cls_crt.yaml: num_samples_cls


def class_aware_order(labels, batch_size, seed, epoch, k=SAMPLES_PER_CLASS):
    """Kang et al.'s ClassAwareSampler for one epoch, as positions: int(N/B) full batches (run_networks.py's
    epoch_steps); the classes drawn in rounds, each a fresh shuffle of the classes, each draw the next k images of
    its class's cycle (its images, reshuffled every time round)."""
    labels, g = labels.cpu(), torch.Generator().manual_seed(seed * 100_003 + epoch)
    present, total = labels.unique(), len(labels) // batch_size * batch_size
    draws = -(-total // k)
    classes = torch.cat([present[torch.randperm(len(present), generator=g)] for _ in range(-(-draws // len(present)))])
    classes, order = classes[:draws], torch.empty(draws, k, dtype=torch.long)
    for c in present.tolist():
        mine, members = (classes == c).nonzero().flatten(), (labels == c).nonzero().flatten()
        rounds = -(-len(mine) * k // len(members))
        cycle = torch.cat([members[torch.randperm(len(members), generator=g)] for _ in range(rounds)] or [members[:0]])
        order[mine] = cycle[:len(mine) * k].view(-1, k)
    return order.flatten()[:total]


class Features:
    """Cached features as GPULoader-like batches: epoch(e, order=positions) → (features, labels, idx)."""

    def __init__(self, feats, labels, batch_size, seed):
        self.feats, self.labels, self.batch_size, self.seed = feats, labels, batch_size, seed

    def epoch(self, epoch, order=None):
        order = torch.arange(len(self.labels)) if order is None else order
        for idx in order.to(self.feats.device).split(self.batch_size):
            yield self.feats[idx], self.labels[idx], idx


@torch.no_grad()
def extract(backbone, batches, amp):
    backbone.eval()
    with torch.autocast(batches.device.type, torch.bfloat16, enabled=amp):
        feats, labels = zip(*[(backbone(x).float(), y) for x, y, _ in batches.epoch(0)])
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
    """Training / validation / test batches and the training class counts."""
    if args.dataset in ("imagenet_lt", "inat"):
        return build_list_data(args, device, rank, world)
    train_x, train_y, names = D.load_split(args.dataset, args.data_root, True, args.download)
    test_x, test_y, _ = D.load_split(args.dataset, args.data_root, False, args.download)
    idx, val_idx = D.training_subset(train_y, argparse.Namespace(**vars(args), subsample=1, balanced=False))
    mean, std = D.mean_std(args.dataset, train_x)
    C = len(names)
    counts = np.bincount(train_y[idx], minlength=C).tolist()
    train = D.GPULoader(train_x[idx], train_y[idx], args.batch_size, mean, std, device,
                        augment="crop_flip" if args.augment else None, shuffle=True, seed=args.seed)
    test = D.GPULoader(test_x, test_y, 1000, mean, std, device)
    val = D.GPULoader(train_x[val_idx], train_y[val_idx], 1000, mean, std, device) if len(val_idx) else None
    train.plain = D.GPULoader(train.images, train_y[idx], 1000, mean, std, device)   # test transform: to cache
    return train, val, test, counts, C


def build_list_data(args, device, rank=0, world=1):
    """Training / validation / test batches of a file list; under torchrun this process's shares
    (ShardedListBatches for training, eval_shard for evaluation)."""
    if not args.train_list or not args.test_list:
        R.fail(f"--dataset {args.dataset} needs --train-list and --test-list ('relative/path label' files)")
    tf = lambda train: D.imagenet_transform(train, dataset=args.dataset)     # iNat: own mean/std, no jitter
    train_ds = D.FileListDataset(args.data_root, args.train_list, transform=tf(args.augment))
    test_ds = D.FileListDataset(args.data_root, args.test_list, transform=tf(False))
    C = max(train_ds.num_classes, test_ds.num_classes)
    idx, val_idx = D.carve_val(np.arange(len(train_ds)), train_ds.labels, args.val_frac, args.data_seed)
    counts = np.bincount(train_ds.labels[idx], minlength=C).tolist()
    if world > 1:
        R.check_shards(args.batch_size, world)
        train = D.ShardedListBatches(train_ds, idx, args.batch_size, args.seed, args.workers, device, rank, world)
        plain = lambda ds, indices: D.eval_shard(ds, indices, args.seed, args.workers, device, rank, world)
    else:
        train = D.ListBatches(train_ds, idx, args.batch_size, True, args.seed, args.workers, device)
        plain = lambda ds, indices: D.ListBatches(ds, indices, 256, False, args.seed, args.workers, device)
    test = plain(test_ds, np.arange(len(test_ds)))
    val = None
    if len(val_idx):
        val = plain(D.FileListDataset(args.data_root, args.train_list, transform=tf(False)), val_idx)
    if args.val_list:                                      # Kang et al. select on the official val list
        val_ds = D.FileListDataset(args.data_root, args.val_list, transform=tf(False))
        val = plain(val_ds, np.arange(len(val_ds)))
    return train, val, test, counts, C


# ----- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, train, epoch, args, world, cached):
    """SGD on the head over one class-aware epoch: (row, first non-finite loss step or -1, last step)."""
    device = model.head.weight.device
    lr = 0.5 * args.lr * (1 + math.cos(math.pi * (epoch + (args.lr_sequence == "kang")) / args.epochs))
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.backbone.train(args.bn == "train")                # the head is a plain linear layer: no train mode
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    order = class_aware_order(train.labels, args.batch_size, args.seed, epoch)
    progress = R.Progress(len(order) // args.batch_size, args.print_freq)
    for step, (x, y, _, *y_batch) in enumerate(train.epoch(epoch, order=order)):
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and not cached):
            logits = model(x).float()
        n_batch = len(y_batch[0]) if world > 1 else len(y)   # torchrun: the shares of the global mean are summed
        loss = F.cross_entropy(logits, y, reduction="sum") / n_batch if world > 1 else F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            R.all_reduce_grads(list(model.head.parameters()))
        optimizer.step()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss.detach() * n_batch
        seen += n_batch
        progress(step, seen, lambda: loss_sum.item() / seen * world)          # torchrun: rank 0's share × world
    if world > 1:
        loss_sum = loss_sum.double()
        dist.all_reduce(loss_sum)                          # the shares sum to the global batches' losses
        if device.type != "cuda" and args.bn == "train":
            R.average_bn_statistics(model.backbone, world)
    return {"epoch": epoch + 1, "lr": lr, "loss": loss_sum.item() / seen}, first_bad, step


# ----- main ----------------------------------------------------------------------------------------

def resume_run(args, world=1):
    """--resume: the saved run's arguments; then the --ckpt checkpoint, whose arguments fill the data flags
    left unset; without --resume, an --out that holds a run is refused. → (args, ckpt, --ckpt checkpoint)."""
    args, ckpt = R.resume_run(args, "crt.py", RESUME_FLAGS, {"data_seed": None},  # older runs: --ckpt's
                              "; pass it as --ckpt to re-train its classifier", say=False)
    source = R.load_checkpoint(args.ckpt)
    trained = source.get("args", {})
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
    args.world_size = world
    D.check_rho(args.rho)
    if args.val_list and (not released or args.val_frac):
        R.fail("--val-list is for --dataset imagenet_lt / inat, without --val-frac")
    if world > 1 and args.dataset not in ("imagenet_lt", "inat"):
        R.fail(f"torchrun runs crt.py on file lists (--dataset imagenet_lt / inat); --dataset {args.dataset} "
               f"re-trains on one device: run it without torchrun")
    R.refuse_occupied(args.out, args.resume)
    return args, ckpt, source


def frozen_backbone(args, source, device, world=1):
    """Stage 1: the --ckpt backbone, read by every process, frozen, `fc` → identity: (backbone, feature size)."""
    backbone = build_backbone(source["arch"])
    R.load_backbone(backbone, source["arch"], args.ckpt)
    feat_dim = backbone.fc.weight.shape[1]
    backbone.fc = nn.Identity()
    if world > 1 and device.type == "cuda" and args.bn == "train":   # BN statistics over the global batch
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone.to(device).requires_grad_(False), feat_dim


def cache_features(args, backbone, train, val, test, world=1):
    """Stage 2: with --bn frozen --no-augment, Features batches of the test, validation and training images (under
    the test transform: `train.plain`, or a file list's `train`) → (train, val, test, cached, seconds)."""
    t0 = time.time()
    cached = args.bn == "frozen" and not args.augment and world == 1   # torchrun: no cache to split, every step
    if cached:
        features = lambda batches, size: Features(*extract(backbone, batches, args.amp), size, args.seed)
        train, test = features(getattr(train, "plain", train), args.batch_size), features(test, 1000)
        val = features(val, 1000) if val else None
    return train, val, test, cached, time.time() - t0


def init_state(args, ckpt, backbone, feat_dim, C, device, world=1, cached=False):
    """Stage 3: the new linear head on the frozen backbone (Classifier) and its SGD; with --resume the head,
    BN statistics, optimizer and RNG of last.pt. → (model, optimizer, start epoch, best)."""
    torch.manual_seed(args.seed)                           # the head's init: --seed alone, cached or not
    head = nn.Linear(feat_dim, C).to(device)
    if world > 1:
        R.broadcast_state(head)
    model = Classifier(backbone, head, cached)
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    if ckpt is None:
        return model, optimizer, 0, None
    backbone.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith("fc.")})
    head.load_state_dict({k[3:]: v for k, v in ckpt["model"].items() if k.startswith("fc.")})
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return model, optimizer, ckpt["epoch"], ckpt["best"]


def open_run(args, ckpt, device, source, counts, start, cached, feature_seconds, rank=0, world=1):
    """The run folder (rank 0); then the lines printed above the epoch table."""
    R.open_run(args, ckpt, device, __file__, start, rank=rank)
    bn = {"cuda": ", SyncBatchNorm"}.get(device.type, ", BatchNorm per process") if args.bn == "train" else ""
    ddp = f", {world} processes × {args.batch_size // world} images per step{bn}" if world > 1 else ""
    print(f"cRT on {source['arch']} from {args.ckpt} ({source.get('script', '?')}): {args.dataset} rho={args.rho:g}, "
          f"{sum(counts)} training images, bn={args.bn}, {'cached features' if cached else 'features every step'}"
          f" ({feature_seconds:.1f} s), {args.epochs} epochs on {device}{ddp}")
    print(R.table_header("test", "many", "med", "few", "val"))


def end_epoch(args, model, optimizer, epoch, row, val_m, best, t0, saved, rank=0):
    """The best epoch on validation, then the metrics row, the printed line and last.pt."""
    test_m = row["test"]
    if val_m and (best is None or val_m["top1"] > best["val_top1"]):
        best = {"epoch": epoch + 1, "val_top1": val_m["top1"], "test": test_m}
    row.update({"val_top1": val_m["top1"] if val_m else None, "seconds": time.time() - t0})
    line = R.table_row(epoch + 1, row["lr"], row["loss"], [test_m["top1"], test_m["many"], test_m["medium"],
                       test_m["few"], row["val_top1"]], row["seconds"])
    weights = {**model.backbone.state_dict(), **{f"fc.{k}": v for k, v in model.head.state_dict().items()}}
    state = {**saved, "model": weights, "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
             "args": vars(args), "best": best, "rng": {"torch": torch.get_rng_state()}}
    R.end_epoch(args.out, row, line, state, rank)
    return best


def finish_run(args, counts, test_m, best, t_run, rank=0, world=1, *, backbone, frozen, report):
    """The check that the backbone did not move (`frozen`: its tensors before), final.json, the last lines."""
    try:
        check_unchanged(backbone, frozen, buffers=args.bn == "frozen")
    except RuntimeError as e:
        sys.exit(f"error: {e}")                            # exit 1
    final = R.finish_run(args.out, {
        "script": "crt.py", "ckpt": args.ckpt, "ckpt_script": report["ckpt_script"], "arch": report["arch"],
        "dataset": args.dataset, "rho": args.rho, "imb_type": args.imb_type, "seed": args.seed, "data_seed": args.data_seed,
        "bn": args.bn, "augment": args.augment, "cached_features": report["cached"], "epochs": args.epochs,
        "class_counts": counts, "before": report["before"], "last": test_m, "test_error": 100 - test_m["top1"],
        "best_on_val": best, "feature_seconds": report["feature_seconds"]}, t_run, rank, per_epoch=False)
    print(f"{'':13}{'top1':>7} {'mean/cls':>8} {'many':>6} {'med':>6} {'few':>6}")
    for name, m in (("before cRT", report["before"]), ("after cRT", test_m)):
        if m:
            print(f"{name:<13}{m['top1']:7.2f} {m['mean_class_acc']:8.2f} {R.fmt(m['many'])} {R.fmt(m['medium'])} "
                  f"{R.fmt(m['few'])}")
    print(f"backbone unchanged ({'parameters and BN buffers' if args.bn == 'frozen' else 'parameters'}); "
          f"test error {final['test_error']:.2f}%")
    R.leave_process_group(world)


def main(argv=None):
    args = parse_args(argv)
    rank, world = R.process_group()
    if rank:                                               # rank 0 prints the log
        sys.stdout = open(os.devnull, "w")
    try:
        args, ckpt, source = resume_run(args, world)
        device = R.setup_device(args, world)
        torch.manual_seed(args.seed)
        train, val, test, counts, C = build_data(args, device, rank, world)
    except D.DataError as e:
        R.fail(str(e))
    if world > 1:
        R.init_process_group(device)
        score = lambda m, batches: D.evaluate_shards(m, batches, C, counts, device)
    else:
        score = lambda m, batches: D.evaluate(m, batches.epoch(0), C, counts)
    backbone, feat_dim = frozen_backbone(args, source, device, world)
    if sum(counts) < args.batch_size:                      # int(N/B) steps an epoch, as released
        R.fail(f"--batch-size {args.batch_size} is more than the {sum(counts)} training images: an epoch of cRT is "
               f"int(N/B) full batches; pass --batch-size {sum(counts)} or less")
    head = previous_head(source, C)                        # on the frozen backbone: the --ckpt model as it was
    before = score(Classifier(backbone, head.to(device), False), test) if head else None
    frozen = snapshot(backbone)
    train, val, test, cached, feature_seconds = cache_features(args, backbone, train, val, test, world)
    model, optimizer, start, best = init_state(args, ckpt, backbone, feat_dim, C, device, world, cached)
    saved = {"script": "crt.py", "arch": source["arch"], "class_counts": counts}
    open_run(args, ckpt, device, source, counts, start, cached, feature_seconds, rank, world)

    t_run = time.time()
    for epoch in range(start, args.epochs):
        t0 = time.time()
        row, first_bad, step = train_one_epoch(model, optimizer, train, epoch, args, world, cached)
        R.stop_if_diverged(args.out, [model], epoch, first_bad, step + 1, rank, world)
        row["test"] = score(model, test)
        val_m = score(model, val) if val else None
        best = end_epoch(args, model, optimizer, epoch, row, val_m, best, t0, saved, rank)
    test_m = score(model, test) if start >= args.epochs else row["test"]
    report = {"ckpt_script": source.get("script"), "arch": source["arch"], "before": before, "cached": cached,
              "feature_seconds": feature_seconds}
    finish_run(args, counts, test_m, best, t_run, rank, world, backbone=backbone, frozen=frozen, report=report)


if __name__ == "__main__":
    main()
