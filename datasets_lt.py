"""Long-tailed data for every script of this project: loading, subsets, and a fast GPU input pipeline.

Part 1 loads a split into memory as uint8 arrays and chooses the seeded long-tailed subsets of Yang & Xu 2020 (§3,
App. D) and Liu et al. 2022 (§2); part 2 keeps those arrays on the GPU and augments whole batches there; part 3 holds
the training subsets, file-list batches (torchrun shares included) and the evaluation every script uses.

    python datasets_lt.py --dataset cifar10 --rho 0.01 --download      # print the subset a run trains on
    python datasets_lt.py --train-list ImageNet_train.txt --lt-list ImageNet_LT_train.txt \
        --out-dir imagenet_variants                                   # paper 2's ImageNet lists (App. A.1)
    python datasets_lt.py --semi-synthetic semi --download            # paper 2's §3.2 folders from CIFAR-10

Conventions: `rho` is tail/head in (0, 1] (the papers' "imbalance ratio 100" is rho = 0.01); class 0 is the head
unless `class_order` says otherwise; every random choice takes an explicit seed: one seed, one image set everywhere.
"""
import argparse
import json
import os
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torchvision import transforms
from torchvision.transforms import v2

from run_lt import fail, write_text_atomic


class DataError(Exception):
    """A problem with the user's data or data arguments; scripts print it as one line and exit 2."""

    def __str__(self):
        # A DataLoader worker's DataError comes back re-raised as DataError("Caught DataError in DataLoader
        # worker process 0.\nOriginal Traceback ...\ndatasets_lt.DataError: <message>"): keep <message>.
        msg = super().__str__()
        if msg.startswith("Caught DataError") and "DataError: " in msg:
            return msg.rstrip().rsplit("DataError: ", 1)[1]
        return msg


# Paper 1 (App. D) and the LDAM-DRW code: images in the head class, and SVHN's rotated class order
# (digit 1 is the head, digit 0 the tail), as the authors' imbalance_svhn.py did.
N_MAX = {"cifar10": 5000, "cifar100": 500, "svhn": 1000}
CLASS_ORDER = {"svhn": [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]}
DATASETS = ("cifar10", "cifar100", "svhn", "stl10", "folder")
CINIC10_SPLITS = ("train", "valid", "test")
_IMAGE_EXTENSIONS = torchvision.datasets.folder.IMG_EXTENSIONS

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INAT_MEAN, INAT_STD = (0.466, 0.471, 0.380), (0.195, 0.194, 0.192)


def check_rho(rho, name="rho"):
    if not 0 < rho <= 1:
        hint = f" (the papers' imbalance ratio {rho:g} is --{name.replace('_', '-')} {1 / rho:g})" if rho > 1 else ""
        raise DataError(f"--{name.replace('_', '-')} must be in (0, 1] as tail/head, got {rho:g}{hint}")


# ----- Loading a split -----------------------------------------------------------------------------

def load_split(dataset, root, train, download=False):
    """Load one split into memory: (uint8 images N×H×W×3, int64 labels, class names). `train` is True, False
    or a split name ("extra" for SVHN, "unlabeled" for STL-10, labels -1); `folder`: see _load_folder."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    split = train if isinstance(train, str) else ("train" if train else "test")
    if dataset == "folder":
        return _load_folder(root, split)
    splits = {"cifar10": ("train", "test"), "cifar100": ("train", "test"), "svhn": ("train", "test", "extra"),
              "stl10": ("train", "test", "unlabeled")}[dataset]
    if split not in splits:
        raise DataError(f"{dataset} has no split '{split}'; it has {', '.join(splits)}")
    try:
        if dataset in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
            ds = cls(root, train=split == "train", download=download)
            return ds.data, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)
        if dataset == "svhn":
            ds = torchvision.datasets.SVHN(root, split=split, download=download)
            return (np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), ds.labels.astype(np.int64),
                    [str(d) for d in range(10)])
        ds = torchvision.datasets.STL10(root, split=split, download=download)
        names = getattr(ds, "classes", [str(c) for c in range(10)])
        return np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), ds.labels.astype(np.int64), list(names)
    except RuntimeError as e:
        if "not found or corrupted" not in str(e):
            raise
        how = ("pass --download on a machine with internet access" if not download else
               "the download did not produce the expected files")
        raise DataError(f"{dataset} ({split}) not found under '{root}': {how}, or point --data-root at a "
                        f"folder that holds it") from None
    except OSError as e:  # urllib's errors when offline with download=True
        raise DataError(f"could not download {dataset} to '{root}' ({e.__class__.__name__}: {e}); "
                        f"on an offline machine copy the files there and drop --download") from None


def _load_folder(root, split):
    """One split of root/<split>/<class>/* (classes sorted by name; one image size). The test split is labelled by
    class NAME against root/train: a class it lacks is absent and shifts no other; one training lacks is an error."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DataError(f"a folder dataset needs '{path}/<class>/<image>' (a {split} split), "
                        f"but '{path}' does not exist")
    files = _folder_files(path)
    names = list(files)
    if split == "test" and os.path.isdir(os.path.join(root, "train")):
        names = sorted(e.name for e in os.scandir(os.path.join(root, "train")) if e.is_dir())
        unknown = [c for c in files if c not in names]
        if unknown:
            raise DataError(f"test class folder(s) {', '.join(repr(c) for c in unknown[:3])} of '{path}' have no "
                            f"training folder of the same name in '{os.path.join(root, 'train')}'; rename or "
                            f"remove them")
        absent = [c for c in names if not files.get(c)]
        if absent:
            print(f"warning: class(es) {', '.join(repr(c) for c in absent[:5])}{' …' if len(absent) > 5 else ''} "
                  f"have no images in '{path}': reported as absent (no test accuracy), the other classes keep "
                  f"their labels", file=sys.stderr)
    else:
        empty = [c for c in names if not files[c]]
        if empty:
            raise DataError(f"class folder '{os.path.join(path, empty[0])}' holds no images "
                            f"({', '.join(_IMAGE_EXTENSIONS)}); add images or remove it")
        if split == "train" and len(names) < 2:
            raise DataError(f"'{path}' holds {len(names)} class folder(s); a classification dataset needs "
                            f"at least two (one folder per class)")
    samples = [(f, names.index(c)) for c in files for f in files[c]]
    if not samples:
        raise DataError(f"no images under '{path}' (one folder per class of {', '.join(_IMAGE_EXTENSIONS)} files)")
    images, first = [], None
    for file, _ in samples:
        img = np.asarray(open_image(file), dtype=np.uint8)
        if first is None:
            first = (img.shape, file)
        elif img.shape != first[0]:
            raise DataError(f"images in '{path}' differ in size ({first[1]}: {first[0][1]}x{first[0][0]}, "
                            f"{file}: {img.shape[1]}x{img.shape[0]}); resize them to one size first")
        images.append(img)
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    return np.stack(images), labels, names


def _folder_files(path):
    """{class: image files} for path/<class>/**, classes and files in ImageFolder's order (sorted)."""
    out = {}
    for c in sorted(e.name for e in os.scandir(path) if e.is_dir()):
        out[c] = [os.path.join(d, n) for d, _, fnames in sorted(os.walk(os.path.join(path, c), followlinks=True))
                  for n in sorted(fnames) if n.lower().endswith(_IMAGE_EXTENSIONS)]
    return out


def open_image(file, listed_in=None):
    """RGB PIL image of one file; a truncated or non-image file is a DataError naming it (and its list)."""
    try:
        return torchvision.datasets.folder.pil_loader(file)
    except Exception as e:                                     # PIL raises OSError, SyntaxError, ValueError, ...
        why = (str(e).splitlines() or [""])[0][:80]
        where = f" (listed in {listed_in})" if listed_in else ""
        raise DataError(f"'{file}'{where} is not a readable image ({e.__class__.__name__}: {why}); "
                        f"replace or {'unlist' if listed_in else 'delete'} it") from None


def cinic10_files(root):
    """CINIC-10 as paper 1's unlabeled pool D_U for CIFAR-10: (paths, labels, class names) of the ~21,000
    ImageNet-sourced images per class under root/{train,valid,test}/<class>/, never a `cifar10-…` file (D_L's own)."""
    if not all(os.path.isdir(os.path.join(root, s)) for s in CINIC10_SPLITS):
        raise DataError(f"--pool-root '{root}' is not a CINIC-10 folder: it needs train/, valid/ and test/ "
                        f"with one folder per class (download CINIC-10 and unpack it there)")
    names = sorted(d for d in os.listdir(os.path.join(root, "train")) if os.path.isdir(os.path.join(root, "train", d)))
    paths, labels = [], []
    for split in CINIC10_SPLITS:
        for c, name in enumerate(names):
            folder = os.path.join(root, split, name)
            if not os.path.isdir(folder):
                raise DataError(f"CINIC-10 under '{root}' has no '{split}/{name}' folder; the download is incomplete")
            for f in sorted(os.listdir(folder)):
                if not f.startswith("cifar10-") and f.lower().endswith((".png", ".jpg", ".jpeg")):
                    paths.append(os.path.join(folder, f))
                    labels.append(c)
    if not paths:
        raise DataError(f"no ImageNet-sourced images under '{root}' (every file is a cifar10-… file)")
    return paths, np.asarray(labels, dtype=np.int64), names


def load_images(paths, size=32):
    """uint8 N×size×size×3 array of the image files `paths` (RGB)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        img = torchvision.datasets.folder.pil_loader(p)
        if img.size != (size, size):
            raise DataError(f"'{p}' is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
        out[i] = np.asarray(img, dtype=np.uint8)
    return out


def mean_std(dataset, train_images=None):
    """Normalisation: the recipe's constants (REFERENCE §2), else the training split's per-channel statistics."""
    if dataset in ("cifar10", "cifar100"):
        return CIFAR_MEAN, CIFAR_STD
    if dataset == "svhn":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if dataset in ("imagenet_lt", "inat"):
        return IMAGENET_MEAN, IMAGENET_STD
    x = torch.as_tensor(train_images).reshape(-1, 3).double() / 255
    return tuple(x.mean(0).tolist()), tuple(x.std(0).tolist())


# ----- Long-tailed subsets (REFERENCE §1) ----------------------------------------------------------

def lt_counts(n_max, num_classes, rho, imb_type="exp"):
    """Images per class, head first. exp: int(n_max·rho^(i/(C-1))); step: half n_max, half int(n_max·rho)."""
    check_rho(rho)
    if imb_type == "exp":
        return [int(n_max * rho ** (i / max(num_classes - 1.0, 1))) for i in range(num_classes)]
    if imb_type == "step":
        half = num_classes // 2
        return [int(n_max)] * half + [int(n_max * rho)] * (num_classes - half)
    raise DataError(f"unknown imbalance type '{imb_type}'; choose exp or step")


def _by_class(labels, num_classes):
    """Ascending indices of each class (one stable sort: the same arrays as flatnonzero(labels == c))."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels, minlength=num_classes))[:-1])


def _num_classes(labels):
    return int(labels.max()) + 1 if len(labels) else 0


def make_long_tailed(labels, rho, imb_type="exp", seed=0, n_max=None, class_order=None):
    """Indices into `labels` of the seeded long-tailed subset: class class_order[i] keeps the first lt_counts(...)[i]
    of its indices, shuffled class after class by one RandomState(seed) (LDAM-DRW's rule); n_max: the smallest class."""
    labels = np.asarray(labels)
    C = _num_classes(labels)
    if C < 2:
        raise DataError(f"the training split has {C} class(es); a classification dataset needs at least two")
    groups = _by_class(labels, C)
    n_max = min(len(g) for g in groups) if n_max is None else n_max
    counts = lt_counts(n_max, C, rho, imb_type)
    order = list(range(C)) if class_order is None else list(class_order)
    if sorted(order) != list(range(C)):
        raise DataError(f"class_order must be a permutation of 0..{C - 1}")
    if min(counts) < 1:
        raise DataError(f"rho={rho:g} leaves the tail class with {min(counts)} images (n_max={n_max}); "
                        f"use a larger rho")
    for c, k in zip(order, counts):
        if len(groups[c]) < k:
            raise DataError(f"class {c} has {len(groups[c])} images but the profile asks for {k}; lower n_max")
    return np.sort(np.concatenate(_draw([groups[c] for c in order], counts, np.random.RandomState(seed))))


def _draw(groups, counts, rng):
    """The first counts[i] indices of each array groups[i], shuffled by `rng` one array after the other."""
    drawn = []
    for g, k in zip(groups, counts):
        g = g.copy()
        rng.shuffle(g)
        drawn.append(g[:k])
    return drawn


def balanced_subset(labels, n_total, seed=0):
    """Paper 2's balanced control: n_total images over the classes (the first n_total mod C one more), seeded."""
    labels = np.asarray(labels)
    C = _num_classes(labels)
    groups = _by_class(labels, C)
    per = [n_total // C + (c < n_total % C) for c in range(C)]
    if min(per) < 1:
        raise DataError(f"a balanced subset of {n_total} images leaves a class empty ({C} classes)")
    for g, k in zip(groups, per):
        if len(g) < k:
            raise DataError(f"balanced subset needs {k} images per class, a class has only {len(g)}")
    return np.sort(np.concatenate(_draw(groups, per, np.random.RandomState(seed))))


def downsample(indices, labels, ratio, seed=0, keep_one=False):
    """Paper 2's size sweep: keep int(ratio·n_c) of each class's images in `indices` (the profile stays). A class
    left empty is an error, or with keep_one keeps one image (the ImageNet lists' 3–5-image tail classes)."""
    if not 0 < ratio <= 1:
        raise DataError(f"subsample ratio must be in (0, 1], got {ratio:g}")
    indices = np.asarray(indices)
    sub = np.asarray(labels)[indices]
    rng = np.random.RandomState(seed)
    keep = []
    order = np.argsort(sub, kind="stable")                # per class, in the order of `indices`
    classes, first = np.unique(sub[order], return_index=True)
    for c, idx in zip(classes, np.split(indices[order], first[1:])):     # views of a copy: shuffled in place
        k = max(int(len(idx) * ratio), int(keep_one))
        if k < 1:
            raise DataError(f"subsampling by {ratio:g} leaves class {c} empty ({len(idx)} images); "
                            f"use a larger ratio or rho")
        rng.shuffle(idx)
        keep.append(idx[:k])
    return np.sort(np.concatenate(keep))


def carve_val(indices, labels, frac, seed=0):
    """Class-stratified validation split: (train, val) indices; each class gives round(frac·n_c), ≥ 1, never all."""
    indices = np.asarray(indices)
    if frac == 0:
        return indices, indices[:0]
    if not 0 < frac < 1:
        raise DataError(f"--val-frac must be in [0, 1), got {frac:g}")
    sub = np.asarray(labels)[indices]
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c in np.unique(sub):
        idx = indices[sub == c].copy()
        if len(idx) < 2:
            raise DataError(f"class {c} has {len(idx)} training image(s): too few to carve a validation split")
        k = min(max(1, int(round(frac * len(idx)))), len(idx) - 1)
        rng.shuffle(idx)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def subset_digest(indices):
    """Fingerprint of a training subset, kept in checkpoints: a later stage checks it (self_training.py --base)."""
    import hashlib
    return hashlib.sha1(np.sort(np.asarray(indices, dtype=np.int64)).tobytes()).hexdigest()[:16]


def save_indices(path, train, val=()):
    """The train and val indices as JSON, atomically: the record that one --data-seed gave the same images."""
    write_text_atomic(path, json.dumps({"train": [int(i) for i in train], "val": [int(i) for i in val]}))


def shot_groups(train_counts):
    """Boolean class masks: many (>100 training images), medium (20–100), few (<20)."""
    n = np.asarray(train_counts)
    return {"many": n > 100, "medium": (n >= 20) & (n <= 100), "few": n < 20}


def unlabeled_pool(pool_labels, n_labeled, mult=5, rho_u=1.0, imb_type="exp", seed=0,
                   irrelevant=None, relevance=1.0, class_order=None, shortfall="shrink"):
    """Choose paper 1's extra unlabeled set D_U: (pool indices, irrelevant picks, report).

    `pool_labels` are the TRUE labels of the candidates, used only to choose them (training sees pseudo-labels).
    |D_U| = mult·n_labeled on the exp (or step) profile with ratio rho_u, rescaled to keep the total (the authors'
    get_img_num_per_cls_unlabeled); the i-th count goes to class class_order[i]. With relevance r < 1 (paper 1 Fig. 2)
    exactly round(r·|D_U|) images come from the pool (flooring's leftovers to the largest remainders), the rest
    uniformly from `irrelevant` (the caller's ids). A pool too small: shortfall="shrink" keeps profile and relevance
    and takes the largest |D_U| that fits, with a warning; "cap" keeps |D_U| and caps each short class."""
    check_rho(rho_u, "rho_u")
    if not 0 <= relevance <= 1:
        raise DataError(f"relevance must be in [0, 1], got {relevance:g}")
    if shortfall not in ("shrink", "cap"):
        raise DataError(f"shortfall must be 'shrink' or 'cap', got {shortfall!r}")
    pool_labels = np.asarray(pool_labels)
    C = _num_classes(pool_labels)
    order = list(range(C)) if class_order is None else list(class_order)
    if sorted(order) != list(range(C)):
        raise DataError(f"class_order must be a permutation of 0..{C - 1}")
    groups = _by_class(pool_labels, C)
    avail = np.array([len(g) for g in groups])
    n_irr_avail = 0 if irrelevant is None else len(irrelevant)
    total = int(round(mult * n_labeled))
    if total - int(round(relevance * total)) and n_irr_avail == 0:
        raise DataError(f"relevance {relevance:g} needs {total - int(round(relevance * total))} irrelevant images, "
                        f"none were given")
    if C == 0 and round(relevance * total):
        raise DataError("the unlabeled pool is empty (every training image is labelled at this rho); give an "
                        "image folder with --unlabeled-root, or --unlabeled-mult 0")
    base = lt_counts(int(round(relevance * total)) // C, C, rho_u, imb_type) if C else []

    def split(n_rel):
        """Per-class counts (indexed by class) of n_rel relevant images on the profile."""
        if sum(base) == 0:
            return np.zeros(C, dtype=np.int64)
        exact = [b * n_rel / sum(base) for b in base]
        counts = [int(e) for e in exact]
        if relevance < 1:                                   # exactly n_rel: hand out the floored images
            for i in np.argsort([c - e for c, e in zip(counts, exact)], kind="stable")[:n_rel - sum(counts)]:
                counts[i] += 1
        out = np.zeros(C, dtype=np.int64)
        out[order] = counts
        return out

    def fits(u):
        n_rel = int(round(relevance * u))
        return bool(np.all(split(n_rel) <= avail)) and u - n_rel <= n_irr_avail

    size = total
    if not fits(total) and shortfall == "shrink":
        lo, hi = 0, total                                    # fits() is monotone in the size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        size = lo
        if split(int(round(relevance * size))).sum() == 0:
            empty = [str(c) for c in range(C) if avail[c] == 0]
            raise DataError(f"the unlabeled pool cannot supply any D_U with this profile (class(es) "
                            f"{', '.join(empty) or '-'} have no image left in it); use a larger pool "
                            f"(CINIC-10) or cap each class instead (shortfall 'cap')")
    n_rel = int(round(relevance * size))
    want = split(n_rel)
    got = np.minimum(want, avail)
    n_irr = min(size - n_rel, n_irr_avail)
    rng = np.random.RandomState(seed)
    chosen = [np.zeros(0, dtype=np.int64)] * C
    for c, idx in zip(order, _draw([groups[c] for c in order], [got[c] for c in order], rng)):
        chosen[c] = idx                                      # drawn head class first, as make_long_tailed
    irr = np.sort(rng.permutation(np.asarray(irrelevant))[:n_irr]) if n_irr else np.zeros(0, dtype=np.int64)
    supplied = int(got.sum()) + int(n_irr)
    if size < total:
        over_rel = int(round(relevance * (size + 1)))
        limit = [f"class {c} ({avail[c]} images)" for c in np.flatnonzero(split(over_rel) > avail)]
        if size + 1 - over_rel > n_irr_avail:
            limit.append(f"the irrelevant pool ({n_irr_avail} images)")
        warnings.warn(f"the unlabeled pool cannot supply D_U@{mult:g}x ({total} images) with this profile: "
                      f"shrunk to {supplied} images ({supplied / max(n_labeled, 1):.2f}x |D_L|), profile and "
                      f"relevance kept; limited by {', '.join(limit)}", stacklevel=2)
    short = [f"class {c}: {w - g}" for c, (w, g) in enumerate(zip(want, got)) if g < w]
    if short or n_irr < size - n_rel:
        warnings.warn(f"the unlabeled pool cannot supply D_U: {int(want.sum())} relevant and {size - n_rel} "
                      f"irrelevant images asked, {int(got.sum())} and {n_irr} supplied (short: "
                      f"{', '.join(short + ([f'irrelevant: {size - n_rel - n_irr}'] if n_irr < size - n_rel else []))}); "
                      f"capped, the profile is not the one asked", stacklevel=2)
    report = {"requested": total, "requested_per_class": want.tolist(), "supplied_per_class": got.tolist(),
              "relevant": int(got.sum()), "irrelevant": int(n_irr), "size": supplied,
              "achieved_mult": supplied / max(n_labeled, 1),
              "achieved_relevance": int(got.sum()) / supplied if supplied else None}
    return np.sort(np.concatenate([irr[:0], *chosen])).astype(np.int64), irr, report


# ----- ImageNet-LT / iNaturalist text lists --------------------------------------------------------

def imagenet_transform(train, size=224, dataset="imagenet_lt"):
    """The decoupling (Kang et al. 2020) / paper 1 ImageNet-LT transforms: train = RandomResizedCrop,
    flip, ColorJitter(0.4, 0.4, 0.4, 0); test = Resize(256/224·size), CenterCrop(size). dataset="inat":
    iNaturalist's statistics and no colour jitter, as their dataloader.py (and paper 1's released code)."""
    inat = dataset == "inat"
    norm = transforms.Normalize(*((INAT_MEAN, INAT_STD) if inat else (IMAGENET_MEAN, IMAGENET_STD)))
    if train:
        jitter = [] if inat else [transforms.ColorJitter(0.4, 0.4, 0.4, 0)]
        return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *jitter,
                                   transforms.ToTensor(), norm])
    return transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                               transforms.ToTensor(), norm])


class FileListDataset(torch.utils.data.Dataset):
    """Images of a list of `relative/path label` lines (ImageNet-LT, iNaturalist); default imagenet_transform(train)."""

    def __init__(self, root, list_file, train=True, transform=None):
        self.root, self.list_file = root, list_file
        self.transform = imagenet_transform(train) if transform is None else transform
        paths, labels, line_of = read_file_list(list_file)
        self.samples = list(zip(paths, labels.tolist()))
        missing = _missing_files(root, [p for p, _ in self.samples])
        if missing:
            first = os.path.join(root, self.samples[missing[0]][0])
            hint = "check --data-root" if len(missing) == len(self.samples) else "restore them or fix the list"
            raise DataError(f"{len(missing)} of the {len(self.samples)} images listed in {list_file} do not exist, "
                            f"the first: '{first}' (line {line_of[missing[0]]}); {hint}")
        self.labels, self.num_classes = labels, int(labels.max()) + 1

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(open_image(os.path.join(self.root, path), self.list_file)), label


def _missing_files(root, paths):
    """Positions of `paths` under root that are not files: one listing per folder (fast for ImageNet's 1.28M files)."""
    listed, missing = {}, []
    for i, rel in enumerate(paths):
        folder, name = os.path.split(os.path.join(root, rel))
        if folder not in listed:
            try:
                listed[folder] = set(os.listdir(folder))
            except OSError:
                listed[folder] = set()
        if name not in listed[folder] and not os.path.isfile(os.path.join(folder, name)):
            missing.append(i)
    return missing


# ---------------------------------------------------------------------------------------------------
# Paper 2's ImageNet variants (§2.2, App. A.1, Table 2, Fig. 1(b)): long-tailed lists, balanced twins and subsamples.

# App. A.1: ImageNet-LT (Liu et al. 2019, Pareto with power 6, 1280 down to 5 images per class) has
# n = 115,846; the "more imbalanced" Pareto list has 3 images in its rarest class and n = 80,218. §2.2
# names the two ratios r = 0.004 and 0.0025: 5/1280 ≈ 0.004, and 3/1200 = 0.0025 gives the head of 1200.
IMAGENET_PARETO = {"r0.004": (1280, 5, 115_846), "r0.0025": (1200, 3, 80_218)}
SIZE_SWEEP = (0.75, 0.5, 0.25, 0.125)


def pareto_counts(num_classes, n_max, n_min, total):
    """Images per class, head first, on a Pareto rank profile with the given head, tail and total.

    Neither paper nor code gives how its Pareto lists were drawn, so this is our construction: the
    rank-size form n(k) = n_max·(1 + k/k0)^(−s), s fixed by n(C−1) = n_min, k0 by bisection so that
    Σ n(k) = total; floor(n(k)) plus one image for the largest fractional parts. Head and tail stay exact."""
    C = int(num_classes)
    if C < 2 or not 1 <= n_min <= n_max or not C * n_min <= total <= C * n_max:
        raise DataError(f"no Pareto profile of {C} classes from {n_max} down to {n_min} images sums to {total}")
    k = np.arange(C, dtype=np.float64)

    def profile(k0):
        s = np.log(n_max / n_min) / np.log1p((C - 1) / k0)
        return n_max * (1 + k / k0) ** (-s)

    lo, hi = 1e-9, 1e9                                     # total grows with k0 (k0 → ∞: the exp profile)
    if not profile(lo).sum() <= total <= profile(hi).sum():
        raise DataError(f"a Pareto rank profile from {n_max} to {n_min} over {C} classes cannot sum to {total}")
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if profile(mid).sum() < total else (lo, mid)
    real = profile(np.sqrt(lo * hi))
    counts = np.floor(real + 1e-9).astype(np.int64)
    counts[0], counts[-1] = n_max, n_min
    short = int(total - counts.sum())
    frac = real - counts
    frac[[0, -1]] = -1                                    # the head and the tail stay as given
    counts[np.argsort(-frac, kind="stable")[:short]] += 1
    return counts.tolist()


def read_file_list(path):
    """(paths, labels, line numbers) of a 'relative/path label' list (the images need not be present)."""
    if not os.path.isfile(path):
        raise DataError(f"image list '{path}' does not exist")
    paths, labels, lines = [], [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{path}:{n}: expected 'relative/path label', got '{line.strip()}'")
            paths.append(parts[0])
            labels.append(int(parts[1]))
            lines.append(n)
    if not paths:
        raise DataError(f"image list '{path}' is empty")
    return paths, np.asarray(labels, dtype=np.int64), lines


def profile_subset(labels, counts, seed=0, class_order=None):
    """Indices of a subset whose class at rank k keeps counts[k] images (a seeded draw per class). Ranks go to
    classes in `class_order` (default: a seeded permutation), passing over one too small (ImageNet's hold 732–1300)."""
    labels = np.asarray(labels)
    C = _num_classes(labels)
    if len(counts) != C:
        raise DataError(f"the profile has {len(counts)} classes, the list {C}")
    groups = _by_class(labels, C)
    rng = np.random.RandomState(seed)
    order = list(rng.permutation(C)) if class_order is None else list(class_order)
    assigned, free = {}, list(order)
    for k, want in enumerate(counts):
        c = next((c for c in free if len(groups[c]) >= want), None)
        if c is None:
            raise DataError(f"no class left with {want} images for rank {k} of the profile")
        free.remove(c)
        assigned[c] = want
    return np.sort(np.concatenate(_draw(groups, [assigned[c] for c in range(C)], rng)))   # class order: seed-stable


def imagenet_variants(labels, seed=0, lt_labels=None, ratios=SIZE_SWEEP):
    """Paper 2's ImageNet pre-training lists from the full ImageNet list's `labels`: {name: ("full" or "lt", indices)}.
    With `lt_labels` (Liu et al.'s ImageNet_LT_train.txt) r0.004 is that list itself (source "lt"), else drawn from the
    full list on pareto_counts(C, 1280, 5, 115,846) (ImageNet-LT's head, tail and n, not its images); r0.0025 on
    pareto_counts(C, 1200, 3, 80,218), in ImageNet-LT's class order when given. Each list L and ratio q also gives
    L_sub<q> = downsample(L, q, keep_one) and bal-… = balanced_subset(full, |…|): the --subsample / --balanced calls."""
    labels = np.asarray(labels)
    C = _num_classes(labels)
    out = {}
    for name, (n_max, n_min, total) in IMAGENET_PARETO.items():
        if name == "r0.004" and lt_labels is not None:
            src, src_labels, idx = "lt", np.asarray(lt_labels), np.arange(len(lt_labels))
        else:
            order = None if lt_labels is None else np.lexsort((np.random.RandomState(seed).permutation(C),
                                                               -np.bincount(lt_labels, minlength=C)))
            src, src_labels = "full", labels
            idx = profile_subset(labels, pareto_counts(C, n_max, n_min, total), seed, order)
        for q in (1.0, *ratios):
            sub = idx if q == 1 else downsample(idx, src_labels, q, seed, keep_one=True)
            tag = "" if q == 1 else f"-sub{q:g}"
            out[f"{name}{tag}"] = (src, sub)
            out[f"bal-{name}{tag}"] = ("full", balanced_subset(labels, len(sub), seed))
    return out


def write_imagenet_variants(train_list, out_dir, seed=0, lt_list=None):
    """Write every variant of imagenet_variants as <out_dir>/<name>.txt; returns {name: class counts}."""
    paths, labels, _ = read_file_list(train_list)
    lt = read_file_list(lt_list)[:2] if lt_list else None
    variants = imagenet_variants(labels, seed, None if lt is None else lt[1])
    os.makedirs(out_dir, exist_ok=True)
    lines = {"full": [f"{p} {y}\n" for p, y in zip(paths, labels)]}
    if lt is not None:
        lines["lt"] = [f"{p} {y}\n" for p, y in zip(*lt)]
    report = {}
    for name, (src, idx) in variants.items():
        y = labels if src == "full" else lt[1]
        tmp = os.path.join(out_dir, f"{name}.txt.tmp")
        with open(tmp, "w") as f:
            f.write("".join(lines[src][i] for i in idx))
        os.replace(tmp, os.path.join(out_dir, f"{name}.txt"))
        report[name] = np.bincount(np.asarray(y)[idx], minlength=_num_classes(labels)).tolist()
    return report


# ---------------------------------------------------------------------------------------------------
# Part 2: the GPU input pipeline (REFERENCE §2, §5, §6). uint8 images live on the device (CIFAR-10's 50,000: 154 MB);
# whole chunks of an epoch are augmented there, per-sample parameters drawn as the authors' torchvision transforms do.

def to_device(images, device):
    """uint8 N×H×W×3 array → contiguous uint8 N×3×H×W tensor on `device`."""
    return torch.as_tensor(np.asarray(images)).to(device).permute(0, 3, 1, 2).contiguous()


def normalize(x, mean, std):
    """uint8 or [0, 1] float N×3×H×W → (x/255 − mean)/std, as ToTensor() + Normalize(mean, std)."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


# ----- supervised: RandomCrop(32, padding=4) + RandomHorizontalFlip() ---------------------------------

def crop_flip(x, top, left, flip, padding=4):
    """Crop an H×W window at (top, left) of each zero-padded image, mirrored where `flip`: one gather on uint8,
    equal to torchvision's pad → crop → hflip for the same parameters."""
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    cols = torch.arange(W, device=x.device)
    cols = left[:, None] + torch.where(flip[:, None], W - 1 - cols, cols)            # B×W
    rows = top[:, None] + torch.arange(H, device=x.device)                            # B×H
    flat = (rows[:, :, None] * (W + 2 * padding) + cols[:, None, :]).view(B, 1, H * W)
    out = padded.reshape(B, C, -1).gather(2, flat.expand(B, C, H * W))
    return out.view(B, C, H, W)


def random_crop_flip(x, generator, padding=4, flip=True):
    """RandomCrop(H, padding) + RandomHorizontalFlip(0.5), offsets in {0..2·padding}; flip=False draws, never flips."""
    B, dev = x.shape[0], x.device
    top = torch.randint(0, 2 * padding + 1, (B,), generator=generator, device=dev)
    left = torch.randint(0, 2 * padding + 1, (B,), generator=generator, device=dev)
    flip = (torch.rand(B, generator=generator, device=dev) < 0.5) & flip
    return crop_flip(x, top, left, flip, padding)


# ----- self-supervised: RandomResizedCrop, flip, ColorJitter, RandomGrayscale, GaussianBlur ----------

def sample_resized_crop(n, height, width, generator, device, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params for n images at once: (top, left, h, w) integer tensors. torchvision's
    rule: up to 10 tries of area ~ U(scale)·H·W and log aspect ~ U(log ratio), the first box that fits at a
    uniform position; else a centred crop of the whole image, its aspect clamped to `ratio`."""
    tries = 10
    area = height * width * torch.empty(n, tries, device=device).uniform_(*scale, generator=generator)
    log_r = torch.empty(n, tries, device=device).uniform_(np.log(ratio[0]), np.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)         # index of the first fitting try
    w, h, ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    # Fallback box (torchvision: whole image, aspect clamped to the ratio range, centred).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    u = torch.rand(n, 2, generator=generator, device=device)       # uniform integer positions
    top = torch.where(ok, (u[:, 0] * (height - h + 1)).long().clamp_max(height - h), (height - fh) // 2)
    left = torch.where(ok, (u[:, 1] * (width - w + 1)).long().clamp_max(width - w), (width - fw) // 2)
    return top, left, h, w


def resized_crop(x, top, left, h, w, size, flip=None):
    """Crop box (top, left, h, w) of each image, resized to size×size bilinearly (half-pixel centres, edges
    clamped, as interpolate(align_corners=False)), mirrored where `flip`; uint8 in, float in [0, 1] out.
    No antialiasing, which only downscaling would need: the CIFAR recipes never downscale."""
    B, C, H, W = x.shape
    u = torch.arange(size, device=x.device, dtype=torch.float32) + 0.5

    def axis(start, length, mirror):
        src = u[None, :] * (length[:, None].float() / size) - 0.5                  # B×size, in the box
        if mirror is not None:
            src = torch.where(mirror[:, None], src.flip(1), src)
        src = src.clamp(min=0)
        i0 = src.floor().long()
        i1 = torch.minimum(i0 + 1, length[:, None] - 1)
        frac = src - i0
        i0 = torch.minimum(i0, length[:, None] - 1)
        return start[:, None] + i0, start[:, None] + i1, frac

    y0, y1, fy = axis(top, h, None)
    x0, x1, fx = axis(left, w, flip)
    flat = x.reshape(B, C, H * W)

    def take(rows, cols):
        idx = (rows[:, :, None] * W + cols[:, None, :]).view(B, 1, -1).expand(B, C, -1)
        return flat.gather(2, idx).view(B, C, size, size).float()

    fx, fy = fx[:, None, None, :], fy[:, None, :, None]
    top_row = take(y0, x0) * (1 - fx) + take(y0, x1) * fx
    bottom_row = take(y1, x0) * (1 - fx) + take(y1, x1) * fx
    return (top_row * (1 - fy) + bottom_row * fy) / 255


def _gray(x):
    """ITU-R 601 luma, the weights of torchvision's rgb_to_grayscale."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x, other, factor):
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp_(0, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, _gray(x), f)


def adjust_hue(x, f):
    """Rotate the hue of each image by f ∈ [−0.5, 0.5] turns (RGB → HSV → RGB)."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    hue = torch.where(v == r, (g - b) / safe_c,
                      torch.where(v == g, 2 + (b - r) / safe_c, 4 + (r - g) / safe_c))
    hue = torch.where(c > 0, hue, torch.zeros_like(hue)) / 6
    hue = torch.remainder(hue + f.view(-1, 1, 1), 1.0) * 6
    # Hexcone HSV → RGB: channel n ∈ {5, 3, 1} for R, G, B is v − v·s·clamp(min(k, 4 − k), 0, 1).
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + hue.unsqueeze(1), 6)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x, factors, order):
    """ColorJitter with per-image factors (B×4: brightness, contrast, saturation, hue) in a per-image order
    (B×4 permutations of 0..3), as torchvision's; in each slot an op runs only on the images that have it there."""
    for slot in range(4):
        out = torch.empty_like(x)
        for op, fn in enumerate(JITTER_OPS):
            idx = (order[:, slot] == op).nonzero().squeeze(1)
            out.index_copy_(0, idx, fn(x.index_select(0, idx), factors[idx, op]))
        x = out
    return x


def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur, a sigma per image, reflect padding: torchvision's gaussian_blur(img, [k, k], [s, s])."""
    B, C, H, W = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)                     # (B·C)×k
    p = kernel_size // 2
    y = torch.nn.functional.pad(x.reshape(1, B * C, H, W), (p, p, p, p), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.view(B, C, H, W)


def sample_jitter(n, generator, device, jitter=(0.4, 0.4, 0.4, 0.1)):
    """ColorJitter.get_params for n images: n×4 factors uniform in 1 ± b, 1 ± c, 1 ± s, ±h; a random op order each."""
    bri, con, sat, hue = jitter
    u = torch.rand(n, 4, generator=generator, device=device)
    lo = torch.tensor([1 - bri, 1 - con, 1 - sat, -hue], device=device)
    factors = lo + u * torch.tensor([2 * bri, 2 * con, 2 * sat, 2 * hue], device=device)
    order = torch.rand(n, 4, generator=generator, device=device).argsort(1)
    return factors, order


def ssl_augment(x, generator, size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8,
                p_gray=0.2, blur=False, blur_kernel=None, flip=True):
    """One SimSiam / MoCo v2 view of each uint8 image, float in [0, 1]: RandomResizedCrop(size, scale) →
    RandomHorizontalFlip() (if flip) → RandomApply(ColorJitter(*jitter), p_jitter) → RandomGrayscale(p_gray) →
    [RandomApply(GaussianBlur(σ ∈ [0.1, 2]), 0.5) if blur]; the flip commutes with the rest, so the crop does it."""
    B, dev = x.shape[0], x.device
    top, left, h, w = sample_resized_crop(B, x.shape[2], x.shape[3], generator, dev, scale)
    flip = (torch.rand(B, generator=generator, device=dev) < 0.5) & flip
    out = resized_crop(x, top, left, h, w, size, flip)
    factors, order = sample_jitter(B, generator, dev, jitter)
    apply = torch.rand(B, generator=generator, device=dev) < p_jitter
    out = torch.where(apply.view(-1, 1, 1, 1), color_jitter(out, factors, order), out)
    gray = torch.rand(B, generator=generator, device=dev) < p_gray
    out = torch.where(gray.view(-1, 1, 1, 1), _gray(out).expand_as(out), out)
    if blur:
        k = blur_kernel or (int(0.1 * size) // 2 * 2 + 1)      # SimCLR's convention: ~10% of the side
        sigma = torch.empty(B, device=dev).uniform_(0.1, 2.0, generator=generator)
        use = torch.rand(B, generator=generator, device=dev) < 0.5
        out = torch.where(use.view(-1, 1, 1, 1), gaussian_blur(out, sigma, k), out)
    return out


# ----- batches ----------------------------------------------------------------------------------------

def balanced_sample_weights(labels):
    """Per-image weight 1/n_y: every class is equally likely per draw (the Resample / DRS rules and cRT)."""
    labels = labels if torch.is_tensor(labels) else torch.as_tensor(np.asarray(labels))
    return (1.0 / torch.bincount(labels).double())[labels]


def effective_number_sample_weights(labels, beta=0.9999, counts=None):
    """Per-image weight (1 − β)/(1 − β^{n_y}) (Cui et al.'s effective number; `counts` default: those of `labels`),
    the authors' ImbalancedDatasetSampler: at CIFAR-10-LT ρ = 100 the head is drawn 1.27× as often as the tail."""
    labels = labels if torch.is_tensor(labels) else torch.as_tensor(np.asarray(labels))
    n = (torch.bincount(labels) if counts is None else torch.as_tensor(counts)).double()
    return ((1 - beta) / (1 - beta ** n.clamp(min=1)))[labels]


class GPULoader:
    """Batches of a device-resident uint8 dataset, normalised and augmented on the device:
    `for x, y, idx in GPULoader(images, labels, 128, mean, std, device, augment="crop_flip").epoch(e)`.

    augment: None (test transform), "crop_flip" (supervised CIFAR recipe) or "ssl" (`views` views, x a list). Each
    epoch's order and augmentation come from a generator seeded by (seed, epoch), so a resumed run sees exactly the
    batches it would have. epoch(e, weights): len(dataset) draws with replacement, as WeightedRandomSampler;
    epoch(e, order=positions): that order (cRT's class-aware sampler). Augmented in chunks of `chunk` images."""

    def __init__(self, images, labels, batch_size, mean, std, device, augment=None, shuffle=None,
                 drop_last=False, seed=0, views=2, size=None, blur=False, chunk=8192, flip=True):
        if augment not in (None, "crop_flip", "ssl"):
            raise ValueError(f"augment must be None, 'crop_flip' or 'ssl', got {augment!r}")
        self.device = torch.device(device)
        self.images = images.to(self.device) if torch.is_tensor(images) else to_device(images, self.device)
        labels = labels if torch.is_tensor(labels) else torch.as_tensor(np.asarray(labels))
        self.labels = labels.long().to(self.device)
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.augment, self.views, self.blur, self.flip = augment, views, blur, flip
        self.shuffle = augment is not None if shuffle is None else shuffle
        self.drop_last, self.seed = drop_last, seed
        self.size = size or self.images.shape[-1]
        self.chunk = max(1, chunk // batch_size) * batch_size

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _augment(self, x, g):
        if self.augment == "crop_flip":
            return normalize(random_crop_flip(x, g, flip=self.flip), self.mean, self.std)
        if self.augment == "ssl":
            return [normalize(ssl_augment(x, g, self.size, blur=self.blur, flip=self.flip), self.mean, self.std)
                    for _ in range(self.views)]
        return normalize(x, self.mean, self.std)

    def epoch(self, epoch, weights=None, order=None):
        n = len(self.labels)
        g = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + epoch)
        if order is not None:
            order, n = order.to(self.device), len(order)
        elif weights is not None:
            w = torch.as_tensor(weights, dtype=torch.double).to(self.device)
            order = torch.multinomial(w, n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(n, generator=g, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        end = len(self) * self.batch_size if self.drop_last else n
        for start in range(0, end, self.chunk):
            idx = order[start:min(start + self.chunk, end)]
            x, y = self._augment(self.images[idx], g), self.labels[idx]
            for b in range(0, len(idx), self.batch_size):
                sl = slice(b, b + self.batch_size)
                yield ([v[sl] for v in x] if isinstance(x, list) else x[sl]), y[sl], idx[sl]


# ----- Training subsets, file lists in batches (one process or a share under torchrun), evaluation ---

def training_subset(train_y, args):
    """Indices of the training images and of the --val-frac ones left out (paper 2 §2.2 / App. A.1): the long-tailed
    subset, downsampled by --subsample (--balanced: a balanced one of its size); one --data-seed, the same images."""
    idx = make_long_tailed(train_y, args.rho, args.imb_type, args.data_seed, N_MAX.get(args.dataset),
                           CLASS_ORDER.get(args.dataset))
    if args.subsample < 1:
        idx = downsample(idx, train_y, args.subsample, args.data_seed)
    if args.balanced:
        idx = balanced_subset(train_y, len(idx), args.data_seed)
    return carve_val(idx, train_y, args.val_frac, args.data_seed)


def headline_metric(dataset):
    """Paper 1 evaluates "on corresponding balanced test datasets" (§2.2); SVHN's test split is not (digit 1: 5,099
    images, digit 9: 1,595), so its headline error is 100 − the mean per-class accuracy; top-1 beside it."""
    return "mean_class_acc" if dataset == "svhn" else "top1"


class ListBatches:
    """DataLoader over a FileListDataset with GPULoader's interface: epoch(e, weights) → (x, y, idx)."""

    def __init__(self, dataset, indices, batch_size, train, seed, workers, device):
        self.dataset, self.indices, self.train, self.seed, self.device = dataset, indices, train, seed, device
        self.labels = torch.as_tensor(dataset.labels[indices])
        self.kw = dict(batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                       persistent_workers=workers > 0)

    def __len__(self):
        return -(-len(self.indices) // self.kw["batch_size"])

    def epoch(self, epoch, weights=None, order=None):
        n = len(self.indices)
        if order is None:
            order = epoch_order(n, self.seed, epoch, weights) if self.train or weights is not None else torch.arange(n)
        sub = torch.utils.data.Subset(self.dataset, [int(self.indices[i]) for i in order])
        try:
            for b, (x, y) in enumerate(torch.utils.data.DataLoader(sub, **self.kw)):
                idx = order[b * self.kw["batch_size"]:(b + 1) * self.kw["batch_size"]]
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx
        except DataError as e:                   # an unreadable image mid-epoch: stop before saving anything
            fail(str(e))


def stream_seed(*key):
    """A seed for one random stream (e.g. one process's augmentations in one epoch)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def epoch_order(n, seed, epoch, weights=None):
    """ListBatches' order of the positions 0 … n-1, seeded by (seed, epoch): a shuffle, or n draws by `weights`."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is not None:
        return torch.as_tensor(list(torch.utils.data.WeightedRandomSampler(weights, n, generator=g)))
    return torch.as_tensor(list(torch.utils.data.RandomSampler(range(n), generator=g)))


def shard_batches(n, batch_size, seed, epoch, weights, rank, world, order=None):
    """[(global batch, this process's share)] of one training epoch, as positions 0 … n-1: all processes draw the same
    order (epoch_order, or `order`: cRT's class-aware sampler) and global batches; process r keeps the r-th of `world`
    contiguous parts of each (a short last batch's may differ by one or be empty); in rank order they are one batch."""
    order = epoch_order(n, seed, epoch, weights) if order is None else order
    return [(b, torch.tensor_split(b, world)[rank]) for b in order.split(batch_size)]


class ShardedListBatches(ListBatches):
    """ListBatches for one of `world` processes: epoch(e, weights) → (x, y, positions, global batch's labels), its
    share (shard_batches; an empty one passes every layer); augmentations from (seed, epoch, rank): --resume agrees."""

    def __init__(self, dataset, indices, batch_size, seed, workers, device, rank, world):
        super().__init__(dataset, indices, batch_size, True, seed, workers, device)
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def epoch(self, epoch, weights=None, order=None):
        shares = shard_batches(len(self.indices), self.batch_size, self.seed, epoch, weights, self.rank, self.world, order)
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
            except DataError as e:                       # an unreadable image: only this process met it, so
                print(f"error: {e}", file=sys.stderr)      # it says so whatever its rank; torchrun stops the rest
                sys.exit(2)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), share, self.labels[b]


def eval_shard(dataset, indices, seed, workers, device, rank, world):
    """Evaluation batches of this process's contiguous part of `indices`; .sizes: every part's size."""
    parts = np.array_split(np.asarray(indices), world)
    batches = ListBatches(dataset, parts[rank], 256, False, seed, workers, device)
    batches.sizes = [len(p) for p in parts]
    return batches


@torch.no_grad()
def evaluate_shards(model, shard, num_classes, train_counts, device):
    """evaluate() of a list split across the processes (`shard` from eval_shard): predictions and labels gathered in
    rank order and counted once, so every number is the one a single process reports on the whole list."""
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
    return accuracies(pred, y, num_classes, train_counts)


class TwoViews:
    """MoCo v2's ImageNet augmentation (REFERENCE §5, the authors' main_moco.py --aug-plus), twice."""

    def __init__(self, size):
        self.t = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.2, 1.0)),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=int(0.1 * size) // 2 * 2 + 1, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, img):
        return [self.t(img), self.t(img)]


class Positions(torch.utils.data.Dataset):
    """(item…, position) of the listed images `indices` of a dataset: rwSAM's weights are per position."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return (*self.dataset[self.indices[i]], i)


class ListViews:
    """Two views of listed images per step, this process's share (DistributedSampler: one permutation seeded by
    (seed, epoch), every W-th index). Worker seeds (without workers, this process's RNG) come from (seed,
    epoch, rank): a resumed run draws the same augmentations with the same --workers."""

    def __init__(self, dataset, indices, batch_size, seed, workers, device, rank, world):
        self.subset = Positions(dataset, indices)
        self.sampler = torch.utils.data.DistributedSampler(self.subset, num_replicas=world, rank=rank, shuffle=True,
                                                           seed=seed, drop_last=True)
        self.batch_size, self.seed, self.workers, self.device, self.rank = batch_size, seed, workers, device, rank

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def epoch(self, epoch):
        self.sampler.set_epoch(epoch)
        s = stream_seed(self.seed, epoch, 2, self.rank)
        torch.manual_seed(s)
        loader = torch.utils.data.DataLoader(self.subset, self.batch_size, sampler=self.sampler, drop_last=True,
                                             num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(s))
        try:
            for views, y, pos in loader:
                yield [v.to(self.device, non_blocking=True) for v in views], y.to(self.device, non_blocking=True), pos
        except DataError as e:                   # an unreadable image mid-epoch: stop before saving anything
            fail(str(e))


def list_plain_batches(args, idx, device):
    """The training images of a file list in training order, test transform (rwSAM's KDE features)."""
    plain = Positions(FileListDataset(args.data_root, args.train_list, train=False), idx)
    loader = torch.utils.data.DataLoader(plain, 256, num_workers=args.workers, pin_memory=device.type == "cuda")
    try:
        for x, y, pos in loader:
            yield x.to(device, non_blocking=True), y, pos
    except DataError as e:                       # an unreadable image: stop before saving anything
        fail(str(e))


@torch.no_grad()
def evaluate(model, batches, num_classes, train_counts):
    """accuracies() of the model's argmax over `batches` of (x, y, _); float32 also under --amp, as bf16 logits
    tie often and argmax gives a tie to the lowest class index, a head class."""
    model.eval()
    preds, labels = zip(*[(model(x).argmax(1).cpu(), y.cpu()) for x, y, _ in batches])
    return accuracies(torch.cat(preds), torch.cat(labels), num_classes, train_counts)


def accuracies(pred, y, num_classes, train_counts):
    """Top-1, mean per-class, per-class and many/medium/few-shot accuracy (means skip a class with no test image)."""
    correct = torch.bincount(y[pred == y], minlength=num_classes).cpu()
    total = torch.bincount(y, minlength=num_classes).cpu()
    per_class = (correct.double() / total.clamp(min=1)).tolist()
    seen = total > 0
    result = {"top1": 100 * correct.sum().item() / total.sum().item(),
              "mean_class_acc": 100 * float(np.mean([a for a, s in zip(per_class, seen) if s])),
              "per_class": [round(100 * a, 2) for a in per_class]}
    for group, mask in shot_groups(train_counts).items():
        accs = [per_class[c] for c in range(num_classes) if mask[c] and seen[c]]
        result[group] = 100 * float(np.mean(accs)) if accs else None
    return result


# ----- Paper 2 §3.2 (Fig. 4, App. B): the semi-synthetic dataset -----------------------------------------

def semi_synthetic(images, labels, seed=0):
    """App. B's balanced semi-synthetic CIFAR-10: classes 0-4 (the paper's 1-5, frequent) keep their left half beside a
    random image's right half (label-irrelevant); classes 5-9 (rare) blank the left half. The imbalanced set is its step
    subset: --rho 0.002 --imb-type step keeps 5000 / 10 per class."""
    x, half = images.copy(), images.shape[2] // 2
    frequent = np.flatnonzero(labels < 5)
    x[frequent, :, half:] = images[np.random.default_rng(seed).integers(0, len(images), len(frequent)), :, half:]
    x[labels >= 5, :, :half] = 0
    return x


def write_semi_synthetic(dataset, root, out, seed=0, rare=10, download=False):
    """Three folder datasets in `out`: semi/ (all ten classes, balanced; pre-training takes its step subset),
    semi-rare/ (classes 5-9 only: the 5-way probe's 25,000 training images) and semi-rare10/ (`rare` images of each
    rare class: the paper's Supervised-rare baseline); test splits from the test images, made the same way."""
    for split in ("train", "test"):
        images, labels, names = load_split(dataset, root, split == "train", download)
        if len(names) != 10:
            raise DataError(f"the semi-synthetic dataset is built from CIFAR-10's ten classes; {root} has {len(names)}")
        x, rng = semi_synthetic(images, labels, seed), np.random.RandomState(seed)
        ten = [rng.permutation(np.flatnonzero(labels == c))[:rare] for c in range(5, 10)]
        for name, idx in (("semi", np.arange(len(x))), ("semi-rare", np.flatnonzero(labels >= 5)),
                          ("semi-rare10", np.concatenate(ten) if split == "train" else np.flatnonzero(labels >= 5))):
            for i in idx:
                folder = os.path.join(out, name, split, f"{labels[i]}-{names[labels[i]]}")
                os.makedirs(folder, exist_ok=True)
                torchvision.io.write_png(torch.from_numpy(x[i]).permute(2, 0, 1).contiguous(),
                                         os.path.join(folder, f"{i:05d}.png"))


# ----- Command line: show the subset a run would train on ------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Print the long-tailed training subset for a dataset and seed.")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--data-root", default="./data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--rho", type=float, default=0.01, help="tail/head ratio in (0, 1]; 1 = balanced")
    p.add_argument("--imb-type", default="exp", choices=("exp", "step"))
    p.add_argument("--data-seed", type=int, default=0, help="seed of the long-tailed draw")
    p.add_argument("--train-list", default=None,
                   help="full ImageNet training list ('relative/path label'): write paper 2's ImageNet variants "
                        "(App. A.1) instead of printing a CIFAR-size subset")
    p.add_argument("--lt-list", default=None,
                   help="with --train-list: Liu et al.'s ImageNet_LT_train.txt, the r = 0.004 list itself")
    p.add_argument("--out-dir", default="imagenet_variants", help="with --train-list: folder for the lists")
    p.add_argument("--semi-synthetic", default=None, metavar="OUT",
                   help="write paper 2's semi-synthetic folders (§3.2) into OUT from --dataset's images")
    args = p.parse_args(argv)
    if args.train_list:
        return imagenet_main(args)
    if args.semi_synthetic:
        try:
            write_semi_synthetic(args.dataset, args.data_root, args.semi_synthetic, args.data_seed,
                                 download=args.download)
        except DataError as e:
            fail(str(e))
        return print(f"paper 2's semi-synthetic folders in {args.semi_synthetic}: semi, semi-rare, semi-rare10")
    try:
        check_rho(args.rho)
        images, labels, names = load_split(args.dataset, args.data_root, True, args.download)
        idx = make_long_tailed(labels, args.rho, args.imb_type, args.data_seed, N_MAX.get(args.dataset),
                               CLASS_ORDER.get(args.dataset))
    except DataError as e:
        fail(str(e))
    counts = np.bincount(labels[idx], minlength=len(names))
    groups = shot_groups(counts)
    print(f"{args.dataset} train: {len(labels)} images {images.shape[1]}x{images.shape[2]}, "
          f"long-tailed subset ({args.imb_type}, rho={args.rho:g}, data seed={args.data_seed}): {len(idx)} images")
    for c, name in enumerate(names):
        group = next(g for g, mask in groups.items() if mask[c])
        print(f"  {c:3d} {name:<20s} {counts[c]:6d}  {group}")


def imagenet_main(args):
    try:
        report = write_imagenet_variants(args.train_list, args.out_dir, args.data_seed, args.lt_list)
    except DataError as e:
        fail(str(e))
    print(f"paper 2's ImageNet variants from {args.train_list}"
          + (f" and {args.lt_list}" if args.lt_list else " (no --lt-list: r0.004 is drawn on ImageNet-LT's profile)")
          + f", data seed {args.data_seed}, in {args.out_dir}/:")
    print(f"  {'list':<22} {'n':>8} {'classes':>7} {'max':>5} {'min':>4} {'r':>8}")
    for name, counts in report.items():
        c = [x for x in counts if x]
        print(f"  {name + '.txt':<22} {sum(c):8d} {len(c):7d} {max(c):5d} {min(c):4d} {min(c) / max(c):8.4g}")
    print("class counts (head first) of each long-tailed list:")
    for name, counts in report.items():
        if not name.startswith("bal-"):
            print(f"  {name}: " + " ".join(map(str, sorted(counts, reverse=True))))


if __name__ == "__main__":
    main()
