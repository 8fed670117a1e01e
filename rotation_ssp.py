"""Rotation self-supervised pre-training (SSP) on the long-tailed training images, labels unused.

Paper 1 (Yang & Xu 2020), §4.2 "Self-Supervised Imbalanced Learning" and the "+ SSP" rows of Table 2:
abandon the labels, pre-train the classifier's network by predicting which of four rotations (0°, 90°,
180°, 270°; Gidaris et al. 2018 → rotation_labels, rotate) was applied to each image of the same
long-tailed training set, then train any long-tail method from that initialisation. This script is the
first stage; ldam_drw.py --pretrained is the second (same --dataset, --rho, --imb-type, --seed and
--val-frac; the last line of a run prints that command). Recipe: REFERENCE §4 (pretext) and §2.
README "Rotation self-supervised pre-training" has the rotation-label argument and the reasons below.

    python rotation_ssp.py --rho 0.01 --gpu 0                     # → runs/rotation_ssp-cifar10-0.01-0/last.pt
    python ldam_drw.py --rho 0.01 --pretrained runs/rotation_ssp-cifar10-0.01-0/last.pt           # LDAM-DRW + SSP
    python rotation_ssp.py --rho 0.01 --epochs 2 --gpu -1                                # CPU smoke run

Recipe: ResNet-32 with a 4-way linear head `fc`; SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128, 200
epochs, 5 warm-up epochs, lr ×0.01 at 80% and 90%; crop 32 (pad 4) + flip, then one rotation per image
(each batch exactly B/4 of each rotation); cross-entropy on the rotation label. The log's "rotation
accuracy (pretext)" scores every test image under all four rotations.
Paper numbers (CIFAR-10-LT ρ=100, top-1 test error %, lossless data, after fine-tuning from this
checkpoint): LDAM-DRW 22.97 → 22.17, CE-DRW 24.94 → 23.04, CB-CE 27.63 → 23.47. No pretext accuracy.

Deliberate differences from the paper and the authors' code (pretrain_rot.py, utils.rotation):
1. ResNet-32 with the pretext head `fc` (the authors' default ResNet-50 fails on 32×32 images).
2. ldam_drw.py --pretrained fails unless every backbone tensor loads (the authors' loaded nothing).
3. Exactly balanced rotation batches, seeded by (seed, epoch) (the authors': nearly balanced).
4. Both lr decays scale with --epochs (the authors' first upload never reached its ×0.0001 branch).
5. Every test image under all four rotations, per rotation and class; the last epoch is kept.
6. Data, crop/flip and rotation on the GPU (torch.rot90 on the normalised batch, as the authors).
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
import torch.nn as nn
import torch.nn.functional as F

import datasets_lt as D

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
    p.error = fail                                         # one line and exit 2, not the usage text
    args = p.parse_args(argv)
    args.cli_flags = given_flags(p, argv)
    if args.dataset in ("imagenet_lt", "inat"):
        fail(f"rotation_ssp.py pre-trains on CIFAR-size images; paper 1 pre-trains {args.dataset} with MoCo "
             f"(moco_ssp.py)")
    for name, default in (("epochs", 200), ("lr", 0.1), ("wd", 2e-4)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.schedule = "step"                                 # REFERENCE §2: the CIFAR schedule of ldam_drw.py
    if args.out is None:
        args.out = os.path.join("runs", f"rotation_ssp-{args.dataset}-{args.rho:g}-{args.seed}")
    check_args(args)
    return args


def check_args(args):
    """Range of every numeric flag, before anything is read or written."""
    check_ranges(args, SHARED_RANGES + [("warmup", 0, None, "[)")])
    if "warmup" in args.cli_flags and 0 < args.warmup >= args.epochs:
        fail(f"--warmup {args.warmup} must be shorter than --epochs {args.epochs}")


# --resume continues a run with its own arguments; only these (where the run executes) may be given with it
RESUME_FLAGS = ("gpu", "data_root", "download")


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def fmt(v):
    return f"{v:6.2f}" if v is not None else f"{'-':>6}"


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


# ----- the method (paper 1 §4.2: rotation pretext task; Gidaris et al. 2018) -----------------------

def rotation_labels(n, generator, device):
    """Rotation class (k: k·90°) of each of n images: a random permutation of the pattern 0, 1, 2, 3, 0, …
    started at a random phase. Exactly n/4 of each class when 4 divides n; every position is uniform
    over the four classes for any n (the random phase decides which classes get the extra images)."""
    phase = torch.randint(4, (1,), generator=generator, device=device)
    return (torch.randperm(n, generator=generator, device=device) + phase) % 4


def rotate(x, k):
    """Turn image i of the N×C×H×W batch `x` by k[i]·90° counter-clockwise (torch.rot90 over H, W, the
    direction of the authors' code and of torchvision's rotate). H must equal W."""
    out = x
    for r in range(1, 4):
        out = torch.where((k == r).view(-1, 1, 1, 1), torch.rot90(x, r, (2, 3)), out)
    return out.contiguous()                                # rot90's transposed strides slow the convolutions


def rotation_seed(seed, epoch):
    """Seed of the rotation generator of one epoch, independent of the loader's (seed, epoch) stream."""
    return int(np.random.SeedSequence([seed, epoch, 90]).generate_state(1)[0])


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
    """The training subset of ldam_drw.py (the same calls, so the same seed selects the same images), with
    its labels replaced by zeros: §4.2 abandons them. Returns train / validation / test batches, the
    training class counts (recorded in the checkpoint) and the number of classes."""
    train_x, train_y, names = D.load_split(args.dataset, args.data_root, True, args.download)
    test_x, test_y, _ = D.load_split(args.dataset, args.data_root, False, args.download)
    for split, x in (("training", train_x), ("test", test_x)):
        if x.shape[1] != x.shape[2]:
            raise D.DataError(f"rotation needs square images, but the {split} images are {x.shape[2]}x{x.shape[1]}; "
                              f"crop or resize them to a square first")
    idx = D.make_long_tailed(train_y, args.rho, args.imb_type, args.data_seed, D.N_MAX.get(args.dataset),
                             D.CLASS_ORDER.get(args.dataset))
    idx, val_idx = D.carve_val(idx, train_y, args.val_frac, args.data_seed)
    mean, std = D.mean_std(args.dataset, train_x)
    C = len(names)
    counts = np.bincount(train_y[idx], minlength=C).tolist()
    train = D.GPULoader(train_x[idx], np.zeros(len(idx), dtype=np.int64), args.batch_size, mean, std, device,
                        augment="crop_flip", seed=args.seed)
    test = D.GPULoader(test_x, test_y, 1000, mean, std, device)
    val = D.GPULoader(train_x[val_idx], train_y[val_idx], 1000, mean, std, device) if len(val_idx) else None
    return train, val, test, counts, C


# ----- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, train, epoch, args, device, step_model):
    """SGD over one epoch of the pretext task: (the row's lr / loss / rotation accuracy, the first step with
    a non-finite loss or -1, the last step)."""
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    g = torch.Generator(device=device)
    g.manual_seed(rotation_seed(args.seed, epoch))
    model.train()
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
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
    row = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum.item() / seen, "train_rotation_acc": 100 * hits.item() / seen}
    return row, first_bad, step


@torch.no_grad()
def rotation_accuracy(model, batches, num_classes, train_counts, amp=False):
    """Rotation accuracy (pretext) with every image under all four rotations: overall, per rotation, per
    class and many/medium/few-shot means. Class labels only sort the results."""
    model.eval()
    hits, total = None, None
    for x, y, _ in batches:
        if hits is None:
            hits = torch.zeros(ROTATIONS, num_classes, dtype=torch.long, device=x.device)
            total = torch.zeros(num_classes, dtype=torch.long, device=x.device)
        y = y.to(x.device)
        for r in range(ROTATIONS):
            with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
                pred = model(torch.rot90(x, r, (2, 3)).contiguous()).argmax(1)
            hits[r] += torch.bincount(y[pred == r], minlength=num_classes)
        total += torch.bincount(y, minlength=num_classes)
    hits, total = hits.cpu().double(), total.cpu().double()
    seen = total > 0
    per_class = (hits.sum(0) / (ROTATIONS * total.clamp(min=1))).tolist()
    result = {"top1": 100 * hits.sum().item() / (ROTATIONS * total.sum().item()),
              "per_rotation": [100 * h / total.sum().item() for h in hits.sum(1).tolist()],
              "per_class": [round(100 * a, 2) for a in per_class]}
    for group, mask in D.shot_groups(train_counts).items():
        accs = [per_class[c] for c in range(num_classes) if mask[c] and seen[c]]
        result[group] = 100 * float(np.mean(accs)) if accs else None
    return result


# ----- main ----------------------------------------------------------------------------------------

def setup_device(args):
    if args.gpu >= 0 and not torch.cuda.is_available():
        print("warning: CUDA is not available; running on the CPU", file=sys.stderr)
        args.gpu = -1
    device = torch.device(f"cuda:{args.gpu}" if args.gpu >= 0 else "cpu")
    for flag in ("amp", "compile"):
        if getattr(args, flag) and device.type != "cuda":
            print(f"warning: --{flag} needs CUDA; ignored on the CPU", file=sys.stderr)
            setattr(args, flag, False)
    if device.type == "cuda":
        if args.gpu >= torch.cuda.device_count():
            fail(f"--gpu {args.gpu}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not args.strict_fp32
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return device


def resume_run(args):
    """--resume: the saved run's arguments; without it, an --out that already holds a run is refused."""
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if ckpt.get("script") != "rotation_ssp.py":
            fail(f"'{args.resume}' was written by {ckpt.get('script', 'another program')}, not rotation_ssp.py; "
                 f"start a new pre-training run with another --out")
        ckpt["args"] = {"data_seed": ckpt["args"].get("seed", 0), **ckpt["args"]}
        args = resume_args(args, ckpt, RESUME_FLAGS)
        print(f"resuming {args.out} after epoch {ckpt['epoch']} with the arguments it was started with")
    D.check_rho(args.rho)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        fail("--epochs, --batch-size and --lr must be positive")
    if args.warmup < 0:
        fail("--warmup must be 0 or more epochs")
    if not args.resume and os.path.exists(os.path.join(args.out, "last.pt")):
        fail(f"{args.out} already holds a run: continue it with --resume {args.out}/last.pt, "
             f"or pass another --out")
    return args, ckpt


def init_state(args, ckpt, device):
    """The 4-way rotation classifier (ResNet-32, linear head `fc`), SGD, and the start epoch from the --resume
    checkpoint."""
    model = ResNet32(ROTATIONS).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd,
                                fused=device.type == "cuda")
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["epoch"]
    return model, optimizer, start


def open_run(args, ckpt, device, counts, start):
    """The run folder: args.json, the source, metrics.jsonl cut back to the resumed epoch; then the lines
    printed above the epoch table."""
    os.makedirs(args.out, exist_ok=True)
    if ckpt is None or not os.path.exists(os.path.join(args.out, "args.json")):
        meta = {**vars(args), "torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        write_json(os.path.join(args.out, "args.json"), meta)
        copy_source(__file__, args.out)
    # a resumed run drops the epochs logged after its checkpoint
    metrics = os.path.join(args.out, "metrics.jsonl")
    write_metrics(metrics, [r for r in read_metrics(metrics) if r["epoch"] <= start])
    print(f"{args.dataset} rho={args.rho:g} ({args.imb_type}): {sum(counts)} training images {counts[:3]}…"
          f"{counts[-1]}, labels unused; rotation pretext (4-way), {ARCH}, {args.epochs} epochs on {device}")
    print("train / test / val: rotation accuracy (pretext, %); test: every test image under all 4 rotations, "
          "many / med / few: its class groups")
    print(f"{'epoch':>5} {'lr':>8} {'loss':>8} {'train':>6} {'test':>6} {'many':>6} {'med':>6} {'few':>6} "
          f"{'val':>6} {'s':>6}")


def stop_if_diverged(out, model, epoch, first_bad, step):
    """The divergence guard, before the epoch is evaluated or saved: a non-finite loss in the epoch or a
    non-finite tensor after it stops the run (exit 1)."""
    if first_bad.item() >= 0:
        stop_diverged(f"loss is not finite at epoch {epoch + 1}, step {first_bad.item() + 1}", out, epoch)
    bad_tensor = nonfinite_tensor(model)
    if bad_tensor:
        stop_diverged(f"'{bad_tensor}' is not finite after epoch {epoch + 1}, step {step + 1}", out, epoch)


def end_epoch(args, out, model, optimizer, epoch, row, val_m, t0, saved):
    """The metrics row, the printed line and last.pt."""
    lr, test_m = row["lr"], row["test_rotation_pretext"]
    row.update({"val_rotation_acc": val_m["top1"] if val_m else None, "seconds": time.time() - t0})
    append_metrics(os.path.join(out, "metrics.jsonl"), row)
    print(f"{epoch + 1:5d} {lr:8.5f} {row['loss']:8.4f} {fmt(row['train_rotation_acc'])} {fmt(test_m['top1'])} "
          f"{fmt(test_m['many'])} {fmt(test_m['medium'])} {fmt(test_m['few'])} {fmt(row['val_rotation_acc'])} "
          f"{row['seconds']:6.2f}", flush=True)
    state = {**saved, "model": model.state_dict(), "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
             "args": vars(args), "best": None, "rng": {"torch": torch.get_rng_state()}}
    save_atomic(state, os.path.join(out, "last.pt"))


def finetune_command(args):
    cmd = (f"python ldam_drw.py --dataset {args.dataset} --data-root {args.data_root} --rho {args.rho:g} "
           f"--imb-type {args.imb_type} --seed {args.seed} --data-seed {args.data_seed}")
    if args.val_frac:
        cmd += f" --val-frac {args.val_frac:g}"
    return cmd + f" --pretrained {os.path.join(args.out, 'last.pt')}"


def finish_run(args, counts, test_m, t_run):
    """final.json (the last epoch's pretext accuracy, the fine-tuning command) and the last printed lines."""
    rows = read_metrics(os.path.join(args.out, "metrics.jsonl")) or [{"val_rotation_acc": None, "loss": None,
                                                                      "seconds": float("nan")}]
    final = {"script": "rotation_ssp.py", "arch": ARCH, "dataset": args.dataset, "rho": args.rho,
             "imb_type": args.imb_type, "seed": args.seed, "data_seed": args.data_seed, "epochs": args.epochs, "class_counts": counts,
             "rotation_accuracy_pretext": test_m, "val_rotation_accuracy_pretext": rows[-1]["val_rotation_acc"],
             "final_loss": rows[-1]["loss"], "checkpoint": os.path.join(args.out, "last.pt"),
             "finetune": finetune_command(args), "seconds_per_epoch": float(np.median([r["seconds"] for r in rows])),
             "wall_seconds": time.time() - t_run}
    write_json(os.path.join(args.out, "final.json"), final)
    per_rot = ", ".join(f"{90 * r}° {a:.1f}" for r, a in enumerate(test_m["per_rotation"]))
    print(f"last epoch: rotation accuracy (pretext) on the test images, each under all 4 rotations: "
          f"{test_m['top1']:.2f}% ({per_rot}; chance 25%)")
    print(f"fine-tune from it: {final['finetune']}")


def main(argv=None):
    args = parse_args(argv)
    try:
        args, ckpt = resume_run(args)
        device = setup_device(args)
        torch.manual_seed(args.seed)
        train, val, test, counts, C = build_data(args, device)
    except D.DataError as e:
        fail(str(e))
    score = lambda m, batches: rotation_accuracy(m, batches.epoch(0), C, counts, args.amp)
    model, optimizer, start = init_state(args, ckpt, device)
    step_model = torch.compile(model, mode="reduce-overhead") if args.compile else model
    saved = {"script": "rotation_ssp.py", "arch": ARCH, "class_counts": counts, "mean": test.mean, "std": test.std}
    open_run(args, ckpt, device, counts, start)

    t_run = time.time()
    for epoch in range(start, args.epochs):
        t0 = time.time()
        row, first_bad, step = train_one_epoch(model, optimizer, train, epoch, args, device, step_model)
        stop_if_diverged(args.out, model, epoch, first_bad, step)
        row["test_rotation_pretext"] = score(model, test)
        val_m = score(model, val) if val else None
        end_epoch(args, args.out, model, optimizer, epoch, row, val_m, t0, saved)
    test_m = score(model, test) if start >= args.epochs else row["test_rotation_pretext"]
    finish_run(args, counts, test_m, t_run)


if __name__ == "__main__":
    main()
