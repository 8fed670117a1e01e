#!/usr/bin/env bash
# The README's reproduction table: CIFAR-10-LT, every method of both papers, several seeds, one GPU.
#
#   bash reproduce.sh                  # every row, seeds 0 1 2, CIFAR-10 (JPEG q75) in .data/cifar10_jpg
#   bash reproduce.sh ce ldam-drw      # only these rows (and the runs they need)
#   bash reproduce.sh --dry-run        # print the commands, stage by stage, and run nothing
#   bash reproduce.sh table            # the Markdown table of the runs finished so far
#   bash reproduce.sh cv               # paper 2's cross-validation of h, α, ρ for rwSAM (not part of "every row")
#   bash reproduce.sh cv-table         # its table: kNN accuracy on the validation split per setting
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
#   CV_H, CV_ALPHA, CV_RHO  values swept by `cv`, one at a time around the defaults (h median, α 1.2, ρ 5)
#   CV_FRAC validation fraction of the `cv` runs   (default 0.1)
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
RUNS=${RUNS:-runs/repro-$RHO}
ARGS=${ARGS:-}
PYTHON=${PYTHON:-python}

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

CV_H=${CV_H:-0.1 0.2 0.5 1.0}
CV_ALPHA=${CV_ALPHA:-0.5 2.0}
CV_RHO=${CV_RHO:-0.5 2 7}
CV_FRAC=${CV_FRAC:-0.1}

DRY=0
TABLE=0
CV=0
ROWS=""
for a in "$@"; do
    case $a in
        --dry-run) DRY=1 ;;
        table) TABLE=1 ;;
        cv) CV=1 ;;
        cv-table) TABLE=2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) [[ " $ALL_ROWS " == *" $a "* ]] || { echo "reproduce.sh: unknown row '$a'; rows: $ALL_ROWS" >&2; exit 2; }
           ROWS="$ROWS $a" ;;
    esac
done
[[ $CV == 1 && -z $ROWS ]] && ROWS=none
ROWS=${ROWS:-$ALL_ROWS}

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
            "simsiam+rwsam": "simsiam_rwsam.py --opt rwsam (stage 2, fresh model; weights from the simsiam run)", "moco": "moco_ssp.py"}


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
    # rwSAM stage 2: KDE weights from the SimSiam run's features, then a fresh model trained for the same
    # --epochs as every other Table 1(a) row (simsiam_rwsam.py's default --stage2-init scratch).
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
