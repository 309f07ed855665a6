#!/usr/bin/env bash
# One device call on a machine with two (or more) GPUs: independent jobs run side by side, one GPU each, so one
# call does the work of two (device time counts per machine held, not per GPU).
#
#   LIGER_FX_COMMIT=<sha> bash bench/gpu_lanes.sh "<job for GPU 0>" "<job for GPU 1>" ["<job after both, all GPUs>"]
#   (carry [".whl"]; each job is a bash command line run in the repo root, with $OUT set to its own folder)
#
# Setup once (the carried wheels: liger-kernel; this checkout, editable, offline), then every lane as its own process
# with CUDA_VISIBLE_DEVICES set and its output in $OUT/laneN/lane.log; the third argument, if any, runs after
# both with every GPU (a multi-GPU DDP run). What a lane writes under its $OUT comes back as $OUT/laneN.tgz. The tail of each lane's log is printed last, lane by lane, because the
# device tool returns only the last 12,000 characters of the output.
#
# Timing caveat: lanes share the host's CPUs. A GPU-bound job (B8 T2048) is not disturbed by a neighbour that compiles;
# a host-bound one (B1, launch cost) can be, so put those next to a quiet neighbour and compare them only with rows
# of the same lane.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LIGER_FX_COMMIT=${LIGER_FX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
T0=$(date +%s)
echo "== gpu_lanes.sh: $(date -u '+%F %T UTC'), commit $LIGER_FX_COMMIT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "!! wheel install failed"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/liger_fx_install.log 2>&1 \
  || { echo "!! editable install failed; PYTHONPATH=. instead"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; }
python3 -c "import torch, triton, transformers; print('== torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'GPUs', torch.cuda.device_count())"
echo "== setup done at $(( $(date +%s) - T0 )) s"

jobs=("$@")
pids=()
for i in 0 1; do
  job=${jobs[$i]:-}
  [ -n "$job" ] || continue
  mkdir -p "$OUT/lane$i"
  CUDA_VISIBLE_DEVICES=$i OUT=$OUT/lane$i bash -c "$job" >"$OUT/lane$i/lane.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
echo "== lanes done at $(( $(date +%s) - T0 )) s"
if [ -n "${3:-}" ]; then
  mkdir -p "$OUT/after"
  OUT=$OUT/after bash -c "$3" >"$OUT/after/lane.log" 2>&1
  echo "== after-job exit $? at $(( $(date +%s) - T0 )) s"
fi
# The device tool brings back only a few files per call: each lane's files travel as one archive beside its log.
for d in "$OUT"/lane0 "$OUT"/lane1 "$OUT"/after; do
  [ -d "$d" ] || continue
  (cd "$d" && find . -mindepth 1 -maxdepth 1 ! -name lane.log | grep -q . \
    && tar czf "$d.tgz" --exclude=./lane.log . && find . -mindepth 1 -maxdepth 1 ! -name lane.log -exec rm -rf {} +)
done
for d in "$OUT"/lane0 "$OUT"/lane1 "$OUT"/after; do
  [ -f "$d/lane.log" ] || continue
  echo "======== $(basename "$d") (tail)"
  tail -n "${TAIL_LINES:-45}" "$d/lane.log"
done
