"""Run files of every script: one run folder, its checkpoints, --resume, and the torchrun plumbing.

No part of any method lives here: a script passes in what is its own (its name, `__file__`, the flags --resume may
change, its rows and final numbers). A run folder holds args.json, metrics.jsonl, last.pt (a plain dict), final.json,
the script's copy and .lock, each written to a temp file and renamed. A user's mistake: one line and exit 2.
"""
import argparse
import datetime
import fcntl
import functools
import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


# ----- errors and flags ----------------------------------------------------------------------------

def fail(msg):
    if int(os.environ.get("RANK", "0")) == 0:             # under torchrun every process fails alike: say it once
        print(f"error: {msg}", file=sys.stderr)
    release_out(failed=True)
    sys.exit(2)


def fmt(v, width=6, digits=2):
    return f"{v:{width}.{digits}f}" if v is not None else f"{'-':>{width}}"


def table_header(*columns):
    return f"{'epoch':>5} {'lr':>8} {'loss':>8} " + " ".join(f"{c:>6}" for c in columns) + f" {'s':>6}"


def table_row(epoch, lr, loss, values, seconds):
    return f"{epoch:5d} {lr:8.5f} {loss:8.4f} " + " ".join(map(fmt, values)) + f" {seconds:6.2f}"


def given_flags(parser, argv):
    """Destinations of the flags on the command line (abbreviations included): --resume applies or refuses each."""
    unset = object()
    seen = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    return sorted(k for k, v in vars(seen).items() if v is not unset and k != "help")


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
                 ("momentum", 0, 1, "[)"), ("workers", 0, None, "[)"), ("data_seed", 0, 2 ** 32, "[)"),
                 ("print_freq", 0, None, "[)")]


# ----- files, written atomically -------------------------------------------------------------------

def replace_atomic(path, write):
    """write(temp file), renamed over `path`: a killed run leaves no half-written file, a full disk the old one."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous copy is kept" if os.path.exists(path) else "nothing was written"
        print(f"error: cannot write {path} ({e.strerror or e}); {kept}, make room and run again (--resume where "
              f"there is a last.pt)", file=sys.stderr)
        release_out()
        sys.exit(1)


def save_atomic(obj, path):
    replace_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    replace_atomic(path, write)


def strict_json(obj, **kw):
    """JSON without the bare NaN / Infinity tokens Python writes by default: a non-finite float is null."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return None if isinstance(v, float) and not np.isfinite(v) else v
    return json.dumps(clean(obj), allow_nan=False, **kw)


def write_json(path, obj):
    write_text_atomic(path, strict_json(obj, indent=1))


def read_metrics(path):
    if not os.path.exists(path):                           # a moved or copied run may lack it
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_metrics(path, rows):
    write_text_atomic(path, "".join(strict_json(r) + "\n" for r in rows))


def append_metrics(path, row):
    write_metrics(path, read_metrics(path) + [row])


def copy_source(path, out):
    replace_atomic(os.path.join(out, os.path.basename(path)), lambda tmp: shutil.copy(path, tmp))


# ----- checkpoints ---------------------------------------------------------------------------------

HEAD_PREFIXES = ("fc.",)


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
    """Every backbone tensor of the checkpoint at `path` into `model`, the head as it was; fails unless each was found
    with its shape (the authors' DataParallel keys began with `module.`: their strict=False load matched none)."""
    ckpt = load_checkpoint(path)
    if ckpt["arch"] != arch:
        fail(f"'{path}' holds a {ckpt['arch']} backbone but this run trains {arch}; pre-train the same "
             f"architecture or pass --arch {ckpt['arch']}")
    src = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    own = model.state_dict()
    matched = [k for k in own if not k.startswith(HEAD_PREFIXES) and k in src and src[k].shape == own[k].shape]
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


def restore(ckpt, model, optimizer):
    if ckpt is None:
        return 0, None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["epoch"], ckpt.get("best")


# ----- a run: resume, device, folder, epochs, end ---------------------------------------------------

def resume_args(args, ckpt, applied):
    """--resume PATH: the run in dirname(PATH) with its first arguments; a flag of `applied` or --print-freq given now
    replaces its value (--gpu, --workers of `applied` always: they describe this machine), any other is refused."""
    flag = lambda k: "--" + k.replace("_", "-")
    applied = (*applied, "print_freq")
    refused = [k for k in args.cli_flags if k not in applied and k != "resume"]
    if refused:
        fail(f"--resume continues a run with its own arguments; drop {' '.join(map(flag, refused))} (with "
             f"--resume only {', '.join(map(flag, applied))} may be given)")
    now = {k: getattr(args, k) for k in applied if k in args.cli_flags or k in ("gpu", "workers")}
    return argparse.Namespace(**{**vars(args), **ckpt["args"], **now, "resume": args.resume, "saved_gpu":
                                 ckpt["args"].get("gpu"), "out": os.path.dirname(os.path.abspath(args.resume)),
                                 "cli_flags": args.cli_flags})


def resume_run(args, script, applied, defaults=None, hint="", say=True):
    """--resume: (the saved run's arguments, its checkpoint), else (args, None). The checkpoint must be `script`'s
    (`hint`: what to do instead); `defaults` fills arguments older runs lacked (--data-seed: their --seed)."""
    if not args.resume:
        return args, None
    ckpt = load_checkpoint(args.resume)
    if ckpt.get("script") != script:
        fail(f"'{args.resume}' was written by {ckpt.get('script', 'another program')}, not {script}{hint}")
    ckpt["args"] = {"data_seed": ckpt["args"].get("seed", 0), **(defaults or {}), **ckpt["args"]}
    args = resume_args(args, ckpt, applied)
    if say and int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming {args.out} after epoch {ckpt['epoch']} with the arguments it was started with")
    return args, ckpt


def refuse_occupied(out, resume, held=("last.pt",)):
    for name in held:
        if not resume and os.path.exists(os.path.join(out, name)):
            fail(f"{out} already holds a run: continue it with --resume {out}/{name}, or pass another --out")
    claim_out(out)


_LOCK = []                                  # this process's run: (its locked out/.lock, made here?, replaced handlers)


def claim_out(out, resumable=True):
    """Rank 0: create `out` and flock out/.lock, so that two runs never share a folder (a killed run's lock goes with
    it); from here on SIGTERM or Ctrl-C end the run with one line saying how to go on (`resumable`: with --resume)."""
    path = os.path.join(os.path.realpath(out), ".lock")
    if int(os.environ.get("RANK", "0")) or _LOCK and _LOCK[0][0].name == path:
        return
    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(path, "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        fail(f"{out} is in use by another run (pid {lock.read().strip() or '?'}); wait for it, or pass another --out")
    except OSError as e:
        fail(f"--out {out} cannot be used: {e.strerror or e} (pass a folder this user can create and write)")
    release_out()                                          # one run at a time in a process
    lock.truncate(0)
    print(os.getpid(), file=lock, flush=True)
    stop = functools.partial(_stopped, out, os.getpid(), resumable)
    _LOCK.append((lock, made, {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}))


def _stopped(out, owner, resumable, signum, frame):
    """SIGTERM (a scheduler; torchrun when another process died) or Ctrl-C: one line, how to go on, its exit code."""
    if os.getpid() != owner:                               # a data-loading worker forked from the run
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    last = os.path.join(out, "last.pt")
    go_on = f"continue with --resume {last}" if resumable and os.path.exists(last) else "run it again"
    print(f"error: stopped by {signal.Signals(signum).name}; {go_on}", file=sys.stderr, flush=True)
    release_out()
    sys.exit(128 + signum)


def release_out(failed=False):
    """The end of a run: its folder's lock goes; a run that failed before writing anything leaves no trace."""
    while _LOCK:
        lock, made, handlers = _LOCK.pop()
        lock.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if failed and made and os.listdir(os.path.dirname(lock.name)) == [".lock"]:
            shutil.rmtree(os.path.dirname(lock.name))


def setup_device(args, world=1):
    """--gpu's device (torchrun: the local rank's GPU, or the CPU for --gpu -1); TF32 on CUDA unless --strict-fp32."""
    if args.gpu >= 0 and not torch.cuda.is_available():
        print("warning: CUDA is not available; running on the CPU", file=sys.stderr)
        args.gpu = -1
    index = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else args.gpu
    device = torch.device(f"cuda:{index}" if args.gpu >= 0 else "cpu")
    for flag in ("amp", "compile"):
        if getattr(args, flag, False) and device.type != "cuda":
            print(f"warning: --{flag} needs CUDA; ignored on the CPU", file=sys.stderr)
            setattr(args, flag, False)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world > 1 else 0
        if max(index, local - 1) >= torch.cuda.device_count():
            fail(f"--gpu {max(index, local - 1)}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0"
                 + (" (torchrun: one process per GPU, --nproc_per_node at most that many)" if world > 1 else ""))
        torch.cuda.set_device(device)              # pinning and the like stay on ours, not cuda:0
    args.tf32 = device.type == "cuda" and not args.strict_fp32           # one policy, in args.json
    saved = vars(args).pop("saved_gpu", None)                            # --resume: the device it ran on
    if saved is not None and (saved >= 0) != (device.type == "cuda") and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: this run trained on {'CUDA' if saved >= 0 else 'the CPU'} and resumes on {device.type}: "
              "their random streams differ, so it will not equal an uninterrupted run", file=sys.stderr)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    return device


def open_run(args, ckpt, device, source, start, extra=None, rank=0):
    """Rank 0: a new run writes args.json (with `extra` and the versions) and the script's `source`; metrics.jsonl
    is cut back to epoch `start` (None: the stages cut their own). True when args.json was written."""
    if rank:
        return False
    os.makedirs(args.out, exist_ok=True)
    fresh = ckpt is None or not os.path.exists(os.path.join(args.out, "args.json"))
    if fresh:
        meta = {**vars(args), **(extra or {}), "torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        write_json(os.path.join(args.out, "args.json"), meta)
        copy_source(source, args.out)
    if start is not None:
        cut_metrics(args.out, start)
    return fresh


def cut_metrics(out, start):
    """out/metrics.jsonl cut back to epoch `start`: a resumed run drops the epochs logged after its checkpoint."""
    os.makedirs(out, exist_ok=True)
    metrics = os.path.join(out, "metrics.jsonl")
    write_metrics(metrics, [r for r in read_metrics(metrics) if r["epoch"] <= start])


def nonfinite_tensor(model):
    """Name of the first parameter or buffer holding NaN / inf (a BatchNorm running_var, say), or None."""
    named = [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist() if named else []
    return next((k for (k, _), ok in zip(named, finite) if not ok), None)


def stop_diverged(what, out, epoch):
    last = os.path.join(out, "last.pt")
    kept = f"{last} still holds epoch {epoch}" if os.path.exists(last) else "no checkpoint was saved"
    print(f"error: {what}; stopped, {kept} (try a lower --lr)", file=sys.stderr)
    release_out()
    sys.exit(1)


def stop_if_diverged(out, models, epoch, first_bad, steps, rank=0, world=1, stage=None):
    """Before the epoch is evaluated or saved: a non-finite loss (`first_bad`: its first step, or -1) or a non-finite
    tensor of `models` after the epoch's `steps` steps stops every process (exit 1)."""
    bad_tensor = next(filter(None, map(nonfinite_tensor, models)), None)
    bad = torch.stack([first_bad, torch.tensor(int(bad_tensor is not None), device=first_bad.device)])
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad[0].item() < 0 and bad[1].item() <= 0:
        return
    at, after = (f"stage {stage}, ", f" at stage {stage}") if stage else ("", "")
    where = (f"loss is not finite at {at}epoch {epoch + 1}, step {bad[0].item() + 1}" if bad[0].item() >= 0 else
             f"'{bad_tensor or 'a tensor of another process'}' is not finite{after} after epoch {epoch + 1}, "
             f"step {steps}")
    if rank == 0:
        stop_diverged(where, out, epoch)
    sys.exit(1)


class Progress:
    """progress(step, images so far this epoch, loss: a callable for the running mean) after each step: on rank 0 a
    line every `every` steps (--print-freq), or with every = 0 at most every 10 s, so that a short epoch prints none."""

    def __init__(self, total, every=0, seconds=10.0):
        self.total, self.every, self.seconds, self.rank = total, every, seconds, process_group()[0]
        self.start = self.last = time.time()

    def __call__(self, step, images, loss):
        now = time.time()
        if self.rank or not ((step + 1) % self.every == 0 if self.every else now - self.last >= self.seconds):
            return
        self.last, took = now, now - self.start
        print(f"  step {step + 1}/{self.total}  {images / took:.0f} img/s  loss {loss():.4f}  "
              f"epoch eta {took / (step + 1) * (self.total - step - 1):.0f} s", flush=True)


def end_epoch(out, row, line, state, rank=0):
    if rank:
        return
    append_metrics(os.path.join(out, "metrics.jsonl"), row)
    print(line, flush=True)
    save_atomic(state, os.path.join(out, "last.pt"))


def finish_run(out, final, t_run, rank=0, per_epoch=True):
    if rank:
        return final
    if per_epoch:
        seconds = [r["seconds"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] or [float("nan")]
        final["seconds_per_epoch"] = float(np.median(seconds))
    final["wall_seconds"] = time.time() - t_run
    write_json(os.path.join(out, "final.json"), final)
    release_out()
    return final


# ----- torchrun ------------------------------------------------------------------------------------

def process_group():
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device):
    """NCCL on CUDA, gloo on the CPU; an hour's timeout, not 10 min: rank 0 alone computes rwSAM's KDE weights."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1),
                            device_id=device if device.type == "cuda" else None)


def leave_process_group(world):
    """Every process leaves together: leaving while rank 0 still writes hangs gloo."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def check_shards(batch_size, world):
    if batch_size % world:
        fail(f"--batch-size {batch_size} (global) must be divisible by the {world} processes")


def all_reduce_grads(params):
    """Sum the processes' gradients in one flat buffer: the shares of the loss sum to the global batch's."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def broadcast_state(model):
    for t in model.state_dict().values():
        dist.broadcast(t, 0)


def average_bn_statistics(model, world):
    """Per-process BatchNorm (the CPU): running means and variances averaged, so all processes save one model (the
    mean is one process's; the variance misses the spread of the processes' batch means)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for t in (m.running_mean, m.running_var):
                dist.all_reduce(t)
                t.div_(world)
