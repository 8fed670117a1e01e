"""Benchmark: datasets_lt's device-resident augmentation vs the PIL + DataLoader pipeline it replaces.

Both pipelines implement the same transforms (REFERENCE §2 and §6):
  supervised  RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, batch 128
  ssl         two views of RandomResizedCrop(32, scale=(0.2, 1)) + flip + ColorJitter(0.4, 0.4, 0.4, 0.1)
              with p 0.8 + RandomGrayscale(0.2) + ToTensor + Normalize, batch 512

    python bench_pipeline.py --gpu 0                # on a GPU
    python bench_pipeline.py --gpu -1 --images 4096 # on CPU

Prints, side by side from one run: milliseconds per batch and images per second for the batched
ops (one batch at a time, and a whole epoch through GPULoader), and images per second for the PIL
DataLoader (workers as given, batches moved to the device). Random uint8 images stand in for CIFAR;
augmentation cost does not depend on the pixel values.
"""
import argparse
import time

import numpy as np
import torch
import torchvision.transforms as T

import datasets_lt as D


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    p.add_argument("--images", type=int, default=12406, help="dataset size (12,406 = CIFAR-10-LT rho 0.01)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for the PIL pipeline")
    p.add_argument("--repeats", type=int, default=20, help="timed batches for the per-batch figures")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    fn()                                                       # warm-up (allocator, kernels)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images, transform, views):
        self.images, self.transform, self.views = images, transform, views

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.images[i])
        return [self.transform(img) for _ in range(self.views)]


def pil_images_per_second(images, transform, views, batch, workers, device):
    loader = torch.utils.data.DataLoader(PILDataset(images, transform, views), batch_size=batch, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0, drop_last=True,
                                         pin_memory=device.type == "cuda")     # as the scripts' DataLoader path
    for _ in loader:                                           # warm-up epoch: workers start, caches fill
        break
    t = time.perf_counter()
    n = 0
    for views_batch in loader:
        [v.to(device, non_blocking=True) for v in views_batch]
        n += len(views_batch[0])
    sync(device)
    return n / (time.perf_counter() - t)


def main():
    args = parse_args()
    device = torch.device(f"cuda:{args.gpu}" if args.gpu >= 0 and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)                          # the DataLoader pins on the current device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(args.images) % 10
    x = D.to_device(images, device)
    g = torch.Generator(device=device).manual_seed(0)
    mb = x.numel() * x.element_size() / 2 ** 20
    print(f"device: {name}   images: {args.images} (uint8 on device: {mb:.1f} MB; CIFAR-10's 50,000: "
          f"{50000 * 3 * 32 * 32 / 2 ** 20:.1f} MB)   torch {torch.__version__}")

    norm = T.Normalize(D.CIFAR_MEAN, D.CIFAR_STD)
    sup_pil = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    ssl_pil = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                         T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                         T.ToTensor(), norm])
    rows = []
    for kind, batch, views, pil_tf in (("supervised", 128, 1, sup_pil), ("ssl 2 views", 512, 2, ssl_pil)):
        xb = x[:batch]
        if views == 1:
            one = lambda: D.normalize(D.random_crop_flip(xb, g), D.CIFAR_MEAN, D.CIFAR_STD)
        else:
            one = lambda: [D.normalize(D.ssl_augment(xb, g, 32), D.CIFAR_MEAN, D.CIFAR_STD) for _ in range(2)]
        per_batch = timed(one, device, args.repeats)
        loader = D.GPULoader(x, labels, batch, D.CIFAR_MEAN, D.CIFAR_STD, device,
                             augment="crop_flip" if views == 1 else "ssl", views=views, drop_last=True)
        epoch = timed(lambda: [b for b in loader.epoch(0)], device, 3)
        gpu_rate = len(loader) * batch / epoch
        pil_rate = pil_images_per_second(images, pil_tf, views, batch, args.workers, device)
        rows.append((kind, batch, per_batch * 1e3, batch / per_batch, gpu_rate, pil_rate))

    print(f"{'pipeline':<12} {'batch':>5} {'ms/batch':>9} {'img/s (batch)':>14} {'img/s (epoch)':>14} "
          f"{'img/s PIL x' + str(args.workers):>16} {'speed-up':>9}")
    for kind, batch, ms, rate, gpu_rate, pil_rate in rows:
        print(f"{kind:<12} {batch:>5} {ms:>9.2f} {rate:>14,.0f} {gpu_rate:>14,.0f} {pil_rate:>16,.0f} "
              f"{gpu_rate / pil_rate:>8.1f}x")


if __name__ == "__main__":
    main()
