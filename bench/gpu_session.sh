#!/usr/bin/env bash
# One device call: install the bundle, describe the machine, run the benchmark, keep the logs.
# usage (on the GPU machine, from the repo root): bash bench/gpu_session.sh PRESET GPUS [extra bench/run.py args]
set -uo pipefail
preset=${1:?preset}; gpus=${2:?gpus}; shift 2
out=${OUT:-/tmp/out}; mkdir -p "$out"
bash .devbundle/install.sh .devbundle >/dev/null
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export NVFP4_BENCH_TIMELINE="$out/timeline"
# the bundle is installed without bytecode: compile it once, as an installed image would be
python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1
for m in torch transformers compressed_tensors llmcompressor; do /usr/bin/time -f "import $m %es" python3 -c "import $m"; done >> "$out/machine.txt" 2>&1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2; df -h /tmp | tail -1;
  python3 -c "import torch, transformers, ray, llmcompressor, compressed_tensors as ct; print(torch.__version__, transformers.__version__, ray.__version__, ct.__version__)"; } > "$out/machine.txt" 2>&1
python3 bench/run.py --preset "$preset" --gpus "$gpus" --out "$out" "$@" 2>&1 | tee "$out/bench.log" | grep -v "progress layers"
