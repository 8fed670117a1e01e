#!/usr/bin/env bash
# The papers' reproduction tables, several seeds, one GPU. The tables CIFAR and LT below list every run: its name,
# stage, the run it starts from, its command and the paper's numbers, which `table` prints beside ours.
#
#   bash reproduce.sh                  # every row, seeds 0 1 2, CIFAR-10 (JPEG q75) in .data/cifar10_jpg
#   bash reproduce.sh ce ldam-drw      # only these rows (and the runs they need)
#   bash reproduce.sh --dry-run        # print the commands, stage by stage, and run nothing
#   bash reproduce.sh table            # the Markdown table of the runs finished so far
#   bash reproduce.sh paper2-fig1 [table]    # paper 2 Fig. 2(a,c): SL vs SSL at equal n (its table: A(n,1), A(n,r), Δ)
#   SET=imagenet_lt bash reproduce.sh paper2-fig1 | paper2-table1b [table]   # paper 2 on ImageNet, settings below
#   bash reproduce.sh cv | cv-table          # paper 2's cross-validation of rwSAM's h, α, ρ | its kNN table
#   bash reproduce.sh paper2-semi [table]    # paper 2 §3.2 (Fig. 4): semi-synthetic CIFAR-10, SSL vs SL, rare probe
#   SET=cifar100 RHO=0.02 bash reproduce.sh                         # Table 2, CIFAR-100-LT, ρ = 50 column
#   RHO=0.02 POOL_ROOT=CINIC bash reproduce.sh fig2 fig3             # paper 1 Figs. 2-3 (CIFAR-10-LT ρ = 50 only)
#   SET=inat NPROC=4 LT_ROOT=INAT LT_LISTS=LISTS bash reproduce.sh  # Table 4, each run on 4 GPUs (torchrun)
# Rows: cifar10: ce cb-ce focal cb-focal ce-drw ce-drs ldam ldam-drw, each also +ssp; ce+st, ldam-drw+st, each also
#   -half -same -double; ce+crt; simsiam simsiam+sam simsiam-balanced simsiam+rwsam, each also -step; moco; at RHO=0.02
#   fig2-r* fig3-u* (fig2, fig3: a whole figure); named only: e3-du1..4 (e3: App. E.3), e4-dl0.25..0.75 (e4: E.4),
#   f3-ce, f3-ldam-drw, each also +ssp (f3: App. F.3, step imbalance). cifar100: ce … ldam-drw, each also +ssp.
#   svhn: ce, ldam-drw, their +st rows. imagenet_lt: ce ce-balanced crt, each also +ssp. inat: those and ldam-drw, ldam-drw+ssp.
# Settings, from the environment (default):
#   SET cifar10, cifar100 (Table 2), svhn (Table 1(b)), imagenet_lt (Table 3), inat (Table 4)   RHO tail/head ratio
#       (0.01, the papers' ρ = 100; 0.02, 0.1: ρ = 50, 10)    SEEDS (0 1 2)    JOBS runs at once (6; LT sets: 1)
#   DATA data flags (cifar10: --dataset folder --data-root .data/cifar10_jpg, lossless "--dataset cifar10 --download";
#       cifar100, svhn: --dataset SET --data-root ./data --download; Tables 3-4: --dataset SET --data-root LT_ROOT)
#   LT_ROOT, LT_LISTS Tables 3-4: images, Kang et al.'s lists (ImageNet_LT_{train,val,test}.txt, iNaturalist18_{train,
#       val}.txt)    ARCH resnet50 or resnet10    NPROC GPUs per run, by torchrun (1)    PYTHON (python)
#   POOL_ROOT CINIC-10, D_U of the CIFAR-10 +st / fig rows (else CIFAR-10's leftovers: "not the paper's pool")
#   C100_ROOT fig2/fig3's cifar-100-python (./data)    GPU index, -1: the CPU (0)    RUNS (runs/repro-<RHO>; other SETs
#       runs/repro-<SET>-<RHO or ARCH>)    ARGS, ARGS_<script> flags appended to every command, to one script's
#   cv: CV_H, CV_ALPHA, CV_RHO values tried one at a time (around h median, α 1.2, ρ 5); CV_FRAC validation split (0.1)
#   paper2-fig1 (RUNS runs/paper2-fig1): RHOS (0.1 0.01), SIZES (1 0.75 0.5 0.25 0.125), METHODS (sl simsiam moco),
#       SCALE × every epoch budget (1), OOD eval_ood.py's target flags (--target stl10 --data-root ./data)
#   SET=imagenet_lt paper2-fig1 (Table 2, Figs. 1, 2(b,d), 6; SimSiam: OOD only, as the paper) and paper2-table1b
#       (Table 1(b)) share RUNS (runs/paper2-imagenet); RHOS (0.004 0.0025), SIZES, METHODS (sl moco simsiam), SCALE as
#       above. The lists (datasets_lt.py, once, into RUNS/lists) come from IMAGENET_TRAIN (every ImageNet train image:
#       LT_ROOT's paths, ImageNet-LT's labels) and LT_LISTS/ImageNet_LT_train.txt (r 0.004 itself); the ID probe tests
#       on IMAGENET_VAL (LT_LISTS/ImageNet_LT_test.txt: ImageNet's val set). eval_ood.py fine-tunes on CUB_ROOT (train/,
#       test/ class folders), CARS_ROOT (holds torchvision's stanford_cars/, which no longer downloads: get it by hand),
#       PETS_ROOT, AIRCRAFT_ROOT (eval_ood.py --target pets / aircraft --download fills them). What moves a number: SL
#       trains 90/q epochs on a size-q list (the paper: cross-validated), SSL 300/q (equal steps); probe batch 256 at
#       lr 30 (App. A.1: 4096); rwSAM: a fresh model on the plain run's features; a seed: pre-training + evaluation.
# RHO, GPU, DATA and the ImageNet settings are checked first (one line, exit 2). Runs go to RUNS/<name>/s<seed>/: one
# with a final.json is skipped, one with a last.pt continued with --resume; a failed run is reported with its log's
# last line.
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python}" - "${0##*/}" "$@" <<'EOF'
import glob, json, os, re, shlex, signal, statistics, subprocess, sys, time
from types import SimpleNamespace

sys.path.insert(0, os.getcwd())
sys.stdout.reconfigure(line_buffering=True)
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))         # Ctrl-C: the runs get it too
env = lambda name, default="": os.environ.get(name) or default
num = lambda s: float((re.match(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", s) or ["0"])[0])   # as awk reads s

die = lambda message: print(f"reproduce.sh: {message}", file=sys.stderr) or sys.exit(2)
SET, LTS = env("SET", "cifar10"), ("imagenet_lt", "inat")
if SET not in ("cifar10", "cifar100", "svhn", *LTS):
    die(f"SET must be cifar10, cifar100, svhn, imagenet_lt or inat, got '{SET}'")
NPROC, RHO, ARCH, GPU, LT_ROOT = env("NPROC", "1"), env("RHO", "0.01"), env("ARCH", "resnet50"), env("GPU", "0"), \
    env("LT_ROOT", f"./data/{SET}")
if not re.fullmatch(r"[1-9][0-9]*", NPROC):
    die(f"NPROC must be a whole number >= 1, got '{NPROC}'")
if NPROC != "1" and SET not in LTS:
    die(f"NPROC (torchrun) is for SET=imagenet_lt or inat; the {SET} runs use one GPU each")
DATA = env("DATA", "--dataset folder --data-root .data/cifar10_jpg" if SET == "cifar10" else
           f"--dataset {SET} --data-root {LT_ROOT}" if SET in LTS else f"--dataset {SET} --data-root ./data --download")
SEEDS, PYTHON, ARGS = env("SEEDS", "0 1 2").split(), env("PYTHON", "python"), env("ARGS").split()
JOBS = env("JOBS", "1" if SET in LTS else "6")  # ResNet-32 is launch-bound: 4 runs side by side on an H200 gave ~3x
RUNS = env("RUNS", f"runs/repro-{RHO}" if SET == "cifar10" else f"runs/repro-{SET}-{ARCH if SET in LTS else RHO}")
IMG = SET == "imagenet_lt"                                    # paper2-fig1 / paper2-table1b: paper 2 on ImageNet
FIG1_RUNS = env("RUNS_FIG1", env("RUNS", "runs/paper2-imagenet" if IMG else "runs/paper2-fig1"))
METHODS = env("METHODS", "sl moco simsiam" if IMG else "sl simsiam moco").split()
RHOS, SIZES = env("RHOS", "0.004 0.0025" if IMG else "0.1 0.01").split(), env("SIZES", "1 0.75 0.5 0.25 0.125").split()
SIZE_ALL, OOD_T, SCALE = "1 0.75 0.5 0.25 0.125".split(), ("cub", "cars", "aircraft", "pets"), env("SCALE", "1")
LISTS = env("LT_LISTS", LT_ROOT)
TRAIN, VAL, TEST = (f"{LISTS}/ImageNet_LT_{s}.txt" for s in ("train", "val", "test")) if SET == "imagenet_lt" else \
    (f"{LISTS}/iNaturalist18_train.txt", "", f"{LISTS}/iNaturalist18_val.txt")
POOL = [] if SET == "svhn" else ["--pool", "cinic10", "--pool-root", env("POOL_ROOT")] if env("POOL_ROOT") else \
    ["--pool-shortfall", "cap"]                               # CIFAR-10's own leftovers: not the paper's pool
# What {name} stands for in a command (a list: several words; {D}: the data flags), and {s}: the seed, {ckpt}: needs.
VARS = dict(D=DATA.split() + (["--train-list", TRAIN, "--test-list", TEST] + (["--val-list", VAL] if VAL else [])
                              + ["--arch", ARCH] if SET in LTS else ["--rho", RHO]),
            data=DATA.split(), pool=POOL, rho=RHO, rho2=f"{min(2 * num(RHO), 1):g}", rho_half=f"{num(RHO) / 2:g}",
            c100=env("C100_ROOT", "./data"), train=TRAIN, arch=ARCH, val=["--val-list", VAL] if VAL else [],
            ood=env("OOD", "--target stl10 --data-root ./data").split(), frac=env("CV_FRAC", "0.1"))
# R(name, stage, needs, command, paper): `$PYTHON command --out RUNS/<name>/s<seed> --gpu GPU ARGS` in that stage, from
# RUNS/<needs>/s<seed>/last.pt. paper, per SET it is a row of: paper 1 top-1 error % (lossless; SVHN: balanced test) or
# paper 2 probe top-1 % at RHO 0.01, 0.02, 0.1, Tables 3-4 by ARCH (resnet10, resnet50); (): not in the papers' text.
R = lambda name, stage, needs, command, **paper: SimpleNamespace(**locals())
ORDER = "ldam_drw.py rotation_ssp.py self_training.py crt.py simsiam_rwsam.py moco_ssp.py eval_linear.py".split()
sup = lambda loss, rule: f"ldam_drw.py {{D}} --seed {{s}} --loss {loss} --rule {rule}"
PROBE, ROT, SSP = "eval_linear.py --ckpt {ckpt} --seed {s}", "pretrain/rotation", " --pretrained {ckpt}"
CE_ST = "self_training.py {D} --seed {s} --loss ce --rule none --base {ckpt} --rho-u %s {pool}"
LDAM_ST = "self_training.py {D} --seed {s} --loss ldam --rule drw --base {ckpt} --rho-u %s {pool}"
fig = lambda u, r: CE_ST % f"{u} --relevance {r} --unlabeled-mult 4 --irrelevant-root {{c100}}"   # Figs. 2-3's D_U
# Paper 2 Table 1(a): a SimSiam pre-training's --opt, its probe's top-1 % (exp, step), the step run's gap (freq., rare)
T1A = {"simsiam": ("sgd", 81.4, 84.3, (0.035, 0.081)), "simsiam+sam": ("sam", 82.1, 84.7, (0.044, 0.075)),
       "simsiam-balanced": ("sgd --balanced", 82.0, 85.8, (0.038, 0.037)),
       "simsiam+rwsam": ("rwsam --stage1 {ckpt}", 82.7, 85.6, (0.037, 0.066))}
T1A_RUNS = []
for v in ("", "-step"):
    for m, (opt, exp, step, _) in T1A.items():
        rw = m == "simsiam+rwsam"           # rwSAM's stage 2: a fresh model, from the simsiam run of its column
        T1A_RUNS += [R(f"pretrain/{m}{v}", 1 + rw, f"pretrain/simsiam{v}" if rw else "",
                       f"simsiam_rwsam.py {{D}} --seed {{s}} --opt {opt}" + (" --imb-type step" if v else "")),
                     R(f"{m}{v}", 2 + rw, f"pretrain/{m}{v}", PROBE, cifar10=(step if v else exp,))]
CIFAR = [
    # Paper 1 Table 2 (and Table 1(b)'s SVHN-LT base): loss × rule of ldam_drw.py; +ssp: from rotation pre-training.
    R("ce", 1, "", sup("ce", "none"),
      cifar10=(29.64, 25.19, 13.61), cifar100=(61.68, 56.15, 44.29), svhn=(19.98, 17.50, 11.46)),
    R("cb-ce", 1, "", sup("ce", "reweight"), cifar10=(27.63, 21.95, 13.23), cifar100=(61.44, 55.45, 42.88)),
    R("focal", 1, "", sup("focal", "none"), cifar10=(29.62, 23.29, 13.34), cifar100=(61.59, 55.68, 44.22)),
    R("cb-focal", 1, "", sup("focal", "reweight"), cifar10=(25.43, 20.73, 12.90), cifar100=(60.40, 54.83, 42.01)),
    R("ce-drw", 1, "", sup("ce", "drw"), cifar10=(24.94, 21.10, 13.57), cifar100=(59.49, 55.31, 43.78)),
    R("ce-drs", 1, "", sup("ce", "drs"), cifar10=(25.53, 21.39, 13.73), cifar100=(59.62, 55.46, 43.95)),
    R("ldam", 1, "", sup("ldam", "none"), cifar10=(26.65, 23.18, 13.04), cifar100=(60.40, 55.03, 43.09)),
    R("ldam-drw", 1, "", sup("ldam", "drw"),
      cifar10=(22.97, 19.06, 11.84), cifar100=(57.96, 53.85, 41.29), svhn=(16.66, 14.59, 10.27)),
    R(ROT, 1, "", "rotation_ssp.py {D} --seed {s}"),
    R("ce+ssp", 2, ROT, sup("ce", "none") + SSP, cifar10=(), cifar100=()),
    R("cb-ce+ssp", 2, ROT, sup("ce", "reweight") + SSP, cifar10=(23.47, 19.60, 11.57), cifar100=(56.94, 52.91, 41.94)),
    R("focal+ssp", 2, ROT, sup("focal", "none") + SSP, cifar10=(), cifar100=()),
    R("cb-focal+ssp", 2, ROT, sup("focal", "reweight") + SSP,
      cifar10=(22.90, 18.74, 11.75), cifar100=(57.03, 53.12, 41.16)),
    R("ce-drw+ssp", 2, ROT, sup("ce", "drw") + SSP, cifar10=(23.04, 19.93, 12.66), cifar100=(57.21, 53.57, 41.77)),
    R("ce-drs+ssp", 2, ROT, sup("ce", "drs") + SSP, cifar10=(), cifar100=()),
    R("ldam+ssp", 2, ROT, sup("ldam", "none") + SSP, cifar10=(), cifar100=()),
    R("ldam-drw+ssp", 2, ROT, sup("ldam", "drw") + SSP, cifar10=(22.17, 17.87, 11.47), cifar100=(56.57, 52.89, 41.09)),
    # Paper 1 Table 1: self-training on the CE / LDAM-DRW base at ρ_U = 1, ρ/2, ρ, 2ρ (--rho-u 1, 2·RHO, RHO, RHO/2).
    R("ce+st", 2, "ce", CE_ST % 1, cifar10=(17.48, 16.79, 10.22), svhn=(13.02, 13.07, 10.01)),
    R("ce+st-half", 2, "ce", CE_ST % "{rho2}", cifar10=(18.42, 16.88, 10.48), svhn=(13.73, 13.36, 10.20)),
    R("ce+st-same", 2, "ce", CE_ST % "{rho}", cifar10=(18.74, 18.36, 10.86), svhn=(14.65, 13.16, 10.06)),
    R("ce+st-double", 2, "ce", CE_ST % "{rho_half}", cifar10=(20.06, 19.94, 11.04), svhn=(15.04, 14.54, 10.71)),
    R("ldam-drw+st", 2, "ldam-drw", LDAM_ST % 1, cifar10=(14.96, 14.33, 8.72), svhn=(10.00,)),
    R("ldam-drw+st-half", 2, "ldam-drw", LDAM_ST % "{rho2}", cifar10=(15.18, 14.70, 8.24), svhn=()),
    R("ldam-drw+st-same", 2, "ldam-drw", LDAM_ST % "{rho}", cifar10=(15.33, 14.93, 8.68), svhn=()),
    R("ldam-drw+st-double", 2, "ldam-drw", LDAM_ST % "{rho_half}", cifar10=(15.55, 15.24, 8.97), svhn=()),
    R("ce+crt", 2, "ce", "crt.py --ckpt {ckpt}", cifar10=()),
    *T1A_RUNS,
    R("pretrain/moco", 1, "", "moco_ssp.py {D} --seed {s}"), R("moco", 2, "pretrain/moco", PROBE, cifar10=()),
    # Paper 1 Figs. 2-3 (RHO=0.02, CE base): relevance at ρ_U = 50, then ρ_U at 60% relevance; |D_U| = 4·|D_L|.
    *[R(f"fig2-r{r}", 2, "ce", fig(0.02, f"{r / 100:g}"), cifar10=()) for r in (20, 40, 60, 80, 100)],
    *[R(f"fig3-u{u}", 2, "ce", fig(f"{1 / u:g}", 0.6), cifar10=()) for u in (1, 25, 50, 100, 200)],
    # Paper 1 App. E.3 (LDAM-DRW + D_U of 1-4x |D_L|; 5x: ldam-drw+st), F.3 (step imbalance): numbers not in the text
    *[R(f"e3-du{m}", 2, "ldam-drw", LDAM_ST % 1 + f" --unlabeled-mult {m}", cifar10=()) for m in (1, 2, 3, 4)],
    *[R(f"e4-dl{f}", 1, "", LDAM_ST.replace(" --base {ckpt}", "") % 1 + f" --labeled-frac {f}", cifar10=())
      for f in (0.25, 0.5, 0.75)],                   # App. E.4: D_L cut per class, the same |D_U|; 1: ldam-drw+st
    R("pretrain/rotation-step", 1, "", "rotation_ssp.py {D} --seed {s} --imb-type step"),
    *[R(f"f3-{n}{ssp}", 2 if ssp else 1, "pretrain/rotation-step" if ssp else "",
        sup(loss, rule) + " --imb-type step" + (SSP if ssp else ""), cifar10=())
      for n, loss, rule in (("ce", "ce", "none"), ("ldam-drw", "ldam", "drw")) for ssp in ("", "+ssp")],
]
BAL = sup("ce", "resample") + " --resample-weights inverse"
LT = [
    # Tables 3-4: CE, CE with class-balanced sampling, LDAM-DRW; +ssp: from MoCo v2; cRT: the classifier retrained.
    R("pretrain/moco", 1, "", "moco_ssp.py {data} --train-list {train} --rho 1 --arch {arch} --seed {s} "
      "--recipe paper1"),
    R("ce", 1, "", sup("ce", "none"), imagenet_lt=(65.2, 61.6), inat=(39.3,)),
    R("ce+ssp", 2, "pretrain/moco", sup("ce", "none") + SSP, imagenet_lt=(64.1, 54.4), inat=(35.6,)),
    R("ce-balanced", 1, "", BAL, imagenet_lt=(62.9, 59.7), inat=(36.5,)),
    R("ce-balanced+ssp", 2, "pretrain/moco", BAL + SSP, imagenet_lt=(61.6, 52.4), inat=(34.1,)),
    R("ldam-drw", 1, "", sup("ldam", "drw"), inat=(35.4,)),
    R("ldam-drw+ssp", 2, "pretrain/moco", sup("ldam", "drw") + SSP, inat=(33.7,)),
    R("crt", 3, "ce", "crt.py --ckpt {ckpt} --seed {s} {val}", imagenet_lt=(58.2, 52.7), inat=(34.8,)),
    R("crt+ssp", 3, "ce+ssp", "crt.py --ckpt {ckpt} --seed {s} {val}", imagenet_lt=(56.8, 48.7), inat=(31.9,)),
]
ROWS = LT if SET in LTS else CIFAR
BY = {e.name: e for e in ROWS}
EXTRA = [e.name for e in ROWS if SET in e.paper and e.name.startswith(("e3-", "e4-", "f3-"))]       # run only when named
ALL = [e.name for e in ROWS if SET in e.paper and e.name not in EXTRA and (RHO == "0.02" or e.name[:3] != "fig")]

DRY, TABLE, FIG1, T1B, CV, SEMI, picked = 0, 0, 0, 0, 0, 0, []
for a in sys.argv[2:]:
    if a in ("--dry-run", "table", "cv-table", "paper2-fig1", "paper2-table1b", "cv", "paper2-semi"):
        DRY, FIG1, T1B = DRY or a == "--dry-run", FIG1 or a == "paper2-fig1", T1B or a == "paper2-table1b"
        CV, SEMI, TABLE = CV or a == "cv", SEMI or a == "paper2-semi", {"table": 1, "cv-table": 2}.get(a, TABLE)
    elif a in ("-h", "--help"):
        print(re.sub("(?m)^# ?", "", open(sys.argv[1]).read().split("\nset -euo")[0].split("\n", 1)[1]))
        sys.exit(0)
    elif a in ("fig2", "fig3"):
        picked += [r for r in ALL if r.startswith(a + "-")] or \
            die(f"{a} is paper 1's CIFAR-10-LT ρ = 50 figure: run it with SET=cifar10 RHO=0.02")
    elif a in ALL + EXTRA + ["e3", "e4", "f3"]:               # a row, or the rows of an appendix group
        picked += [r for r in EXTRA if r.startswith(a + "-")] if a in ("e3", "e4", "f3") else [a]
    else:
        die(f"unknown row '{a}'; rows: {' '.join(ALL)}")
picked = picked or ([] if CV or SEMI or T1B else ALL)
if FIG1 and SET not in ("cifar10", "imagenet_lt") or T1B and not IMG:
    die(f"paper2-fig1 runs with SET=cifar10 or imagenet_lt, paper2-table1b with SET=imagenet_lt; not SET={SET}")
if FIG1 and (bad := [m for m in METHODS if m not in ("sl", "simsiam", "moco")]):
    die(f"unknown method '{bad[0]}' in METHODS; methods: sl simsiam moco")
if IMG and FIG1 and (bad := [x for x in RHOS if x not in ("0.004", "0.0025")] + list(set(SIZES) - set(SIZE_ALL))):
    die(f"'{bad[0]}' in RHOS or SIZES: paper 2's ImageNet lists are r 0.004, 0.0025 and sizes {' '.join(SIZE_ALL)}")
if (FIG1 or T1B) and not num(SCALE) > 0:
    die(f"SCALE must be a number > 0, got '{SCALE}'")
SEMI_RUNS, SEMI_PAPER = env("RUNS", "runs/paper2-semi"), {"simsiam": 70.1, "sl": 44.3, "sl-rare": 36.5}

finals = lambda folder, runs=RUNS: [json.load(open(p))
                                    for p in sorted(glob.glob(os.path.join(runs, folder, "s*", "final.json")))]
minutes = lambda results: f"{statistics.mean(r['wall_seconds'] for r in results) / 60:.1f}" if results else "—"

def mean_std(values, digits=2):
    if len(values) < 2:
        return f"{values[0]:.{digits}f} (1 seed)" if values else "not run"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} ({len(values)} seeds)"

def trained_epochs(pattern, runs=RUNS):     # of the full-size runs: a subsampled variant trains more epochs
    found = {r["epochs"] for r in finals(pattern, runs) if r.get("subsample", 1) == 1 and "epochs" in r}
    return "/".join(map(str, sorted(found))) or "not run"

def table():
    rho = float(RHO)
    col = (0 if ARCH == "resnet10" else -1) if SET in LTS else {0.01: 0, 0.02: 1, 0.1: 2}.get(rho, 3)   # 3: no column
    name = {"cifar10": "CIFAR-10-LT", "cifar100": "CIFAR-100-LT", "svhn": "SVHN-LT", "imagenet_lt": "ImageNet-LT",
            "inat": "iNaturalist 2018"}[SET]
    print(f"{name}, {ARCH if SET in LTS else f'rho {rho:g}'}, runs in {RUNS}; ours: mean ± sample std over training "
          "seeds (the data subset is fixed: --data-seed 0), last epoch"
          + ("; SVHN errors from mean per-class accuracy" if SET == "svhn" else "")
          + "\n\n| row | metric | paper (lossless) | ours | minutes per run |\n|---|---|---|---|---|")
    for row in [r for r in ALL if r.removesuffix("-step") not in T1A] + [r for r in EXTRA if finals(r)]:
        probe, v, results = BY[row].command == PROBE, BY[row].paper[SET], finals(row)
        label = row + (" (not the paper's pool)" if any(r.get("pool") == "rest" and r.get("dataset") != "svhn"
                                                       for r in results) else "")
        print(f"| {label} | {'probe acc. %' if probe else 'error %'} | {v[col] if col < len(v) else '—'} | "
              f"{mean_std([r['top1' if probe else 'test_error'] for r in results])} | {minutes(results)} |")
    if SET != "cifar10":
        return
    def gaps(row, group):
        runs_ = finals(os.path.join("pretrain", row))
        found = [r["last"]["gap"][group]["gap"] for r in runs_ if (r.get("last") or {}).get("gap")]
        return mean_std(found, 3) if found or not runs_ else "not measured (--knn-every -1)"
    show = lambda v: v if col == 0 else "—"
    acc = lambda r: mean_std([x["top1"] for x in finals(r)])
    print(f"\nPaper 2 Table 1(a), rho {rho:g}: linear-probe top-1 % (row <name>: exp, row <name>-step: step) and the "
          "generalization gap of the step pre-training run (held-out − training SimSiam loss, frequent / rare half of "
          "the classes, mean over the run's --gap-views draws); paper numbers are for rho 0.01. SimSiam pre-training: "
          f"{trained_epochs('pretrain/simsiam*')} epochs (the authors' README: 1600; paper2-fig1's cells: 800, "
          "SimSiam-91)\n\n| row | exp: paper | exp: ours | step: paper | step: ours | gap frequent: paper | gap "
          "frequent: ours | gap rare: paper | gap rare: ours |\n|---|---|---|---|---|---|---|---|---|")
    for row, (_, exp, step, (freq, rare)) in T1A.items():
        print(f"| {row} | {show(exp)} | {acc(row)} | {show(step)} | {acc(row + '-step')} | "
              f"{show(freq)} | {gaps(row + '-step', 'frequent')} | {show(rare)} | {gaps(row + '-step', 'rare')} |")
    print("\n| pre-training | command | minutes per run |\n|---|---|---|")
    for e in (e for e in ROWS if e.name.startswith("pretrain/")):
        doc = (f"the {e.name[9:-5]} command with --imb-type step" if e.name.endswith("-step") else e.command.replace(
            " {D} --seed {s}", "").replace("--stage1 {ckpt}", "(stage 2, fresh model; weights from the simsiam run)"))
        print(f"| {e.name[9:]} | {doc} | {minutes(finals(e.name))} |")

def fig1_table():
    import eval_linear as E
    method = {"ldam_drw[he]:ce-none": "sl", "simsiam_rwsam+sgd": "simsiam", "moco_ssp[paper2]+sgd": "moco"}
    paths = sorted(p for d in ("id", "ood")
                   for p in glob.glob(os.path.join(FIG1_RUNS, d, "*", "*", "s*", "final.json")))
    if not paths:
        sys.exit(f"no finished probe under {FIG1_RUNS}/id or {FIG1_RUNS}/ood yet")
    rows, unpaired = E.gap_rows([E.read_result(p) for p in paths])
    for key, why in unpaired:
        print(f"note: eval={key[0]} method={key[2]} n={key[5]}: {why}", file=sys.stderr)
    cell = {(x["eval"], method.get(x["method"]), x["r"], x["n"]): x for x in rows}
    print(f"Paper 2 Fig. 2(a,c) on CIFAR-10, runs in {FIG1_RUNS}. A: last-epoch test top-1 % of the probe, mean±sample "
          "std over runs (a run: pre-training seed + its probe; the paper's std varies the probe only). Δ = (A(n,1) − "
          "A(n,r)) / A(n,1) in % (Eq. (1)), ± the sample std of the per-seed Δ. n and r from the pre-training class "
          "counts. The paper's claim: Δ^SSL < Δ^SL at every n and r, in-domain and out-of-domain. Pre-training epochs "
          "at full size (the subsampled variants train as many steps): " + ", ".join(
              f"{NAMES[m]} {trained_epochs(os.path.join('pretrain', m, '*'), FIG1_RUNS)}" for m in METHODS)
          + " (SimSiam in `reproduce.sh table`'s Table 1(a): 1600).")
    pm = lambda x, key, scale=1: E.pm(x[key], x[key + "_std"], scale)
    cells = lambda x: ["—"] * 3 if x is None else [pm(x, "A_balanced"), pm(x, "A_imbalanced"), pm(x, "delta", 100)]
    for ev in sorted({k[0] for k in cell}):
        title = "ID: linear probe on the full training set" if ev.startswith("linear:") else f"OOD: {ev} linear probe"
        print(f"\n### {title} ({ev})\n\n| r | n | " + " | ".join(
            f"{NAMES[m]} A(n,1) | {NAMES[m]} A(n,r) | Δ^{NAMES[m]} %" for m in METHODS) + " |")
        print("|---|---|" + "---|---|---|" * len(METHODS))
        for r, n in sorted({(k[2], k[3]) for k in cell if k[0] == ev}, key=lambda t: (-t[0], -t[1])):
            print(f"| {r:.4g} | {n} | " + " | ".join(c for m in METHODS for c in cells(cell.get((ev, m, r, n)))) + " |")

# Paper 2 Table 2 (Figs. 2(b,d), 6(a) as numbers), top-1 %: balanced at n 116K 87K 58K 29K 14K, r 0.004 at the same n,
# r 0.0025 at 80K 60K 40K 20K 10K (no balanced column there); Table 1(b): CUB, Cars, Aircraft, Pets, mean at r 0.004
NAMES = {"sl": "SL", "simsiam": "SimSiam", "moco": "MoCo v2"}
T2 = {("moco", "id"): "50.4 43.5 40.9 37.0 30.8 49.5 43.2 39.5 36.6 30.5 40.6 38.8 35.5 31.9 27.2",
      ("moco", "ood"): "80.3 79.8 79.7 77.4 77.0 80.2 80.1 79.5 77.8 77.3 79.2 78.8 77.7 75.6 74.4",
      ("sl", "id"): "54.3 51.6 46.1 40.5 26.3 52.9 49.6 44.0 37.3 24.9 46.1 42.0 36.3 27.5 20.3",
      ("sl", "ood"): "76.6 74.7 71.9 67.4 59.1 75.5 73.3 70.4 65.8 57.8 71.8 69.1 65.9 60.3 54.3",
      ("simsiam", "ood"): "80.7 80.4 79.9 78.7 77.2 80.6 79.9 79.6 78.8 76.9 79.8 79.3 78.8 77.5 76.0"}
T1B_ROWS = {"MoCo v2": ("moco", "imb", "69.9±0.7 88.4±0.4 82.9±0.6 80.1±0.6 80.3"),
            "MoCo v2+SAM": ("moco+sam", "imb", "69.9±0.5 88.8±0.5 83.4±0.4 81.5±0.8 80.9"),
            "MoCo v2, balanced": ("moco", "bal", "69.8±0.5 88.6±0.4 82.7±0.5 80.0±0.4 80.2"),
            "MoCo v2+rwSAM": ("moco+rwsam", "imb", "70.3±0.7 88.7±0.3 84.9±0.6 81.7±0.4 81.4"),
            "SimSiam": ("simsiam", "imb", "70.0±0.3 87.0±0.6 81.5±0.7 83.8±0.5 80.6"),
            "SimSiam, balanced": ("simsiam", "bal", "70.5±0.8 87.9±0.7 81.8±0.7 82.7±0.4 80.7"),
            "SimSiam+rwSAM": ("simsiam+rwsam", "imb", "70.7±0.8 88.4±0.6 82.6±0.6 84.0±0.4 81.4")}

def imagenet_table():
    top1 = lambda folder: {p.split(os.sep)[-2]: json.load(open(p))["top1"]
                           for p in glob.glob(os.path.join(FIG1_RUNS, folder, "s*", "final.json"))}
    def acc(ev, c):     # {seed: top-1 %}: the ID probe, or the mean of the seed's four fine-tunings (App. A.1)
        per = [top1(f"id/{c}")] if ev == "id" else [top1(f"ood/{t}/{c}") for t in OOD_T]
        return {s: statistics.mean(d[s] for d in per) for s in per[0] if all(s in d for d in per)}
    ms = lambda d: mean_std(list(d.values()))
    if FIG1:
        print(f"Paper 2 on ImageNet, runs in {FIG1_RUNS}: last-epoch test top-1 %, mean ± sample std over seeds (a "
              "seed: pre-training + evaluation; the paper's std: evaluation only); Δ = (A(n,1) − A(n,r)) / A(n,1) % "
              "(Eq. (1)) of each seed. Paper: Table 2, Δ from its two numbers (Fig. 1 is a plot); –: no number there.")
    for ev, title in (("id", "ID: linear probe, ImageNet train → val (Table 2, Fig. 2(b); Δ: Fig. 1(a))"),
                      ("ood", "OOD: mean fine-tuning top-1 on CUB, Cars, Aircraft, Pets (Table 2, Fig. 2(d); Δ: "
                              "Fig. 1(b); SimSiam: Fig. 6)")) if FIG1 else ():
        print(f"\n### {title}\n\n| method | r | n | A(n,1) paper | A(n,1) ours | A(n,r) paper | A(n,r) ours | "
              "Δ % paper | Δ % ours |\n" + "|---" * 9 + "|")
        for m, r, q in ((m, r, q) for m in METHODS if (m, ev) in T2 for r in RHOS for q in SIZES):
            i, p, bal, imb = SIZE_ALL.index(q), T2[m, ev].split(), acc(ev, f"{m}/r{r}-q{q}-bal"), \
                acc(ev, f"{m}/r{r}-q{q}-imb")
            pb, pi = (p[i], p[5 + i]) if r == "0.004" else ("–", p[10 + i])
            pd = f"{100 * (num(pb) - num(pi)) / num(pb):.1f}" if r == "0.004" else "–"
            n = ("116K 87K 58K 29K 14K" if r == "0.004" else "80K 60K 40K 20K 10K").split()[i]
            print(f"| {NAMES[m]} | {r} | {n} | {pb} | {ms(bal)} | {pi} | {ms(imb)} | {pd} | "
                  f"{mean_std([100 * (bal[s] - imb[s]) / bal[s] for s in bal if s in imb])} |")
    if T1B:
        cols = "".join(f" {t} paper | {t} ours |" for t in ("CUB", "Cars", "Aircraft", "Pets", "mean"))
        print(f"\nPaper 2 Table 1(b), runs in {FIG1_RUNS}: fine-tuning test top-1 % after pre-training on ImageNet-LT "
              "(r 0.004; balanced: its partner of equal n), mean ± sample std over seeds; mean: over a seed's four "
              f"targets (the paper's MoCo v2 rows swap Table 2's 80.3 balanced / 80.2)\n\n| row |{cols}\n" + "|---" * 11
              + "|")
        for row, (m, v, paper) in T1B_ROWS.items():
            ours = [ms(top1(f"ood/{t}/{m}/r0.004-q1-{v}")) for t in OOD_T] + [ms(acc("ood", f"{m}/r0.004-q1-{v}"))]
            print(f"| {row} | " + " | ".join(f"{p} | {o}" for p, o in zip(paper.split(), ours)) + " |")

def semi_table():
    print(f"Paper 2 Fig. 4 (right), runs in {SEMI_RUNS}: 5-way linear probe on the rare classes (25,000 semi-synthetic "
          "images), last-epoch test top-1 %, mean ± sample std over seeds. The paper's SSL is SimCLR (ResNet-50); "
          "ours SimSiam (CIFAR ResNet-18), both without flips.\n\n| pre-training | paper | ours |\n|---|---|---|")
    for m, ref in SEMI_PAPER.items():
        print(f"| {m} | {ref} | {mean_std([r['top1'] for r in finals(m, SEMI_RUNS)])} |")

def cv_table():
    runs = os.path.join(RUNS, "cv")
    print(f"Cross-validation of rwSAM's h, α, ρ (paper 2 App. C.1) in {runs}: weighted kNN (k 200) on the --val-frac "
          "split left out of pre-training, last epoch; mean ± sample std over seeds. Never the test set.\n\n"
          "| setting | kNN top-1 % (val) | kNN mean per-class % (val) | seeds |\n|---|---|---|---|")
    show = lambda v: f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")
    for folder in sorted(glob.glob(os.path.join(runs, "*"))):
        last = [r["last"] for r in finals(os.path.basename(folder), runs) if r.get("last")]
        if last:
            print(f"| {os.path.basename(folder)} | {show([x['knn_top1'] for x in last])} | "
                  f"{show([x['knn_class_mean'] for x in last])} | {len(last)} |")

if TABLE:
    sys.exit(cv_table() if TABLE == 2 else imagenet_table() if IMG and (FIG1 or T1B) else fig1_table() if FIG1 else
             semi_table() if SEMI else table())

def data_step(name, *args):           # datasets_lt.<name>(*args); a DataError is one line and exit 2
    import datasets_lt
    try:
        getattr(datasets_lt, name)(*args)
    except datasets_lt.DataError as e:
        die(f"DATA: {e}")

NEED = {"IMAGENET_TRAIN": env("IMAGENET_TRAIN"), **{f"{t.upper()}_ROOT": env(f"{t.upper()}_ROOT") for t in OOD_T}}
if IMG and (FIG1 or T1B) and (unset := [k for k, v in NEED.items() if not v]):
    die(f"set {', '.join(unset)}: paper 2's ImageNet runs need the full ImageNet train list and the four fine-tuning "
        "targets (bash reproduce.sh --help says what each holds)")
if not DRY:     # the shared settings, checked before anything is launched
    if not (re.fullmatch(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?", RHO) and 0 < float(RHO) <= 1):
        die(f"RHO={RHO} must be a tail/head ratio in (0, 1] (the papers' imbalance 100 is RHO=0.01)")
    if not (re.fullmatch(r"-?[0-9]+", GPU) and int(GPU) >= -1):
        die(f"GPU={GPU} must be a GPU index (0, 1, ...) or -1 for the CPU")
    data = shlex.split(DATA)
    flag = lambda name, default: data[data.index(name) + 1] if name in data[:-1] else default
    dataset, root = flag("--dataset", "cifar10"), flag("--data-root", "./data")
    if dataset == "folder" and (missing := [s for s in ("train", "test") if not os.path.isdir(os.path.join(root, s))]):
        die(f"DATA: no {' or '.join(missing)} split under '{root}' (a folder dataset needs {root}/train/<class>/* "
            f"and {root}/test/<class>/*); unpack the data there or set DATA")
    if dataset in LTS and not os.path.isdir(root):
        die(f"DATA: no folder '{root}'; set LT_ROOT to the folder the image lists' paths start from")
    if dataset not in ("folder", *LTS) and "--download" not in data:
        data_step("load_split", dataset, root, True)
    if int(GPU) >= 0:
        import torch
        if not torch.cuda.is_available():
            die(f"GPU={GPU} but CUDA is not available on this machine; set GPU=-1 to run everything on the CPU")
        if int(GPU) >= torch.cuda.device_count():
            die(f"GPU={GPU}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
RUNNING, FAILED = {}, []
report = lambda line: FAILED.append(line) or print(line)

def settle(limit):
    while len(RUNNING) >= limit:
        time.sleep(0.1)
        for proc in [p for p in RUNNING if p.poll() is not None]:
            out, rc = RUNNING.pop(proc), proc.returncode
            if rc == 0:
                print(f"finished {out}")
                continue
            last = open(f"{out}/log.txt", "rb").read().removesuffix(b"\n").rsplit(b"\n", 1)[-1].decode(errors="replace")
            report(f"FAILED {out} (exit {rc if rc > 0 else 128 - rc}): {last}; see {out}/log.txt")

def launch(stages, entries, runs):
    for n in stages:
        settle(1)                   # a stage starts once the one before has ended
        print(f"# stage {n}" if DRY else f"== stage {n}")
        for s, e in ((s, e) for s in SEEDS for e in entries if e.stage == n):
            v, out = dict(VARS, s=s, ckpt=f"{runs}/{e.needs}/s{s}/last.pt"), f"{runs}/{e.name}/s{s}"
            script, *args = (w for t in e.command.split() for w in (
                v[t[1:-1]] if isinstance(v.get(t[1:-1]), list) else [t.format(**v)]))
            launcher = [PYTHON] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", NPROC]
                                   if NPROC != "1" and script in ("ldam_drw.py", "moco_ssp.py", "crt.py",
                                                                  "simsiam_rwsam.py") else [])
            cmd = [*launcher, script, *args, "--out", out, "--gpu", GPU, *ARGS, *env(f"ARGS_{script[:-3]}").split()]
            if DRY or os.path.isfile(f"{out}/final.json"):
                print(" ".join(cmd) if DRY else f"done already: {out}")
                continue
            if os.path.isfile(f"{out}/last.pt") and script not in ("crt.py", "eval_linear.py", "eval_ood.py"):
                cmd = [*launcher, script, "--resume", f"{out}/last.pt", "--gpu", GPU]
            settle(int(JOBS))
            if e.needs and not os.path.isfile(v["ckpt"]):
                report(f"skipped {out}: {v['ckpt']} is missing")
                continue
            os.makedirs(out, exist_ok=True)
            print(f"start {out}: {' '.join(cmd)}")
            with open(f"{out}/log.txt", "ab") as log:
                RUNNING[subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)] = out

def finish(message, then=lambda: None):
    if DRY:
        sys.exit(0)
    settle(1)
    if FAILED:
        print(f"== {len(FAILED)} run(s) did not finish:\n" + "\n".join(FAILED))
        sys.exit(1)
    print(message)
    sys.exit(then())

epochs = lambda budget: max(1, int(budget * num(SCALE) + 0.5))
if IMG and (FIG1 or T1B):   # Paper 2 on ImageNet (§2.2, §4.1, App. A): the lists, each pre-training, its evaluations
    train, lists, val = NEED["IMAGENET_TRAIN"], f"{FIG1_RUNS}/lists", env("IMAGENET_VAL", TEST)
    if not DRY and (absent := [f"{k}={v}" for k, v in {**NEED, "IMAGENET_VAL": val}.items() if not os.path.exists(v)]):
        die(f"{', '.join(absent)}: no such file or folder (bash reproduce.sh --help says what each holds)")
    lst = lambda r, q, v: f"{lists}/{'bal-' * (v == 'bal')}r{r}{f'-sub{q}' * (q != '1')}.txt"
    print(f"# stage lists\n{PYTHON} datasets_lt.py --train-list {train} --lt-list {TRAIN} --out-dir {lists}" if DRY
          else f"== the lists in {lists}")
    if not DRY and not all(os.path.isfile(lst(r, q, v)) for r in ("0.004", "0.0025") for q in SIZE_ALL
                           for v in ("imb", "bal")):
        data_step("write_imagenet_variants", train, lists, 0, TRAIN)   # data seed 0: one set of lists for every method
    ev = {"id": f"eval_linear.py --ckpt {{ckpt}} {{data}} --train-list {train} --test-list {val} --epochs "
                f"{epochs(100)}",
          **{t: f"eval_ood.py --ckpt {{ckpt}} --target {t.replace('cub', 'folder')} --data-root "
                f"{NEED[t.upper() + '_ROOT']} --epochs {epochs(150)}" for t in OOD_T}}
    moco, cells = "moco_ssp.py --recipe paper2 --opt", {}
    ssl = {"moco": f"{moco} sgd", "moco+sam": f"{moco} sam", "moco+rwsam": f"{moco} rwsam --stage1 {{ckpt}}",
           "simsiam": "simsiam_rwsam.py --opt sgd", "simsiam+rwsam": "simsiam_rwsam.py --opt rwsam --stage1 {ckpt}"}
    def cell(m, r, q, v, evals, needs=""):          # method m pre-trained on one list, then its evaluations
        c, stage, data = f"{m}/r{r}-q{q}-{v}", 1 + bool(needs), f"{{data}} --train-list {lst(r, q, v)} --seed {{s}}"
        cells[c] = R(f"pretrain/{c}", stage, needs, f"ldam_drw.py --recipe he {data} --test-list {val} --epochs "
                     f"{round(epochs(90) / num(q))}" if m == "sl" else f"{ssl[m]} {data} --epochs {epochs(300)}"
                     + f" --subsample {q}" * (q != "1"))
        for e in evals:
            name = f"id/{c}" if e == "id" else f"ood/{e}/{c}"
            cells[name] = R(name, stage + 1, f"pretrain/{c}", f"{ev[e]} --seed {{s}}")
    for m, r, q, v in ((m, r, q, v) for m in METHODS for r in RHOS for q in SIZES for v in ("imb", "bal") if FIG1):
        cell(m, r, q, v, ("id",) * (m != "simsiam") + OOD_T)
    for m, v, _ in T1B_ROWS.values() if T1B else ():
        cell(m, "0.004", "1", v, OOD_T, f"pretrain/{m.split('+')[0]}/r0.004-q1-imb" * ("rwsam" in m))
    launch((1, 2, 3), list(cells.values()), FIG1_RUNS)
    finish("== all runs finished", imagenet_table)

if FIG1:    # Paper 2 Fig. 2(a,c) (§2.2, App. A.1): each CIFAR-10 variant and its balanced partner of equal n, probed
    pre = {"sl": ("ldam_drw.py --recipe he", 200), "simsiam": ("simsiam_rwsam.py --opt sgd", 800),
           "moco": ("moco_ssp.py", 200)}                       # the pre-training command and its epochs at SCALE 1
    probe, cells = f"--seed {{s}} --epochs {epochs(100)}", []
    for m, r, q, v in ((m, r, q, v) for m in METHODS for r in RHOS for q in SIZES for v in ("imb", "bal")):
        c = f"{m}/r{r}-q{q}-{v}"
        cells += [R(f"pretrain/{c}", 1, "", f"{pre[m][0]} {{data}} --rho {r} --seed {{s}} --epochs {epochs(pre[m][1])}"
                    + (f" --subsample {q}" if q != "1" else "") + (" --balanced" if v == "bal" else "")),
                  R(f"id/{c}", 2, f"pretrain/{c}", f"eval_linear.py --ckpt {{ckpt}} {probe}"),
                  R(f"ood/{c}", 2, f"pretrain/{c}", f"eval_ood.py --ckpt {{ckpt}} {{ood}} {probe}")]
    launch((1, 2), cells, FIG1_RUNS)
    finish("== all runs finished", fig1_table)

if SEMI:    # Paper 2 §3.2 (Fig. 4, App. B): the semi-synthetic folders from DATA's CIFAR-10, then the runs of its table
    out = f"{SEMI_RUNS}/data"
    if not DRY and not os.path.isdir(f"{out}/semi-rare10"):
        print(f"writing the semi-synthetic folders in {out}")
        data_step("write_semi_synthetic", dataset, root, out)       # DATA's, as the settings check read them
    imb = f"--dataset folder --data-root {out}/semi --rho 0.002 --imb-type step --no-flip --seed {{s}}"
    rare = f"--dataset folder --data-root {out}/semi-rare10 --rho 1 --no-flip --seed {{s}}"
    pre = {"simsiam": f"simsiam_rwsam.py --opt sgd {imb}", "sl": f"ldam_drw.py --recipe he {imb}",
           "sl-rare": f"ldam_drw.py --recipe he {rare}"}
    launch((1, 2), [R(f"pretrain/{m}", 1, "", c) for m, c in pre.items()] + [R(m, 2, f"pretrain/{m}",
           f"eval_linear.py --ckpt {{ckpt}} --dataset folder --data-root {out}/semi-rare --seed {{s}}") for m in pre],
           SEMI_RUNS)
    finish("== all runs finished", semi_table)

chain = lambda name: {name} | chain(BY[name].needs) if name else set()     # a run and the runs it starts from
wanted = set().union(*map(chain, picked))
launch((1, 2, 3), sorted((e for e in ROWS if e.name in wanted), key=lambda e: ORDER.index(e.command.split()[0])), RUNS)
if CV:  # Paper 2 App. C.1 picks ρ and α "with cross validation": one value at a time around the defaults (kept)
    cv = "simsiam_rwsam.py {data} --rho {rho} --seed {s} --opt %s --val-frac {frac}"
    tries = [("default", "")] + [(f"{name}={x}", f" {flag} {x}") for name, flag, var, default in (
        ("h", "--bandwidth", "CV_H", "0.1 0.2 0.5 1.0"), ("alpha", "--alpha", "CV_ALPHA", "0.5 2.0"),
        ("rho", "--sam-rho", "CV_RHO", "0.5 2 7")) for x in env(var, default).split()]
    launch(("cv-1", "cv-2"), [R("cv/stage1-simsiam", "cv-1", "", cv % "sgd")] + [R(f"cv/{name}", "cv-2",
           "cv/stage1-simsiam", cv % "rwsam --stage1 {ckpt}" + flags) for name, flags in tries], RUNS)
finish("== all runs finished; the table: bash reproduce.sh table")
EOF
