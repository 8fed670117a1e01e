"""datasets_lt.py part 1: loaders on fake files in the real formats, long-tailed subsets, errors."""
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import datasets_lt as D
from conftest import ROOT, run_script, write_file_list, write_folder


# ----- class counts (REFERENCE §1) -----------------------------------------------------------------

@pytest.mark.parametrize("n_max,C,rho,imb,total", [
    (5000, 10, 0.01, "exp", 12406), (5000, 10, 0.02, "exp", 13996), (5000, 10, 0.1, "exp", 20431),
    (5000, 10, 0.01, "step", 25250), (500, 100, 0.01, "exp", 10847), (500, 100, 0.02, "exp", 12608),
    (500, 100, 0.1, "exp", 19573), (1000, 10, 0.01, "exp", 2478), (5000, 10, 1.0, "exp", 50000)])
def test_lt_counts_totals(n_max, C, rho, imb, total):
    assert sum(D.lt_counts(n_max, C, rho, imb)) == total


def test_lt_counts_cifar10_profile():
    assert D.lt_counts(5000, 10, 0.01) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert D.lt_counts(5000, 10, 0.01, "step") == [5000] * 5 + [50] * 5


@pytest.mark.parametrize("rho", [0, -0.5, 100, 1.01])
def test_rho_outside_unit_interval_is_an_error(rho):
    with pytest.raises(D.DataError, match="must be in"):
        D.lt_counts(5000, 10, rho)


def test_rho_error_converts_the_papers_ratio():
    with pytest.raises(D.DataError, match=r"100 is --rho 0\.01"):
        D.check_rho(100)


def test_unknown_imbalance_type():
    with pytest.raises(D.DataError, match="exp or step"):
        D.lt_counts(5000, 10, 0.1, "linear")


# ----- long-tailed subsets on CIFAR-10-sized label arrays ------------------------------------------

@pytest.fixture(scope="module")
def cifar10_labels():
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10), 5000))


@pytest.mark.parametrize("rho,imb,total", [(0.01, "exp", 12406), (0.02, "exp", 13996), (0.1, "exp", 20431),
                                           (0.01, "step", 25250)])
def test_make_long_tailed_exact_counts(cifar10_labels, rho, imb, total):
    idx = D.make_long_tailed(cifar10_labels, rho, imb, seed=0, n_max=5000)
    assert len(idx) == total and len(np.unique(idx)) == total
    assert np.bincount(cifar10_labels[idx]).tolist() == D.lt_counts(5000, 10, rho, imb)


def test_make_long_tailed_cifar100_count():
    labels = np.repeat(np.arange(100), 500)
    assert len(D.make_long_tailed(labels, 0.01, "exp", 3, n_max=500)) == 10847


def test_same_seed_same_subset_other_seed_other_subset(cifar10_labels):
    a = D.make_long_tailed(cifar10_labels, 0.01, seed=1)
    assert np.array_equal(a, D.make_long_tailed(cifar10_labels, 0.01, seed=1))
    b = D.make_long_tailed(cifar10_labels, 0.01, seed=2)
    assert len(a) == len(b) and not np.array_equal(a, b)
    assert np.bincount(cifar10_labels[b], minlength=10).min() > 0


def test_svhn_rotated_class_order():
    labels = np.repeat(np.arange(10), 1200)
    idx = D.make_long_tailed(labels, 0.01, seed=0, n_max=D.N_MAX["svhn"], class_order=D.CLASS_ORDER["svhn"])
    counts = np.bincount(labels[idx])
    assert len(idx) == 2478 and counts[1] == 1000 and counts[0] == 10 and counts[9] == 16


def test_make_long_tailed_needs_enough_images():
    with pytest.raises(D.DataError, match="class 0 has 20 images"):
        D.make_long_tailed(np.repeat(np.arange(10), 20), 0.01, n_max=5000)


def test_balanced_subset_same_n(cifar10_labels):
    idx = D.balanced_subset(cifar10_labels, 12406, seed=0)
    counts = np.bincount(cifar10_labels[idx])
    assert len(idx) == 12406 and counts.max() - counts.min() == 1 and counts.tolist()[:7] == [1241] * 6 + [1240]
    assert not np.array_equal(idx, D.balanced_subset(cifar10_labels, 12406, seed=1))


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25, 0.125])
def test_downsample_keeps_profile(cifar10_labels, ratio):
    lt = D.make_long_tailed(cifar10_labels, 0.01, seed=0)
    sub = D.downsample(lt, cifar10_labels, ratio, seed=0)
    assert set(sub) <= set(lt)
    assert np.bincount(cifar10_labels[sub]).tolist() == [int(n * ratio) for n in D.lt_counts(5000, 10, 0.01)]


def test_downsample_empty_class_is_an_error():
    labels = np.repeat(np.arange(3), [40, 10, 3])
    with pytest.raises(D.DataError, match="leaves class 2 empty"):
        D.downsample(np.arange(len(labels)), labels, 0.25)


def test_carve_val_is_stratified_and_disjoint(cifar10_labels):
    lt = D.make_long_tailed(cifar10_labels, 0.01, seed=0)
    train, val = D.carve_val(lt, cifar10_labels, 0.1, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and np.array_equal(np.sort(np.r_[train, val]), lt)
    assert np.bincount(cifar10_labels[val]).tolist() == [round(0.1 * n) for n in D.lt_counts(5000, 10, 0.01)]
    t0, v0 = D.carve_val(lt, cifar10_labels, 0.0)
    assert np.array_equal(t0, lt) and len(v0) == 0


def test_shot_groups_boundaries():
    g = D.shot_groups([500, 101, 100, 20, 19, 1])
    assert g["many"].tolist() == [True, True, False, False, False, False]
    assert g["medium"].tolist() == [False, False, True, True, False, False]
    assert g["few"].tolist() == [False, False, False, False, True, True]


def test_unlabeled_pool_profile_and_cap(cifar10_labels):
    lt = D.make_long_tailed(cifar10_labels, 0.01, seed=0)
    rest = np.setdiff1d(np.arange(len(cifar10_labels)), lt)
    assert len(rest) == 37594
    # Capping class by class (asked for) reverses the profile: class 0 has nothing left, class 9 the most.
    with pytest.warns(UserWarning, match="cannot supply D_U") as w:
        idx, irr, rep = D.unlabeled_pool(cifar10_labels[rest], len(lt), 5, rho_u=1.0, seed=0, shortfall="cap")
    assert rep["requested"] == 62030 and rep["requested_per_class"] == [6203] * 10
    assert rep["supplied_per_class"][0] == 0 and rep["supplied_per_class"][9] == 4950
    assert "class 0: 6203" in str(w[0].message)
    assert len(idx) == rep["relevant"] and len(irr) == 0
    # The default keeps the profile, and a pool with nothing of the head class gives nothing: an error.
    with pytest.raises(D.DataError, match=r"cannot supply any D_U .*class\(es\) 0 have no image"):
        D.unlabeled_pool(cifar10_labels[rest], len(lt), 5, rho_u=1.0, seed=0)
    # A request the pool can meet: exact per-class profile, no warning, true labels match.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx, _, rep = D.unlabeled_pool(cifar10_labels, 2000, 5, rho_u=0.1, seed=0)
    assert np.bincount(cifar10_labels[idx]).tolist() == rep["requested_per_class"]
    assert 9990 <= sum(rep["requested_per_class"]) <= 10000
    assert rep["requested_per_class"][0] > 4 * rep["requested_per_class"][9]


@pytest.mark.parametrize("rho_u", [1.0, 0.01])
def test_short_pool_shrinks_the_total_and_keeps_the_profile(rho_u):
    """A pool shaped like CIFAR's leftovers (fewest images in the head class): never reversed."""
    avail = [5000 - n for n in D.lt_counts(4000, 10, 0.01)]               # 1000, 2603, …, 4960
    labels = np.repeat(np.arange(10), avail)
    with pytest.warns(UserWarning, match="shrunk to") as w:
        idx, _, rep = D.unlabeled_pool(labels, 12406, 5, rho_u=rho_u, seed=0)
    got = rep["supplied_per_class"]
    assert np.bincount(labels[idx], minlength=10).tolist() == got == rep["requested_per_class"]
    assert all(a >= b for a, b in zip(got, got[1:])) and got[0] <= 1000
    base = D.lt_counts(6203, 10, rho_u)                                      # the asked profile at some size n …
    sizes = [n for n in range(sum(got), sum(got) + 20) if [int(b * n / sum(base)) for b in base] == got]
    assert sizes and int(base[0] * (max(sizes) + 1) / sum(base)) > 1000      # … the largest class 0 can fill
    assert f"({rep['size'] / 12406:.2f}x |D_L|)" in str(w[0].message) and "class 0 (1000 images)" in str(w[0].message)
    assert rep["achieved_mult"] == pytest.approx(rep["size"] / 12406)


def test_svhn_unlabeled_profile_follows_the_rotated_class_order():
    labels = np.repeat(np.arange(10), 5000)
    n_l = sum(D.lt_counts(1000, 10, 0.02))
    idx, _, rep = D.unlabeled_pool(labels, n_l, 5, rho_u=0.02, class_order=D.CLASS_ORDER["svhn"])
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.argmax() == 1 and counts.argmin() == 0
    assert counts[[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]].tolist() == [int(b * 5 * n_l / sum(D.lt_counts(5 * n_l // 10, 10, 0.02)))
                                                               for b in D.lt_counts(5 * n_l // 10, 10, 0.02)]


def test_unlabeled_pool_relevance_mix():
    labels = np.repeat(np.arange(4), 500)
    irrelevant = np.arange(10_000, 10_600)
    idx, irr, rep = D.unlabeled_pool(labels, 200, 5, 1.0, seed=0, irrelevant=irrelevant, relevance=0.6)
    assert len(idx) == 600 and len(irr) == 400 and set(irr) <= set(irrelevant)
    with pytest.raises(D.DataError, match="irrelevant"):
        D.unlabeled_pool(labels, 200, 5, 1.0, relevance=0.5)


def test_relevance_sweep_holds_ratio_and_size():
    """Fig. 2: achieved ratio within one image of the request, |D_U| the same at every point."""
    labels = np.repeat(np.arange(10), 10_000)
    irrelevant = np.arange(50_000)
    n_l = sum(D.lt_counts(5000, 10, 0.02))                                  # CIFAR-10-LT rho = 50: 13,996
    sizes = set()
    for r in (0.2, 0.4, 0.6, 0.8):
        idx, irr, rep = D.unlabeled_pool(labels, n_l, 2, rho_u=0.02, irrelevant=irrelevant, relevance=r)
        sizes.add(len(idx) + len(irr))
        assert abs(len(idx) - r * (len(idx) + len(irr))) <= 1 and rep["achieved_relevance"] == len(idx) / rep["size"]
        counts = np.bincount(labels[idx], minlength=10)
        assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sizes == {2 * n_l}


# ----- loaders on fake files in the real formats ---------------------------------------------------

def test_load_cifar10(fake_cifar10):
    root, data = fake_cifar10
    for train, split in ((True, "train"), (False, "test")):
        x, y, names = D.load_split("cifar10", root, train)
        assert x.dtype == np.uint8 and x.shape == (len(data[split][1]), 32, 32, 3) and y.dtype == np.int64
        assert np.array_equal(x, data[split][0]) and np.array_equal(y, data[split][1])
    assert names == [f"class{c:03d}" for c in range(10)]


def test_load_cifar100(fake_cifar100):
    root, data = fake_cifar100
    x, y, names = D.load_split("cifar100", root, True)
    assert np.array_equal(x, data["train"][0]) and np.array_equal(y, data["train"][1]) and len(names) == 100


def test_load_svhn_all_splits(fake_svhn):
    root, data = fake_svhn
    for train, split in ((True, "train"), (False, "test"), ("extra", "extra")):
        x, y, _ = D.load_split("svhn", root, train)
        assert np.array_equal(x, data[split][0]) and np.array_equal(y, data[split][1])
    assert (y == 0).sum() == 12                                   # digit 0 is stored as 10 on disk


def test_load_stl10(fake_stl10):
    root, data = fake_stl10
    x, y, names = D.load_split("stl10", root, False)
    assert x.shape == (10, 96, 96, 3) and np.array_equal(x, data["test"][0]) and np.array_equal(y, data["test"][1])
    assert names[0] == "stl0"
    x, y, _ = D.load_split("stl10", root, "unlabeled")
    assert np.array_equal(x, data["unlabeled"][0]) and (y == -1).all()


def test_load_folder(fake_folder):
    root, data = fake_folder
    x, y, names = D.load_split("folder", root, True)
    assert names == ["ant", "bee", "cat"]
    assert np.array_equal(x, data["train"][0]) and np.array_equal(y, data["train"][1])
    assert np.bincount(y).tolist() == [4, 5, 6]


def test_folder_without_test_split(tmp_path):
    write_folder(tmp_path, splits=("train",))
    with pytest.raises(D.DataError, match="test"):
        D.load_split("folder", tmp_path, False)


def test_folder_mixed_sizes(tmp_path):
    write_folder(tmp_path, splits=("train",))
    write_folder(tmp_path / "x", splits=("train",), size=24)
    (tmp_path / "x" / "train" / "ant" / "0000.png").rename(tmp_path / "train" / "ant" / "big.png")
    with pytest.raises(D.DataError, match="differ in size"):
        D.load_split("folder", tmp_path, True)


def test_folder_test_classes_are_matched_by_name(tmp_path, capsys):
    """A test folder without 'ant' keeps bee = 1 and cat = 2 (not shifted to 0 and 1); 'ant' is
    reported as absent."""
    data = write_folder(tmp_path)
    shutil.rmtree(tmp_path / "test" / "ant")
    x, y, names = D.load_split("folder", tmp_path, False)
    assert names == ["ant", "bee", "cat"]
    assert sorted(set(y.tolist())) == [1, 2]
    assert np.array_equal(x, data["test"][0][data["test"][1] != 0])
    assert np.array_equal(y, data["test"][1][data["test"][1] != 0])
    assert "'ant'" in capsys.readouterr().err


def test_folder_empty_test_class_is_absent_not_an_error(tmp_path, capsys):
    write_folder(tmp_path)
    for f in (tmp_path / "test" / "bee").iterdir():
        f.unlink()
    _, y, names = D.load_split("folder", tmp_path, False)
    assert names == ["ant", "bee", "cat"] and np.bincount(y, minlength=3).tolist() == [2, 0, 2]
    assert "'bee'" in capsys.readouterr().err


def test_folder_test_class_unknown_to_training(tmp_path):
    write_folder(tmp_path)
    shutil.copytree(tmp_path / "test" / "ant", tmp_path / "test" / "wasp")
    with pytest.raises(D.DataError, match="'wasp'"):
        D.load_split("folder", tmp_path, False)


def test_folder_needs_two_classes(tmp_path):
    write_folder(tmp_path, classes=("cat",), per_class=(6,))
    with pytest.raises(D.DataError, match="at least two"):
        D.load_split("folder", tmp_path, True)


def test_one_class_labels_cannot_make_a_long_tailed_subset():
    with pytest.raises(D.DataError, match="at least two"):
        D.make_long_tailed(np.zeros(10, dtype=np.int64), 0.5)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_folder_unreadable_image_names_the_file(tmp_path, content):
    write_folder(tmp_path, splits=("train",))
    bad = tmp_path / "train" / "bee" / "0001.png"
    content = bad.read_bytes()[:60] if content == "truncated" else content
    bad.write_bytes(content)
    with pytest.raises(D.DataError, match="0001.png' is not a readable image") as e:
        D.load_split("folder", tmp_path, True)
    assert "\n" not in str(e.value)


def test_folder_order_matches_imagefolder(fake_folder):
    """Same files in the same order as torchvision's ImageFolder, so seeded subsets are unchanged."""
    import torchvision
    root, _ = fake_folder
    ds = torchvision.datasets.ImageFolder(root / "train")
    assert D._folder_files(root / "train") == {c: [f for f, t in ds.samples if ds.classes[t] == c] for c in ds.classes}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn", "stl10"])
def test_missing_data_offline_says_what_to_pass(tmp_path, dataset):
    with pytest.raises(D.DataError) as e:
        D.load_split(dataset, tmp_path / "nothing", True)
    msg = str(e.value)
    assert "--download" in msg and "--data-root" in msg and "\n" not in msg


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(D.DataError, match="unknown dataset 'mnist'"):
        D.load_split("mnist", tmp_path, True)
    with pytest.raises(D.DataError, match="no split 'extra'"):
        D.load_split("cifar10", tmp_path, "extra")


def test_download_without_network_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(D.DataError, match="could not download cifar10"):
        D.load_split("cifar10", tmp_path, True, download=True)


def test_mean_std_folder_from_training_images(fake_folder):
    root, data = fake_folder
    x = data["train"][0]
    mean, std = D.mean_std("folder", x)
    assert np.allclose(mean, x.reshape(-1, 3).mean(0) / 255) and np.allclose(std, (x.reshape(-1, 3) / 255).std(0, ddof=1))
    assert D.mean_std("cifar10") == (D.CIFAR_MEAN, D.CIFAR_STD)


# ----- file lists (ImageNet-LT / iNaturalist) ------------------------------------------------------

def test_file_list_dataset(tmp_path):
    lst = write_file_list(tmp_path)
    ds = D.FileListDataset(tmp_path, lst, train=True)
    assert len(ds) == 12 and ds.num_classes == 3 and np.bincount(ds.labels).tolist() == [4, 4, 4]
    x, y = ds[5]
    assert x.shape == (3, 224, 224) and y == 1
    loader = torch.utils.data.DataLoader(D.FileListDataset(tmp_path, lst, train=False), batch_size=4, num_workers=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 224, 224) and yb.tolist() == [0, 0, 0, 0]


def test_file_list_errors(tmp_path):
    lst = write_file_list(tmp_path)
    with pytest.raises(D.DataError, match="12 of the 12 images listed in .* do not exist.*check --data-root"):
        D.FileListDataset(tmp_path / "elsewhere", lst)
    bad = tmp_path / "bad.txt"
    bad.write_text("images/n00000/0.jpg 0\nimages/n00000/1.jpg\n")
    with pytest.raises(D.DataError, match="bad.txt:2"):
        D.FileListDataset(tmp_path, bad)


def test_unreadable_listed_image_is_one_line_from_a_worker(tmp_path):
    """A DataLoader worker re-raises the dataset's DataError with its whole traceback as the message; str()
    gives back the one line naming the file and its list."""
    lst = write_file_list(tmp_path, num_classes=2, per_class=1)
    (tmp_path / "images" / "n00001" / "0.jpg").write_bytes(b"not a picture")
    ds = D.FileListDataset(tmp_path, lst, train=False)
    for workers in (0, 1):
        with pytest.raises(D.DataError) as e:
            list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers))
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and "Traceback" not in msg, msg
        assert msg.startswith(f"'{tmp_path}/images/n00001/0.jpg' (listed in {lst}) is not a readable image ("), msg


# ----- command line and imports --------------------------------------------------------------------

def test_cli_prints_the_subset(fake_folder):
    root, _ = fake_folder
    r = run_script("datasets_lt.py", "--dataset", "folder", "--data-root", root, "--rho", "0.5")
    assert r.returncode == 0, r.stderr
    assert "long-tailed subset (exp, rho=0.5, data seed=0): 8 images" in r.stdout   # n_max 4: 4 + int(4·0.5^½) + int(4·0.5)


@pytest.mark.parametrize("args,msg", [(["--rho", "100"], "--rho 0.01"),
                                      (["--dataset", "cifar10"], "--download")])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, msg):
    r = run_script("datasets_lt.py", "--data-root", tmp_path, *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_imports_only_torch_torchvision_numpy_scipy():
    """datasets_lt (and run_lt, which it imports for fail) bring in no package beyond the four."""
    code = ("import sys; import torch, torchvision, numpy, scipy, scipy.io; before = set(sys.modules); "
            "import datasets_lt; new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new - set(sys.stdlib_module_names) - "
            "{'datasets_lt', 'run_lt', 'torch', 'torchvision', 'numpy', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unlabeled_pool_empty():
    """No candidate left (rho 1 labels every image): one clear error, or nothing when nothing is asked."""
    none = np.zeros(0, dtype=np.int64)
    with pytest.raises(D.DataError, match="pool is empty"):
        D.unlabeled_pool(none, 10, 5)
    idx, irr, report = D.unlabeled_pool(none, 10, 0)
    assert len(idx) == len(irr) == 0 and report["requested"] == 0


def test_semi_synthetic_folders_are_paper2_appendix_b(tmp_path):
    """Paper 2 §3.2 / App. B: frequent classes 0-4 keep their left half and take a random image's right half, rare
    classes 5-9 a blank left half and their own right half; semi-rare holds every rare image (the 5-way probe),
    semi-rare10 `rare` of each; --rho 0.002 --imb-type step on 5000 a class keeps 5000 / 10."""
    from conftest import write_cifar
    from torchvision.io import read_image
    data = write_cifar(tmp_path, per_class_train=4, per_class_test=2)
    D.write_semi_synthetic("cifar10", str(tmp_path), str(tmp_path / "out"), rare=2)
    for split, (images, labels) in data.items():
        right_halves = {images[j][:, 16:].tobytes() for j in range(len(images))}
        files = sorted((tmp_path / "out" / "semi" / split).glob("*/*.png"))
        assert len(files) == len(labels)
        for f in files:
            i, x = int(f.stem), read_image(str(f)).permute(1, 2, 0).numpy()
            assert f.parent.name == f"{labels[i]}-class{labels[i]:03d}"
            if labels[i] < 5:
                assert (x[:, :16] == images[i][:, :16]).all() and x[:, 16:].tobytes() in right_halves
            else:
                assert (x[:, :16] == 0).all() and (x[:, 16:] == images[i][:, 16:]).all()
        rare = sorted(f.name for f in (tmp_path / "out" / "semi-rare" / split).glob("*/*.png"))
        assert rare == sorted(f.name for f in files if int(f.stem) in set(np.flatnonzero(labels >= 5)))
        ten = list((tmp_path / "out" / "semi-rare10" / split).glob("*/*.png"))
        assert len(ten) == (10 if split == "train" else len(rare)) and {f.name for f in ten} <= set(rare)
    assert D.lt_counts(5000, 10, 0.002, "step") == [5000] * 5 + [10] * 5
