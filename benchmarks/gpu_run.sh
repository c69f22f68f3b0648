#!/usr/bin/env bash
# One GPU session's worth of checks and benchmarks; run on the device machine from the repo root:
#   bash benchmarks/gpu_run.sh tests|mixers|explore|inference|stage2 ...
# Logs and Markdown results go to $OUT (default ./gpu-out).
set -uo pipefail
OUT="${OUT:-gpu-out}"; mkdir -p "$OUT"
source .gpu/setup.sh
export PYTHONPATH="$PWD/src:$PYTHONPATH"
python3 - <<'PY'
import torch, transformers, triton
print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
import fla; print("fla", fla.__version__)
PY
for what in "$@"; do
  case "$what" in
    tests) python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu-tests.log" ;;
    mixers) python3 benchmarks/bench_mixers.py --seq 4096 --batch 1 --markdown "$OUT/results-mixers.md" 2>&1 | tee "$OUT/bench-mixers.log" ;;
    explore) (cd benchmarks && python3 explore_gdn.py --top 14) 2>&1 | tee "$OUT/explore-gdn.log" ;;
    inference) python3 benchmarks/bench_inference.py --markdown "$OUT/results-inference.md" --json "$OUT/inference.json" --plot "$OUT/inference.png" 2>&1 | tee "$OUT/bench-inference.log" ;;
    stage2) python3 benchmarks/bench_stage2.py --seq 4096 --batch 2 --accum 1 4 --steps 6 --iters 3 --compile-layers all --markdown "$OUT/results-stage2.md" 2>&1 | tee "$OUT/bench-stage2.log" ;;
    *) echo "unknown step $what" ;;
  esac
done
