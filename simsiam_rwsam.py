"""SimSiam with SAM and label-free reweighted SAM (rwSAM) on long-tailed data (paper 2, Liu et al. 2022).

Paper 2 §2.2 and App. A.1 (datasets and the size sweep), §4 Eq. (2)–(3) (SAM, reweighted SAM), §4 "Assigning
weight with kernel density estimation", App. C.1 and Algorithm 1 (ρ = 5, α = 1.2 on CIFAR-10-LT; ρ = 2,
α = 0.5 on ImageNet-LT), Table 1 (accuracy and the generalization gap). SimSiam: Chen & He 2021; SAM:
Foret et al. 2021; recipe: REFERENCE §6. Labels never train the model or the weights; they only label the
monitors. README "SimSiam, SAM and label-free rwSAM" has the recipe, the monitors, DDP and ImageNet-LT.

    python simsiam_rwsam.py --rho 0.01 --gpu 0            # SimSiam → KDE weights → SimSiam + rwSAM (stage1.pt, last.pt)
    python simsiam_rwsam.py --rho 0.01 --opt sgd          # SimSiam (Table 1(a)); --opt sam: SimSiam + SAM
    python simsiam_rwsam.py --rho 0.01 --opt sgd --balanced              # SimSiam, balanced (same n)
    python simsiam_rwsam.py --rho 0.01 --imb-type step                    # the step column
    python simsiam_rwsam.py --rho 0.1 --subsample 0.25 --opt sgd         # §2.2 size sweep (6400 epochs)
    python simsiam_rwsam.py --rho 0.01 --stage1 runs/simsiam_rwsam-cifar10-0.01-0-sgd/last.pt   # reuse stage 1
    torchrun --nproc_per_node 4 simsiam_rwsam.py --rho 0.01              # DDP, --batch-size is global
    python simsiam_rwsam.py --dataset imagenet_lt --data-root IMNET --train-list ImageNet_LT_train.txt --rho 1
    python eval_linear.py --ckpt runs/simsiam_rwsam-cifar10-0.01-0-rwsam/last.pt --gpu 0    # the paper's probe

Paper (CIFAR-10-LT rho 0.01, linear probe %): exp SimSiam 81.4, +SAM 82.1, balanced 82.0, +rwSAM 82.7;
step 84.3 / 84.7 / 85.8 / 85.6; gap frequent / rare: SimSiam 0.035 / 0.081, +rwSAM 0.037 / 0.066.
ImageNet-LT (Table 1(b), mean of four fine-tuning targets): SimSiam 80.6, balanced 80.7, +rwSAM 81.4.
Algorithm 1: stage1 (lines 3–7), stage1_weights (8), stage2 (9), train_one_epoch and train_step (10–14).

Deliberate differences from the paper and the authors' code:
1. Label-free KDE weights computed here (the authors weighted by label, or read a missing weight file).
2. The weighted loss weights (the authors' SimSiamLossRe ignored them: their "rwSAM" was plain ASAM).
3. ASAM by default (the authors' --adaptive was argparse type=bool, so always on: ρ 5 / 2 are ASAM radii).
4. BatchNorm running statistics update in SAM's first pass only.
5. No test-set selection: the last epoch is kept; kNN monitors on training data only.
6. Stage 2 starts from a fresh model (equal budgets); --stage2-init stage1 is the literal Algorithm 1.
7. lr 0.06 per 512 (SimSiam-91), cosine from epoch 0; the authors' scripts default to 0.05.
8. Seeded datasets_lt subsets and GPU augmentation; no bias before BatchNorm (it removes it; theirs moved by wd).
9. One GPU, the CPU, or torchrun (the authors' code was single-GPU).
10. ImageNet-LT / iNat: Chen & He's model with App. A.1's schedule (300 epochs, lr 0.025 at batch 256).
"""
import argparse
import contextlib
import gc
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
    p = argparse.ArgumentParser(description="SimSiam + SAM / label-free reweighted SAM (paper 2, §4, Algorithm 1).")
    # --- shared flags (same names and order in every script; defaults and help are this method's) ---
    p.add_argument("--dataset", default="cifar10",
                   choices=["cifar10", "cifar100", "svhn", "folder", "imagenet_lt", "inat"])
    p.add_argument("--data-root", default="./data", help="dataset folder")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--rho", type=float, default=0.01, help="tail/head ratio in (0, 1]; 1 = balanced")
    p.add_argument("--imb-type", default="exp", choices=["exp", "step"])
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    p.add_argument("--epochs", type=int, default=None,
                   help="SimSiam epochs (rwSAM: stage 2, and stage 1 unless --stage1-epochs); default 1600 as the "
                        "authors' long-tailed CIFAR runs (SimSiam-91: 800), 300 for ImageNet-LT / iNat (paper 2 "
                        "App. A.1); the full-size variant's with --subsample")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (split across torchrun processes); default 512, 256 for ImageNet-LT / iNat "
                        "(paper 2 App. A.1; Chen & He: 512)")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 0.06 · batch-size / 512; ImageNet-LT / iNat: 0.025 · batch-size / 256 (paper 2 "
                        "App. A.1; Chen & He: 0.05 · batch-size / 256)")
    p.add_argument("--wd", type=float, default=None, help="default: 5e-4; 1e-4 for ImageNet-LT / iNat (Chen & He)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the data subsets (long-tailed draw, balanced/downsampled subsets, validation split); --seed varies training only")
    p.add_argument("--out", default=None,
                   help="default: runs/<script>-<dataset>-<rho>-<seed>-<opt>[-step][-balanced][-sub<r>]")
    p.add_argument("--resume", default=None,
                   help="continue the run saved in this last.pt, in its folder, with its arguments; only --gpu, "
                        "--data-root, --download (and --workers) may be given with it, any other flag is refused")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--val-frac", type=float, default=0.0,
                   help="validation split carved from the training subset; 0 = report last epoch only")
    # --- this method ---
    p.add_argument("--opt", default="rwsam", choices=["sgd", "sam", "rwsam"],
                   help="sgd: SimSiam; sam: + SAM; rwsam: stage 1 SimSiam, KDE weights, stage 2 rwSAM")
    p.add_argument("--sam-rho", type=float, default=None,
                   help="SAM radius ρ (paper 2 App. C.1, an ASAM radius): default 5 (CIFAR-10-LT), 2 "
                        "(ImageNet-LT, iNat)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="ASAM (Kwon et al.): ε = ρ·|w|²·g/‖|w|·g‖₂, as the authors always ran it (default); "
                        "--no-adaptive: plain SAM, ε = ρ·g/‖g‖₂")
    p.add_argument("--alpha", type=float, default=None,
                   help="rwSAM weight exponent: w = density^(-α); default 1.2 (CIFAR-10-LT), 0.5 (ImageNet-LT, iNat), "
                        "paper 2 App. C.1")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="KDE bandwidth h; default: median distance between normalised stage-1 features")
    p.add_argument("--stage1", default=None, help="rwSAM: take stage 1 from this checkpoint instead of training it")
    p.add_argument("--stage1-epochs", type=int, default=None, help="rwSAM stage-1 epochs; default: --epochs")
    p.add_argument("--stage2-init", default="scratch", choices=["scratch", "stage1"],
                   help="rwSAM stage 2 starts from a fresh model with the seed of stage 1 (the authors' "
                        "main_sam_weight.py; equal budgets) or continues the stage-1 model (doubles the budget)")
    p.add_argument("--balanced", action="store_true",
                   help="class-balanced subset with the same number of images as the long-tailed one")
    p.add_argument("--subsample", type=float, default=1.0, choices=SUBSAMPLE,
                   help="keep this fraction of every class (paper 2's size sweep); trains round(epochs / r) epochs")
    p.add_argument("--no-flip", action="store_true",
                   help="no horizontal flip (CIFAR-size data): paper 2's semi-synthetic images (§3.2), halves apart")
    p.add_argument("--same-epochs", action="store_true",
                   help="with --subsample r < 1, train --epochs epochs instead of round(epochs / r)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--knn-every", type=int, default=None,
                   help="kNN every N epochs and at the end of each stage (gap: at stage ends); 0: only at the ends; "
                        "-1: no monitors; default 10, -1 for ImageNet-LT / iNat (the monitors need in-memory data)")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1, help="kNN vote temperature")
    p.add_argument("--knn-val-frac", type=float, default=0.1,
                   help="kNN queries: this class-stratified fraction of the full training split")
    p.add_argument("--gap-views", type=int, default=16,
                   help="generalization gap: average over this many seeded draws of view pairs, standard error "
                        "reported")
    p.add_argument("--strict-fp32", action="store_true", help="disable TF32 in cuDNN convolutions and matmuls")
    # ImageNet-LT / iNat (file lists): Chen & He's ImageNet SimSiam with paper 2's App. A.1 schedule
    p.add_argument("--arch", default=None, choices=["resnet18", "resnet10", "resnet50"],
                   help="default: resnet18 (CIFAR ResNet-18: CIFAR, SVHN, folder), resnet50 (torchvision: "
                        "ImageNet-LT, iNat); resnet10 is a small torchvision ResNet for file lists")
    p.add_argument("--train-list", default=None, help="ImageNet-LT / iNat: 'relative/path label' list")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process (ImageNet-LT / iNat only)")
    p.add_argument("--crop-size", type=int, default=224,
                   help="ImageNet-LT / iNat: side of the RandomResizedCrop views (Chen & He: 224); a smaller one only "
                        "for quick CPU checks")
    p.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the predictor's lr at --lr, no cosine (Chen & He's --fix-pred-lr); default: on for "
                        "ImageNet-LT / iNat, off for CIFAR-size data")
    p.add_argument("--print-freq", type=int, default=0,
                   help="a progress line every N steps of an epoch; 0: at most every 10 s (none in a short epoch)")
    p.error = R.fail                                       # one line and exit 2, not the usage text
    args = p.parse_args(argv)
    args.cli_flags = R.given_flags(p, argv)
    large = args.dataset in LARGE
    for name, small, imagenet in (("epochs", 1600, 300), ("batch_size", 512, 256), ("wd", 5e-4, 1e-4),
                                  ("sam_rho", 5.0, 2.0), ("alpha", 1.2, 0.5), ("knn_every", 10, -1),
                                  ("arch", "resnet18", "resnet50"), ("fix_pred_lr", False, True)):
        if getattr(args, name) is None:
            setattr(args, name, imagenet if large else small)
    if args.lr is None:                                    # linear scaling rule (Goyal et al.)
        args.lr = 0.025 * args.batch_size / 256 if large else 0.06 * args.batch_size / 512
    if args.out is None:
        tags = [args.opt] + (["step"] if args.imb_type == "step" else []) + (["balanced"] if args.balanced else []) \
            + ([f"sub{args.subsample:g}"] if args.subsample < 1 else [])
        args.out = os.path.join("runs", f"simsiam_rwsam-{args.dataset}-{args.rho:g}-{args.seed}-" + "-".join(tags))
    R.check_ranges(args, RANGES)
    return args


RANGES = R.SHARED_RANGES + [    # of every numeric flag: checked before anything is read or written
    ("sam_rho", 0, None, "[)"), ("alpha", 0, None, "[)"), ("bandwidth", 0, None, "()"),
    ("stage1_epochs", 1, None, "[)"), ("knn_every", -1, None, "[)"), ("knn_k", 1, None, "[)"), ("knn_t", 0, None, "()"),
    ("knn_val_frac", 0, 1, "()"), ("gap_views", 1, None, "[)"), ("crop_size", 8, None, "[)")]


def check_run(args, world):
    """The checks of the run's own arguments (after --resume) that need the number of processes."""
    D.check_rho(args.rho)
    if args.batch_size % world or args.batch_size // world < 2:
        R.fail(f"--batch-size {args.batch_size} must split into at least 2 images on each of {world} processes")
    if args.stage1 and args.opt != "rwsam":
        R.fail("--stage1 is the first stage of rwSAM; pass --opt rwsam or drop --stage1")
    if args.stage1 and args.stage1_epochs is not None:
        R.fail("--stage1 replaces stage 1, so --stage1-epochs has nothing to do; drop one of them")
    large = args.dataset in LARGE
    if large and args.knn_every >= 0:
        R.fail(f"the kNN monitor and the generalization gap need in-memory data; for {args.dataset} pass "
               f"--knn-every -1 (its default) and probe the checkpoint with eval_linear.py")
    if large == (args.arch == "resnet18"):
        R.fail(f"--arch {args.arch} is for {'CIFAR-size data' if large else 'file lists'}; use "
               + ("resnet50 or resnet10 with --dataset " + args.dataset if large else "resnet18 (the CIFAR ResNet-18)"))
    if args.train_list and not large:
        R.fail("--train-list is for --dataset imagenet_lt or inat; drop it")


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


def simsiam_heads(dim=2048, pred_dim=512, width=512):
    """SimSiam's heads (Chen & He 2021, CIFAR variant; REFERENCE §6): projector width → dim (BN, ReLU)
    → dim (BN without affine), predictor dim → pred_dim (BN, ReLU) → dim. Returns (projector, predictor)."""
    projector = nn.Sequential(nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                              nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False))
    predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                              nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))
    return projector, predictor


class SimSiam(ResNet18):
    """Chen & He 2021 on the CIFAR ResNet-18 (REFERENCE §6), no classifier: the backbone's tensors keep their
    top-level names (what every script of the project loads), the heads live under projector. and predictor."""

    def __init__(self, dim=2048, pred_dim=512):
        super().__init__()
        self.fc = nn.Identity()
        self.projector, self.predictor = simsiam_heads(dim, pred_dim)

    def forward(self, x1, x2):
        z1, z2 = self.projector(self.features(x1)), self.projector(self.features(x2))
        return z1, z2, self.predictor(z1), self.predictor(z2)


class ResNetBackbone(torchvision.models.resnet.ResNet):
    """torchvision ResNet-50 (ResNet-10: one basic block per stage) without its classifier, under torchvision's
    tensor names (moco_ssp.py's, ldam_drw.py's, eval_linear.py's for file lists); zero_init_residual as Chen & He."""

    def __init__(self, arch):
        block, layers = ((torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]) if arch == "resnet10" else
                         (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]))
        super().__init__(block, layers, zero_init_residual=True)
        self.width = self.fc.in_features
        self.fc = nn.Identity()

    features = torchvision.models.resnet.ResNet.forward          # the pooled 2048-d (ResNet-10: 512-d) feature


class SimSiamResNet(ResNetBackbone):
    """Chen & He 2021's ImageNet SimSiam (their §4 and builder): a projector of three layers; names as SimSiam's."""

    def __init__(self, arch, dim=2048, pred_dim=512):
        super().__init__(arch)
        w = self.width
        self.projector = nn.Sequential(nn.Linear(w, w, bias=False), nn.BatchNorm1d(w), nn.ReLU(inplace=True),
                                       nn.Linear(w, w, bias=False), nn.BatchNorm1d(w), nn.ReLU(inplace=True),
                                       nn.Linear(w, dim, bias=False), nn.BatchNorm1d(dim, affine=False))
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                                       nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))

    forward = SimSiam.forward


def build_simsiam(arch):
    return SimSiam() if arch == "resnet18" else SimSiamResNet(arch)


def init_state(seed, arch="resnet18"):
    torch.manual_seed(seed)
    return build_simsiam(arch).state_dict()


def build_model(args, ckpt, n, device, rank, world):
    """The stages' epochs, SimSiam and SGD as --resume's checkpoint left them, in DDP under torchrun
    (SyncBatchNorm on GPUs). Returns (run: what an epoch changes, first epoch)."""
    if n < args.batch_size:
        R.fail(f"the training subset has {n} images, fewer than one batch of {args.batch_size}; lower --batch-size")
    e1 = run_epochs(args, args.stage1_epochs or args.epochs) if args.opt == "rwsam" and not args.stage1 else 0
    e2 = run_epochs(args, args.epochs)
    torch.manual_seed(args.seed)
    model = build_simsiam(args.arch).to(device)
    optimizer = make_optimizer(model, args, device)
    start, best = R.restore(ckpt, model, optimizer)
    kde, summary = (ckpt.get("kde_weights"), ckpt.get("summary", {})) if ckpt is not None else (None, {})
    net = nn.SyncBatchNorm.convert_sync_batchnorm(model) if world > 1 and device.type == "cuda" else model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    run = argparse.Namespace(model=model, net=net, optimizer=optimizer, kde=kde,
                             weights=kde["weights"].to(device) if kde is not None else None, best=best,
                             summary=summary, e1=e1, e2=e2, device=device, rank=rank, world=world)
    return run, start


# ----- the method (SimSiam Eq. (1)–(2), paper 2 Eq. (2)–(3) and Algorithm 1) ----------------------

def simsiam_loss(z1, z2, p1, p2):
    """Per-example ℓ_i = ½·D(p1, sg z2) + ½·D(p2, sg z1), D = negative cosine (Chen & He Eq. (1)–(2))."""
    def d(p, z):
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1)
    return 0.5 * d(p1, z2) + 0.5 * d(p2, z1)


def forward_loss(model, x1, x2, amp):
    """Per-example losses and the collapse meter (std over the batch of normalised z1, channel mean)."""
    with torch.autocast(x1.device.type, torch.bfloat16, enabled=amp):
        z1, z2, p1, p2 = model(x1, x2)
    z_std = F.normalize(z1.detach().float(), dim=1).std(0).mean()
    return simsiam_loss(z1, z2, p1, p2), z_std


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


def train_step(model, optimizer, x1, x2, opt, rho=0.0, adaptive=False, weights=None, amp=False):
    """One update; returns (mean loss at w, mean loss of the second pass, z_std) as device tensors. sgd: w ←
    step(∇L(w)). sam / rwsam (paper 2 Eq. (3), Algorithm 1 lines 12–13): ε from ∇L_w(w) with L_w = mean(w_i·ℓ_i)
    (w ≡ 1 for sam), then the optimiser steps at w with ∇L(w + ε) of the plain mean loss. The first pass runs
    without DDP's gradient all-reduce; BN buffers keep the first pass's update."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer.zero_grad(set_to_none=True)
    if opt == "sgd":
        loss, z_std = forward_loss(model, x1, x2, amp)
        loss.mean().backward()
        optimizer.step()
        return loss.detach().mean(), loss.detach().mean(), z_std
    with model.no_sync() if model is not net else contextlib.nullcontext():
        loss, z_std = forward_loss(model, x1, x2, amp)
        (loss if weights is None else weights * loss).mean().backward()
    live = [p for p in net.parameters() if p.grad is not None]
    with torch.no_grad():
        e = sam_perturbation(live, [p.grad for p in live], rho, adaptive)
        at_w = [p.detach().clone() for p in live]
        buffers = bn_buffers(net)
        first_pass_stats = [b.clone() for b in buffers]
        torch._foreach_add_(live, e)                                # w + ε
    optimizer.zero_grad(set_to_none=True)
    loss2, _ = forward_loss(model, x1, x2, amp)
    loss2.mean().backward()                                         # ∇L(w + ε), all-reduced under DDP
    with torch.no_grad():
        torch._foreach_copy_(live, at_w)
        torch._foreach_copy_(buffers, first_pass_stats)
    optimizer.step()
    return loss.detach().mean(), loss2.detach().mean(), z_std


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


@torch.no_grad()
def embed(model, loader, amp=False):
    """L2-normalised backbone features (the loss and kNN see directions only; the norm follows image contrast) and
    labels of a GPULoader's images, in order (eval mode)."""
    model.eval()
    feats, labels = [], []
    for x, y, _ in loader.epoch(0):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            f = model.features(x)
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def weights_from_training_set(model, loader, alpha, bandwidth, seed, amp=False):
    """Algorithm 1 line 8 on the training subset; the loader's labels are not read."""
    return kde_weights(embed(model, loader, amp)[0], alpha, bandwidth, seed)


def lr_at(epoch, epochs, base):
    """Cosine per epoch (0-based) over one stage."""
    return 0.5 * base * (1 + math.cos(math.pi * epoch / epochs))


def run_epochs(args, epochs):
    """App. A.1's size sweep: round(epochs / r) epochs with --subsample r < 1 (the full variant's steps)."""
    return epochs if args.subsample >= 1 or args.same_epochs else round(epochs / args.subsample)


def make_optimizer(model, args, device):
    """SGD; with --fix-pred-lr the predictor is a group of its own whose lr stays at --lr (Chen & He)."""
    hyper = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.wd, fused=device.type == "cuda")
    if not args.fix_pred_lr:
        return torch.optim.SGD(model.parameters(), **hyper)
    pred = [p for n, p in model.named_parameters() if n.startswith("predictor.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("predictor.")]
    return torch.optim.SGD([{"params": rest, "fix_lr": False}, {"params": pred, "fix_lr": True}], **hyper)


# ----- data ---------------------------------------------------------------------------------------

def ssl_batches(images, batch_size, mean, std, epoch, seed, rank=0, world=1, chunk=8192, flip=True):
    """This process's part of every full global batch of one epoch: ([view1, view2], positions). All ranks draw
    the same (seed, epoch) permutation and take their slice of each global batch, so the union over ranks is the
    one-process batch; rank 0 augments with that generator (alone: datasets_lt.GPULoader(augment="ssl",
    drop_last=True) exactly), every other rank re-seeds it with its own seed."""
    n, dev = images.shape[0], images.device
    g = torch.Generator(device=dev).manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g, device=dev)
    steps, local = n // batch_size, batch_size // world
    mine = order[:steps * batch_size].view(steps, world, local)[:, rank].reshape(-1)
    if rank:
        g.manual_seed((seed * 100_003 + epoch) * 1009 + rank)
    step = max(1, chunk // local) * local
    for start in range(0, len(mine), step):
        idx = mine[start:start + step]
        x = images[idx]
        views = [D.normalize(D.ssl_augment(x, g, images.shape[-1], flip=flip), mean, std) for _ in range(2)]
        for b in range(0, len(idx), local):
            yield [v[b:b + local] for v in views], idx[b:b + local]


def build_list_data(args, device, rank, world):
    """ImageNet-LT / iNat: the list is the variant (python datasets_lt.py --train-list writes paper 2's);
    --val-frac carves a validation split from it. Two views per image in DataLoader workers; no kNN sets."""
    if not args.train_list:
        R.fail(f"--dataset {args.dataset} needs --train-list ('relative/path label' file)")
    if args.balanced:
        R.fail(f"--balanced draws a CIFAR-size subset; for {args.dataset} pass the balanced list as --train-list "
               f"(python datasets_lt.py --train-list ... writes paper 2's ImageNet variants)")
    ds = D.FileListDataset(args.data_root, args.train_list, train=True, transform=D.TwoViews(args.crop_size))
    idx, val_idx = D.carve_val(np.arange(len(ds)), ds.labels, args.val_frac, args.data_seed)
    data = argparse.Namespace(C=ds.num_classes, idx=idx, val_idx=val_idx, mean=D.IMAGENET_MEAN, std=D.IMAGENET_STD,
                              counts=np.bincount(ds.labels[idx], minlength=ds.num_classes).tolist(),
                              labels=ds.labels[idx], images=None)
    data.train = D.ListViews(ds, idx, args.batch_size // world, args.seed, args.workers, device, rank, world)
    data.train_eval = argparse.Namespace(epoch=lambda _: D.list_plain_batches(args, idx, device))  # for embed()
    return data


def build_data(args, device, rank, world):
    """Everything the run reads: training images (device, uint8), eval loaders, monitor sets."""
    if args.dataset in LARGE:
        return build_list_data(args, device, rank, world)
    train_x, train_y, names = D.load_split(args.dataset, args.data_root, True, args.download)
    test_x, test_y, _ = D.load_split(args.dataset, args.data_root, False, args.download)
    C = len(names)
    idx, val_idx = D.training_subset(train_y, args)
    mean, std = D.mean_std(args.dataset, train_x)
    full = D.to_device(train_x, device)
    pick = lambda i: full[torch.as_tensor(i, device=device)]
    data = argparse.Namespace(C=C, idx=idx, val_idx=val_idx, mean=mean, std=std, images=pick(idx),
                              counts=np.bincount(train_y[idx], minlength=C).tolist(), labels=train_y[idx])
    data.train_eval = D.GPULoader(data.images, train_y[idx], 1024, mean, std, device)
    order = D.CLASS_ORDER.get(args.dataset, list(range(C)))
    data.frequent, data.rare = order[:C // 2], order[C // 2:]
    if rank == 0:
        if len(val_idx):                                   # --val-frac: score on the held-out split only
            queries = np.asarray(val_idx)
            mem = np.setdiff1d(np.arange(len(train_y)), queries)
        else:
            mem, queries = D.carve_val(np.arange(len(train_y)), train_y, args.knn_val_frac, args.data_seed)
        data.knn_mem = D.GPULoader(pick(mem), train_y[mem], 1024, mean, std, device)
        data.knn_query = D.GPULoader(pick(queries), train_y[queries], 1024, mean, std, device)
        views = dict(augment="ssl", shuffle=False, seed=args.seed, flip=not args.no_flip)   # gap_over_views' pairs
        data.gap_train = D.GPULoader(data.images, train_y[idx], 1024, mean, std, device, **views)
        data.gap_heldout = D.GPULoader(test_x, test_y, 1024, mean, std, device, **views)
    return data


# ----- one epoch, the stages (paper 2 Algorithm 1) ------------------------------------------------

def phase(args, run, epoch):
    """(optimiser rule, epoch within the stage, epochs of the stage) of 0-based global epoch `epoch`."""
    return ("sgd", epoch, run.e1) if epoch < run.e1 else (args.opt, epoch - run.e1, run.e2)


def train_one_epoch(run, data, epoch, args):
    """One epoch of the stage's rule (phase) with train_step. Returns (row: means over all processes; the first
    step whose loss was not finite, -1 if none; steps)."""
    opt, e, epochs = phase(args, run, epoch)
    lr = lr_at(e, epochs, args.lr)
    for group in run.optimizer.param_groups:
        group["lr"] = args.lr if group.get("fix_lr") else lr
    run.model.train()
    device, rank, world = run.device, run.rank, run.world
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    steps = 0
    batches = (ssl_batches(data.images, args.batch_size, data.mean, data.std, epoch, args.seed, rank, world,
                           flip=not args.no_flip)
               if data.images is not None else ((views, pos) for views, _, pos in data.train.epoch(epoch)))
    progress = R.Progress(len(data.images) // args.batch_size if data.images is not None else len(data.train),
                          args.print_freq)
    for step, ((x1, x2), pos) in enumerate(batches):
        steps += 1
        w = run.weights[pos.to(device)] if opt == "rwsam" else None
        loss, loss2, z_std = train_step(run.model, run.optimizer, x1, x2, opt, args.sam_rho, args.adaptive, w, args.amp)
        first_bad = torch.where((first_bad < 0) & ~(torch.isfinite(loss) & torch.isfinite(loss2)), step, first_bad)
        sums += torch.stack([loss, loss2, z_std]).double()
        progress(step, steps * args.batch_size, lambda: sums[0].item() / steps)   # rank 0's share
    if world > 1:
        dist.all_reduce(sums)
        sums /= world
    loss_avg, loss2_avg, z_avg = (sums / steps).tolist()
    return {"epoch": epoch + 1, "opt": opt, "stage_epoch": e + 1, "lr": lr, "loss": loss_avg,
            "loss_perturbed": loss2_avg if opt != "sgd" else None, "z_std": z_avg}, first_bad, steps


def monitor(args, run, data, epoch):
    """Rank 0: knn_top1 of the backbone features every --knn-every epochs and at each stage's end (-1: off); the
    best stage-2 epoch goes to run.best. Returns (top-1, class mean), None when off."""
    _, e, epochs = phase(args, run, epoch)
    if not (args.knn_every >= 0 and (e + 1 == epochs or (args.knn_every and (e + 1) % args.knn_every == 0))):
        return None, None
    knn_now, knn_cm = knn_top1(*embed(run.net, data.knn_mem, args.amp), *embed(run.net, data.knn_query, args.amp),
                               data.C, args.knn_k, args.knn_t, class_mean=True)
    if epoch >= run.e1 and (run.best is None or knn_now > run.best["knn_top1"]):
        run.best = {"epoch": epoch + 1, "knn_top1": knn_now}
    return knn_now, knn_cm


@torch.no_grad()
def knn_top1(mem_f, mem_y, q_f, q_y, num_classes, k=200, t=0.1, chunk=1024, class_mean=False):
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar memory features vote for their class with
    weight exp(sim/t); top-1 % over the queries (class_mean: and the mean over classes of per-class %)."""
    k = min(k, len(mem_f))
    hits = torch.zeros(num_classes, dtype=torch.long)
    for s in range(0, len(q_f), chunk):
        sim, i = (q_f[s:s + chunk] @ mem_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device, dtype=sim.dtype)
        votes.scatter_add_(1, mem_y[i], (sim / t).exp())
        y = q_y[s:s + chunk]
        hits += torch.bincount(y[votes.argmax(1) == y], minlength=num_classes).cpu()
    top1 = 100.0 * hits.sum().item() / len(q_f)
    if not class_mean:
        return top1
    seen = torch.bincount(q_y, minlength=num_classes).cpu()
    return top1, float(100.0 * (hits[seen > 0].double() / seen[seen > 0]).mean())


@torch.no_grad()
def class_mean_loss(model, loader, num_classes, amp=False, draw=0):
    """Mean per-example SimSiam loss per class, eval mode, the loader's seeded views of draw `draw` (one
    pair of views per image; NaN: no image)."""
    model.eval()
    total, count = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    for (x1, x2), y, _ in loader.epoch(draw):
        loss, _ = forward_loss(model, x1, x2, amp)
        total += torch.bincount(y, weights=loss.double(), minlength=num_classes).cpu()
        count += torch.bincount(y, minlength=num_classes).cpu().double()
    return (total / count).tolist()


def gap_over_views(model, train_loader, heldout_loader, num_classes, frequent, rare, views, amp=False):
    """Table 1(a)'s gap averaged over `views` seeded draws of view pairs (draw v = epoch v of the seeded
    loaders), with its standard error over the draws, std(ddof=1)/√views: one pair of views of the 250
    rare training images of step CIFAR-10-LT leaves an error of the order of the gaps' differences."""
    draws = [generalization_gap(class_mean_loss(model, train_loader, num_classes, amp, v),
                                class_mean_loss(model, heldout_loader, num_classes, amp, v), frequent, rare)
             for v in range(views)]
    out = {}
    for name in ("frequent", "rare"):
        gaps = np.array([d[name]["gap"] for d in draws])
        out[name] = {"gap": float(gaps.mean()), "se": float(gaps.std(ddof=1) / math.sqrt(views)) if views > 1 else None,
                     "train_loss": float(np.mean([d[name]["train_loss"] for d in draws])),
                     "heldout_loss": float(np.mean([d[name]["heldout_loss"] for d in draws])),
                     "views": views, "per_view": gaps.tolist()}
    return out


def generalization_gap(train_loss, heldout_loss, frequent, rare):
    """Paper 2 Table 1(a): held-out minus training pre-training loss, class means averaged per group."""
    out = {}
    for name, classes in (("frequent", frequent), ("rare", rare)):
        tr = float(np.nanmean([train_loss[c] for c in classes]))
        ho = float(np.nanmean([heldout_loss[c] for c in classes]))
        out[name] = {"gap": ho - tr, "train_loss": tr, "heldout_loss": ho}
    return out


def stage_end(args, run, data, name, knn_now, knn_cm=None):
    """kNN and generalization gap of the model as it stands (rank 0), stored under run.summary[name]; returns the
    printed line."""
    gap = gap_over_views(run.net, data.gap_train, data.gap_heldout, data.C, data.frequent, data.rare,
                         args.gap_views, args.amp)
    run.summary[name] = {"knn_top1": knn_now, "knn_class_mean": knn_cm, "gap": gap}
    se = lambda g: f" ± {g['se']:.4f}" if g["se"] is not None else ""
    return (f"{name}: kNN {R.fmt(knn_now)}%, generalization gap frequent {gap['frequent']['gap']:.4f}"
            f"{se(gap['frequent'])}, rare {gap['rare']['gap']:.4f}{se(gap['rare'])} (± standard error over "
            f"{args.gap_views} seeded view draws)")


def stage1(args, ckpt, rank):
    """Algorithm 1 lines 3–7: without --stage1, the epoch loop's first epochs (phase); with --stage1 PATH, its backbone
    gives stage1_weights the features, and its heads stage 2 if it continues from it: (backbone, full state or None)."""
    if not args.stage1 or (ckpt is not None and ckpt.get("kde_weights") is not None):
        return None, None
    with open(os.devnull, "w") as sink, (contextlib.redirect_stdout(sink) if rank else contextlib.nullcontext()):
        backbone = ResNet18() if args.arch == "resnet18" else ResNetBackbone(args.arch)
        arch = R.load_checkpoint(args.stage1)["arch"]
        if arch != args.arch:
            R.fail(f"'{args.stage1}' holds a {arch} backbone; --stage1 needs a {args.arch} checkpoint, "
                   f"e.g. the stage1.pt or last.pt of a simsiam_rwsam.py run")
        saved = R.load_backbone(backbone, args.arch, args.stage1)
    if args.stage2_init == "scratch":
        return backbone, None
    state = {k.removeprefix("module."): v for k, v in saved["model"].items()}
    want = build_simsiam(args.arch).state_dict()
    bad = [k for k in want if k not in state or state[k].shape != want[k].shape]
    if bad:
        R.fail(f"'{args.stage1}' lacks the SimSiam heads ({bad[0]}, …) that stage 2 continues from; "
               f"pass --stage2-init scratch to use only its backbone for the weights")
    return backbone, {k: state[k] for k in want}


def stage1_weights(args, data, net, stage1_backbone, device, rank, world):
    """Algorithm 1 line 8 on rank 0, broadcast: KDE weights (weights_from_training_set → kde_weights) of the
    stage-1 features, from this run's stage-1 model `net` or --stage1's backbone."""
    source = "stage 1 of this run" if stage1_backbone is None else args.stage1
    weights, kde = torch.empty(len(data.idx), device=device), None
    if rank == 0:
        try:
            w, density, h = weights_from_training_set(net if stage1_backbone is None else stage1_backbone.to(device),
                                                      data.train_eval, args.alpha, args.bandwidth, args.seed, args.amp)
        except ValueError as e:                            # too few images or a collapsed representation
            R.fail(str(e))
        weights.copy_(w)
        labels, w_np = np.asarray(data.labels), w.cpu().numpy()
        per_class = [float(w_np[labels == c].mean()) if (labels == c).any() else None for c in range(data.C)]
        kde = {"weights": w.cpu(), "density": density.cpu(), "indices": torch.as_tensor(data.idx),
               "bandwidth": h, "alpha": args.alpha, "source": source, "per_class_mean_weight": per_class}
        print(f"KDE weights from {source}: h = {h:.4f}, α = {args.alpha:g}, weights {w.min().item():.3f}–"
              f"{w.max().item():.3f} (mean 1); mean weight per class (labels read only for this line): "
              + " ".join(f"{v:.2f}" if v is not None else "-" for v in per_class))
    if world > 1:
        dist.broadcast(weights, 0)
    return kde if kde is not None else {"weights": weights.cpu()}


def stage2(args, run, kde, stage1_full):
    """Algorithm 1 line 9: stage 2 starts from a fresh model with the seed of stage 1 (--stage2-init scratch) or from
    the stage-1 model (--stage1's with its heads, or this run's as it stands), a fresh optimizer, line 8's weights."""
    if args.stage2_init == "scratch":
        run.net.load_state_dict(init_state(args.seed, args.arch))
    elif stage1_full is not None:
        run.net.load_state_dict(stage1_full)
    run.kde, run.weights = kde, kde["weights"].to(run.device)
    if run.rank == 0:
        R.save_atomic(kde, os.path.join(args.out, "kde_weights.pt"))
    run.optimizer = make_optimizer(run.net, args, run.device)


# ----- main ---------------------------------------------------------------------------------------

def resume_run(args, world):
    """--resume: the saved run's arguments, then check_run; no new run over a run."""
    old_defaults = {"same_epochs": True, "gap_views": 1, "arch": "resnet18", "train_list": None, "workers": 8,
                    "crop_size": 224, "fix_pred_lr": False}              # what runs saved before these flags did
    args, ckpt = R.resume_run(args, "simsiam_rwsam.py", RESUME_FLAGS, old_defaults,
                              "; use --stage1 to start rwSAM from its backbone")
    check_run(args, world)
    R.refuse_occupied(args.out, args.resume)
    return args, ckpt


def open_run(args, ckpt, run, data, start):
    """The run folder (rank 0) with the training indices; then the lines printed above the epoch table. A resumed
    run writes again the stage1.pt / kde_weights.pt an interrupted write may have lost."""
    if R.open_run(args, ckpt, run.device, __file__, start, extra={"world_size": run.world}, rank=run.rank):
        D.save_indices(os.path.join(args.out, "train_indices.json"), data.idx, data.val_idx)
    if run.rank != 0:
        return
    n, e1, e2 = len(data.idx), run.e1, run.e2
    init = "from a fresh model" if args.stage2_init == "scratch" else "continuing stage 1"
    plan = (f"stage 1 SimSiam {e1} epochs, then rwSAM {e2} {init}" if e1 else
            f"rwSAM {e2} epochs {init}, weights from --stage1 {args.stage1}" if args.opt == "rwsam" else
            f"{'SimSiam' if args.opt == 'sgd' else 'SimSiam + SAM'} {e2} epochs")
    if args.subsample < 1:
        print(f"--subsample {args.subsample:g}: " + (
            f"--same-epochs, {args.epochs} epochs as the full variant (fewer optimizer steps)" if args.same_epochs
            else f"{e2} = round({args.epochs} / {args.subsample:g}) epochs, the optimizer steps of the full "
                 f"variant's {args.epochs} (paper 2 App. A.1; --same-epochs turns this off)"))
    counts = data.counts if data.images is not None else f"{data.counts[:3]}…{data.counts[-1]}"
    print(f"{args.dataset} rho={args.rho:g} ({args.imb_type}{', balanced' if args.balanced else ''}"
          f"{f', subsample {args.subsample:g}' if args.subsample < 1 else ''}): {n} training images "
          f"{counts}; {plan}; {args.arch}, batch {args.batch_size} on {run.world} × {run.device}, lr {args.lr:g}"
          + (" (predictor: fixed)" if args.fix_pred_lr else "")
          + (f", SAM ρ={args.sam_rho:g}{' adaptive' if args.adaptive else ''}" if args.opt != "sgd" else ""))
    print(f"{'epoch':>5} {'opt':>5} {'lr':>8} {'loss':>8} {'z_std':>7} {'knn':>6} {'s':>6}")
    stage1_pt, kde_pt = os.path.join(args.out, "stage1.pt"), os.path.join(args.out, "kde_weights.pt")
    if ckpt is not None and e1 and start == e1 and run.kde is None and not os.path.exists(stage1_pt):
        R.save_atomic(run_state(args, run, data, e1, stage1=True), stage1_pt)
    if ckpt is not None and run.kde is not None and "density" in run.kde and not os.path.exists(kde_pt):
        R.save_atomic(run.kde, kde_pt)


def end_epoch(args, run, data, epoch, row, t0):
    """Rank 0: the kNN monitor, then the metrics row, the printed line (with the stage's kNN and generalization gap
    at its end: stage_end), stage1.pt after stage 1 and last.pt."""
    if run.rank != 0:
        return
    opt, e, epochs = phase(args, run, epoch)
    seconds, t_knn = time.time() - t0, time.time()
    knn_now, knn_cm = monitor(args, run, data, epoch)
    row.update({"knn_top1": knn_now, "knn_class_mean": knn_cm, "seconds": seconds, "knn_seconds": time.time() - t_knn})
    line = (f"{epoch + 1:5d} {opt:>5} {row['lr']:8.5f} {row['loss']:8.4f} {row['z_std']:7.4f} {R.fmt(knn_now)} "
            f"{seconds:6.2f}")
    if e + 1 == epochs and args.knn_every >= 0:
        line += "\n" + stage_end(args, run, data, "stage1" if epoch < run.e1 else "final", knn_now, knn_cm)
    if epoch + 1 == run.e1:                                # before last.pt: a kill between the two redoes the epoch
        R.save_atomic(run_state(args, run, data, epoch + 1, stage1=True), os.path.join(args.out, "stage1.pt"))
    R.end_epoch(args.out, row, line, run_state(args, run, data, epoch + 1))


def run_state(args, run, data, epoch, stage1=False):
    """last.pt; stage1=True: stage1.pt, whose args are stage 1's recipe (SimSiam, its epochs)."""
    recipe = dict(opt="sgd", epochs=args.stage1_epochs or args.epochs, stage1_epochs=None, stage1_of=args.out)
    return {"script": "simsiam_rwsam.py", "arch": args.arch, "model": run.net.state_dict(), "epoch": epoch,
            "optimizer": run.optimizer.state_dict(), "args": {**vars(args), **(recipe if stage1 else {})},
            "class_counts": data.counts, "rng": {"torch": torch.get_rng_state()}, "kde_weights": run.kde,
            "best": run.best, "summary": run.summary, "mean": data.mean, "std": data.std}


def finish_run(args, run, data, t_run):
    """Rank 0: final.json (the stages' kNN and generalization gaps, the run's recipe) and the last printed line."""
    if run.rank != 0:
        return
    rows = R.read_metrics(os.path.join(args.out, "metrics.jsonl"))
    per_epoch = {o: float(np.median([r["seconds"] for r in rows if r["opt"] == o]))
                 for o in sorted({r["opt"] for r in rows})}
    R.finish_run(args.out, {
        "script": "simsiam_rwsam.py", "arch": args.arch, "dataset": args.dataset, "rho": args.rho,
        "imb_type": args.imb_type, "balanced": args.balanced, "subsample": args.subsample, "opt": args.opt,
        "sam_rho": args.sam_rho, "adaptive": args.adaptive, "alpha": args.alpha, "seed": args.seed,
        "data_seed": args.data_seed, "epochs": args.epochs, "epochs_trained": run.e2, "same_epochs": args.same_epochs,
        "stage1_epochs": run.e1, "stage1": args.stage1, "stage2_init": args.stage2_init, "world_size": run.world,
        "n_train": len(data.idx), "class_counts": data.counts, "last": run.summary.get("final"),
        "stage1_result": run.summary.get("stage1"), "best_knn_on_val": run.best,
        "knn_queries": "--val-frac split (left out of pre-training)" if len(data.val_idx) else
                       "--knn-val-frac of the full training split",
        "kde": run.kde and {k: run.kde[k] for k in ("bandwidth", "alpha", "source", "per_class_mean_weight")},
        "checkpoint": os.path.join(args.out, "last.pt"), "seconds_per_epoch": per_epoch}, t_run, per_epoch=False)
    knn = (run.summary.get("final") or {}).get("knn_top1")
    print(f"done: {args.out}/last.pt" + (f"; kNN (validation split) {knn:.2f}%" if knn is not None else "")
          + (f"; stage 1 (SimSiam) in {args.out}/stage1.pt" if run.e1 else ""))


def main(argv=None):
    rank, world = R.process_group()
    try:
        args, ckpt = resume_run(parse_args(argv), world)
        stage1_backbone, stage1_full = stage1(args, ckpt, rank)
        device = R.setup_device(args, world)
        if world > 1:
            R.init_process_group(device)
        data = build_data(args, device, rank, world)
    except D.DataError as e:
        R.fail(str(e))
    run, start = build_model(args, ckpt, len(data.idx), device, rank, world)
    open_run(args, ckpt, run, data, start)
    t_run = time.time()
    for epoch in range(start, run.e1 + run.e2):
        if phase(args, run, epoch)[0] == "rwsam" and run.kde is None:    # Algorithm 1 line 8, then stage 2
            kde = stage1_weights(args, data, run.net, stage1_backbone, device, rank, world)
            stage2(args, run, kde, stage1_full)
        t0 = time.time()
        row, first_bad, steps = train_one_epoch(run, data, epoch, args)
        R.stop_if_diverged(args.out, [run.net], epoch, first_bad, steps, rank, world)
        end_epoch(args, run, data, epoch, row, t0)
    finish_run(args, run, data, t_run)
    del run                     # DDP's reducer must not hold the last reference to a gloo group: freed there (GIL
    gc.collect()                # held), it can deadlock against a worker thread still releasing the barrier's tensors
    R.leave_process_group(world)


if __name__ == "__main__":
    main()
