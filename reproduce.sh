#!/usr/bin/env bash
# The README's reproduction table: CIFAR-10-LT, every method of both papers, several seeds, one GPU.
#
#   bash reproduce.sh                  # every row, seeds 0 1 2, CIFAR-10 (JPEG q75) in .data/cifar10_jpg
#   bash reproduce.sh ce ldam-drw      # only these rows (and the runs they need)
#   bash reproduce.sh --dry-run        # print the commands, stage by stage, and run nothing
#   bash reproduce.sh table            # the Markdown table of the runs finished so far
#   bash reproduce.sh paper2-fig1      # paper 2 Fig. 1(a): SL vs SSL at equal n, balanced vs imbalanced
#   bash reproduce.sh paper2-fig1 table            # its table of A(n, 1), A(n, r) and Δ (also --dry-run)
#   POOL_ROOT=CINIC bash reproduce.sh ce+st ldam-drw+st          # paper 1 Table 1(a) with a real D_U
#   SET=cifar100 RHO=0.02 bash reproduce.sh                      # Table 2, CIFAR-100-LT, ρ = 50 column
#   SET=svhn bash reproduce.sh                                   # Table 1(b), SVHN-LT
#   RHO=0.02 POOL_ROOT=CINIC bash reproduce.sh fig2 fig3          # Figs. 2-3 (CIFAR-10-LT ρ = 50 only)
#   SET=imagenet_lt LT_ROOT=IMNET LT_LISTS=LISTS bash reproduce.sh  # Table 3: MoCo SSP → CE / cRT (ResNet-50)
#   SET=inat LT_ROOT=INAT LT_LISTS=LISTS bash reproduce.sh          # Table 4 (+ LDAM-DRW)
#   SET=inat NPROC=8 LT_ROOT=INAT LT_LISTS=LISTS bash reproduce.sh  # the same, each run on 8 GPUs (torchrun)
#   bash reproduce.sh cv               # paper 2's cross-validation of h, α, ρ for rwSAM (not part of "every row")
#   bash reproduce.sh cv-table         # its table: kNN accuracy on the validation split per setting
#
# Settings, from the environment:
#   SET    cifar10 (default: both papers), cifar100 (paper 1 Table 2), svhn (paper 1 Table 1(b)),
#          imagenet_lt (Table 3) or inat (Table 4)
#   LT_ROOT, LT_LISTS  ImageNet-LT / iNaturalist 2018: the image root and the folder of Kang et al.'s lists
#          (ImageNet_LT_{train,val,test}.txt; iNaturalist18_{train,val}.txt, whose val list is the test set)
#   ARCH   ImageNet-LT backbone: resnet50 (default) or resnet10 (Table 3's two columns); iNat: resnet50.
#   NPROC  ImageNet-LT / iNat: processes (GPUs) per run (default 1: one GPU, plain python). NPROC > 1 launches
#          ldam_drw.py, moco_ssp.py and crt.py with torchrun --standalone --nproc_per_node NPROC on GPUs
#          0 … NPROC-1 (GPU=-1: gloo on the CPU); --batch-size stays the global batch, so the runs are the
#          one-GPU runs (BatchNorm synchronised). JOBS then defaults to 1: each run takes every GPU.
#          Kang et al. trained on 4-8 GPUs.
#   DATA   data flags of the training scripts   (default: cifar10: --dataset folder --data-root
#          .data/cifar10_jpg, lossless elsewhere: DATA="--dataset cifar10 --download"; cifar100 / svhn:
#          --dataset cifar100 / svhn --data-root ./data --download)
#   RHO    tail/head ratio                       (default 0.01; the papers' ρ = 100; 0.02 and 0.1 are the
#          ρ = 50 and ρ = 10 columns)
#   POOL_ROOT  CINIC-10 folder: the unlabeled pool of the CIFAR-10 self-training rows (+st, fig2, fig3).
#          Without it those rows draw D_U from CIFAR-10's own leftover training images, capped class by
#          class, and the table marks them "not the paper's pool". SVHN always uses its extra split.
#   C100_ROOT  folder holding cifar-100-python, the irrelevant images of fig2/fig3 (default ./data)
#   SEEDS  seeds                                 (default "0 1 2")
#   JOBS   runs at once on the GPU               (default 6: seeds and independent rows share one GPU)
#   GPU    GPU index, -1 for the CPU             (default 0)
#   RUNS   output folder                         (default runs/repro-<RHO>)
#   ARGS   flags appended to every command, ARGS_<script> to one script's (ARGS_moco_ssp="--amp")
#   PYTHON interpreter                           (default python)
#   CV_H, CV_ALPHA, CV_RHO  values swept by `cv`, one at a time around the defaults (h median, α 1.2, ρ 5)
#   CV_FRAC validation fraction of the `cv` runs   (default 0.1)
# RHO, GPU and the data that DATA names are checked before anything starts (one line, exit 2); a run
# that fails is reported on the console with the last line of its log.txt.
# paper2-fig1 only (RHO is not used; RUNS defaults to runs/paper2-fig1):
#   RHOS    imbalance ratios r                   (default "0.1 0.01": n = 20,431 and 12,406 at full size)
#   SIZES   downsampling ratios                  (default "1 0.75 0.5 0.25 0.125")
#   METHODS pre-training methods                 (default "sl simsiam moco": ldam_drw.py --recipe he,
#           simsiam_rwsam.py --opt sgd, moco_ssp.py)
#   SCALE   multiplies every full-size epoch budget (SL 200, SimSiam 800, MoCo 200) and the probes' 100
#           epochs, at least 1 each (default 1; SCALE=0.05 for a quick look). Downsampled variants train
#           round(epochs / ratio) epochs, as the scripts do (App. A.1: equal optimizer steps)
#   OOD     eval_ood.py's target flags for the OOD probe (default "--target stl10 --data-root ./data", the
#           folder holding stl10_binary/; ARGS_eval_ood="--download" fetches it)
#
# Runs go to RUNS/<row>/s<seed>/ (the row's number is in its final.json) and pre-training runs to
# RUNS/pretrain/<method>/s<seed>/. A run whose final.json exists is skipped; one with a last.pt but no
# final.json is continued with --resume, so an interrupted reproduce.sh picks up where it stopped.
# Three stages, each waiting for the one before: (1) supervised rows and pre-training, (2) rows that
# start from a stage-1 checkpoint (+SSP, +self-training, +cRT, rwSAM stage 2, linear probes),
# (3) the rwSAM probe. Every row is run exactly as its script's docstring says; nothing is tuned here.
set -euo pipefail
cd "$(dirname "$0")"

SET=${SET:-cifar10}
case $SET in
    cifar10) DEFAULT_DATA="--dataset folder --data-root .data/cifar10_jpg" ;;
    cifar100|svhn) DEFAULT_DATA="--dataset $SET --data-root ./data --download" ;;
    imagenet_lt|inat) DEFAULT_DATA="--dataset $SET --data-root ${LT_ROOT:-./data/$SET}" ;;
    *) echo "reproduce.sh: SET must be cifar10, cifar100, svhn, imagenet_lt or inat, got '$SET'" >&2; exit 2 ;;
esac
DATA=${DATA:-$DEFAULT_DATA}
RHO=${RHO:-0.01}
SEEDS=${SEEDS:-0 1 2}
NPROC=${NPROC:-1}
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "reproduce.sh: NPROC must be a whole number >= 1, got '$NPROC'" >&2; exit 2; }
[[ $NPROC == 1 || $SET == imagenet_lt || $SET == inat ]] ||
    { echo "reproduce.sh: NPROC (torchrun) is for SET=imagenet_lt or inat; the $SET runs use one GPU each" >&2; exit 2; }
[[ $NPROC != 1 ]] && JOBS=${JOBS:-1}
JOBS=${JOBS:-6}
GPU=${GPU:-0}
USER_RUNS=${RUNS:-}
ARCH=${ARCH:-resnet50}
if [[ $SET == cifar10 ]]; then RUNS=${RUNS:-runs/repro-$RHO}
elif [[ $SET == imagenet_lt || $SET == inat ]]; then RUNS=${RUNS:-runs/repro-$SET-$ARCH}
else RUNS=${RUNS:-runs/repro-$SET-$RHO}; fi
LT_LISTS=${LT_LISTS:-${LT_ROOT:-./data/$SET}}
if [[ $SET == imagenet_lt ]]; then
    TRAIN_LIST=$LT_LISTS/ImageNet_LT_train.txt; VAL_LIST=$LT_LISTS/ImageNet_LT_val.txt; TEST_LIST=$LT_LISTS/ImageNet_LT_test.txt
else
    TRAIN_LIST=$LT_LISTS/iNaturalist18_train.txt; VAL_LIST=""; TEST_LIST=$LT_LISTS/iNaturalist18_val.txt
fi
POOL_ROOT=${POOL_ROOT:-}
C100_ROOT=${C100_ROOT:-./data}
ARGS=${ARGS:-}
PYTHON=${PYTHON:-python}
FIG1_RUNS=${RUNS_FIG1:-${USER_RUNS:-runs/paper2-fig1}}

# Paper 1 Table 2: loss × rule of ldam_drw.py.
SUPERVISED="ce cb-ce focal cb-focal ce-drw ce-drs ldam ldam-drw"
declare -A RULE=(
    [ce]="--loss ce --rule none"        [cb-ce]="--loss ce --rule reweight"
    [focal]="--loss focal --rule none"  [cb-focal]="--loss focal --rule reweight"
    [ce-drw]="--loss ce --rule drw"     [ce-drs]="--loss ce --rule drs"
    [ldam]="--loss ldam --rule none"    [ldam-drw]="--loss ldam --rule drw"
)
# Paper 1 Table 1: self-training on the CE / LDAM-DRW base, one row per ρ_U column (1, ρ/2, ρ, 2ρ in the
# paper's head/tail convention: rho_u = 1, 2·RHO, RHO, RHO/2 here).
ST_ROWS=""
declare -A RHO_U
for r in ce ldam-drw; do
    for u in "" -half -same -double; do ST_ROWS="$ST_ROWS $r+st$u"; done
    RHO_U[$r+st]=1
    RHO_U[$r+st-half]=$(awk -v r="$RHO" 'BEGIN { printf "%g", (2 * r < 1 ? 2 * r : 1) }')
    RHO_U[$r+st-same]=$RHO
    RHO_U[$r+st-double]=$(awk -v r="$RHO" 'BEGIN { printf "%g", r / 2 }')
done
ST_ROWS=${ST_ROWS# }
# Paper 1 Figs. 2-3 (CIFAR-10-LT ρ = 50, CE base): relevance sweep at ρ_U = 50, then ρ_U sweep at 60%
# relevance; |D_U| = 4·|D_L| at every point, so that CIFAR-100's 50,000 images fill 80% irrelevance.
FIG2="fig2-r20 fig2-r40 fig2-r60 fig2-r80 fig2-r100"
FIG3="fig3-u1 fig3-u25 fig3-u50 fig3-u100 fig3-u200"
declare -A FIG=(
    [fig2-r20]="--rho-u 0.02 --relevance 0.2" [fig2-r40]="--rho-u 0.02 --relevance 0.4"
    [fig2-r60]="--rho-u 0.02 --relevance 0.6" [fig2-r80]="--rho-u 0.02 --relevance 0.8"
    [fig2-r100]="--rho-u 0.02 --relevance 1"
    [fig3-u1]="--rho-u 1 --relevance 0.6" [fig3-u25]="--rho-u 0.04 --relevance 0.6"
    [fig3-u50]="--rho-u 0.02 --relevance 0.6" [fig3-u100]="--rho-u 0.01 --relevance 0.6"
    [fig3-u200]="--rho-u 0.005 --relevance 0.6"
)
if [[ -n $POOL_ROOT ]]; then POOL="--pool cinic10 --pool-root $POOL_ROOT"
else POOL="--pool-shortfall cap"; fi         # CIFAR-10's own leftovers: not the paper's pool
case $SET in
    cifar10)
        ALL_ROWS="$SUPERVISED $(for r in $SUPERVISED; do echo -n "$r+ssp "; done)$ST_ROWS ce+crt"
        ALL_ROWS="$ALL_ROWS simsiam simsiam+sam simsiam-balanced simsiam+rwsam"
        ALL_ROWS="$ALL_ROWS simsiam-step simsiam+sam-step simsiam-balanced-step simsiam+rwsam-step moco"
        [[ $RHO == 0.02 ]] && ALL_ROWS="$ALL_ROWS $FIG2 $FIG3" ;;
    cifar100) ALL_ROWS="$SUPERVISED $(for r in $SUPERVISED; do echo -n "$r+ssp "; done)" ;;
    svhn) ALL_ROWS="ce ldam-drw $ST_ROWS"; POOL="" ;;
    imagenet_lt) ALL_ROWS="ce ce+ssp ce-balanced ce-balanced+ssp crt crt+ssp" ;;
    inat) ALL_ROWS="ce ce+ssp ce-balanced ce-balanced+ssp ldam-drw ldam-drw+ssp crt crt+ssp" ;;
esac
# Tables 3-4 rows: CE (uniform sampling), CE (balanced: Kang et al.'s ClassAwareSampler, i.e. exactly
# class-balanced draws), LDAM-DRW; +SSP starts from the MoCo v2 checkpoint; cRT re-trains the classifier of
# the CE (uniform) model.
declare -A LT_RULE=([ce]="--loss ce --rule none" [ce-balanced]="--loss ce --rule resample --resample-weights inverse"
                    [ldam-drw]="--loss ldam --rule drw")

CV_H=${CV_H:-0.1 0.2 0.5 1.0}
CV_ALPHA=${CV_ALPHA:-0.5 2.0}
CV_RHO=${CV_RHO:-0.5 2 7}
CV_FRAC=${CV_FRAC:-0.1}

DRY=0
TABLE=0
FIG1=0
CV=0
ROWS=""
for a in "$@"; do
    case $a in
        --dry-run) DRY=1 ;;
        table) TABLE=1 ;;
        paper2-fig1) FIG1=1 ;;
        cv) CV=1 ;;
        cv-table) TABLE=2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        fig2|fig3) [[ " $ALL_ROWS " == *" $a-"* ]] || {
               echo "reproduce.sh: $a is paper 1's CIFAR-10-LT ρ = 50 figure: run it with SET=cifar10 RHO=0.02" >&2; exit 2; }
           [[ $a == fig2 ]] && ROWS="$ROWS $FIG2" || ROWS="$ROWS $FIG3" ;;
        *) [[ " $ALL_ROWS " == *" $a "* ]] || { echo "reproduce.sh: unknown row '$a'; rows: $ALL_ROWS" >&2; exit 2; }
           ROWS="$ROWS $a" ;;
    esac
done
[[ $CV == 1 && -z $ROWS ]] && ROWS=none
ROWS=${ROWS:-$ALL_ROWS}

if [[ $FIG1 == 1 && $TABLE == 1 ]]; then
    RUNS=$FIG1_RUNS METHODS=${METHODS:-sl simsiam moco} exec "$PYTHON" - <<'EOF'
# Paper 2 Fig. 1(a) / Eq. (1) on CIFAR-10 from the probes' final.json files, paired by eval_linear.gap_rows.
import glob, os, sys
sys.path.insert(0, os.getcwd())
import eval_linear as E

runs = os.environ["RUNS"]
NAMES = {"sl": "SL", "simsiam": "SimSiam", "moco": "MoCo v2"}
PREFIX = {"sl": "ldam_drw[he]:ce-none", "simsiam": "simsiam_rwsam+sgd", "moco": "moco_ssp+sgd"}
methods = os.environ["METHODS"].split()
paths = sorted(glob.glob(os.path.join(runs, "id", "*", "*", "s*", "final.json")) +
               glob.glob(os.path.join(runs, "ood", "*", "*", "s*", "final.json")))
if not paths:
    sys.exit(f"no finished probe under {runs}/id or {runs}/ood yet")
rows, unpaired = E.gap_rows([E.read_result(p) for p in paths])
for key, why in unpaired:
    print(f"note: eval={key[0]} method={key[2]} n={key[5]}: {why}", file=sys.stderr)
by_method = {v: k for k, v in PREFIX.items()}
cell = {(x["eval"], by_method.get(x["method"]), x["r"], x["n"]): x for x in rows}
print(f"Paper 2 Fig. 1(a) on CIFAR-10, runs in {runs}. A: last-epoch test top-1 % of the probe, mean±sample std "
      "over runs (a run: pre-training seed + its probe; the paper's std varies the probe only). Δ = (A(n,1) − A(n,r)) "
      "/ A(n,1) in % (Eq. (1)), ± the sample std of the per-seed Δ. n and r from the pre-training class counts. "
      "The paper's claim: Δ^SSL < Δ^SL at every n and r, in-domain and out-of-domain.")
for ev in sorted({k[0] for k in cell}):
    title = "ID: linear probe on the full training set" if ev.startswith("linear:") else f"OOD: {ev} linear probe"
    print(f"\n### {title} ({ev})\n")
    print("| r | n | " + " | ".join(f"{NAMES[m]} A(n,1) | {NAMES[m]} A(n,r) | Δ^{NAMES[m]} %" for m in methods) + " |")
    print("|---|---|" + "---|---|---|" * len(methods))
    for r, n in sorted({(k[2], k[3]) for k in cell if k[0] == ev}, key=lambda t: (-t[0], -t[1])):
        parts = []
        for m in methods:
            x = cell.get((ev, m, r, n))
            parts += ["—"] * 3 if x is None else [E.pm(x["A_balanced"], x["A_balanced_std"]),
                                                   E.pm(x["A_imbalanced"], x["A_imbalanced_std"]),
                                                   E.pm(x["delta"], x["delta_std"], 100)]
        print(f"| {r:.4g} | {n} | " + " | ".join(parts) + " |")
EOF
fi

if [[ $TABLE == 2 ]]; then
    RUNS=$RUNS exec "$PYTHON" - <<'EOF'
import glob, json, os, statistics

runs = os.path.join(os.environ["RUNS"], "cv")
print(f"Cross-validation of rwSAM's h, α, ρ (paper 2 App. C.1) in {runs}: weighted kNN (k 200) on the --val-frac "
      f"split left out of pre-training, last epoch; mean ± sample std over seeds. Never the test set.")
print()
print("| setting | kNN top-1 % (val) | kNN mean per-class % (val) | seeds |")
print("|---|---|---|---|")
for folder in sorted(glob.glob(os.path.join(runs, "*"))):
    finals = []
    for path in sorted(glob.glob(os.path.join(folder, "s*", "final.json"))):
        with open(path) as f:
            finals.append(json.load(f))
    last = [r["last"] for r in finals if r.get("last")]
    if not last:
        continue
    show = lambda v: f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")
    print(f"| {os.path.basename(folder)} | {show([x['knn_top1'] for x in last])} | "
          f"{show([x['knn_class_mean'] for x in last])} | {len(last)} |")
EOF
fi

if [[ $TABLE == 1 ]]; then
    RUNS=$RUNS RHO=$RHO SET=$SET ARCH=$ARCH ROWS="$ALL_ROWS" exec "$PYTHON" - <<'EOF'
import glob, json, os, statistics

runs, rho, dataset = os.environ["RUNS"], float(os.environ["RHO"]), os.environ["SET"]
rows = os.environ["ROWS"].split()
# Paper numbers on lossless data, columns rho = 0.01 / 0.02 / 0.1 (the papers' ρ = 100 / 50 / 10): paper 1
# Tables 1-2 (top-1 error %; SVHN: the paper's balanced-test error) and paper 2 Table 1(a) (T1A below,
# rho 0.01 only). None: no such number in the papers' text (Figs. 2-3 are plots).
ERR, ACC = "error %", "probe acc. %"
T2 = {  # Table 2: CIFAR-10-LT then CIFAR-100-LT
    "ce": ((29.64, 25.19, 13.61), (61.68, 56.15, 44.29)), "cb-ce": ((27.63, 21.95, 13.23), (61.44, 55.45, 42.88)),
    "focal": ((29.62, 23.29, 13.34), (61.59, 55.68, 44.22)), "cb-focal": ((25.43, 20.73, 12.90), (60.40, 54.83, 42.01)),
    "ce-drw": ((24.94, 21.10, 13.57), (59.49, 55.31, 43.78)), "ce-drs": ((25.53, 21.39, 13.73), (59.62, 55.46, 43.95)),
    "ldam": ((26.65, 23.18, 13.04), (60.40, 55.03, 43.09)), "ldam-drw": ((22.97, 19.06, 11.84), (57.96, 53.85, 41.29)),
    "cb-ce+ssp": ((23.47, 19.60, 11.57), (56.94, 52.91, 41.94)),
    "cb-focal+ssp": ((22.90, 18.74, 11.75), (57.03, 53.12, 41.16)),
    "ce-drw+ssp": ((23.04, 19.93, 12.66), (57.21, 53.57, 41.77)),
    "ldam-drw+ssp": ((22.17, 17.87, 11.47), (56.57, 52.89, 41.09)),
}
T1 = {  # Table 1: base, then + D_U@5x at rho_U = 1, ρ/2, ρ, 2ρ, per column
    "cifar10": {"ce": ((17.48, 18.42, 18.74, 20.06), (16.79, 16.88, 18.36, 19.94), (10.22, 10.48, 10.86, 11.04)),
                "ldam-drw": ((14.96, 15.18, 15.33, 15.55), (14.33, 14.70, 14.93, 15.24), (8.72, 8.24, 8.68, 8.97))},
    "svhn": {"ce": ((13.02, 13.73, 14.65, 15.04), (13.07, 13.36, 13.16, 14.54), (10.01, 10.20, 10.06, 10.71)),
             "ldam-drw": ((10.00, None, None, None), (None,) * 4, (None,) * 4)},
}
T34 = {  # Tables 3-4, top-1 error %: ImageNet-LT (ResNet-10, ResNet-50), iNaturalist 2018 (ResNet-50)
    "imagenet_lt": {"ce": (65.2, 61.6), "ce+ssp": (64.1, 54.4), "ce-balanced": (62.9, 59.7),
                    "ce-balanced+ssp": (61.6, 52.4), "crt": (58.2, 52.7), "crt+ssp": (56.8, 48.7)},
    "inat": {"ce": (39.3,), "ce+ssp": (35.6,), "ce-balanced": (36.5,), "ce-balanced+ssp": (34.1,),
             "ldam-drw": (35.4,), "ldam-drw+ssp": (33.7,), "crt": (34.8,), "crt+ssp": (31.9,)},
}
SVHN_BASE = {"ce": (19.98, 17.50, 11.46), "ldam-drw": (16.66, 14.59, 10.27)}
# Paper 2 Table 1(a), CIFAR-10-LT rho 0.01: linear-probe accuracy % with exp and with step imbalance, and
# the generalization gap (held-out − training SimSiam loss) of the step pre-training run on the frequent
# and on the rare classes. Row <name> is the exp column, row <name>-step the step column.
T1A = {"simsiam": (81.4, 84.3, 0.035, 0.081), "simsiam+sam": (82.1, 84.7, 0.044, 0.075),
       "simsiam-balanced": (82.0, 85.8, 0.038, 0.037), "simsiam+rwsam": (82.7, 85.6, 0.037, 0.066)}
P2 = {"moco": None}
PRETRAIN = {"rotation": "rotation_ssp.py", "simsiam": "simsiam_rwsam.py --opt sgd",
            "simsiam+sam": "simsiam_rwsam.py --opt sam", "simsiam-balanced": "simsiam_rwsam.py --opt sgd --balanced",
            "simsiam+rwsam": "simsiam_rwsam.py --opt rwsam (stage 2, fresh model; weights from the simsiam run)",
            **{f"{m}-step": f"the {m} command with --imb-type step" for m in T1A}, "moco": "moco_ssp.py"}
col = {0.01: 0, 0.02: 1, 0.1: 2}.get(rho)


def paper(row):
    if dataset in T34:
        values = T34[dataset].get(row, (None, None))
        return ERR, values[0] if os.environ.get("ARCH") == "resnet10" else values[-1]
    if row in P2:                                         # a probe accuracy at every rho, paper number or not
        return ACC, P2[row] if col == 0 else None
    if col is None:
        return ERR, None
    base, _, u = row.partition("+st")
    if "+st" in row:
        return ERR, T1.get(dataset, {}).get(base, ((None,) * 4,) * 3)[col][["", "-half", "-same", "-double"].index(u)]
    if dataset == "svhn":
        return ERR, SVHN_BASE.get(row, (None,) * 3)[col]
    return ERR, T2[row][dataset == "cifar100"][col] if row in T2 else None


def finals(folder):
    out = []
    for path in sorted(glob.glob(os.path.join(runs, folder, "s*", "final.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


def mean_std(values, digits=2):
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} ({len(values)} seeds)"


def minutes(results):
    return f"{statistics.mean(r['wall_seconds'] for r in results) / 60:.1f}" if results else "—"


name = {"cifar10": "CIFAR-10-LT", "cifar100": "CIFAR-100-LT", "svhn": "SVHN-LT", "imagenet_lt": "ImageNet-LT",
        "inat": "iNaturalist 2018"}[dataset]
where = f"{os.environ['ARCH']}" if dataset in T34 else f"rho {rho:g}"
print(f"{name}, {where}, runs in {runs}; ours: mean ± sample std over training seeds (the data subset is fixed: --data-seed 0), last epoch"
      + ("; SVHN errors from mean per-class accuracy" if dataset == "svhn" else ""))
print()
print("| row | metric | paper (lossless) | ours | minutes per run |")
print("|---|---|---|---|---|")
for row in rows:
    if row in T1A or row.removesuffix("-step") in T1A:      # the Table 1(a) block below
        continue
    metric, ref = paper(row)
    results = finals(row)
    values = [r["test_error"] if metric == ERR else r["top1"] for r in results]
    label = row
    if any(r.get("pool") == "rest" and r.get("dataset") != "svhn" for r in results):
        label += " (not the paper's pool)"
    print(f"| {label} | {metric} | {ref if ref is not None else '—'} | {mean_std(values)} | {minutes(results)} |")
if dataset == "cifar10":
    def gaps(row, group):
        """The pre-training run's gap at its end (simsiam_rwsam.py's final.json "last"), per seed."""
        runs_ = finals(os.path.join("pretrain", row))
        found = [r["last"]["gap"][group]["gap"] for r in runs_ if (r.get("last") or {}).get("gap")]
        return mean_std(found, 3) if found or not runs_ else "not measured (--knn-every -1)"
    show = lambda v: "—" if v is None or col != 0 else v
    print()
    print(f"Paper 2 Table 1(a), rho {rho:g}: linear-probe top-1 % (row <name>: exp, row <name>-step: step) and the "
          "generalization gap of the step pre-training run (held-out − training SimSiam loss, frequent / rare half "
          "of the classes, mean over the run's --gap-views draws); paper numbers are for rho 0.01")
    print()
    print("| row | exp: paper | exp: ours | step: paper | step: ours | gap frequent: paper | gap frequent: ours "
          "| gap rare: paper | gap rare: ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row, (exp, step, freq, rare) in T1A.items():
        acc = lambda r: mean_std([x["top1"] for x in finals(r)])
        print(f"| {row} | {show(exp)} | {acc(row)} | {show(step)} | {acc(row + '-step')} | {show(freq)} | "
              f"{gaps(row + '-step', 'frequent')} | {show(rare)} | {gaps(row + '-step', 'rare')} |")
    print()
    print("| pre-training | command | minutes per run |")
    print("|---|---|---|")
    for name, command in PRETRAIN.items():
        print(f"| {name} | {command} | {minutes(finals(os.path.join('pretrain', name)))} |")
EOF
fi

# The shared settings, checked before anything is launched: one line and exit 2 on the first bad one.
if [[ $DRY == 0 ]]; then
    [[ $RHO =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] && awk "BEGIN { exit !($RHO > 0 && $RHO <= 1) }" ||
        { echo "reproduce.sh: RHO=$RHO must be a tail/head ratio in (0, 1] (the papers' imbalance 100 is RHO=0.01)" >&2; exit 2; }
    [[ $GPU =~ ^-?[0-9]+$ ]] && (( GPU >= -1 )) ||
        { echo "reproduce.sh: GPU=$GPU must be a GPU index (0, 1, ...) or -1 for the CPU" >&2; exit 2; }
    DATA=$DATA GPU=$GPU "$PYTHON" - <<'EOF' || exit 2
import os, shlex, sys

def flag(argv, name, default):
    return argv[argv.index(name) + 1] if name in argv[:-1] else default

data = shlex.split(os.environ["DATA"])
dataset, root = flag(data, "--dataset", "cifar10"), flag(data, "--data-root", "./data")
gpu = int(os.environ["GPU"])
problem = None
if dataset == "folder":
    missing = [s for s in ("train", "test") if not os.path.isdir(os.path.join(root, s))]
    if missing:
        problem = (f"DATA: no {' or '.join(missing)} split under '{root}' (a folder dataset needs {root}/train/<class>/* "
                   f"and {root}/test/<class>/*); unpack the data there or set DATA")
elif "--download" not in data:
    import datasets_lt
    try:
        datasets_lt.load_split(dataset, root, True)
    except datasets_lt.DataError as e:
        problem = f"DATA: {e}"
if problem is None and gpu >= 0:
    import torch
    if not torch.cuda.is_available():
        problem = f"GPU={gpu} but CUDA is not available on this machine; set GPU=-1 to run everything on the CPU"
    elif gpu >= torch.cuda.device_count():
        problem = f"GPU={gpu}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0"
if problem:
    print(f"reproduce.sh: {problem}", file=sys.stderr)
    sys.exit(2)
EOF
fi

want() { [[ " $ROWS " == *" $1 "* ]]; }
want_any() { local r; for r in "$@"; do want "$r" && return 0; done; return 1; }

FAILED=$(mktemp)
trap 'rm -f "$FAILED"' EXIT

# job OUT NEEDS SCRIPT ARGS...: one run into OUT, once NEEDS (a checkpoint, or -) exists.
job() {
    local out=$1 needs=$2 script=$3; shift 3
    local stem=${script%.py} extra
    extra=ARGS_$stem
    local launch=("$PYTHON")
    [[ $NPROC != 1 && " ldam_drw.py moco_ssp.py crt.py " == *" $script "* ]] &&
        launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
    local cmd=("${launch[@]}" "$script" "$@" --out "$out" --gpu "$GPU" $ARGS ${!extra:-})
    if [[ $DRY == 1 ]]; then echo "${cmd[*]}"; return; fi
    if [[ -f $out/final.json ]]; then echo "done already: $out"; return; fi
    if [[ -f $out/last.pt && $script != crt.py && $script != eval_linear.py ]]; then
        cmd=("${launch[@]}" "$script" --resume "$out/last.pt" --gpu "$GPU")
    fi
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
    (
        if [[ $needs != - && ! -f $needs ]]; then
            echo "skipped $out: $needs is missing" | tee -a "$FAILED"; exit 1
        fi
        mkdir -p "$out"
        echo "start $out: ${cmd[*]}"
        if "${cmd[@]}" >>"$out/log.txt" 2>&1; then echo "finished $out"
        else
            rc=$?
            echo "FAILED $out (exit $rc): $(tail -n 1 "$out/log.txt"); see $out/log.txt" | tee -a "$FAILED"
        fi
    ) &
}

stage() {
    if [[ $DRY == 1 ]]; then echo "# stage $1"; return; fi
    wait
    echo "== stage $1"
}

# Paper 2 Fig. 1(a) (§2.2, App. A.1): SL, SimSiam and MoCo v2 on every CIFAR-10 variant, each imbalanced
# one with its balanced partner of the same n (one data seed: every method sees the same images), then
# the ID probe (eval_linear.py) and the OOD probe (eval_ood.py, STL-10 by default) of every checkpoint.
if [[ $FIG1 == 1 ]]; then
    RHOS=${RHOS:-0.1 0.01}
    SIZES=${SIZES:-1 0.75 0.5 0.25 0.125}
    METHODS=${METHODS:-sl simsiam moco}
    SCALE=${SCALE:-1}
    OOD=${OOD:---target stl10 --data-root ./data}
    awk -v s="$SCALE" 'BEGIN { exit !(s + 0 > 0) }' ||
        { echo "reproduce.sh: SCALE must be a number > 0, got '$SCALE'" >&2; exit 2; }
    for m in $METHODS; do
        [[ " sl simsiam moco " == *" $m "* ]] ||
            { echo "reproduce.sh: unknown method '$m' in METHODS; methods: sl simsiam moco" >&2; exit 2; }
    done
    epochs() { awk -v b="$1" -v s="$SCALE" 'BEGIN { e = int(b * s + 0.5); print (e < 1 ? 1 : e) }'; }
    declare -A PRE=([sl]="ldam_drw.py --recipe he" [simsiam]="simsiam_rwsam.py --opt sgd" [moco]="moco_ssp.py")
    declare -A BUDGET=([sl]=200 [simsiam]=800 [moco]=200)
    PROBE=$(epochs 100)
    stage 1
    for s in $SEEDS; do
        for m in $METHODS; do
            for r in $RHOS; do
                for q in $SIZES; do
                    for v in imb bal; do
                        flags=(--rho "$r" --seed "$s" --epochs "$(epochs "${BUDGET[$m]}")")
                        [[ $q != 1 ]] && flags+=(--subsample "$q")
                        [[ $v == bal ]] && flags+=(--balanced)
                        job "$FIG1_RUNS/pretrain/$m/r$r-q$q-$v/s$s" - ${PRE[$m]} $DATA "${flags[@]}"
                    done
                done
            done
        done
    done
    stage 2
    for s in $SEEDS; do
        for m in $METHODS; do
            for r in $RHOS; do
                for q in $SIZES; do
                    for v in imb bal; do
                        cell=$m/r$r-q$q-$v/s$s
                        ckpt=$FIG1_RUNS/pretrain/$cell/last.pt
                        job "$FIG1_RUNS/id/$cell" "$ckpt" eval_linear.py --ckpt "$ckpt" --seed "$s" --epochs "$PROBE"
                        job "$FIG1_RUNS/ood/$cell" "$ckpt" eval_ood.py --ckpt "$ckpt" $OOD --seed "$s" --epochs "$PROBE"
                    done
                done
            done
        done
    done
    [[ $DRY == 1 ]] && exit 0
    wait
    if [[ -s $FAILED ]]; then
        echo "== $(wc -l <"$FAILED") run(s) did not finish:"; cat "$FAILED"; exit 1
    fi
    echo "== all runs finished"
    RUNS_FIG1=$FIG1_RUNS exec bash "$0" paper2-fig1 table
fi

if [[ $SET == imagenet_lt || $SET == inat ]]; then
    LISTS="--train-list $TRAIN_LIST --test-list $TEST_LIST${VAL_LIST:+ --val-list $VAL_LIST}"
    stage 1
    for s in $SEEDS; do
        for r in ce ce-balanced ldam-drw; do
            want_any "$r" "${r/ce/crt}" && [[ -n ${LT_RULE[$r]:-} ]] && [[ " $ALL_ROWS " == *" $r "* ]] &&
                job "$RUNS/$r/s$s" - ldam_drw.py $DATA $LISTS --arch "$ARCH" --seed "$s" ${LT_RULE[$r]}
        done
        want_any ce+ssp ce-balanced+ssp ldam-drw+ssp crt+ssp &&
            job "$RUNS/pretrain/moco/s$s" - moco_ssp.py $DATA --train-list "$TRAIN_LIST" --rho 1 --arch "$ARCH" --seed "$s"
    done
    stage 2
    for s in $SEEDS; do
        ckpt=$RUNS/pretrain/moco/s$s/last.pt
        for r in ce ce-balanced ldam-drw; do
            want_any "$r+ssp" $([[ $r == ce ]] && echo crt+ssp) && [[ " $ALL_ROWS " == *" $r+ssp "* ]] &&
                job "$RUNS/$r+ssp/s$s" "$ckpt" ldam_drw.py $DATA $LISTS --arch "$ARCH" --seed "$s" ${LT_RULE[$r]} \
                    --pretrained "$ckpt"
        done
    done
    stage 3
    for s in $SEEDS; do
        for base in ce ce+ssp; do
            row=crt${base#ce}
            want "$row" && job "$RUNS/$row/s$s" "$RUNS/$base/s$s/last.pt" crt.py --ckpt "$RUNS/$base/s$s/last.pt" \
                --seed "$s"${VAL_LIST:+ --val-list $VAL_LIST}
        done
    done
else
stage 1
for s in $SEEDS; do
    for r in $SUPERVISED; do
        want_any "$r" "$r+crt" $(for row in $ST_ROWS; do [[ ${row%%+st*} == "$r" ]] && echo "$row"; done) \
            $([[ $r == ce ]] && echo $FIG2 $FIG3) && job "$RUNS/$r/s$s" - ldam_drw.py $DATA --rho "$RHO" --seed "$s" ${RULE[$r]}
    done
    want_any $(for r in $SUPERVISED; do echo "$r+ssp"; done) &&
        job "$RUNS/pretrain/rotation/s$s" - rotation_ssp.py $DATA --rho "$RHO" --seed "$s"
    for v in "" -step; do                           # paper 2 Table 1(a): exp and step columns
        imb=${v:+--imb-type step}
        want_any simsiam$v simsiam+rwsam$v &&
            job "$RUNS/pretrain/simsiam$v/s$s" - simsiam_rwsam.py $DATA --rho "$RHO" --seed "$s" --opt sgd $imb
        want simsiam+sam$v &&
            job "$RUNS/pretrain/simsiam+sam$v/s$s" - simsiam_rwsam.py $DATA --rho "$RHO" --seed "$s" --opt sam $imb
        want simsiam-balanced$v && job "$RUNS/pretrain/simsiam-balanced$v/s$s" - simsiam_rwsam.py $DATA --rho "$RHO" \
            --seed "$s" --opt sgd --balanced $imb
    done
    want moco && job "$RUNS/pretrain/moco/s$s" - moco_ssp.py $DATA --rho "$RHO" --seed "$s"
done

stage 2
for s in $SEEDS; do
    for r in $SUPERVISED; do
        ckpt=$RUNS/pretrain/rotation/s$s/last.pt
        want "$r+ssp" && job "$RUNS/$r+ssp/s$s" "$ckpt" ldam_drw.py $DATA --rho "$RHO" --seed "$s" ${RULE[$r]} --pretrained "$ckpt"
    done
    for row in $ST_ROWS; do
        r=${row%%+st*}
        ckpt=$RUNS/$r/s$s/last.pt
        want "$row" && job "$RUNS/$row/s$s" "$ckpt" self_training.py $DATA --rho "$RHO" --seed "$s" ${RULE[$r]} \
            --base "$ckpt" --rho-u "${RHO_U[$row]}" $POOL
    done
    for row in $FIG2 $FIG3; do
        ckpt=$RUNS/ce/s$s/last.pt
        want "$row" && job "$RUNS/$row/s$s" "$ckpt" self_training.py $DATA --rho "$RHO" --seed "$s" ${RULE[ce]} \
            --base "$ckpt" ${FIG[$row]} --unlabeled-mult 4 --irrelevant-root "$C100_ROOT" $POOL
    done
    want ce+crt && job "$RUNS/ce+crt/s$s" "$RUNS/ce/s$s/last.pt" crt.py --ckpt "$RUNS/ce/s$s/last.pt"
    # rwSAM stage 2: KDE weights from the SimSiam run's features, then a fresh model trained for the same
    # --epochs as every other Table 1(a) row (simsiam_rwsam.py's default --stage2-init scratch).
    for v in "" -step; do
        ckpt=$RUNS/pretrain/simsiam$v/s$s/last.pt
        want simsiam+rwsam$v && job "$RUNS/pretrain/simsiam+rwsam$v/s$s" "$ckpt" simsiam_rwsam.py $DATA --rho "$RHO" \
            --seed "$s" --opt rwsam --stage1 "$ckpt" ${v:+--imb-type step}
    done
    for m in simsiam simsiam+sam simsiam-balanced simsiam-step simsiam+sam-step simsiam-balanced-step moco; do
        ckpt=$RUNS/pretrain/$m/s$s/last.pt
        want $m && job "$RUNS/$m/s$s" "$ckpt" eval_linear.py --ckpt "$ckpt" --seed "$s"
    done
done

stage 3
for s in $SEEDS; do
    for row in simsiam+rwsam simsiam+rwsam-step; do
        ckpt=$RUNS/pretrain/$row/s$s/last.pt
        want $row && job "$RUNS/$row/s$s" "$ckpt" eval_linear.py --ckpt "$ckpt" --seed "$s"
    done
done
fi

# Paper 2 App. C.1: "We select the hyperparameters ρ and α with cross validation" (h is not reported).
# One value at a time around the defaults, every run on the same --val-frac split left out of
# pre-training and scored by kNN on it alone (`cv-table`); the scripts' defaults do not change.
if [[ $CV == 1 ]]; then
    stage cv-1
    for s in $SEEDS; do
        job "$RUNS/cv/stage1-simsiam/s$s" - simsiam_rwsam.py $DATA --rho "$RHO" --seed "$s" --opt sgd --val-frac "$CV_FRAC"
    done
    stage cv-2
    for s in $SEEDS; do
        ckpt=$RUNS/cv/stage1-simsiam/s$s/last.pt
        cvjob() { job "$RUNS/cv/$1/s$s" "$ckpt" simsiam_rwsam.py $DATA --rho "$RHO" --seed "$s" --opt rwsam \
                      --stage1 "$ckpt" --val-frac "$CV_FRAC" "${@:2}"; }
        cvjob default
        for h in $CV_H; do cvjob "h=$h" --bandwidth "$h"; done
        for a in $CV_ALPHA; do cvjob "alpha=$a" --alpha "$a"; done
        for r in $CV_RHO; do cvjob "rho=$r" --sam-rho "$r"; done
    done
fi

[[ $DRY == 1 ]] && exit 0
wait
if [[ -s $FAILED ]]; then
    echo "== $(wc -l <"$FAILED") run(s) did not finish:"; cat "$FAILED"; exit 1
fi
echo "== all runs finished; the table: bash reproduce.sh table"
