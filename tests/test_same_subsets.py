"""Paper 2 fixes each data variant once for all algorithms (App. A.1): the same --data-seed gives the same
balanced / downsampled training images in ldam_drw.py, simsiam_rwsam.py and moco_ssp.py, read back from the
train_indices.json each run saves (different training seeds on purpose)."""
import json

import numpy as np
import pytest

import datasets_lt as D
from conftest import run_script, write_folder

COMMON = ["--rho", "0.2", "--balanced", "--subsample", "0.5", "--data-seed", "3", "--epochs", "1", "--gpu", "-1"]


@pytest.mark.slow
def test_three_scripts_train_on_the_same_images(tmp_path):
    root = tmp_path / "data"
    write_folder(root, classes=tuple("abcde"), per_class=(40,) * 5, per_class_test=2, size=8, easy=True)
    data = ["--dataset", "folder", "--data-root", root]
    runs = {"ldam_drw.py": ["--batch-size", "16", "--seed", "1", "--same-epochs"],
            "simsiam_rwsam.py": ["--opt", "sgd", "--batch-size", "16", "--knn-every", "-1", "--seed", "2", "--same-epochs"],
            "moco_ssp.py": ["--arch", "resnet10", "--batch-size", "16", "--queue", "32", "--knn-every", "0",
                            "--seed", "4", "--same-epochs"]}
    saved = {}
    for script, extra in runs.items():
        out = tmp_path / script[:-3]
        r = run_script(script, *data, *COMMON, *extra, "--out", out)
        assert r.returncode == 0, r.stderr
        saved[script] = json.loads((out / "train_indices.json").read_text())
    first = saved["ldam_drw.py"]
    assert all(s == first for s in saved.values())
    labels = D.load_split("folder", root, True)[1]
    # LT [40, 26, 17, 11, 8] → halved [20, 13, 8, 5, 4] = 50 → balanced, 10 per class
    assert np.bincount(labels[first["train"]]).tolist() == [10] * 5 and first["val"] == []
