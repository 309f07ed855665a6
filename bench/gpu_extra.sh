#!/usr/bin/env bash
# The second H200 call, for what bench/gpu_all.sh's 9 minutes could not fit (carry [".whl"]):
#   1. where one training step's time goes (bench/profile_step.py) for the liger-fx hook and liger-kernel;
#   2. the e2e variants the first call left out (hf_eager, hf_liger_kernel, inductor_on_liger_kernel);
#   3. the HF Trainer comparison of issue 6 (bench/e2e_trainer.py: liger-fx hook, liger-kernel, torch_compile=True);
#   4. the FSDP2 example at world size 1 (issue 9).
# Results land in $OUT (results.json, trainer.jsonl, profile_*.txt, fsdp2.txt) and the tail of the output.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=/tmp/site:$PWD
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
for v in hf_hook hf_liger_kernel; do
  timeout 120 python3 -m bench.profile_step --variant "$v" --top 15 >"$OUT/profile_$v.txt" 2>&1; echo "== profile $v rc $? at $(el) s"
done
timeout 200 python3 -m bench.run --kernels none --e2e llama-1b --variants hf_eager,hf_liger_kernel,inductor_on_liger_kernel \
  --variant-timeout 100 --budget-s 190 --out "$OUT" >"$OUT/e2e_extra.log" 2>&1; echo "== e2e extra rc $? at $(el) s"
for v in liger_fx_hook liger_kernel torch_compile; do
  timeout 110 python3 -m bench.e2e_trainer --variant "$v" --steps 20 --warmup 3 --out "$OUT/trainer.jsonl" >/dev/null 2>"$OUT/trainer_$v.err"
  echo "== trainer $v rc $? at $(el) s"
done
timeout 90 torchrun --nproc-per-node 1 examples/train_fsdp2.py --device cuda --dtype bf16 --steps 30 --hidden 1024 \
  --intermediate 2816 --layers 8 --heads 16 --kv-heads 4 --vocab 32000 --batch 8 --seq 1024 >"$OUT/fsdp2.txt" 2>&1
echo "== fsdp2 rc $? at $(el) s"
for f in "$OUT"/profile_*.txt; do echo "---- $f"; head -12 "$f"; done
tail -n 25 "$OUT/e2e_extra.log"
python3 -c "
import json
for line in open('$OUT/trainer.jsonl'):
    r = json.loads(line); print('trainer', r.get('variant'), r.get('status', ''), 'tok/s', r.get('tok_s'), 'peak', r.get('peak_gib'), 'loss', (r.get('losses') or [None])[-1])
" 2>&1 | tail -5
tail -n 8 "$OUT/fsdp2.txt"
