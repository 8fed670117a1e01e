"""datasets_lt.py part 2: the batched augmentations against torchvision, their random parameters
against torchvision's sampling rules, and the device-resident loader.

Tolerances. Crop/flip is exact. The SSL ops are compared with torchvision's functional ops on
float tensors to 1e-5 (float32 round-off). Against the PIL path the authors ran, which rounds to
uint8 after every op, they differ by at most 1.5/255 per pixel, except hue: PIL rotates hue in
8-bit HSV, which moves single pixels by up to ~16/255 (mean 0.8/255).
"""
import numpy as np
import pytest
import scipy.stats
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import datasets_lt as D


def _pil(img_uint8_chw):
    return Image.fromarray(img_uint8_chw.permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def batch():
    return torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# ----- supervised crop + flip ----------------------------------------------------------------------

def test_crop_flip_equals_torchvision_exactly(batch):
    g = torch.Generator().manual_seed(1)
    top, left = torch.randint(0, 9, (24,), generator=g), torch.randint(0, 9, (24,), generator=g)
    flip = torch.rand(24, generator=g) < 0.5
    out = D.crop_flip(batch, top, left, flip)
    for b in range(24):
        ref = TF.crop(TF.pad(_pil(batch[b]), 4), int(top[b]), int(left[b]), 32, 32)
        ref = TF.hflip(ref) if flip[b] else ref
        assert torch.equal(out[b], TF.pil_to_tensor(ref))
        ref_t = TF.crop(TF.pad(batch[b], [4]), int(top[b]), int(left[b]), 32, 32)
        assert torch.equal(out[b], TF.hflip(ref_t) if flip[b] else ref_t)


def test_random_crop_flip_parameters_are_uniform():
    n = 18_000
    rows = torch.arange(1, 33).view(32, 1).expand(32, 32)
    img = torch.stack([rows, rows.T, torch.zeros_like(rows)]).to(torch.uint8)      # pixel = its (row, col) + 1
    out = D.random_crop_flip(img.expand(n, 3, 32, 32), torch.Generator().manual_seed(0)).long()
    top = out[:, 0, 16, 16] - 13
    step = out[:, 1, 16, 17] - out[:, 1, 16, 16]
    flip = step == -1
    left = out[:, 1, 16, 16] - torch.where(flip, 12, 13)
    assert set(step.tolist()) == {-1, 1}
    for v in (top, left):
        counts = torch.bincount(v, minlength=9)
        assert len(counts) == 9 and scipy.stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert abs(flip.float().mean().item() - 0.5) < 4 * 0.5 / n ** 0.5


# ----- SSL ops with fixed parameters ---------------------------------------------------------------

def test_resized_crop_matches_torchvision(batch):
    g = torch.Generator().manual_seed(2)
    top, left, h, w = D.sample_resized_crop(24, 32, 32, g, "cpu")
    flip = torch.rand(24, generator=g) < 0.5
    out = D.resized_crop(batch, top, left, h, w, 32, flip)
    xf = batch.float() / 255
    for b in range(24):
        args = int(top[b]), int(left[b]), int(h[b]), int(w[b]), [32, 32]
        ref = TF.resized_crop(xf[b], *args, antialias=True)
        ref = TF.hflip(ref) if flip[b] else ref
        assert torch.allclose(out[b], ref, atol=1e-5)
        ref_pil = TF.resized_crop(_pil(batch[b]), *args)
        ref_pil = TF.to_tensor(TF.hflip(ref_pil) if flip[b] else ref_pil)
        assert (out[b] - ref_pil).abs().max() <= 1.5 / 255


@pytest.mark.parametrize("name,lo,hi", [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                                        ("saturation", 0.6, 1.4), ("hue", -0.1, 0.1)])
def test_jitter_ops_match_torchvision(batch, name, lo, hi):
    ours, theirs = getattr(D, f"adjust_{name}"), getattr(TF, f"adjust_{name}")
    f = torch.linspace(lo, hi, 24)
    xf = batch.float() / 255
    out = ours(xf, f)
    for b in range(24):
        assert torch.allclose(out[b], theirs(xf[b], float(f[b])), atol=1e-5)
        pil = TF.to_tensor(theirs(_pil(batch[b]), float(f[b])))
        assert (out[b] - pil).abs().max() <= (17 if name == "hue" else 1.5) / 255


def test_color_jitter_applies_ops_in_the_given_order(batch):
    xf = batch[:4].float() / 255
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05]] * 4)
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    out = D.color_jitter(xf, factors, orders)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(4):
        ref = xf[b]
        for op in orders[b].tolist():
            ref = fns[op](ref, float(factors[b, op]))
        assert torch.allclose(out[b], ref, atol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-3)          # order matters, so it was honoured


def test_color_jitter_with_random_orders_equals_op_by_op(batch):
    """Many images with sampled factors and orders (some ops absent from some slots) against applying
    torchvision's ops one image at a time."""
    xf = batch.float() / 255
    factors, orders = D.sample_jitter(len(xf), torch.Generator().manual_seed(3), "cpu")
    out = D.color_jitter(xf, factors, orders)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(len(xf)):
        ref = xf[b]
        for op in orders[b].tolist():
            ref = fns[op](ref, float(factors[b, op]))
        assert torch.allclose(out[b], ref, atol=1e-5)
    assert torch.equal(D.color_jitter(xf[:1], factors[:1], orders[:1]), out[:1])


def test_grayscale_and_blur_match_torchvision(batch):
    xf = batch.float() / 255
    assert torch.allclose(D._gray(xf), TF.rgb_to_grayscale(xf), atol=1e-6)
    sigma = torch.linspace(0.1, 2.0, 24)
    out = D.gaussian_blur(xf, sigma, 9)
    for b in range(24):
        assert torch.allclose(out[b], TF.gaussian_blur(xf[b], [9, 9], [float(sigma[b])] * 2), atol=1e-5)


# ----- random parameters follow torchvision's rules ------------------------------------------------

@pytest.mark.parametrize("height,width", [(32, 32), (32, 4)])        # (32, 4): most draws take the fallback
def test_resized_crop_boxes_follow_torchvision(height, width):
    n = 20_000
    top, left, h, w = D.sample_resized_crop(n, height, width, torch.Generator().manual_seed(0), "cpu")
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.empty(1, height, width), [0.2, 1.0], [3 / 4, 4 / 3])
                    for _ in range(n)])
    ours = torch.stack([top, left, h, w], 1).numpy()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    assert (ours[:, 2:] > 0).all()
    area, ref_area = ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3]
    aspect, ref_aspect = ours[:, 3] / ours[:, 2], ref[:, 3] / ref[:, 2]
    for a, b in ((area, ref_area), (aspect, ref_aspect), (ours[:, 0], ref[:, 0]), (ours[:, 1], ref[:, 1])):
        assert scipy.stats.ks_2samp(a, b).pvalue > 1e-3
    if width == 32:
        assert 0.17 <= area.min() / 1024 and area.max() / 1024 <= 1.0       # 0.2 less side rounding
        assert np.log(aspect).min() > np.log(3 / 4) - 0.1 and np.log(aspect).max() < np.log(4 / 3) + 0.1


def test_jitter_factors_and_orders():
    n = 24_000
    factors, order = D.sample_jitter(n, torch.Generator().manual_seed(0), "cpu", (0.4, 0.4, 0.4, 0.1))
    for j, (lo, hi) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
        f = factors[:, j].numpy()
        assert lo <= f.min() and f.max() <= hi
        assert scipy.stats.kstest(f, scipy.stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    perms = {p: 0 for p in map(tuple, order.tolist())}
    for p in map(tuple, order.tolist()):
        perms[p] += 1
    assert len(perms) == 24 and scipy.stats.chisquare(list(perms.values())).pvalue > 1e-3


def test_ssl_augment_probabilities():
    """Jitter applied with p 0.8 and grayscale with p 0.2: count grey outputs of a saturated image."""
    n = 8000
    red = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 200
    out = D.ssl_augment(red, torch.Generator().manual_seed(0), 32)
    grey = (out.amax(1) - out.amin(1)).amax((1, 2)) < 1e-6
    assert abs(grey.float().mean().item() - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5
    untouched = (out[:, 0] == 200 / 255).all(dim=(1, 2)) & (out[:, 1:] == 0).all(dim=(1, 2, 3))
    assert abs(untouched.float().mean().item() - 0.2 * 0.8) < 4 * (0.16 * 0.84 / n) ** 0.5


# ----- the loader ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [200, 100, 50, 25, 5])
    return rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels


def _loader(data, **kw):
    kw = {"augment": "crop_flip", "seed": 3, **kw}
    return D.GPULoader(data[0], data[1], 64, D.CIFAR_MEAN, D.CIFAR_STD, "cpu", **kw)


def test_loader_epoch_is_a_permutation_and_reproducible(data):
    loader = _loader(data)
    batches = list(loader.epoch(7))
    idx = torch.cat([i for _, _, i in batches])
    assert len(batches) == len(loader) == 6 and sorted(idx.tolist()) == list(range(380))
    assert all(torch.equal(y, torch.as_tensor(data[1])[i]) for _, y, i in batches)
    again = list(_loader(data).epoch(7))                  # a fresh loader, as after a resume
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(batches, again))
    other = torch.cat([i for _, _, i in loader.epoch(8)])
    assert not torch.equal(idx, other)


def test_loader_drop_last(data):
    loader = _loader(data, drop_last=True)
    sizes = [len(y) for _, y, _ in loader.epoch(0)]
    assert sizes == [64] * 5 and len(loader) == 5


def test_loader_test_mode_is_totensor_normalize(data):
    loader = _loader(data, augment=None)
    x, y, idx = next(loader.epoch(0))
    assert idx.tolist() == list(range(64))
    ref = T.Compose([T.ToTensor(), T.Normalize(D.CIFAR_MEAN, D.CIFAR_STD)])
    for b in (0, 17, 63):
        assert torch.allclose(x[b], ref(Image.fromarray(data[0][b])), atol=1e-6)


def test_loader_balanced_sampling_draws_classes_uniformly(data):
    loader = _loader(data, chunk=64)
    w = D.balanced_sample_weights(data[1])
    ys = torch.cat([torch.cat([y for _, y, _ in loader.epoch(e, weights=w)]) for e in range(30)])
    counts = torch.bincount(ys, minlength=5).numpy()
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    plain = torch.cat([y for _, y, _ in loader.epoch(0)])
    assert torch.bincount(plain).tolist() == [200, 100, 50, 25, 5]


def test_loader_ssl_views(data):
    loader = _loader(data, augment="ssl", views=2)
    (v1, v2), y, idx = next(loader.epoch(0))
    assert v1.shape == v2.shape == (64, 3, 32, 32) and not torch.allclose(v1, v2)


def test_loader_and_weights_accept_tensors(data):
    labels = torch.as_tensor(data[1])
    assert torch.equal(D.balanced_sample_weights(labels), D.balanced_sample_weights(data[1]))
    a = [i for _, _, i in _loader(data).epoch(1)]
    b = [i for _, _, i in D.GPULoader(torch.as_tensor(data[0]).permute(0, 3, 1, 2).contiguous(), labels, 64,
                                      D.CIFAR_MEAN, D.CIFAR_STD, "cpu", augment="crop_flip", seed=3).epoch(1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_no_flip_keeps_every_other_draw_and_never_mirrors():
    """flip=False (--no-flip, paper 2's semi-synthetic halves): the same crops as with flips, none mirrored."""
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    g = lambda: torch.Generator().manual_seed(0)
    plain = D.random_crop_flip(x, g(), flip=False)
    h = g()
    top, left = torch.randint(0, 9, (64,), generator=h), torch.randint(0, 9, (64,), generator=h)
    assert torch.equal(plain, D.crop_flip(x, top, left, torch.zeros(64, dtype=torch.bool)))
    assert not torch.equal(D.random_crop_flip(x, g()), plain)                           # flips happen by default
    halves = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    halves[..., 4:] = 255                                                                 # dark left, bright right
    view = lambda flip: D.ssl_augment(halves, g(), 8, scale=(1, 1), p_jitter=0, p_gray=0, flip=flip)
    left_darker = lambda v: v[..., :4].mean((1, 2, 3)) < v[..., 4:].mean((1, 2, 3))
    assert left_darker(view(False)).all() and not left_darker(view(True)).all()
