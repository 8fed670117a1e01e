#!/usr/bin/env bash
# The GPU check: from a fresh checkout on a one-GPU machine without network, in about 9 minutes, every result
# in one folder. Nothing is installed: PYTHON (default python3) must import torch, torchvision, numpy, scipy, pytest.
#
#   bash gpu_check.sh PATH/cifar10_jpg.tar.xz [OUT]        # OUT: runs/gpu-check
#   DRY=1 bash gpu_check.sh PATH/archive.tar.xz [OUT]      # the same sequence on the CPU with tiny settings
#
# Steps, each under its own time limit (a step that fails or runs out is recorded and the next one runs):
#   env        python, torch, torchvision, the GPU
#   data       the archive (the JPEG CIFAR-10, train/<class>/, test/<class>/) extracted into OUT/cifar10_jpg
#   tests      python -m pytest -q tests/test_gpu.py: every script on CUDA with its switches, CPU == CUDA, ...
#   bench      bench_train.py: s/epoch of ldam_drw.py (eager / --amp / --compile) and simsiam_rwsam.py (SimSiam,
#              rwSAM) beside a DataLoader + PIL baseline, and the KDE at ImageNet-LT size
#   ldam-drw-s0 ldam-drw-s1 ce-s0 ce-s1   ldam_drw.py, CIFAR-10-LT rho 0.01, 200 epochs, the four side by side on
#              the one GPU until BUDGET runs out; a run stopped there records its epoch and last test error, and
#              goes on with `python ldam_drw.py --resume OUT/runs/NAME/last.pt`
# OUT/results.tsv: check, status (ok, failed, timeout), seconds, detail; OUT/NAME.log: each step's output.
# Settings (default): BUDGET seconds for all steps (540), STEPS to run after env and data (tests bench runs),
#   RUN_FLAGS of the four runs (--compile: the same method, CUDA graphs), GPU (0), PYTHON (python3, else python).
set -uo pipefail
cd "$(dirname "$0")"
[ $# -ge 1 ] || { echo "usage: [DRY=1] bash gpu_check.sh CIFAR10_JPG_ARCHIVE [OUT]" >&2; exit 2; }
ARCHIVE=$1 OUT=${2:-runs/gpu-check} BUDGET=${BUDGET:-540} DRY=${DRY:-0}
PY=${PYTHON:-$(command -v python3 || command -v python)}
[ -f "$ARCHIVE" ] || { echo "gpu_check.sh: no archive at '$ARCHIVE'" >&2; exit 2; }
case $BUDGET in '' | *[!0-9]*) echo "gpu_check.sh: BUDGET must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
STEPS=" ${STEPS:-tests bench runs} " RUN_FLAGS=(${RUN_FLAGS---compile})
for s in $STEPS; do
    case $s in tests | bench | runs) ;; *) echo "gpu_check.sh: STEPS holds tests, bench, runs, got '$s'" >&2; exit 2 ;; esac
done
if [ "$DRY" = 1 ]; then
    GPU=-1 EPOCHS=1 RHO=0.5 BENCH=(--tiny) TESTS=60 BENCH_S=120
else
    GPU=${GPU:-0} EPOCHS=200 RHO=0.01 BENCH=() TESTS=200 BENCH_S=200
fi
mkdir -p "$OUT" || exit 2
TSV=$OUT/results.tsv START=$(date +%s)
printf 'check\tstatus\tseconds\tdetail\n' > "$TSV"
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - ($(date +%s) - START))); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$TSV"; printf '%-12s %-8s %5ss  %s\n' "$@"; }

step() {   # step NAME LIMIT COMMAND...: COMMAND's output in OUT/NAME.log, its last line as the detail
    local name=$1 limit=$2 t0=$(date +%s) code status
    shift 2
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    if [ "$limit" -le 0 ]; then record "$name" timeout 0 "no time left of BUDGET=$BUDGET"; return; fi
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    code=$?
    case $code in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    record "$name" "$status" $(($(date +%s) - t0)) "$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-300)"
}

step env 60 "$PY" -c "
import torch, torchvision, numpy, scipy, pytest
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, {gpu}')"
if [ "$(tail -n 1 "$TSV" | cut -f2)" != ok ]; then echo "gpu_check.sh: $PY cannot run the scripts" >&2; exit 2; fi

DATA=$OUT/cifar10_jpg
rm -rf "$DATA" && mkdir -p "$DATA"
step data 120 bash -c 'tar -xf "$1" -C "$2" && echo "$(find "$2" -type f | wc -l) files in $2"' - "$ARCHIVE" "$DATA"
[ -d "$DATA/train" ] || { echo "gpu_check.sh: '$ARCHIVE' holds no train/<class>/ folder" >&2; exit 2; }

has() { [[ $STEPS == *" $1 "* ]]; }
has tests && step tests "$TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
has bench && step bench "$BENCH_S" "$PY" bench_train.py --gpu "$GPU" --data-root "$DATA" --out "$OUT/bench" "${BENCH[@]}"
[ -f "$OUT/bench/bench.json" ] && cp "$OUT/bench/bench.json" "$OUT/bench.json"
has runs || { echo "gpu_check.sh: $TSV ($(($(date +%s) - START)) s)"; exit 0; }

# LDAM-DRW and CE, 2 seeds, side by side: each stopped (SIGTERM: its last.pt stays) when the budget ends
names=() pids=() t0=$(date +%s) limit=$(($(left) - 15))
for run in ldam-drw-s0 ldam-drw-s1 ce-s0 ce-s1; do
    loss=${run%-s*} seed=${run##*-s}
    flags=(--loss ldam --rule drw)
    [ "$loss" = ce ] && flags=(--loss ce --rule none)
    rm -rf "$OUT/runs/$run"
    if [ "$limit" -gt 0 ]; then
        timeout --kill-after=10 "$limit" "$PY" ldam_drw.py --dataset folder --data-root "$DATA" --rho "$RHO" \
            --epochs "$EPOCHS" --seed "$seed" --gpu "$GPU" "${flags[@]}" "${RUN_FLAGS[@]}" --out "$OUT/runs/$run" \
            > "$OUT/$run.log" 2>&1 &
        names+=("$run") pids+=($!)
    else
        record "$run" timeout 0 "no time left of BUDGET=$BUDGET"
    fi
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    code=$?
    run=${names[$i]} status=failed
    [ $code = 0 ] && status=ok
    [ -f "$OUT/runs/$run/last.pt" ] && [ $code != 0 ] && status=timeout
    detail=$("$PY" - "$OUT/runs/$run" "$EPOCHS" <<'PY' 2>/dev/null || grep -v '^\s*$' "$OUT/$run.log" | tail -n 1
import json, os, statistics, sys
out, epochs = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
last = rows[-1]
s, t = statistics.median(r["seconds"] for r in rows[1:] or rows), last["test"]
acc = ", ".join(f"{k} {'-' if t[k] is None else format(t[k], '.1f')}" for k in ("many", "medium", "few"))
print(f"epoch {last['epoch']}/{epochs}: test error {100 - t['top1']:.2f}% (accuracy {acc}), {s:.2f} s/epoch (median)"
      + ("" if last["epoch"] == epochs else f"; continue: python ldam_drw.py --resume {out}/last.pt"))
PY
)
    record "$run" "$status" $(($(date +%s) - t0)) "$detail"
done
echo "gpu_check.sh: $TSV ($(($(date +%s) - START)) s)"
