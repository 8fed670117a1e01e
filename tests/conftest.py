"""Test harness: tiny fake datasets written in the real on-disk formats, so the real loaders run.

Only torchvision's md5 check is replaced (by a does-the-file-exist check): the fake files cannot
match the published checksums, and a missing file must still be reported as missing.

Keeping the suite fast (`python -m pytest -q tests` must stay well under 6 minutes on an idle 2-core machine):
- Run a script in-process, `module.main([...])`, unless process isolation is what the test checks. Where it
  is (exit code, stderr, a kill), use run_script(...) below: a process of its own, forked from a parent
  that imported torch once (tests/forkrun.py), not a fresh `python` that re-imports it (2-4 s each). For
  reproduce.sh, pass forkrun_env() in its environment. Many bad-input cases: tests/bad_input_driver.py.
  Under torchrun: torchrun(script, ...), the real launcher with its workers forked from that parent.
- Several tests that read the same run share it through a module- or session-scoped fixture.
- Fake data, epochs, image sizes and archs as small as still exercises the behaviour (1-2 epochs,
  resnet10/resnet32 on 32 px, a few images per class).
- A test that still takes more than ~5 s carries @pytest.mark.slow, so `pytest -m "not slow"` is a quick
  loop; the README's command runs everything.
"""
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: more than ~5 s on an idle 2-core machine (deselect: -m 'not slow')")


def parser_of(script):
    """The argparse parser a script's parse_args() builds (caught as it starts parsing): its flags and choices."""
    import argparse
    import importlib

    class Built(Exception):
        pass

    def catch(parser, *a, **k):
        raise Built(parser)
    module = importlib.import_module(script.removesuffix(".py"))
    real, argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_args, catch
    try:
        module.parse_args([])
    except Built as built:
        return built.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{script}'s parse_args() parsed nothing")


@pytest.fixture(autouse=True)
def _no_md5(monkeypatch):
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10
    import torchvision.datasets.svhn as svhn
    for mod in (cifar, svhn, stl10):
        monkeypatch.setattr(mod, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _images(rng, n, size=32):
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _labels(rng, num_classes, per_class):
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    return labels


def write_cifar(root, num_classes=10, per_class_train=20, per_class_test=5, seed=0):
    """CIFAR-10/100 python pickles; returns {'train': (images, labels), 'test': (...)}."""
    rng = np.random.default_rng(seed)
    out = {}
    if num_classes == 10:
        folder, label_key, names_key = Path(root) / "cifar-10-batches-py", "labels", "label_names"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta = "batches.meta"
    else:
        folder, label_key, names_key = Path(root) / "cifar-100-python", "fine_labels", "fine_label_names"
        files, meta = {"train": ["train"], "test": ["test"]}, "meta"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        labels = _labels(rng, num_classes, per)
        images = _images(rng, len(labels))
        out[split] = (images, labels)
        for part, idx in zip(files[split], np.array_split(np.arange(len(labels)), len(files[split]))):
            rows = images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)     # R plane, G plane, B plane
            with open(folder / part, "wb") as f:
                pickle.dump({"data": rows, label_key: labels[idx].tolist()}, f)
    with open(folder / meta, "wb") as f:
        pickle.dump({names_key: [f"class{c:03d}" for c in range(num_classes)]}, f)
    return out


def write_svhn(root, per_class=12, seed=0):
    """SVHN .mat files (X is H×W×3×N, digit 0 stored as label 10); returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    out = {}
    Path(root).mkdir(parents=True, exist_ok=True)
    for split in ("train", "test", "extra"):
        labels = _labels(rng, 10, per_class)
        images = _images(rng, len(labels))
        out[split] = (images, labels)
        y = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)
        scipy.io.savemat(Path(root) / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y})
    return out


def write_stl10(root, per_class_train=2, per_class_test=1, n_unlabeled=4, seed=0):
    """STL-10 binaries (each image stored channel-major and column-major, labels 1..10)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, per in (("train", per_class_train), ("test", per_class_test), ("unlabeled", None)):
        labels = _labels(rng, 10, per) if per else np.full(n_unlabeled, -1)
        images = _images(rng, len(labels), 96)
        out[split] = (images, labels)
        images.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")
        if per:
            (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"stl{c}" for c in range(10)) + "\n")
    return out


def write_folder(root, classes=("cat", "ant", "bee"), per_class=(6, 4, 5), per_class_test=2, size=32,
                 splits=("train", "test"), seed=0, easy=False):
    """root/{train,test}/<class>/<n>.png (lossless); classes come back sorted by name.

    easy=True: each class has its own colour (plus noise), so a network can learn it in a few epochs."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, (len(classes), 3))
    out = {}
    for split in splits:
        images, labels = [], []
        for c, name in enumerate(sorted(classes)):
            n = dict(zip(classes, per_class))[name] if split == "train" else per_class_test
            d = Path(root) / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = _images(rng, 1, size)[0]
                if easy:
                    img = np.clip(palette[c] + (img.astype(int) - 128) // 4, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
                images.append(img)
                labels.append(c)
        out[split] = (np.stack(images), np.asarray(labels))
    return out


def write_file_list(root, num_classes=3, per_class=4, size=40, seed=0):
    """ImageNet-LT style: root/images/<class>/<n>.jpg and root/train.txt with 'relative/path label'."""
    rng = np.random.default_rng(seed)
    lines = []
    for c in range(num_classes):
        d = Path(root) / "images" / f"n{c:05d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_images(rng, 1, size)[0]).save(d / f"{i}.jpg")
            lines.append(f"images/n{c:05d}/{i}.jpg {c}")
    (Path(root) / "train.txt").write_text("\n".join(lines) + "\n")
    return Path(root) / "train.txt"


@pytest.fixture
def fake_cifar10(tmp_path):
    return tmp_path, write_cifar(tmp_path, 10)


@pytest.fixture
def fake_cifar100(tmp_path):
    return tmp_path, write_cifar(tmp_path, 100, per_class_train=3, per_class_test=1)


@pytest.fixture
def fake_svhn(tmp_path):
    return tmp_path, write_svhn(tmp_path)


@pytest.fixture
def fake_stl10(tmp_path):
    return tmp_path, write_stl10(tmp_path)


@pytest.fixture
def fake_folder(tmp_path):
    return tmp_path, write_folder(tmp_path)


def run_script(*args, timeout=600):
    """Run a top-level script of the project as a user would; returns the CompletedProcess. It runs in a
    process of its own, forked from a parent that imported torch once (tests/forkrun.py)."""
    import subprocess
    env = dict(os.environ, PYTHONUNBUFFERED="1", **forkrun_env())
    return subprocess.run([sys.executable, str(ROOT / "tests" / "forkrun.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def drive(todo):
    """{case: [script, argv(, kill_at)]} → {case: [exit code, stderr]}, each case in a process forked from one
    subprocess that imported the scripts (tests/bad_input_driver.py), as many at a time as there are cores."""
    import json
    import subprocess
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "bad_input_driver.py")], input=json.dumps(todo),
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def torchrun(script, *args, nproc=2):
    """`python -m torch.distributed.run --standalone --nproc_per_node N SCRIPT ARGS`, the real launcher, whose
    worker processes run through the session's fork server (torchrun's --no-python with forkrun's interpreter
    command), so no worker re-imports torch. As a plain torchrun command if the server could not start."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    python = forkrun_env().get("PYTHON")
    if python is None:
        return launch + [script, *map(str, args)]
    return launch + ["--no-python", python, str(ROOT / script), *map(str, args)]


_FORKRUN = {}


def forkrun_env():
    """{FORKRUN_SOCKET, PYTHON}: the session's fork server (started on first use) and an interpreter
    command for reproduce.sh that runs the project's scripts through it; {} if it could not start."""
    if "env" not in _FORKRUN:
        import atexit
        import subprocess
        import tempfile
        tmp = tempfile.mkdtemp(prefix="forkrun-")
        sock = os.path.join(tmp, "socket")
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}     # each run sets its own
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkrun.py"), "--serve", sock],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        atexit.register(server.kill)
        if server.stdout.readline().strip() != "ready":
            _FORKRUN["env"] = {}
        else:
            python = os.path.join(tmp, "python")
            with open(python, "w") as f:
                f.write(f'#!/bin/sh\nFORKRUN_SOCKET="${{FORKRUN_SOCKET:-{sock}}}" exec "{sys.executable}" '
                        f'"{ROOT / "tests" / "forkrun.py"}" "$@"\n')
            os.chmod(python, 0o755)
            _FORKRUN["env"] = {"FORKRUN_SOCKET": sock, "PYTHON": python}
    return _FORKRUN["env"]
