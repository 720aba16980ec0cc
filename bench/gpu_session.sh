#!/usr/bin/env bash
# One device call: install the bundle, describe the machine, run the benchmark, keep the logs.
# usage (on the GPU machine, from the repo root): bash bench/gpu_session.sh PRESET GPUS [extra bench/run.py args]
# Several calls in one device command share the install and the machine description.
set -uo pipefail
preset=${1:?preset}; gpus=${2:?gpus}; shift 2
out=${OUT:-/tmp/out}; mkdir -p "$out"
[ -f /tmp/site/.nvfp4-session ] || bash .devbundle/install.sh .devbundle >/dev/null
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export NVFP4_BENCH_TIMELINE="$out/timeline"
env | grep '^PYTHON' > "$out/python-env.txt" || true
# The bundle is installed without bytecode, and the device's Python writes none for its own
# packages (torch, sklearn, sympy...): every fresh process, every Ray worker among them, then
# compiles what transformers imports (about 12 s on the H100 machine). An installed image has
# bytecode (pip writes it: cluster/docker/Dockerfile); give these processes a cache like it.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
if [ ! -f /tmp/site/.nvfp4-session ]; then
python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1
python3 -c "import transformers.models.llama.modeling_llama, compressed_tensors, llmcompressor" >/dev/null 2>&1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2; df -h /tmp | tail -1;
  python3 -c "import torch, transformers, ray, llmcompressor, compressed_tensors as ct; print(torch.__version__, transformers.__version__, ray.__version__, ct.__version__)"; } > "$out/machine.txt" 2>&1
for m in ray torch transformers transformers.models.llama.modeling_llama nvfp4_ray.calibration.runner compressed_tensors llmcompressor; do /usr/bin/time -f "import $m %es" python3 -c "import $m"; done >> "$out/machine.txt" 2>&1
touch /tmp/site/.nvfp4-session
fi
python3 bench/run.py --preset "$preset" --gpus "$gpus" --out "$out" "$@" 2>&1 | tee -a "$out/bench.log" | grep -v "progress layers"
