#!/usr/bin/env bash
# One prepared check for a lent GPU (sized for about 5 minutes on one GPU; not yet timed on one);
# every figure goes to --out.
#   1. pytest -k "gpu or cuda"                        (CPU == GPU decisions; skipped without CUDA)
#   2. bench_engine.py --device DEV at 4k / 64k / 1M queries (float32, 11 models, depth 5, K=128;
#      decisions asserted identical to the per-query Python baseline)  -> engine.jsonl
#   3. the Table 1 protocol (reproduce routerbench --device DEV)        -> table1/, reproduce.txt
#   4. a 1-epoch fine-tuning smoke run of configs/finetune_gpu.yaml     -> finetune.txt
#   summary.md: one line per step (status, seconds) and the engine figures.
#
# Usage: benchmarks/gpu_check.sh [--device cuda|cpu] [--dry-run] [--only STEPS] [--out DIR]
#   --dry-run: small sizes (engine 256 / 1024 queries, reproduce --quick, fine-tuning 2 batches on
#              the CPU-friendly settings) to exercise the script without a GPU; default out
#              /tmp/gpu_check_dry_run so that no CPU figure lands in benchmarks/results/gpu/.
#   --only:    comma list of steps to run (pytest,engine,reproduce,finetune); default all.
#   GPU_CHECK_SIZES="64 128": engine query counts of a dry run (the test suite uses it).
# Python: $PYTHON, else .venv/bin/python, else python3. Data: $CASCADE_ROUTING_DATA_DIR, else
# shared/data/raw or ../shared/data/raw when present.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
DRY=0
ONLY="pytest,engine,reproduce,finetune"
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ -z "$OUT" ]; then
  if [ "$DRY" = 1 ]; then OUT=/tmp/gpu_check_dry_run; else OUT=benchmarks/results/gpu; fi
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
if [ -z "${CASCADE_ROUTING_DATA_DIR:-}" ]; then
  for d in shared/data/raw ../shared/data/raw; do
    if [ -d "$d" ]; then export CASCADE_ROUTING_DATA_DIR="$(cd "$d" && pwd)"; break; fi
  done
fi

mkdir -p "$OUT"
rm -f "$OUT/engine.jsonl"
SUMMARY="$OUT/summary.md"
{
  echo "# gpu_check: device $DEVICE, dry run $DRY, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1)"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
} > "$SUMMARY"

wants() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# step NAME LOGFILE COMMAND...: run, log, record status and wall seconds (a failed step does not stop the rest)
FAILED=0
step() {
  local name="$1" log="$2"; shift 2
  local t0 t1 rc
  t0=$(date +%s.%N)
  echo "== $name: $*" | tee "$log"
  "$@" >> "$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  tail -n 5 "$log"
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [ $rc -eq 0 ]; then status=ok; else status="failed (exit $rc, see $(basename "$log"))"; FAILED=1; fi
  echo "| $name | $status | $secs |" >> "$SUMMARY"
}

if [ "$DRY" = 1 ]; then
  SIZES="${GPU_CHECK_SIZES:-256 1024}"; REPEATS=1; BASELINE=5
  ENGINE_ARGS=()
  REPRO_ARGS=(--quick --resamples 20)
  FT_ARGS=(--trainer.accelerator cpu --trainer.precision 32-true --trainer.limit_train_batches 2
           --trainer.limit_val_batches 1 --data.batch_size 8)
else
  SIZES="4096 65536 1048576"; REPEATS=3; BASELINE=20
  ENGINE_ARGS=(--chunk-mb 4096)   # the torch path on a GPU: few large launches
  REPRO_ARGS=()
  FT_ARGS=()
fi

if wants pytest; then
  # this script's own tests match "gpu" too, and the slow one runs this script: leave them out (no recursion)
  step "pytest -k 'gpu or cuda'" "$OUT/pytest.txt" "$PY" -m pytest -q -rA -k "gpu or cuda" -m "slow or not slow" \
    --ignore tests/test_gpu_check.py tests
fi

if wants engine; then
  for n in $SIZES; do
    step "bench_engine $n queries" "$OUT/engine_$n.txt" "$PY" benchmarks/bench_engine.py --device "$DEVICE" \
      --queries "$n" --dtypes float32 --repeats "$REPEATS" --baseline-steps "$BASELINE" --json "$OUT/engine.jsonl" "${ENGINE_ARGS[@]}"
  done
fi

if wants reproduce; then
  step "Table 1 protocol (reproduce routerbench)" "$OUT/reproduce.txt" "$PY" -m cascade_routing reproduce routerbench \
    --device "$DEVICE" --out "$OUT/table1" --no-progress "${REPRO_ARGS[@]}"
fi

if wants finetune; then
  step "fine-tuning smoke run (1 epoch)" "$OUT/finetune.txt" "$PY" train.py fit --config configs/routerbench.yaml \
    --config configs/finetune_gpu.yaml --trainer.max_epochs 1 --trainer.logger false --trainer.callbacks '[]' \
    --trainer.enable_checkpointing false --trainer.default_root_dir "$OUT/finetune_run" "${FT_ARGS[@]}"
fi

if [ -s "$OUT/engine.jsonl" ]; then
  {
    echo
    echo "| queries | query-steps | engine query-steps/s | µs per query-step | Python baseline ms/step | speed-up | load |"
    echo "|---|---|---|---|---|---|---|"
    "$PY" - "$OUT/engine.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"| {r['queries']:,} | {r['query_steps']:,} | {r['engine_query_steps_per_s']:,.0f} | "
          f"{r['engine_s'] / r['query_steps'] * 1e6:.2f} | {r['baseline_ms_per_step']:.2f} | {r['speedup']:,.0f}x | "
          f"{r['load_average']:.2f} |")
EOF
  } >> "$SUMMARY"
fi
cat "$SUMMARY"
exit $FAILED
