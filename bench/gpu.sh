#!/usr/bin/env bash
# One device call: set up once, optionally run GPU tests, then several `python -m bench.run` jobs under one budget,
# and print one short table of every job last (the device tool returns only the output's tail).
#
#   bash bench/gpu.sh "NAME: <bench.run args>" ["NAME: <bench.run args>" ...]      # carry [".whl"]
#   e.g. bash bench/gpu.sh "ref1b: --e2e ref-llama-1b --variants inductor,liger_fx,liger_fx_nolazy" \
#                          "grpo: --post grpo-qwen2-1.5b --post-variants inductor,liger_fx,liger_kernel"
#
# Each job runs `python -m bench.run --kernels none --e2e none <args> --out $OUT/NAME --budget-s <left>` (its own
# args come last and win), so a job that would not fit reports its rows "skipped (time budget)" instead of dying at
# the call's limit. Knobs (environment): TOTAL_BUDGET (560 s), PYTEST (paths for a GPU pytest run first; none by
# default), PYTEST_BUDGET (120 s), STEPS (10), WARMUP (3), LIGER_FX_COMMIT. Files: $OUT/gpu.log, $OUT/NAME/results.*,
# $OUT/pytest.log. SMOKE=1: on CPU, tiny shapes, no installs (a check of this script, not a measurement). Merge into RESULTS.md afterwards: python -m bench.report $OUT/*/results.json --update ...
# Distributed runs (FSDP2, DDP, world size) have their own script: bench/gpu_ddp.sh.
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
elapsed() { echo $(( $(date +%s) - T0 )); }
echo "== gpu.sh: $(date -u '+%F %T UTC'), commit ${LIGER_FX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
SMOKE_ARG=()
if [ "${SMOKE:-0}" = "1" ]; then
  SMOKE_ARG=(--smoke)
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "!! wheel install failed: liger-kernel rows will say unavailable"
fi
[ "${SMOKE:-0}" = "1" ] || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  >/tmp/liger_fx_install.log 2>&1 \
  || { echo "!! editable install failed; PYTHONPATH=. instead"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; }
python3 -c "import torch, triton, transformers; print('== torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

if [ -n "${PYTEST:-}" ]; then
  timeout -k 10 "${PYTEST_BUDGET:-120}" python3 -m pytest $PYTEST -q -rfE -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "!! pytest stopped at PYTEST_BUDGET=${PYTEST_BUDGET:-120} s"
  grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" | head -n 20
  echo "== pytest exit $rc: $(tail -n 1 "$OUT/pytest.log") at $(elapsed) s"
fi

names=()
for job in "$@"; do
  name=${job%%:*}; args=${job#*:}
  left=$(( ${TOTAL_BUDGET:-560} - $(elapsed) - 10 ))
  echo "== job $name ($left s left): bench.run $args"
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086
  python3 -m bench.run --kernels none --e2e none --post none --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" $args \
    "${SMOKE_ARG[@]}" --out "$OUT/$name" --budget-s "$left" >"$OUT/$name/run.log" 2>&1
  echo "== job $name exit $? at $(elapsed) s"
  names+=("$name")
done
echo "== gpu.sh done in $(elapsed) s"
for name in "${names[@]}"; do
  echo "######## $name"
  python3 - "$OUT/$name/results.json" <<'EOF' || tail -n 15 "$OUT/$name/run.log"
import json, sys
res = json.load(open(sys.argv[1]))
f = lambda v, nd=0: "-" if v is None else (round(v) if nd == 0 else round(v, nd))
for r in res.get("e2e", []) + res.get("post_training", []):
    rep = {k: v for k, v in (r.get("replaced") or {}).items() if v}
    loss = r.get("final_loss", (r.get("losses") or [None])[-1])
    print(f"{r.get('shape', r.get('workload', '?'))[:16]:16} {r['variant'][:22]:22} {str(r['status'])[:40]:40} "
          f"tok/s {f(r.get('tok_s')):>8} peak {f(r.get('peak_gib'), 2):>6} loss {f(loss, 4)} {rep}")
EOF
  grep -E "x[0-9.]+|agree" "$OUT/$name/results.md" 2>/dev/null | head -n 6
done
