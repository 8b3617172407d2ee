#!/usr/bin/env bash
# The GPU checks of one session with a lent device, in one go (about 8 minutes on one H200; run it through the
# device tool as `bash benchmarks/device_check.sh`): the CUDA tests, then the end-to-end benchmark on the device
# for every workload with 4 trials at once. Everything lands in $OUT/device_check/ (./device_check/ without $OUT):
# gpu.txt, test_cuda.txt, end_to_end.json (bench_end_to_end.py --json rows) and end_to_end.err.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/device_check"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline WANDB_SILENT=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >> "$out/gpu.txt" 2>&1
timeout 150 python -m pytest -o addopts="" -q -p no:cacheprovider tests/test_cuda.py  # in one process, xdist or not > "$out/test_cuda.txt" 2>&1
echo "test_cuda.py: rc $?"
timeout 330 python benchmarks/bench_end_to_end.py --device cuda --concurrent 4 --json \
    > "$out/end_to_end.json" 2> "$out/end_to_end.err"
echo "bench_end_to_end.py --device cuda --concurrent 4: rc $?"
[ -s "$out/end_to_end.json" ] && python - "$out/end_to_end.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f"{r['name']:13s} e2e {r['e2e_updates_per_s']:9.1f}  trainer {r['trainer_updates_per_s']:9.1f}  "
          f"efficiency {r['efficiency']:.2f} (whole run {r['full_run_efficiency']:.2f}, {r['full_run_hours']:.2f} h)  "
          f"4 at once {r['concurrent_updates_per_s']:9.1f} upd/s")
PY
