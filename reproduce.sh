#!/usr/bin/env bash
# The README's reproduction table: CIFAR-10-LT, every method of both papers, several seeds, one GPU.
#
#   bash reproduce.sh                  # every row, seeds 0 1 2, CIFAR-10 (JPEG q75) in .data/cifar10_jpg
#   bash reproduce.sh ce ldam-drw      # only these rows (and the runs they need)
#   bash reproduce.sh --dry-run        # print the commands, stage by stage, and run nothing
#   bash reproduce.sh table            # the Markdown table of the runs finished so far
#   bash reproduce.sh paper2-fig1      # paper 2 Fig. 1(a): SL vs SSL at equal n, balanced vs imbalanced
#   bash reproduce.sh paper2-fig1 table            # its table of A(n, 1), A(n, r) and Δ (also --dry-run)
#
# Settings, from the environment:
#   DATA   data flags of the training scripts   (default: --dataset folder --data-root .data/cifar10_jpg;
#          lossless CIFAR-10 elsewhere: DATA="--dataset cifar10 --download")
#   RHO    tail/head ratio                       (default 0.01; the papers' ρ = 100)
#   SEEDS  seeds                                 (default "0 1 2")
#   JOBS   runs at once on the GPU               (default 6: seeds and independent rows share one GPU)
#   GPU    GPU index, -1 for the CPU             (default 0)
#   RUNS   output folder                         (default runs/repro-<RHO>)
#   ARGS   flags appended to every command, ARGS_<script> to one script's (ARGS_moco_ssp="--amp")
#   PYTHON interpreter                           (default python)
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

DATA=${DATA:---dataset folder --data-root .data/cifar10_jpg}
RHO=${RHO:-0.01}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-6}
GPU=${GPU:-0}
USER_RUNS=${RUNS:-}
RUNS=${RUNS:-runs/repro-$RHO}
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
ALL_ROWS="$SUPERVISED $(for r in $SUPERVISED; do echo -n "$r+ssp "; done)ce+st ldam-drw+st ce+crt"
ALL_ROWS="$ALL_ROWS simsiam simsiam+sam simsiam-balanced simsiam+rwsam moco"

DRY=0
TABLE=0
FIG1=0
ROWS=""
for a in "$@"; do
    case $a in
        --dry-run) DRY=1 ;;
        table) TABLE=1 ;;
        paper2-fig1) FIG1=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) [[ " $ALL_ROWS " == *" $a "* ]] || { echo "reproduce.sh: unknown row '$a'; rows: $ALL_ROWS" >&2; exit 2; }
           ROWS="$ROWS $a" ;;
    esac
done
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

if [[ $TABLE == 1 ]]; then
    RUNS=$RUNS RHO=$RHO exec "$PYTHON" - <<'EOF'
import glob, json, os, statistics

runs, rho = os.environ["RUNS"], float(os.environ["RHO"])
# Paper numbers on lossless CIFAR-10-LT: paper 1 Tables 1–2 (top-1 error %, rho 0.01 and 0.1) and
# paper 2 Table 1(a) (linear-probe accuracy %, exp, rho 0.01). None: the paper has no such row.
ERR, ACC = "error %", "probe acc. %"
PAPER = {
    "ce": (ERR, 29.64, 13.61), "cb-ce": (ERR, 27.63, 13.23), "focal": (ERR, 29.62, 13.34),
    "cb-focal": (ERR, 25.43, 12.90), "ce-drw": (ERR, 24.94, 13.57), "ce-drs": (ERR, 25.53, 13.73),
    "ldam": (ERR, 26.65, 13.04), "ldam-drw": (ERR, 22.97, 11.84),
    "ce+ssp": (ERR, None, None), "cb-ce+ssp": (ERR, 23.47, 11.57), "focal+ssp": (ERR, None, None),
    "cb-focal+ssp": (ERR, 22.90, 11.75), "ce-drw+ssp": (ERR, 23.04, 12.66), "ce-drs+ssp": (ERR, None, None),
    "ldam+ssp": (ERR, None, None), "ldam-drw+ssp": (ERR, 22.17, 11.47),
    "ce+st": (ERR, 17.48, 10.22), "ldam-drw+st": (ERR, 14.96, 8.72), "ce+crt": (ERR, None, None),
    "simsiam": (ACC, 81.4, None), "simsiam+sam": (ACC, 82.1, None), "simsiam-balanced": (ACC, 82.0, None),
    "simsiam+rwsam": (ACC, 82.7, None), "moco": (ACC, None, None),
}
PRETRAIN = {"rotation": "rotation_ssp.py", "simsiam": "simsiam_rwsam.py --opt sgd",
            "simsiam+sam": "simsiam_rwsam.py --opt sam", "simsiam-balanced": "simsiam_rwsam.py --opt sgd --balanced",
            "simsiam+rwsam": "simsiam_rwsam.py --opt rwsam (stage 2)", "moco": "moco_ssp.py"}


def finals(folder):
    out = []
    for path in sorted(glob.glob(os.path.join(runs, folder, "s*", "final.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


def mean_std(values):
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)} seeds)"


def minutes(results):
    return f"{statistics.mean(r['wall_seconds'] for r in results) / 60:.1f}" if results else "—"


col = {0.01: 1, 0.1: 2}.get(rho)
print(f"CIFAR-10-LT, rho {rho:g}, runs in {runs}; ours: mean ± sample std over training seeds (the data subset is fixed: --data-seed 0), last epoch")
print()
print("| row | metric | paper (lossless) | ours | minutes per run |")
print("|---|---|---|---|---|")
for row, (metric, *paper) in PAPER.items():
    results = finals(row)
    values = [r["test_error"] if metric == ERR else r["top1"] for r in results]
    ref = paper[col - 1] if col and paper[col - 1] is not None else "—"
    print(f"| {row} | {metric} | {ref} | {mean_std(values)} | {minutes(results)} |")
print()
print("| pre-training | command | minutes per run |")
print("|---|---|---|")
for name, command in PRETRAIN.items():
    print(f"| {name} | {command} | {minutes(finals(os.path.join('pretrain', name)))} |")
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
    local cmd=("$PYTHON" "$script" "$@" --out "$out" --gpu "$GPU" $ARGS ${!extra:-})
    if [[ $DRY == 1 ]]; then echo "${cmd[*]}"; return; fi
    if [[ -f $out/final.json ]]; then echo "done already: $out"; return; fi
    if [[ -f $out/last.pt && $script != crt.py && $script != eval_linear.py ]]; then
        cmd=("$PYTHON" "$script" --resume "$out/last.pt" --gpu "$GPU")
    fi
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
    (
        if [[ $needs != - && ! -f $needs ]]; then
            echo "skipped $out: $needs is missing" | tee -a "$FAILED"; exit 1
        fi
        mkdir -p "$out"
        echo "start $out: ${cmd[*]}"
        if "${cmd[@]}" >>"$out/log.txt" 2>&1; then echo "finished $out"
        else echo "FAILED $out (exit $?), see $out/log.txt" | tee -a "$FAILED"; fi
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

stage 1
for s in $SEEDS; do
    for r in $SUPERVISED; do
        want_any "$r" "$r+crt" "$r+st" && job "$RUNS/$r/s$s" - ldam_drw.py $DATA --rho "$RHO" --seed "$s" ${RULE[$r]}
    done
    want_any $(for r in $SUPERVISED; do echo "$r+ssp"; done) &&
        job "$RUNS/pretrain/rotation/s$s" - rotation_ssp.py $DATA --rho "$RHO" --seed "$s"
    want_any simsiam simsiam+rwsam &&
        job "$RUNS/pretrain/simsiam/s$s" - simsiam_rwsam.py $DATA --rho "$RHO" --seed "$s" --opt sgd
    want simsiam+sam && job "$RUNS/pretrain/simsiam+sam/s$s" - simsiam_rwsam.py $DATA --rho "$RHO" --seed "$s" --opt sam
    want simsiam-balanced &&
        job "$RUNS/pretrain/simsiam-balanced/s$s" - simsiam_rwsam.py $DATA --rho "$RHO" --seed "$s" --opt sgd --balanced
    want moco && job "$RUNS/pretrain/moco/s$s" - moco_ssp.py $DATA --rho "$RHO" --seed "$s"
done

stage 2
for s in $SEEDS; do
    for r in $SUPERVISED; do
        ckpt=$RUNS/pretrain/rotation/s$s/last.pt
        want "$r+ssp" && job "$RUNS/$r+ssp/s$s" "$ckpt" ldam_drw.py $DATA --rho "$RHO" --seed "$s" ${RULE[$r]} --pretrained "$ckpt"
    done
    for r in ce ldam-drw; do
        ckpt=$RUNS/$r/s$s/last.pt
        want "$r+st" && job "$RUNS/$r+st/s$s" "$ckpt" self_training.py $DATA --rho "$RHO" --seed "$s" ${RULE[$r]} --base "$ckpt"
    done
    want ce+crt && job "$RUNS/ce+crt/s$s" "$RUNS/ce/s$s/last.pt" crt.py --ckpt "$RUNS/ce/s$s/last.pt"
    ckpt=$RUNS/pretrain/simsiam/s$s/last.pt
    want simsiam+rwsam &&
        job "$RUNS/pretrain/simsiam+rwsam/s$s" "$ckpt" simsiam_rwsam.py $DATA --rho "$RHO" --seed "$s" --opt rwsam --stage1 "$ckpt"
    for m in simsiam simsiam+sam simsiam-balanced moco; do
        ckpt=$RUNS/pretrain/$m/s$s/last.pt
        want $m && job "$RUNS/$m/s$s" "$ckpt" eval_linear.py --ckpt "$ckpt" --seed "$s"
    done
done

stage 3
for s in $SEEDS; do
    ckpt=$RUNS/pretrain/simsiam+rwsam/s$s/last.pt
    want simsiam+rwsam && job "$RUNS/simsiam+rwsam/s$s" "$ckpt" eval_linear.py --ckpt "$ckpt" --seed "$s"
done

[[ $DRY == 1 ]] && exit 0
wait
if [[ -s $FAILED ]]; then
    echo "== $(wc -l <"$FAILED") run(s) did not finish:"; cat "$FAILED"; exit 1
fi
echo "== all runs finished; the table: bash reproduce.sh table"
