"""MoCo v2 self-supervised pre-training on the long-tailed training images, on one GPU or many.

Paper 1 (Yang & Xu 2020) §4.2: the self-supervised pre-training (SSP) of ImageNet-LT and iNaturalist (Tables 3–4),
labels abandoned. Paper 2 (Liu et al. 2022) §2.1–2.2, App. A.1: MoCo v2 after balanced vs imbalanced pre-training
(Table 2, Figs. 1–2), + SAM / rwSAM (Table 1(b), App. C.1; Algorithm 1: stage1, stage2). Method: He et al. 2020
(Eq. (1) → info_nce, Eq. (2) → momentum_update, the queue → enqueue, §3.3 shuffle-BN → split_batchnorm /
shuffled_keys), Chen et al. 2020's v2 changes (MLP head, τ 0.2, blur, cosine). Recipe: REFERENCE §5, README.

    python moco_ssp.py --rho 0.01 --gpu 0                      # CIFAR-10-LT ρ=100, ResNet-18, batch 512
    python moco_ssp.py --dataset imagenet_lt --data-root IMNET --train-list ImageNet_LT_train.txt --rho 1
    python moco_ssp.py --recipe paper1 --dataset inat ...    # paper 1's SSP: 200 epochs, batch 128, lr 0.015
    torchrun --nproc_per_node 8 moco_ssp.py --dataset imagenet_lt ...   # the same on 8 GPUs, real shuffle-BN
    python moco_ssp.py --rho 0.01 --balanced                   # paper 2: the balanced subset, same n
    python moco_ssp.py --rho 0.1 --subsample 0.25              # the size sweep: 800 epochs = 200 / 0.25
    python moco_ssp.py --rho 0.01 --opt rwsam --stage1 runs/moco_ssp-cifar10-0.01-0/last.pt   # MoCo v2 + rwSAM
    python crt.py --ckpt runs/moco_ssp-cifar10-0.01-0/last.pt  # then: cRT + SSP (or eval_linear.py)

Paper numbers: paper 1 Table 3 (ImageNet-LT top-1 error, ResNet-10 / ResNet-50): cRT 58.2 / 52.7 →
cRT + SSP 56.8 / 48.7; CE (Uniform) 65.2 / 61.6 → 64.1 / 54.4. Table 4 (iNat, ResNet-50): cRT 34.8 →
31.9. Paper 2 Table 2 (ImageNet linear probe, n = 116K): MoCo v2 50.4 balanced, 49.5 ImageNet-LT.

Deliberate differences from the papers and the authors' code (facebookresearch/moco main_moco.py):
1. One process works: shuffle-BN is emulated with --bn-splits BN sub-batches; torchrun does the real one.
2. ImageNet-LT / iNat default to paper 2's App. A.1: 300 epochs at lr 0.025 per 256, batch 256; --recipe paper1
   is paper 1's released pretrain_moco.py: 200 epochs, batch 128, lr 0.015 (0.03 per 256), cosine.
3. The queue is checked at start: a multiple of the global batch and smaller than the training set.
4. A kNN monitor (k 200, τ 0.1) on CIFAR-size data, the only use of labels.
5. CIFAR-size views on the GPU (same distributions, no antialiasing, no blur as REFERENCE §5).
6. Under torchrun DDP wraps only θ_q: the queue is identical by construction, θ_k's BN statistics unused.
7. ImageNet blur: torchvision's GaussianBlur, kernel 10% of the crop (the authors: PIL's radius σ; ±3σ both).
8. Resume needs the same number of processes (--bn-splits and the sharding depend on it).
"""
import argparse
import contextlib
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import datasets_lt as D
import run_lt as R

LARGE = ("imagenet_lt", "inat")
SUBSAMPLE = (1.0, 0.75, 0.5, 0.25, 0.125)


# ----- flags --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo v2 self-supervised pre-training (paper 1 §4.2, paper 2 §2).")
    # --- shared flags (names and order of every script; defaults and help are MoCo v2's, REFERENCE §5) ---
    p.add_argument("--dataset", default="cifar10",
                   choices=["cifar10", "cifar100", "svhn", "folder", "imagenet_lt", "inat"])
    p.add_argument("--data-root", default="./data", help="dataset folder")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--rho", type=float, default=0.01, help="tail/head ratio in (0, 1]; 1 = balanced")
    p.add_argument("--imb-type", default="exp", choices=["exp", "step"])
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU (under torchrun: the local rank's GPU)")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: 200 (CIFAR-size data; --recipe paper1), 300 (ImageNet-LT, iNat: paper 2 App. A.1); "
                        "the full-size variant's with --subsample")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch over all processes; default: 512 (CIFAR-size data), 256 (ImageNet-LT, iNat), "
                        "128 (--recipe paper1)")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 0.03 × batch / 256; 0.025 × batch / 256 for ImageNet-LT, iNat (paper 2 App. A.1)")
    p.add_argument("--wd", type=float, default=1e-4)
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
    p.add_argument("--recipe", default="paper2", choices=["paper1", "paper2"],
                   help="ImageNet-LT / iNat: paper2 (App. A.1) or paper1 (Yang & Xu's released pretrain_moco.py)")
    p.add_argument("--arch", default=None, choices=["resnet18", "resnet10", "resnet50"],
                   help="default: resnet18 (CIFAR ResNet-18: CIFAR, SVHN, folder), resnet50 (ImageNet-LT, iNat)")
    p.add_argument("--queue", type=int, default=None,
                   help="negatives K; a multiple of the global batch, smaller than the training set; default: "
                        "65536 (ImageNet-LT, iNat) or 4096 (CIFAR-size), and the largest multiple of the batch "
                        "≤ half the set where that does not fit (printed at start)")
    p.add_argument("--moco-m", type=float, default=0.999, help="key encoder momentum m of MoCo Eq. (2)")
    p.add_argument("--moco-t", type=float, default=0.2, help="InfoNCE temperature τ")
    p.add_argument("--moco-dim", type=int, default=128, help="embedding width (output of the MLP head)")
    p.add_argument("--bn-splits", type=int, default=None,
                   help="BN sub-batches per process (shuffle-BN emulation); default: 8 alone, 1 under torchrun")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--train-list", default=None, help="ImageNet-LT / iNat: 'relative/path label' list")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process (ImageNet-LT / iNat only)")
    p.add_argument("--knn-every", type=int, default=None,
                   help="kNN monitor every N epochs and at the last (0 = off); default: 10, off for ImageNet-LT / iNat")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1)
    p.add_argument("--strict-fp32", action="store_true", help="disable TF32 in cuDNN convolutions and matmuls")
    # paper 2: balanced control, size sweep (§2.2, App. A.1) and SAM / rwSAM (§4, Table 1(b))
    p.add_argument("--balanced", action="store_true",
                   help="class-balanced subset with the same number of images as the long-tailed one")
    p.add_argument("--subsample", type=float, default=1.0, choices=SUBSAMPLE,
                   help="keep this fraction of every class (paper 2's size sweep); file lists: the list is already "
                        "that variant (python datasets_lt.py --train-list), the flag only sets the epochs")
    p.add_argument("--same-epochs", action="store_true",
                   help="with --subsample < 1: train --epochs epochs, not round(epochs / subsample)")
    p.add_argument("--opt", default="sgd", choices=["sgd", "sam", "rwsam"],
                   help="sgd: MoCo v2; sam: + SAM; rwsam: + SAM perturbed along the KDE-reweighted loss "
                        "(weights from the --stage1 model's features)")
    p.add_argument("--sam-rho", type=float, default=None,
                   help="SAM radius ρ; default 5 (CIFAR-size data), 2 (ImageNet-LT, iNat), paper 2 App. C.1")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="ASAM (Kwon et al.): element-wise |w| scaling of the perturbation, as the authors always ran")
    p.add_argument("--alpha", type=float, default=None,
                   help="rwSAM weight exponent, w = density^(-α); default 1.2 (CIFAR-size data), "
                        "0.5 (ImageNet-LT, iNat)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="KDE bandwidth h; default: median distance between normalised stage-1 features")
    p.add_argument("--stage1", default=None,
                   help="rwSAM: moco_ssp.py checkpoint (plain MoCo on the same images) whose backbone gives the "
                        "KDE features (Algorithm 1 line 8); this run trains a fresh model")
    p.add_argument("--print-freq", type=int, default=0,
                   help="a progress line every N steps of an epoch; 0: at most every 10 s (none in a short epoch)")
    p.error = R.fail                                       # one line and exit 2, not the usage text
    args = p.parse_args(argv)
    args.cli_flags = R.given_flags(p, argv)
    large, paper1 = args.dataset in LARGE, args.recipe == "paper1"
    if paper1 and not large:
        R.fail("--recipe paper1 is paper 1's MoCo pre-training of ImageNet-LT / iNat; on CIFAR-size data paper 1 "
               "pre-trains by rotation (rotation_ssp.py)")
    for name, small, imagenet in (("batch_size", 512, 128 if paper1 else 256), ("arch", "resnet18", "resnet50"),
                                  ("knn_every", 10, 0), ("epochs", 200, 200 if paper1 else 300), ("sam_rho", 5.0, 2.0),
                                  ("alpha", 1.2, 0.5)):
        if getattr(args, name) is None:
            setattr(args, name, imagenet if large else small)
    if args.lr is None:                                     # linear scaling rule (Goyal et al.), REFERENCE §5
        args.lr = (0.025 if large and not paper1 else 0.03) * args.batch_size / 256
    args.epochs_full = args.epochs
    if args.subsample < 1 and not args.same_epochs:        # paper 2 App. A.1: the full variant's iterations
        args.epochs = round(args.epochs / args.subsample)
    if args.out is None:
        tags = ([args.opt] if args.opt != "sgd" else []) + (["balanced"] if args.balanced else []) + \
               ([f"sub{args.subsample:g}"] if args.subsample < 1 else [])
        args.out = os.path.join("runs", "-".join(["moco_ssp", args.dataset, f"{args.rho:g}", str(args.seed), *tags]))
    R.check_ranges(args, RANGES)
    return args


RANGES = R.SHARED_RANGES + [    # of every numeric flag: checked before anything is read or written, a resumed run's too
    ("queue", 1, None, "[)"), ("moco_m", 0, 1, "[)"), ("moco_t", 0, None, "()"), ("moco_dim", 1, None, "[)"),
    ("bn_splits", 1, None, "[)"), ("knn_every", 0, None, "[)"), ("knn_k", 1, None, "[)"), ("knn_t", 0, None, "()"),
    ("sam_rho", 0, None, "[)"), ("alpha", 0, None, "[)"), ("bandwidth", 0, None, "()")]


def check_run(args, world):
    """The run's own arguments (a resumed run's: their ranges again), also against the number of processes."""
    R.check_ranges(args, RANGES)
    D.check_rho(args.rho)
    if (args.opt == "rwsam") != bool(args.stage1):
        R.fail("--opt rwsam needs --stage1 PATH (a plain moco_ssp.py run on the same images: its features give "
               "the KDE weights)" if args.opt == "rwsam" else
               "--stage1 gives rwSAM its weights; pass --opt rwsam or drop it")
    R.check_shards(args.batch_size, world)
    b = args.batch_size // world
    if b % args.bn_splits:
        R.fail(f"--bn-splits {args.bn_splits} must divide the {b} images each process encodes per step")
    if args.dataset in LARGE and args.knn_every:
        R.fail(f"the kNN monitor needs in-memory data; for {args.dataset} pass --knn-every 0 and probe the "
               f"checkpoint with eval_linear.py")


RESUME_FLAGS = ("gpu", "workers", "data_root", "download")     # where the run executes: these may go with --resume


# ----- model --------------------------------------------------------------------------------------

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
    """The backbone with its classifier `fc` replaced by the identity, and its feature width."""
    if arch == "resnet18":
        net = ResNet18()
    else:
        block, layers = ((torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]) if arch == "resnet10" else
                         (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]))
        net = torchvision.models.resnet.ResNet(block, layers)
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class Encoder(nn.Module):
    """Backbone + MoCo v2's head fc → ReLU → fc (Chen et al. 2020 §2, REFERENCE §5); a unit-length float32 output."""

    def __init__(self, arch, dim):
        super().__init__()
        self.backbone, width = build_backbone(arch)
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


def contract_state(encoder):
    """The project's checkpoint layout: backbone tensors at the top level, the head under `head.`."""
    return {k.removeprefix("backbone."): v for k, v in encoder.state_dict().items()}


def load_contract_state(encoder, state):
    encoder.load_state_dict({k if k.startswith("head.") else f"backbone.{k}": v for k, v in state.items()})


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d normalising `splits` groups of a training batch apart (rows s, s+S, … form group s) in one call over
    (N/S, S·C), as the MoCo CIFAR demo's SplitBatchNorm; running statistics: the groups' mean. BatchNorm2d's keys."""

    def __init__(self, bn, splits):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.splits = splits

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        (N, C, H, W), S = x.shape, self.splits
        mean, var = self.running_mean.repeat(S), self.running_var.repeat(S)
        out = F.batch_norm(x.view(N // S, S * C, H, W), mean, var, self.weight.repeat(S), self.bias.repeat(S),
                           True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(S, C).mean(0))
            self.running_var.copy_(var.view(S, C).mean(0))
            self.num_batches_tracked.add_(1)
        return out.view(N, C, H, W)


def split_batchnorm(module, splits):
    """Replace every BatchNorm2d of `module` by a SplitBatchNorm with the same weights and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, SplitBatchNorm(child, splits))
        else:
            split_batchnorm(child, splits)
    return module


def split_forward(encoder, x, splits):
    """encoder(x) with BN statistics per contiguous chunk: chunk s moves to rows s, s+S, … (group s) and back."""
    if splits == 1:
        return encoder(x)
    x = x.unflatten(0, (splits, -1)).transpose(0, 1).flatten(0, 1)
    return encoder(x).unflatten(0, (-1, splits)).transpose(0, 1).flatten(0, 1)


def build_model(args, ckpt, n, device, rank, world):
    """The queue (checked), both encoders (BN splits), SGD, as --resume left them; DDP under torchrun: (run, start)."""
    if args.queue is None:
        args.queue = default_queue(args, n)
        if rank == 0:
            print(f"queue: K = {args.queue} negatives (default for {n} training images at global batch "
                  f"{args.batch_size}; --queue sets it)")
    check_queue(args.queue, args.batch_size, n)
    encoder_q, encoder_k = Encoder(args.arch, args.moco_dim), Encoder(args.arch, args.moco_dim)
    if args.bn_splits > 1:
        encoder_q, encoder_k = split_batchnorm(encoder_q, args.bn_splits), split_batchnorm(encoder_k, args.bn_splits)
    encoder_q, encoder_k = encoder_q.to(device), encoder_k.to(device)
    queue = F.normalize(torch.randn(args.queue, args.moco_dim, generator=torch.Generator().manual_seed(args.seed)),
                        dim=1).to(device)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd,
                                fused=device.type == "cuda")
    if ckpt is not None:
        load_contract_state(encoder_q, ckpt["model"])
        load_contract_state(encoder_k, ckpt["key_model"])
        queue.copy_(ckpt["queue"])
        optimizer.load_state_dict(ckpt["optimizer"])
    encoder_k.requires_grad_(False)
    model = encoder_q if world == 1 else nn.parallel.DistributedDataParallel(    # DDP: all start from rank 0's θ_q
        encoder_q, device_ids=[device.index] if device.type == "cuda" else None)
    if ckpt is None:
        encoder_k.load_state_dict(encoder_q.state_dict())  # θ_k starts as θ_q (MoCo Algorithm 1), on every process
    run = argparse.Namespace(model=model, net=encoder_q, key=encoder_k, queue=queue, optimizer=optimizer, kde=None,
                             weights=None, device=device, rank=rank, world=world, ptr=ckpt["queue_ptr"] if ckpt else 0)
    return run, ckpt["epoch"] if ckpt else 0


# ----- the method (MoCo Eq. (1)–(2) and §3.3, paper 2 Eq. (3) and Algorithm 1) --------------------

@torch.no_grad()
def momentum_update(key, query, m):
    """MoCo Eq. (2): θ_k ← m·θ_k + (1 − m)·θ_q, parameters only (buffers are the key encoder's own)."""
    kp, qp = list(key.parameters()), [p.detach() for p in query.parameters()]
    torch._foreach_mul_(kp, m)
    torch._foreach_add_(kp, qp, alpha=1 - m)


def info_nce(q, k, queue, t):
    """MoCo Eq. (1): −log exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_queue exp(q·k/τ)), as cross-entropy over the
    logits [q·k₊, q·queue] / τ with the positive at index 0. Returns (mean loss, logits)."""
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device)), logits


@torch.no_grad()
def enqueue(queue, keys, ptr):
    """MoCo Algorithm 1: the keys replace the oldest rows (ptr …) of the ring `queue`; returns the new pointer."""
    queue[ptr:ptr + len(keys)] = keys
    return (ptr + len(keys)) % len(queue)


def gather(x, world):
    """Concatenation over the processes in rank order (no gradient), the authors' concat_all_gather."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def shuffle_order(n, generator, device, world):
    """The key batch's permutation for shuffle-BN (MoCo §3.3): from the epoch's generator, rank 0's everywhere."""
    perm = torch.randperm(n, generator=generator, device=device)
    if world > 1:
        dist.broadcast(perm, 0)
    return perm


@torch.no_grad()
def shuffled_keys(encoder_k, x, perm, splits, rank, world):
    """Keys of the global batch under shuffle-BN (MoCo §3.3: shared BN statistics would give a pair away): process r
    encodes rows perm[r·b … (r+1)·b − 1] of the gathered key views (`splits` BN groups); gathered, un-permuted."""
    k = split_forward(encoder_k, gather(x, world)[perm.view(world, -1)[rank]], splits)
    return gather(k, world)[torch.argsort(perm)]


# === shared: sam (identical in moco_ssp.py and simsiam_rwsam.py) ===
def sam_perturbation(params, grads, rho, adaptive):
    """ε of paper 2 Algorithm 1 line 12 with p = q = 2: ρ·g/‖g‖₂, one norm over all parameters (Foret
    et al. Eq. (2)). adaptive (ASAM, Kwon et al. 2021, as the authors ran it; the default): ρ·w²·g/‖|w|·g‖₂."""
    if adaptive:
        scaled = torch._foreach_mul(grads, torch._foreach_abs(params))
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
        return torch._foreach_mul(torch._foreach_mul(scaled, torch._foreach_abs(params)), rho / (norm + 1e-12))
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return torch._foreach_mul(grads, rho / (norm + 1e-12))


def bn_buffers(model):
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
# === end shared: sam ===


def sam_moco_step(model, net, optimizer, x_q, keys, queue, args, weights=None):
    """Paper 2 Eq. (3) / Algorithm 1 lines 12–13 on the MoCo loss: ε from ∇L_w(w) with L_w = mean(w_i·ℓ_i), ℓ_i the
    per-query InfoNCE of Eq. (1) (w ≡ 1 for --opt sam), then the optimiser steps at w with ∇L(w + ε) of the plain
    mean loss. Both passes see the step's keys and queue; BN buffers keep the first pass's update; under DDP the
    first pass is not all-reduced. Returns (mean loss at w, logits at w, mean loss at w + ε)."""
    optimizer.zero_grad(set_to_none=True)
    with model.no_sync() if model is not net else contextlib.nullcontext():
        with torch.autocast(x_q.device.type, torch.bfloat16, enabled=args.amp):
            q = split_forward(model, x_q, args.bn_splits)
        _, logits = info_nce(q, keys, queue, args.moco_t)
        per = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device), reduction="none")
        (per if weights is None else weights * per).mean().backward()
    live = [p for p in net.parameters() if p.grad is not None]
    with torch.no_grad():
        e = sam_perturbation(live, [p.grad for p in live], args.sam_rho, args.adaptive)
        at_w = [p.detach().clone() for p in live]
        buffers = bn_buffers(net)
        first_pass_stats = [b.clone() for b in buffers]
        torch._foreach_add_(live, e)                                # w + ε
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x_q.device.type, torch.bfloat16, enabled=args.amp):
        q2 = split_forward(model, x_q, args.bn_splits)
    loss2, _ = info_nce(q2, keys, queue, args.moco_t)
    loss2.backward()                                                # ∇L(w + ε), all-reduced under DDP
    with torch.no_grad():
        torch._foreach_copy_(live, at_w)
        torch._foreach_copy_(buffers, first_pass_stats)
    optimizer.step()
    return per.detach().mean(), logits, loss2.detach()


def train_step(run, x_q, x_k, g, weights, args):
    """One update: momentum update and shuffled keys (MoCo Eq. (2), §3.3), then the InfoNCE step of Eq. (1) (sgd) or
    sam_moco_step (weights: rwSAM's w_i); enqueues the keys. Returns (mean loss at w, logits), no gradient."""
    device, rank, world, b = run.device, run.rank, run.world, args.batch_size // run.world
    with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
        q = split_forward(run.model, x_q, args.bn_splits) if args.opt == "sgd" else None
        with torch.no_grad():
            momentum_update(run.key, run.net, args.moco_m)
            perm = shuffle_order(len(x_k) * world, g, device, world)
            keys = shuffled_keys(run.key, x_k, perm, args.bn_splits, rank, world)
    if args.opt != "sgd":
        loss, logits, _ = sam_moco_step(run.model, run.net, run.optimizer, x_q, keys[rank * b:(rank + 1) * b],
                                        run.queue, args, weights)
    else:
        loss, logits = info_nce(q, keys[rank * b:(rank + 1) * b], run.queue, args.moco_t)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        loss = loss.detach()
    run.ptr = enqueue(run.queue, keys, run.ptr)
    return loss, logits


# === shared: kde (identical in moco_ssp.py and simsiam_rwsam.py) ===
def kde_weights(feats, alpha, bandwidth=None, seed=0, chunk=None, pairs=10_000):
    """Paper 2 §4 and Algorithm 1 line 8: w_i = ((1/n)·Σ_j K(f_i − f_j, h))^(−α), Gaussian K.

    density_i = mean_j exp(−‖f_i − f_j‖²/(2h²)) over all n rows of `feats` (j = i included), computed in
    float64 by `chunk` rows at a time (default: a 1 GiB block of distances, built in place: beside the features
    the peak is one block, at any n); K's constant (2πh²)^(−d/2) is dropped and the weights rescaled to mean 1,
    which changes no perturbation. h = `bandwidth`, or by default the median of ‖f_i − f_j‖ over `pairs`
    random pairs (i uniform, j uniform among the others; a CPU generator seeded with `seed`).
    Returns (weights float32, density float64, h); ValueError for < 2 rows or h = 0."""
    f = feats.double()
    n = len(f)
    if n < 2:
        raise ValueError(f"the KDE needs at least 2 training images, got {n}")
    if bandwidth is None:                                             # the median heuristic
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(0, n, (pairs,), generator=g)
        j = (i + torch.randint(1, n, (pairs,), generator=g)) % n
        h = (f[i.to(f.device)] - f[j.to(f.device)]).norm(dim=1).median().item()
    else:
        h = float(bandwidth)
    if not h > 0:
        raise ValueError("every stage-1 feature is the same (a collapsed representation): the KDE bandwidth "
                          "is 0; pass --bandwidth or train stage 1 longer")
    sq = (f * f).sum(1)
    density = torch.empty(n, dtype=torch.float64, device=f.device)
    chunk = chunk or max(1, 2 ** 30 // (8 * n))
    for s in range(0, n, chunk):
        d2 = torch.addmm(sq[None, :], f[s:s + chunk], f.T, alpha=-2).add_(sq[s:s + chunk, None]).clamp_(min=0)
        density[s:s + chunk] = d2.div_(-2 * h * h).exp_().mean(1)
    log_w = -alpha * density.log()
    weights = torch.exp(log_w - torch.logsumexp(log_w, 0)) * n
    return weights.float(), density, h
# === end shared: kde ===


def lr_at(epoch, args):
    """Per-epoch cosine schedule of MoCo v2 (the authors' adjust_learning_rate with --cos), 0-based epoch."""
    return 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))


def check_queue(K, B, n):
    """Fail unless the queue holds whole global batches (the pointer wraps exactly) and fewer keys than images."""
    if B > n:
        R.fail(f"--batch-size {B} is larger than the {n} training images; lower it")
    valid = [B * m for m in range(1, (n - 1) // B + 1)]
    if K <= 0 or K % B or K >= n:
        shown = ", ".join(map(str, valid[:4])) + (f", …, {valid[-1]}" if len(valid) > 4 else "")
        R.fail(f"--queue {K} must be a multiple of the global batch {B} and smaller than the {n} training images; "
               + (f"use one of {shown}" if valid else "lower --batch-size"))


def default_queue(args, n):
    """The authors' 65,536 (ImageNet-LT / iNat) where the set is larger, 4096 (CIFAR-size) where it holds 2 × 4096
    images; else the largest multiple of the global batch ≤ n/2 (paper 2's smaller ImageNet variants, SVHN-LT)."""
    fit = args.batch_size * ((n // 2) // args.batch_size)
    if args.dataset in LARGE:
        return 65536 if n > 65536 else fit or args.batch_size
    return min(4096, fit) if fit else args.batch_size


# ----- data ---------------------------------------------------------------------------------------

class ShardedViews:
    """Two GPU-augmented views of each global batch of a GPULoader, rows r·b … (r+1)·b − 1 for process r: disjoint
    shards of one (seed, epoch) permutation, together the images and views of one process with that batch."""

    def __init__(self, loader, rank, world):
        self.loader, self.rank, self.world = loader, rank, world

    def __len__(self):
        return len(self.loader)

    def epoch(self, epoch):
        for views, y, idx in self.loader.epoch(epoch):
            sl = slice(self.rank * (len(y) // self.world), (self.rank + 1) * (len(y) // self.world))
            yield [v[sl] for v in views], y[sl], idx[sl]


def build_list_data(args, device, rank, world):
    """ImageNet-LT / iNat: the list is the variant (python datasets_lt.py --train-list writes paper 2's);
    --val-frac carves a validation split from it. Two views per image in DataLoader workers; no kNN sets."""
    if not args.train_list:
        R.fail(f"--dataset {args.dataset} needs --train-list ('relative/path label' file)")
    if args.balanced:
        R.fail(f"--balanced draws a CIFAR-size subset; for {args.dataset} pass the balanced list as --train-list "
               f"(python datasets_lt.py --train-list ... writes paper 2's ImageNet variants)")
    ds = D.FileListDataset(args.data_root, args.train_list, train=True, transform=D.TwoViews(224))
    idx, val_idx = D.carve_val(np.arange(len(ds)), ds.labels, args.val_frac, args.data_seed)
    data = argparse.Namespace(C=ds.num_classes, idx=idx, val_idx=val_idx, bank=None, val=None, test=None,
                              counts=np.bincount(ds.labels[idx], minlength=ds.num_classes).tolist())
    data.train = D.ListViews(ds, idx, args.batch_size // world, args.seed, args.workers, device, rank, world)
    return data


def build_data(args, device, rank, world):
    """Training views (this process's share), the kNN bank (the training images in order), validation and test
    batches, class counts, number of classes C, the training indices and their validation split."""
    if args.dataset in LARGE:
        return build_list_data(args, device, rank, world)
    train_x, train_y, names = D.load_split(args.dataset, args.data_root, True, args.download)
    test_x, test_y, _ = D.load_split(args.dataset, args.data_root, False, args.download)
    C = len(names)
    idx, val_idx = D.training_subset(train_y, args)
    mean, std = D.mean_std(args.dataset, train_x)
    data = argparse.Namespace(C=C, idx=idx, val_idx=val_idx, counts=np.bincount(train_y[idx], minlength=C).tolist())
    loader = D.GPULoader(train_x[idx], train_y[idx], args.batch_size, mean, std, device, augment="ssl", views=2,
                         blur=False, drop_last=True, seed=args.seed)
    data.train = ShardedViews(loader, rank, world)
    data.bank = D.GPULoader(loader.images, train_y[idx], 1000, mean, std, device)
    data.test = D.GPULoader(test_x, test_y, 1000, mean, std, device)
    data.val = D.GPULoader(train_x[val_idx], train_y[val_idx], 1000, mean, std, device) if len(val_idx) else None
    return data


# ----- one epoch, the stages (paper 2 Algorithm 1) ------------------------------------------------

def train_one_epoch(run, data, epoch, args):
    """One epoch of train_step, all processes: (row: lr, loss, % positive first; first non-finite step or -1; steps)."""
    lr = lr_at(epoch, args)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.net.train()
    run.key.train()
    device, rank, world = run.device, run.rank, run.world
    g = torch.Generator(device=device).manual_seed(D.stream_seed(args.seed, epoch, 1))
    sums = torch.zeros(2, device=device)              # loss sum, queries whose positive ranks first
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    steps = seen = 0
    progress = R.Progress(len(data.train), args.print_freq)
    for step, ((x1, x2), _, pos) in enumerate(data.train.epoch(epoch)):
        steps += 1
        w = run.weights[pos.to(device)] if run.weights is not None else None
        loss, logits = train_step(run, x1, x2, g, w, args)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        sums += torch.stack([loss * len(x1), (logits.argmax(1) == 0).sum().float()])
        seen += len(x1) * world
        progress(step, seen, lambda: sums[0].item() / len(x1) / steps)        # rank 0's share
    if world > 1:
        dist.all_reduce(sums)
    loss_sum, pos = sums.tolist()
    return {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / seen, "pos_top1": 100 * pos / seen}, first_bad, steps


class KNN(nn.Module):
    """Weighted kNN on unit-length backbone features (Wu et al. 2018; the MoCo CIFAR demo's monitor):
    class score = Σ over the k most cosine-similar bank images of that class of exp(similarity / t)."""

    def __init__(self, backbone, bank, bank_labels, num_classes, k, t):
        super().__init__()
        self.backbone, self.bank, self.bank_labels = backbone, bank, bank_labels
        self.num_classes, self.k, self.t = num_classes, min(k, len(bank)), t

    def forward(self, x):
        f = F.normalize(self.backbone(x).float(), dim=1)
        with torch.autocast(x.device.type, enabled=False):    # float32: bf16 resolves cosines near 1 to 2^-8 only
            sim, idx = (f @ self.bank.t()).topk(self.k, dim=1)
        scores = torch.zeros(len(x), self.num_classes, device=x.device)
        return scores.scatter_add_(1, self.bank_labels[idx], (sim / self.t).exp())


@torch.no_grad()
def monitor(args, run, data, epoch):
    """The kNN monitor (rank 0) at --knn-every's epochs: (test, validation) KNN of the query backbone, None when off."""
    if not (args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs)):
        return None, None
    backbone = run.net.backbone.eval()
    bank = [(F.normalize(backbone(x).float(), dim=1), y) for x, y, _ in data.bank.epoch(0)]  # float32, as queries
    feats, labels = map(torch.cat, zip(*bank))
    knn = KNN(backbone, feats, labels, data.C, args.knn_k, args.knn_t)
    score = lambda split: D.evaluate(knn, split.epoch(0), data.C, data.counts) if split else None
    return score(data.test), score(data.val)


@torch.no_grad()
def stage1(args, data, device, rank):
    """Algorithm 1 lines 3–7 ran before (--stage1: a plain moco_ssp.py run on these images, checked on every process);
    line 8 on rank 0 (None elsewhere): kde_weights of its backbone's normalised features (eval, in training order)."""
    ckpt = R.load_checkpoint(args.stage1)
    if ckpt.get("script") != "moco_ssp.py" or ckpt.get("class_counts") != data.counts:
        R.fail(f"--stage1 '{args.stage1}' is not a moco_ssp.py run on these training images (its class counts "
               f"{ckpt.get('class_counts')} differ from {data.counts}); pass the plain MoCo run of the same data")
    if rank != 0:
        return None
    backbone, _ = build_backbone(args.arch)
    R.load_backbone(backbone, args.arch, args.stage1)
    backbone.to(device).eval()
    batches = data.bank.epoch(0) if data.bank is not None else D.list_plain_batches(args, data.idx, device)
    feats = torch.cat([F.normalize(backbone(x).float(), dim=1) for x, _, _ in batches])
    try:
        w, density, h = kde_weights(feats, args.alpha, args.bandwidth, args.seed)
    except ValueError as e:                                # too few images or a collapsed representation
        R.fail(str(e))
    kde = {"weights": w.cpu(), "density": density.cpu(), "bandwidth": h, "alpha": args.alpha, "source": args.stage1,
           "indices": torch.as_tensor(data.idx)}
    print(f"KDE weights from {args.stage1}: h = {h:.4f}, α = {args.alpha:g}, weights "
          f"{w.min().item():.3f}–{w.max().item():.3f} (mean 1)")
    return kde


def stage2(args, run, kde, n):
    """Algorithm 1 lines 9–14, this run: SAM steps (--opt rwsam) along the loss weighted by rank 0's line 8."""
    run.kde = kde
    if args.opt == "rwsam":
        run.weights = kde["weights"].to(run.device) if kde is not None else torch.empty(n, device=run.device)
        if run.world > 1:
            dist.broadcast(run.weights, 0)


# ----- main ---------------------------------------------------------------------------------------

def resume_run(args, rank, world):
    """--resume: the saved run's arguments (as many processes as now), then check_run; no new run over a run."""
    old_defaults = {"balanced": False, "subsample": 1.0, "same_epochs": False, "opt": "sgd", "recipe": "paper2"}
    args, ckpt = R.resume_run(args, "moco_ssp.py", RESUME_FLAGS, old_defaults,
                              "; start a new pre-training run with another --out", say=False)
    if ckpt is not None:
        if args.world_size != world:
            R.fail(f"'{args.resume}' was trained by {args.world_size} process(es) but this is {world}; resume it "
                   f"with the same number (torchrun --nproc_per_node {args.world_size}, or no torchrun for 1)")
        if rank == 0:
            print(f"resuming {args.out} after epoch {ckpt['epoch']} with the arguments it was started with")
    else:                                                  # --bn-splits: None or at least 1
        args.world_size, args.bn_splits = world, args.bn_splits or (8 if world == 1 else 1)
    check_run(args, world)
    R.refuse_occupied(args.out, args.resume)
    return args, ckpt


def open_run(args, ckpt, run, data, start):
    """The run folder (rank 0) with the training indices; then the lines printed above the epoch table."""
    if R.open_run(args, ckpt, run.device, __file__, start, rank=run.rank):
        D.save_indices(os.path.join(args.out, "train_indices.json"), data.idx, data.val_idx)
    if run.rank != 0:
        return
    n, counts, b = len(data.idx), data.counts, args.batch_size // run.world
    print(f"{args.dataset} rho={args.rho:g} ({args.imb_type}{', balanced' if args.balanced else ''}"
          f"{f', subsample {args.subsample:g}' if args.subsample < 1 else ''}): {n} training images "
          f"{counts[:3]}…{counts[-1]}, labels unused (kNN monitor only); MoCo v2 {args.arch}, batch "
          f"{args.batch_size} = {run.world} process(es) × {b} in {args.bn_splits} BN split(s), queue {args.queue}, "
          f"m={args.moco_m:g}, τ={args.moco_t:g}, lr {args.lr:g}, {args.epochs} epochs on {run.device}"
          + (f", {'rwSAM' if args.opt == 'rwsam' else 'SAM'} ρ={args.sam_rho:g}{' adaptive' if args.adaptive else ''}"
             if args.opt != "sgd" else ""))
    if args.subsample < 1:
        print(f"--subsample {args.subsample:g}: {args.epochs} epochs " +
              (f"(--same-epochs)" if args.same_epochs else
               f"= round({args.epochs_full} / {args.subsample:g}), the full variant's optimizer steps (App. A.1); "
               f"--same-epochs keeps {args.epochs_full}"))
    print("pos: % of queries whose positive key beats all queue keys; knn / many / med / few / val: weighted kNN "
          "top-1 on backbone features")
    print(R.table_header("pos", "knn", "many", "med", "few", "val"))


def end_epoch(args, run, data, epoch, row, t0):
    """Rank 0: the kNN monitor, then the metrics row, the printed line and last.pt."""
    if run.rank != 0:
        return
    knn_m, val_m = monitor(args, run, data, epoch)
    row.update({"knn_test": knn_m, "knn_val_top1": val_m["top1"] if val_m else None, "seconds": time.time() - t0})
    m = knn_m or {}
    line = R.table_row(epoch + 1, row["lr"], row["loss"], [row["pos_top1"], m.get("top1"), m.get("many"),
                       m.get("medium"), m.get("few"), row["knn_val_top1"]], row["seconds"])
    state = {"script": "moco_ssp.py", "arch": args.arch, "model": contract_state(run.net),
             "key_model": contract_state(run.key), "queue": run.queue, "queue_ptr": run.ptr, "epoch": epoch + 1,
             "optimizer": run.optimizer.state_dict(), "args": vars(args), "class_counts": data.counts,
             "rng": {"torch": torch.get_rng_state()}, "mean": getattr(data.test, "mean", D.IMAGENET_MEAN),
             "std": getattr(data.test, "std", D.IMAGENET_STD), "kde_weights": run.kde}
    R.end_epoch(args.out, row, line, state)


def finish_run(args, run, data, t_run):
    """Rank 0: final.json (the last epoch's numbers and the run's recipe) and the last printed line."""
    if run.rank != 0:
        return
    last = (R.read_metrics(os.path.join(args.out, "metrics.jsonl")) or [{}])[-1]
    ckpt_path = os.path.join(args.out, "last.pt")
    final = R.finish_run(args.out, {
        "script": "moco_ssp.py", "arch": args.arch, "dataset": args.dataset, "rho": args.rho,
        "imb_type": args.imb_type, "seed": args.seed, "data_seed": args.data_seed, "epochs": args.epochs,
        "batch_size": args.batch_size, "processes": run.world, "bn_splits": args.bn_splits, "queue": args.queue,
        "class_counts": data.counts, "n_train": len(data.idx), "balanced": args.balanced,
        "subsample": args.subsample, "opt": args.opt, "sam_rho": args.sam_rho if args.opt != "sgd" else None,
        "adaptive": args.adaptive, "alpha": args.alpha if args.opt == "rwsam" else None, "stage1": args.stage1,
        "final_loss": last.get("loss"), "final_pos_top1": last.get("pos_top1"), "knn_test": last.get("knn_test"),
        "knn_val_top1": last.get("knn_val_top1"), "checkpoint": ckpt_path,
        "next": [f"python crt.py --ckpt {ckpt_path}", f"python eval_linear.py --ckpt {ckpt_path}"]}, t_run)
    knn = last.get("knn_test")
    print(f"done: {ckpt_path} (loss {final['final_loss']:.4f}"
          + (f", kNN test top-1 {knn['top1']:.2f}%" if knn else "") + f"); next: {final['next'][0]}")


def main(argv=None):
    rank, world = R.process_group()
    try:
        args, ckpt = resume_run(parse_args(argv), rank, world)
        device = R.setup_device(args, world)
        if world > 1:
            R.init_process_group(device)
        torch.manual_seed(args.seed)
        data = build_data(args, device, rank, world)
    except D.DataError as e:
        R.fail(str(e))
    kde = ckpt.get("kde_weights") if ckpt is not None else None
    if args.opt == "rwsam" and kde is None:                # Algorithm 1 lines 3–7 (--stage1), then line 8
        kde = stage1(args, data, device, rank)
    run, start = build_model(args, ckpt, len(data.idx), device, rank, world)
    stage2(args, run, kde, len(data.idx))
    open_run(args, ckpt, run, data, start)
    t_run = time.time()
    for epoch in range(start, args.epochs):
        t0 = time.time()
        row, first_bad, steps = train_one_epoch(run, data, epoch, args)
        R.stop_if_diverged(args.out, [run.net, run.key], epoch, first_bad, steps, rank, world)
        end_epoch(args, run, data, epoch, row, t0)
    finish_run(args, run, data, t_run)
    R.leave_process_group(world)


if __name__ == "__main__":
    main()
