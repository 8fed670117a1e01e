"""Paper 2's ImageNet variants (App. A.1): Pareto / balanced / downsampled lists on a fake 1000-class list."""
import numpy as np
import pytest

import datasets_lt as D
from conftest import run_script

LT = D.pareto_counts(1000, 1280, 5, 115_846)
MORE = D.pareto_counts(1000, 1200, 3, 80_218)


def fake_labels(seed=0):
    """1000 classes; class c holds max(LT[c], MORE[c], 130) images (ImageNet holds 732–1300), shuffled."""
    avail = np.maximum(np.maximum(LT, MORE), 130)
    labels = np.repeat(np.arange(1000), avail)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def test_pareto_profiles_have_the_papers_head_tail_and_total():
    assert (LT[0], LT[-1], sum(LT)) == (1280, 5, 115_846)           # ImageNet-LT, r = 5/1280 ≈ 0.004
    assert (MORE[0], MORE[-1], sum(MORE)) == (1200, 3, 80_218)      # r = 3/1200 = 0.0025
    assert all(a >= b for a, b in zip(MORE, MORE[1:])) and all(a >= b for a, b in zip(LT, LT[1:]))
    with pytest.raises(D.DataError):
        D.pareto_counts(10, 100, 5, 40)                              # below C·n_min


def test_variants_counts_on_a_fake_1000_class_list():
    labels = fake_labels()
    v = D.imagenet_variants(labels, seed=0)
    counts = {k: np.bincount(labels[idx], minlength=1000) for k, (src, idx) in v.items()}
    assert sorted(counts["r0.004"], reverse=True) == LT and sorted(counts["r0.0025"], reverse=True) == MORE
    assert counts["bal-r0.004"].sum() == 115_846 and set(counts["bal-r0.004"]) == {115, 116}
    assert counts["bal-r0.0025"].sum() == 80_218 and set(counts["bal-r0.0025"]) == {80, 81}
    for name in ("r0.004", "r0.0025"):
        for q in (0.75, 0.5, 0.25, 0.125):
            sub = counts[f"{name}-sub{q:g}"]
            assert (sub == np.maximum((counts[name] * q).astype(int), counts[name] > 0)).all()   # int(q·n_c), ≥ 1
            assert counts[f"bal-{name}-sub{q:g}"].sum() == sub.sum()  # balanced n equals the LT n
            assert counts[f"bal-{name}-sub{q:g}"].max() - counts[f"bal-{name}-sub{q:g}"].min() <= 1
            assert set(v[f"{name}-sub{q:g}"][1]) <= set(v[name][1])   # a subset of its full-size list
    assert len(v) == 20 and all(src == "full" for src, _ in v.values())
    again = D.imagenet_variants(labels, seed=0)
    assert all((again[k][1] == v[k][1]).all() for k in v)
    other = D.imagenet_variants(labels, seed=1)
    assert not (other["r0.0025"][1].size == v["r0.0025"][1].size and (other["r0.0025"][1] == v["r0.0025"][1]).all())


def test_command_writes_the_lists_and_uses_imagenet_lt_itself(tmp_path):
    labels = fake_labels()
    full = tmp_path / "train.txt"
    full.write_text("".join(f"train/n{y:05d}/{i}.JPEG {y}\n" for i, y in enumerate(labels)))
    lt_idx = D.profile_subset(labels, LT, seed=7)                     # a stand-in for ImageNet_LT_train.txt
    lt = tmp_path / "lt.txt"
    lt.write_text("".join(f"train/n{labels[i]:05d}/{i}.JPEG {labels[i]}\n" for i in lt_idx))
    r = run_script("datasets_lt.py", "--train-list", full, "--lt-list", lt, "--out-dir", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v" / "r0.004.txt").read_text() == lt.read_text()
    lines = (tmp_path / "v" / "r0.0025-sub0.5.txt").read_text().splitlines()
    assert len(lines) == sum(max(1, int(0.5 * c)) for c in MORE)
    more = np.bincount([int(l.split()[1]) for l in (tmp_path / "v" / "r0.0025.txt").read_text().splitlines()],
                       minlength=1000)
    lt_counts = np.bincount(labels[lt_idx], minlength=1000)
    assert (np.argsort(-more, kind="stable")[:20] == np.argsort(-lt_counts, kind="stable")[:20]).all()  # LT's order
    assert "bal-r0.0025.txt" in r.stdout and "80218" in r.stdout and "115846" in r.stdout
    bad = run_script("datasets_lt.py", "--train-list", tmp_path / "missing.txt")
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: image list '{tmp_path / 'missing.txt'}' does not exist"
