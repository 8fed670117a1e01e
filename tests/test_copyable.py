"""The methods a user copies into another codebase (README "Copying a method") work on their own.

Each piece is cut out of its script's source with `ast` (the script is not imported for this), pasted
into a fresh namespace that holds only `torch`, `nn` (torch.nn) and `F` (torch.nn.functional), checked
to name nothing else, and run beside the script's own function on a small input: the results must be
equal bit for bit. Where cheap, one value is also computed by hand.
"""
import ast
import builtins
import functools
import math
import symtable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crt
import ldam_drw
import moco_ssp
import rotation_ssp
import self_training
import simsiam_rwsam
from conftest import ROOT

PASTE_NAMES = {"torch", "nn", "F"}

# (script, function or class) — the list in README "Copying a method"
PIECES = [
    ("ldam_drw.py", "class_balanced_weights"), ("ldam_drw.py", "ldam_margins"), ("ldam_drw.py", "ce_loss"),
    ("ldam_drw.py", "focal_loss"), ("ldam_drw.py", "ldam_loss"), ("ldam_drw.py", "NormedLinear"),
    ("ldam_drw.py", "deferred_rule"),
    ("self_training.py", "class_balanced_weights"), ("self_training.py", "ldam_margins"),
    ("self_training.py", "ce_loss"), ("self_training.py", "focal_loss"),
    ("self_training.py", "ldam_loss"), ("self_training.py", "deferred_rule"),
    ("rotation_ssp.py", "rotation_labels"), ("rotation_ssp.py", "rotate"),
    ("crt.py", "Classifier"),
    ("simsiam_rwsam.py", "simsiam_heads"), ("simsiam_rwsam.py", "simsiam_loss"),
    ("simsiam_rwsam.py", "sam_perturbation"), ("simsiam_rwsam.py", "bn_buffers"), ("simsiam_rwsam.py", "kde_weights"),
    ("moco_ssp.py", "momentum_update"), ("moco_ssp.py", "enqueue"), ("moco_ssp.py", "info_nce"),
    ("moco_ssp.py", "sam_perturbation"), ("moco_ssp.py", "bn_buffers"), ("moco_ssp.py", "kde_weights"),
]
MODULES = {"ldam_drw.py": ldam_drw, "self_training.py": self_training, "rotation_ssp.py": rotation_ssp,
           "crt.py": crt, "simsiam_rwsam.py": simsiam_rwsam, "moco_ssp.py": moco_ssp}


@functools.lru_cache(maxsize=None)
def parsed(script):
    text = (ROOT / script).read_text()
    return text, ast.parse(text)


def source_of(script, name):
    """The text of the top-level def/class `name` of `script`, decorators included."""
    text, tree = parsed(script)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "\n".join(text.splitlines()[first - 1:node.end_lineno]) + "\n"
    raise AssertionError(f"{script} has no top-level '{name}'")


def free_names(src):
    """Names the pasted source reads from the module namespace (any scope inside it), builtins excluded."""
    found, tables = set(), [symtable.symtable(src, "<paste>", "exec")]
    while tables:
        table = tables.pop()
        scoped = table.get_type() == "function"            # module level: decorators, defaults, base classes
        found |= {s.get_name() for s in table.get_symbols()
                  if (s.is_global() if scoped else s.is_referenced() and not s.is_assigned())}
        tables += table.get_children()
    return {n for n in found if not hasattr(builtins, n)}


def paste(script, name):
    """`name` as it behaves when pasted into a file that starts with the three imports of PASTE_NAMES."""
    src = source_of(script, name)
    ns = {"torch": torch, "nn": nn, "F": F}
    exec(compile(src, f"<{name} pasted from {script}>", "exec"), ns)
    return ns[name]


@pytest.mark.parametrize("script,name", PIECES)
def test_piece_needs_only_torch_nn_f(script, name):
    assert free_names(source_of(script, name)) <= PASTE_NAMES, f"{script}:{name} reads names defined elsewhere"


def test_free_name_check_can_fail():
    assert free_names("def f(x):\n    return D.helper(x) + len(x)\n") == {"D"}
    assert free_names("class A(nn.Module):\n    k = ROTATIONS\n") == {"nn", "ROTATIONS"}
    assert free_names("@torch.no_grad()\ndef g(pairs=KDE_PAIRS):\n    def h():\n        return np\n") == \
        {"torch", "KDE_PAIRS", "np"}


def both(script, name):
    return paste(script, name), getattr(MODULES[script], name)


def equal(a, b):
    """Bit-for-bit equality of (nested tuples / lists of) tensors and plain values."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----- supervised losses, weights, DRW / DRS ---------------------------------------------------------

@pytest.mark.parametrize("script", ["ldam_drw.py", "self_training.py"])
def test_class_balance(script):
    cb, cb_own = both(script, "class_balanced_weights")
    w = cb([100, 10, 1], 0.9999)
    assert equal(w, cb_own([100, 10, 1], 0.9999))
    e = [(1 - 0.9999) / (1 - 0.9999 ** n) for n in (100, 10, 1)]          # Cui et al. Eq. (3), by hand
    assert w.tolist() == pytest.approx([3 * x / sum(e) for x in e], rel=1e-6)
    margins, margins_own = both(script, "ldam_margins")
    m = margins([100, 10, 1], 0.5)
    assert equal(m, margins_own([100, 10, 1], 0.5)) and m.max().item() == 0.5
    assert m.tolist() == pytest.approx([0.5 * 100 ** -0.25, 0.5 * 10 ** -0.25, 0.5], rel=1e-6)   # ∝ n^(-1/4)


def test_supervised_losses():
    logits, y, w = rand(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0.5, 1.0, 2.0])
    cosines = logits.tanh()
    for name, args in (("ce_loss", (logits, y, w)), ("ce_loss", (logits, y, None)),
                       ("focal_loss", (logits, y, w, 1.0)), ("focal_loss", (logits, y, None, 0.5)),
                       ("ldam_loss", (cosines, y, w, torch.tensor([0.5, 0.3, 0.2]), 30.0))):
        pasted, own = both("ldam_drw.py", name)
        assert equal(pasted(*args), own(*args)), name
    cosine, cosine_own = both("ldam_drw.py", "NormedLinear")
    torch.manual_seed(3)
    head = cosine(4, 3)
    torch.manual_seed(3)
    head_own = cosine_own(4, 3)
    x = rand(5, 4)
    assert equal(head.weight, head_own.weight) and equal(head(x), head_own(x))
    assert head.weight.norm(dim=1).tolist() == pytest.approx([1.0] * 3) and head(x).abs().max() <= 1
    ldam, _ = both("ldam_drw.py", "ldam_loss")
    by_hand = F.cross_entropy(30 * torch.tensor([[0.5 - 0.1, 0.2]]), torch.tensor([0]))   # Δ_y off the true class
    assert ldam(torch.tensor([[0.5, 0.2]]), torch.tensor([0]), None, torch.tensor([0.1, 0.3]), 30.0) == by_hand


def test_self_training_losses():
    logits, y, w = rand(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0.5, 1.0, 2.0])
    c, margins = torch.tensor([1.0, 1.0, 0.3, 0.3, 1.0, 0.3]), torch.tensor([0.5, 0.3, 0.2])
    cosines = logits.tanh()
    for weight in (w, None):
        for cw in (c, None):
            for name, args in (("ce_loss", (logits, y, weight, cw)),
                               ("focal_loss", (logits, y, weight, 1.0, cw)),
                               ("ldam_loss", (cosines, y, weight, margins, 30.0, cw))):
                pasted, own = both("self_training.py", name)
                assert equal(pasted(*args), own(*args)), (name, weight, cw)
    ldam, _ = both("self_training.py", "ldam_loss")
    assert equal(ldam(cosines, y, w, margins, 30.0), ldam_drw.ldam_loss(cosines, y, w, margins, 30.0))
    assert equal(ldam(cosines, y, w, margins, 30.0, c),
                 self_training.ce_loss(30.0 * (cosines - F.one_hot(y, 3) * margins[y].unsqueeze(1)), y, w, c))


@pytest.mark.parametrize("script", ["ldam_drw.py", "self_training.py"])
def test_deferred_rule(script):
    rule_at, own = both(script, "deferred_rule")
    cb = torch.tensor([0.2, 0.8, 2.0])
    for rule in ("none", "reweight", "resample", "drw", "drs"):
        for epoch in range(10):
            assert equal(rule_at(rule, epoch, 10, cb), own(rule, epoch, 10, cb))
    drw = [rule_at("drw", e, 200, cb)[0] is cb for e in range(200)]
    assert drw.index(True) == 160 and all(drw[160:])                     # 80% of 200 epochs, 0-based
    drs = [rule_at("drs", e, 200, cb) for e in range(200)]
    assert [r[1] for r in drs].index(True) == 160 and all(r[0] is None for r in drs)
    assert rule_at("reweight", 0, 200, cb) == (cb, False) and rule_at("resample", 0, 200, cb) == (None, True)
    assert rule_at("none", 199, 200, cb) == (None, False)


# ----- rotation, cRT -----------------------------------------------------------------------------------

def test_rotation_step():
    labels, labels_own = both("rotation_ssp.py", "rotation_labels")
    rotate, rotate_own = both("rotation_ssp.py", "rotate")
    k = labels(10, torch.Generator().manual_seed(3), "cpu")
    assert equal(k, labels_own(10, torch.Generator().manual_seed(3), "cpu"))
    assert torch.bincount(labels(8, torch.Generator().manual_seed(4), "cpu"), minlength=4).tolist() == [2] * 4
    x = rand(10, 3, 5, 5)
    assert equal(rotate(x, k), rotate_own(x, k))
    square = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(4, 1, 2, 2)
    turned = rotate(square, torch.tensor([0, 1, 2, 3]))
    assert turned[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]            # 90° counter-clockwise
    assert turned[2, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]] and turned[0, 0].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_crt_head():
    Classifier, Own = both("crt.py", "Classifier")
    torch.manual_seed(0)
    backbone, head = nn.Linear(4, 3).requires_grad_(False), nn.Linear(3, 2)
    x = rand(5, 4)
    for cached, inputs in ((False, x), (True, backbone(x))):
        a, b = Classifier(backbone, head, cached), Own(backbone, head, cached)
        assert equal(a(inputs), b(inputs)) and list(a.state_dict()) == list(b.state_dict())
    assert equal(Classifier(backbone, head, False)(x), head(backbone(x)))


# ----- SimSiam, SAM / rwSAM, KDE -------------------------------------------------------------------------

def test_simsiam_heads_and_loss():
    heads, heads_own = both("simsiam_rwsam.py", "simsiam_heads")
    torch.manual_seed(1)
    projector, predictor = heads(64, 16, width=32)
    torch.manual_seed(1)
    projector_own, predictor_own = heads_own(64, 16, width=32)
    for a, b in ((projector, projector_own), (predictor, predictor_own)):
        assert list(a.state_dict()) == list(b.state_dict())
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    f1, f2 = rand(6, 32, seed=1), rand(6, 32, seed=2)
    z1, z2 = projector(f1), projector(f2)
    p1, p2 = predictor(z1), predictor(z2)
    assert equal(torch.stack([z1, z2, p1, p2]),
                 torch.stack([projector_own(f1), projector_own(f2), predictor_own(projector_own(f1)),
                              predictor_own(projector_own(f2))]))
    loss, loss_own = both("simsiam_rwsam.py", "simsiam_loss")
    assert equal(loss(z1, z2, p1, p2), loss_own(z1, z2, p1, p2))
    assert loss(z1, z1, z1, z1).tolist() == pytest.approx([-1.0] * 6)      # D(z, z) = −1


@pytest.mark.parametrize("script", ["simsiam_rwsam.py", "moco_ssp.py"])
def test_sam_perturbation_and_bn_buffers(script):
    perturb, own = both(script, "sam_perturbation")
    params, grads = [rand(3, 4, seed=1), rand(5, seed=2)], [rand(3, 4, seed=3), rand(5, seed=4)]
    for adaptive in (False, True):
        assert equal(perturb(params, grads, 0.05, adaptive), own(params, grads, 0.05, adaptive))
    e = perturb(params, grads, 0.05, False)
    assert math.sqrt(sum(t.pow(2).sum().item() for t in e)) == pytest.approx(0.05, rel=1e-5)   # ‖ε‖₂ = ρ
    buffers, buffers_own = both(script, "bn_buffers")
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert equal(buffers(net), buffers_own(net)) and len(buffers(net)) == 6


@pytest.mark.parametrize("script", ["simsiam_rwsam.py", "moco_ssp.py"])
def test_kde_weights(script):
    kde, own = both(script, "kde_weights")
    feats = rand(20, 3, seed=5)
    for kw in ({}, {"bandwidth": 0.7, "chunk": 6}, {"seed": 3, "pairs": 50}):
        assert equal(kde(feats, 1.2, **kw), own(feats, 1.2, **kw)), kw
    w, density, h = kde(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), 1.0)
    assert h == pytest.approx(5.0)                                       # the median of the one distance
    assert density.tolist() == pytest.approx([(1 + math.exp(-0.5)) / 2] * 2) and w.tolist() == pytest.approx([1, 1])
    with pytest.raises(ValueError, match="at least 2"):
        kde(feats[:1], 1.2)


# ----- MoCo ---------------------------------------------------------------------------------------------

def test_moco_momentum_update_queue_and_loss():
    update, update_own = both("moco_ssp.py", "momentum_update")
    torch.manual_seed(2)
    query = nn.Linear(3, 2)
    keys = [nn.Linear(3, 2), nn.Linear(3, 2)]
    keys[1].load_state_dict(keys[0].state_dict())
    update(keys[0], query, 0.99)
    update_own(keys[1], query, 0.99)
    assert all(torch.equal(a, b) for a, b in zip(keys[0].parameters(), keys[1].parameters()))
    key, q = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    nn.init.zeros_(key.weight), nn.init.ones_(q.weight)
    update(key, q, 0.9)
    assert key.weight.item() == pytest.approx(0.1)                       # 0.9·0 + 0.1·1

    enqueue, enqueue_own = both("moco_ssp.py", "enqueue")
    queues = [rand(6, 2), rand(6, 2)]
    queues[1].copy_(queues[0])
    k = rand(2, 2, seed=7)
    ptrs = enqueue(queues[0], k, 4), enqueue_own(queues[1], k, 4)
    assert ptrs == (0, 0) and torch.equal(queues[0], queues[1]) and torch.equal(queues[0][4:], k)
    assert enqueue(queues[0], k, 0) == 2 and torch.equal(queues[0][:2], k)

    nce, nce_own = both("moco_ssp.py", "info_nce")
    q, kp, queue = (F.normalize(rand(4, 8, seed=s), dim=1) for s in (8, 9, 10))
    assert equal(nce(q, kp, queue[:3], 0.2), nce_own(q, kp, queue[:3], 0.2))
    loss, logits = nce(q, kp, queue[:3], 0.2)
    assert logits.shape == (4, 4) and equal(logits[:, 0], (q * kp).sum(1) / 0.2)
    assert loss.item() == pytest.approx((torch.logsumexp(logits, 1) - logits[:, 0]).mean().item(), rel=1e-6)
