#!/usr/bin/env bash
# One device call: set up once, optionally run GPU tests, then jobs under one budget, one GPU each or side by side,
# and one short table of every job last (the device tool returns only the output's tail).
#
#   bash bench/gpu.sh "NAME: <job>" ["NAME: <job>" ...]          # carry [".whl"] for the liger-kernel rows
#
# A job is what follows `python -m bench.run`, or a command line:
#   "ref1b: --e2e ref-llama-1b --variants inductor,liger_fx"     measurements: python -m bench.run --kernels none
#        --e2e none --post none --steps $STEPS --warmup $WARMUP <args> --out $OUT/NAME --budget-s <left> (its own
#        args come last and win), so a job that would not fit reports its rows "skipped (time budget)" instead of
#        dying at the call's limit;
#   "prof: profile --variant hf_hook --gemms"                     a tool of bench.run (profile, memory, warmup, trainer,
#        convergence, distributed, trl): python -m bench.run <tool> <args>, OUT=$OUT/NAME, at most <left> seconds;
#   "x2: distributed --nproc 2"                                   world size: FSDP2, DDP under torchrun, every GPU;
#   "hc: sh python3 -m bench.lab.host_cost --both"                any command line (the lab's tools), OUT=$OUT/NAME
#        (quote it for the job: 'hc: sh python3 -m bench.lab.host_cost --both --json $OUT/host_cost.jsonl').
# E.g. the whole suite in one call: PYTEST="tests/kernels tests" bash bench/gpu.sh "all: --kernels all --e2e llama-1b"
#
# LANES=N (default 1): on a machine with N GPUs the jobs are dealt round-robin to N lanes, one GPU each
# (CUDA_VISIBLE_DEVICES), which run side by side: one call does N calls' work (device time counts per machine held,
# not per GPU); `distributed` jobs run after the lanes, with every GPU. Lanes share the host's CPUs: a GPU-bound job
# (B8 T2048) is not disturbed by a neighbour that compiles; a host-bound one (B1, launch cost) can be, so put those
# beside a quiet neighbour and compare them only with rows of the same lane.
#
# Knobs (environment): TOTAL_BUDGET (560 s), PYTEST (paths for a GPU pytest run first; none by default), PYTEST_MARK
# ("not slow": the slow tests are CPU-only), PYTEST_BUDGET (120 s), STEPS (10), WARMUP (3), LANES (1), TAIL_LINES (25:
# lines of a job's log shown when it wrote no results.json), TAR=1 (pack each job's files into $OUT/NAME.tgz beside its
# run.log, for a tool that brings back few files), SKIP_INSTALL=1 (liger-fx installed already), LIGER_FX_COMMIT.
# Files: $OUT/gpu.log, $OUT/NAME/run.log, $OUT/NAME/results.* (measurement jobs), $OUT/pytest.log. SMOKE=1: on CPU,
# tiny shapes, no installs, --smoke added to every bench.run job (a check of this script, not a measurement; memory
# and trl have no smoke mode). Merge into RESULTS.md afterwards: python -m bench.report $OUT/*/results.json --update
# bench/RESULTS.md --plot bench/e2e.png
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
LANES=${LANES:-1}
elapsed() { echo $(( $(date +%s) - T0 )); }
echo "== gpu.sh: $(date -u '+%F %T UTC'), commit ${LIGER_FX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}, $# job(s), $LANES lane(s)"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
SMOKE_ARG=()
if [ "${SMOKE:-0}" = "1" ]; then
  SMOKE_ARG=(--smoke)
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "!! wheel install failed: liger-kernel rows will say unavailable"
else
  echo "!! no .whl/ carried: liger-kernel rows will say unavailable"
fi
# The package itself: editable and offline, so `backend="liger"` resolves through its entry point as for a user.
if [ "${SMOKE:-0}" = "1" ] || [ "${SKIP_INSTALL:-0}" = "1" ]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
elif ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/liger_fx_install.log 2>&1; then
  echo "!! editable install failed; PYTHONPATH=. instead (bench registers the backend itself)"
  tail -n 5 /tmp/liger_fx_install.log
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, triton, transformers; print('== torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'GPUs', torch.cuda.device_count())"
echo "== setup done at $(elapsed) s"

if [ -n "${PYTEST:-}" ]; then
  # Test output goes to its own log; only the verdict lines are echoed (the jobs' table must stay in the tail).
  # shellcheck disable=SC2086
  timeout -k 10 "${PYTEST_BUDGET:-120}" python3 -m pytest $PYTEST -m "${PYTEST_MARK:-not slow}" -q -rfE \
    -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "!! pytest stopped at PYTEST_BUDGET=${PYTEST_BUDGET:-120} s (pytest.log shows how far it got)"
  grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" | head -n 20
  echo "== pytest exit $rc: $(tail -n 1 "$OUT/pytest.log") at $(elapsed) s"
fi

job_name() { local n=${1%%:*}; echo "${n//[[:space:]]/}"; }
job_args() { local a=${1#*:}; echo "${a#"${a%%[![:space:]]*}"}"; }   # after the colon, leading blanks dropped

run_job() {  # run_job "NAME: ARGS": one job, its output in $OUT/NAME/run.log
  local name args kind left rc
  name=$(job_name "$1"); args=$(job_args "$1"); kind=${args%% *}
  left=$(( ${TOTAL_BUDGET:-560} - $(elapsed) - 10 ))
  mkdir -p "$OUT/$name"
  echo "== job $name (${left} s left${CUDA_VISIBLE_DEVICES:+, GPU $CUDA_VISIBLE_DEVICES}): $args"
  if (( left < 30 )); then
    echo "skipped (time budget): $left s left" >"$OUT/$name/run.log"
    echo "== job $name skipped (time budget)"
    return
  fi
  # shellcheck disable=SC2086
  case "$kind" in
    -*|"")  # measurements: bench.run's own budget, so what does not fit is a row that says so
      python3 -m bench.run --kernels none --e2e none --post none --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" $args \
        "${SMOKE_ARG[@]}" --out "$OUT/$name" --budget-s "$left" ;;
    sh)
      OUT=$OUT/$name timeout -k 10 "$left" bash -c "${args#sh }" ;;
    distributed|convergence)  # they plan their runs within --budget-s
      OUT=$OUT/$name timeout -k 10 "$left" python3 -m bench.run $args "${SMOKE_ARG[@]}" --out "$OUT/$name" \
        --budget-s $(( left - 10 )) ;;
    *)
      OUT=$OUT/$name timeout -k 10 "$left" python3 -m bench.run $args "${SMOKE_ARG[@]}" ;;
  esac >"$OUT/$name/run.log" 2>&1
  rc=$?
  echo "== job $name exit $rc at $(elapsed) s"
}

LANE_JOBS=() AFTER=()
for job in "$@"; do
  args=$(job_args "$job")
  if (( LANES > 1 )) && [ "${args%% *}" = distributed ]; then AFTER+=("$job"); else LANE_JOBS+=("$job"); fi
done
lane() {  # lane L: every LANES-th job from the L-th, in order
  local i
  for (( i = $1; i < ${#LANE_JOBS[@]}; i += LANES )); do run_job "${LANE_JOBS[$i]}"; done
}
if (( LANES > 1 )); then
  pids=()
  for (( l = 0; l < LANES; l++ )); do
    ( export CUDA_VISIBLE_DEVICES=$l; lane "$l" ) &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  echo "== lanes done at $(elapsed) s"
else
  lane 0
fi
for job in "${AFTER[@]}"; do run_job "$job"; done
echo "== gpu.sh done in $(elapsed) s"

for job in "$@"; do
  name=$(job_name "$job")
  echo "######## $name"
  if [ -f "$OUT/$name/results.json" ]; then
    python3 -m bench.report --brief "$OUT/$name/results.json" || tail -n "${TAIL_LINES:-25}" "$OUT/$name/run.log"
  else
    tail -n "${TAIL_LINES:-25}" "$OUT/$name/run.log"
  fi
  if [ "${TAR:-0}" = "1" ]; then
    (cd "$OUT/$name" && find . -mindepth 1 -maxdepth 1 ! -name run.log | grep -q . \
      && tar czf "$OUT/$name.tgz" --exclude=./run.log . && find . -mindepth 1 -maxdepth 1 ! -name run.log -exec rm -rf {} +)
  fi
done
sleep 1  # let tee flush the tail into gpu.log
