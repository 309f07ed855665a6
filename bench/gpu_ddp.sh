#!/usr/bin/env bash
# Distributed training as users write it, on the Llama-3.2-1B shape (bf16, tied lm_head, B8 T2048 per GPU, AdamW,
# random weights), in one device call per world size: examples/train_fsdp2.py under torchrun with NPROC ranks.
#
#   NPROC=1 bash bench/gpu_ddp.sh      # one GPU (carry [".whl"] for the liger-kernel row)
#   NPROC=2 bash bench/gpu_ddp.sh      # two GPUs: the same runs, then the loss check below
#
# Runs (RUNS, each wrap:backend[:entry]; default all of them; RUNS=none for the loss check alone):
#   fsdp2:liger          torch.compile(model, backend="liger") with fully_shard per layer (the plain path)
#   fsdp2:inductor       torch.compile(model), the same wrapping
#   fsdp2:liger_kernel   liger-kernel's monkeypatch, eager (needs the carried wheel)
#   fsdp2:liger:apply    liger_fx.apply(model)
#   ddp:liger            the bare torch.compile(DDP(model), backend="liger"), DDP's default 25 MB buckets
#   ddp:inductor         torch.compile(DDP(model))
# Each prints every rank's rewrite counters and DDP buckets, tok/s (all GPUs, and per GPU), peak memory and the last
# loss; a table of all runs comes last, with each liger row's ratio to Inductor under the same wrapper.
# With NPROC > 1 (or LOSSES=1) it then checks the losses (LOSS_STEPS=20 steps, global batch 8 x NPROC, T=LOSS_SEQ
# 512 so that one GPU holds the global batch): eager on 1 GPU twice (run-to-run noise) and on NPROC GPUs (what
# distribution alone changes), liger (FSDP2 plain path) on 1 and on NPROC GPUs; prints the largest difference of
# each pair over the steps. Success: liger's NPROC-vs-1 difference within eager's (<= 2x the larger eager one).
#
# SMOKE=1 runs it all on CPU with a tiny model (a check of the script, not a measurement).
# Knobs: STEPS (12), RUN_TIMEOUT (150 s a run), TOTAL_BUDGET (560 s: a run that would start after it is reported
# "skipped (time budget)"), LOSSES (1 if NPROC > 1), EXTRA (more arguments for every perf run), TAG (file suffix).
# Files in $OUT: <run>.txt/.json for each run, losses_*.json, gpu_ddp.log (everything printed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_ddp.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
NPROC=${NPROC:-1}
echo "== gpu_ddp.sh NPROC=$NPROC: $(date -u '+%F %T UTC'), commit ${LIGER_FX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || echo "!! wheel install failed: the liger-kernel row will fail"
fi
python3 -c "import torch, triton, transformers; print('== torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'GPUs', torch.cuda.device_count())"
MODEL=(--device cuda --dtype bf16 --hidden 2048 --intermediate 8192 --layers 16 --heads 32 --kv-heads 8 --vocab 128256
       --tie)
SEQ=2048
if [ "${SMOKE:-0}" = 1 ]; then  # CPU dry run of the script itself: tiny model, gloo, the liger-kernel row fails
  MODEL=(--device cpu --tie) SEQ=32 LOSS_SEQ=${LOSS_SEQ:-32} LOSS_STEPS=${LOSS_STEPS:-3} STEPS=${STEPS:-3}
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1
fi
BUDGET=${TOTAL_BUDGET:-560}

run() {  # run NAME NPROC ARGS...: one torchrun, its log and JSON in $OUT
  local name=$1 n=$2; shift 2
  if (( $(date +%s) - T0 > BUDGET - 60 )); then echo "== $name: skipped (time budget)"; return; fi
  timeout -k 10 "${RUN_TIMEOUT:-150}" torchrun --standalone --nproc-per-node "$n" examples/train_fsdp2.py "${MODEL[@]}" \
    "$@" --out "$OUT/$name.json" >"$OUT/$name.txt" 2>&1
  echo "== $name: exit $? at $(( $(date +%s) - T0 )) s"
  [ -f "$OUT/$name.json" ] || tail -n 5 "$OUT/$name.txt"
}

NAMES=()
for spec in ${RUNS:-fsdp2:liger fsdp2:inductor fsdp2:liger_kernel fsdp2:liger:apply ddp:liger ddp:inductor}; do
  [ "$spec" = none ] && continue  # RUNS=none LOSSES=1: the loss check alone
  IFS=: read -r wrap backend entry <<<"$spec"
  name="x${NPROC}_${wrap}_${backend}${entry:+_$entry}${TAG:-}"
  NAMES+=("$name")
  run "$name" "$NPROC" --wrap "$wrap" --backend "$backend" --entry "${entry:-compile}" --steps "${STEPS:-12}" \
    --batch $((8 * NPROC)) --seq "$SEQ" ${EXTRA:-}
done

if [ "${LOSSES:-$([ "$NPROC" -gt 1 ] && echo 1 || echo 0)}" = 1 ]; then
  L=(--wrap fsdp2 --steps "${LOSS_STEPS:-20}" --batch $((8 * NPROC)) --seq "${LOSS_SEQ:-512}")
  run losses_eager_x1 1 "${L[@]}" --backend eager
  run losses_eager_x1_again 1 "${L[@]}" --backend eager
  run "losses_eager_x$NPROC" "$NPROC" "${L[@]}" --backend eager
  run losses_liger_x1 1 "${L[@]}" --backend liger
  run "losses_liger_x$NPROC" "$NPROC" "${L[@]}" --backend liger
fi

python3 - "$OUT" "$NPROC" "${NAMES[@]}" <<'PY'
import json, os, sys
out, nproc, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def load(name):
    path = os.path.join(out, name + ".json")
    return json.load(open(path)) if os.path.exists(path) else None
rows, inductor = [], {}
for name in names:
    r = load(name)
    if r is None:
        rows.append((name, None)); continue
    if r["args"]["backend"] == "inductor":
        inductor[r["args"]["wrap"]] = r["tokens_per_s"]
    rows.append((name, r))
print("\n== rewrite counts per rank")
for name, r in rows:
    if r is None or r["args"]["backend"] != "liger":
        continue
    for rank in r["ranks"]:
        recs = rank["records"]
        buckets = [x["ddp_buckets"] for x in recs if x.get("ddp_buckets")]
        print(f"{name} rank {rank['rank']}: {rank['counters']}; graphs {len(recs)}, DDP buckets {buckets or '-'}, "
              f"near misses {sum(len(x['misses']) for x in recs)}, fallbacks {sum(x['fallback'] is not None for x in recs)}")
print(f"\n== world size {nproc}: Llama-3.2-1B shape, B8 T2048 per GPU, bf16")
print(f"{'run':34} {'tok/s':>9} {'tok/s/GPU':>9} {'peak GiB':>8} {'vs Inductor':>11}  last loss")
for name, r in rows:
    if r is None:
        print(f"{name:34} {'failed or skipped'}"); continue
    tps, base = r["tokens_per_s"], inductor.get(r["args"]["wrap"])
    ratio = f"{tps / base:.3f}x" if base and r["args"]["backend"] != "inductor" else "-"
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    print(f"{name:34} {tps:9.0f} {tps / r['world']:9.0f} {peak:>8} {ratio:>11}  {r['losses'][-1]:.4f}")
losses = {n: load(n) for n in ("losses_eager_x1", "losses_eager_x1_again", f"losses_eager_x{nproc}",
                               "losses_liger_x1", f"losses_liger_x{nproc}")}
if any(v is not None for v in losses.values()):
    def diff(a, b):
        if losses[a] is None or losses[b] is None:
            return None
        la, lb = losses[a]["losses"], losses[b]["losses"]
        return max(abs(x - y) for x, y in zip(la, lb))
    pairs = [("eager x1 vs x1 again (run-to-run)", "losses_eager_x1", "losses_eager_x1_again"),
             (f"eager x{nproc} vs x1 (distribution)", f"losses_eager_x{nproc}", "losses_eager_x1"),
             (f"liger x{nproc} vs x1", f"losses_liger_x{nproc}", "losses_liger_x1"),
             ("liger x1 vs eager x1", "losses_liger_x1", "losses_eager_x1")]
    print(f"\n== first {len((losses['losses_eager_x1'] or {}).get('losses', []))} losses, global batch {8 * nproc}: "
          "largest difference over the steps")
    got = {}
    for label, a, b in pairs:
        got[label] = d = diff(a, b)
        print(f"{label:40} {'-' if d is None else f'{d:.5f}'}")
    noise = [d for label, d in got.items() if label.startswith("eager") and d is not None]
    mine = got[pairs[2][0]]
    if noise and mine is not None:
        ok = mine <= 2 * max(noise) + 1e-6
        print(f"liger x{nproc} vs x1 within 2x eager's noise ({2 * max(noise):.5f}): {'yes' if ok else 'NO'}")
PY
echo "== gpu_ddp.sh done at $(( $(date +%s) - T0 )) s"
