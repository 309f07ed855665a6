#!/usr/bin/env bash
# Issue 15 on one H200, in one device call: DDP at world size 1 on the Llama-3.2-1B shape (bf16 weights, tied lm_head,
# B8 T2048, AdamW; random weights), three runs of examples/train_fsdp2.py with DDP's default settings:
#   ddp  liger     torch.compile(DDP(model), backend="liger"), steps inside liger_fx.distributed.split_after_rewrite()
#   ddp  inductor  torch.compile(DDP(model)): Dynamo's own bucket split, plain Inductor
#   none liger     the same model and step without DDP
# Each prints the rewrite counters (rms_norm, rope, swiglu, fused_linear_cross_entropy), how many DDP buckets the
# graph was cut into, tok/s over the second half of the steps, peak memory and the last loss.
#
#   bash bench/gpu_ddp.sh                    # all three; RUNS="ddp:liger" for one; STEPS (20), RUN_TIMEOUT (180 s)
#
# Logs and JSON land in $OUT (ddp_<wrap>_<backend>.txt/.json). Both liger runs return the logits too (the plain
# torch.compile path), as Inductor's does, so the three compare the same step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the example passes the backend as a function
T0=$(date +%s)
echo "== gpu_ddp.sh: $(date -u '+%F %T UTC'), commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# NPROC ranks (1), global BATCH (8 x NPROC: 8 rows a rank), EXTRA arguments for the example (e.g. "--entry apply"),
# TAG appended to the file names.
NPROC=${NPROC:-1}
SHAPE=(--device cuda --dtype bf16 --steps "${STEPS:-20}" --hidden 2048 --intermediate 8192 --layers 16 --heads 32
       --kv-heads 8 --vocab 128256 --tie --batch "${BATCH:-$((8 * NPROC))}" --seq 2048)
for run in ${RUNS:-ddp:liger ddp:inductor none:liger}; do
  wrap=${run%%:*} backend=${run##*:} name="ddp_${run%%:*}_${run##*:}${TAG:-}"
  timeout -k 10 "${RUN_TIMEOUT:-180}" torchrun --standalone --nproc-per-node "$NPROC" examples/train_fsdp2.py \
    "${SHAPE[@]}" --wrap "$wrap" --backend "$backend" ${EXTRA:-} --out "$OUT/$name.json" >"$OUT/$name.txt" 2>&1
  echo "== $wrap $backend: exit $? at $(( $(date +%s) - T0 )) s"
  python3 - "$OUT/$name.json" <<'EOF' || tail -n 5 "$OUT/$name.txt"
import json, sys
r = json.load(open(sys.argv[1]))
rank = r["ranks"][0]
buckets = [rec["ddp_buckets"] for rec in rank["records"] if rec.get("ddp_buckets")]
print(f"   counters {rank['counters'] or '-'}; DDP buckets {buckets or '-'}; graphs {len(rank['records'])}; "
      f"misses {sum(len(rec['misses']) for rec in rank['records'])}")
peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
print(f"   {r['tokens_per_s']:.0f} tok/s, peak {peak} GiB, loss {r['losses'][-1]:.4f}, "
      f"step 0 (compile) {r['step_s'][0]:.1f} s; {r['versions']}")
EOF
done
