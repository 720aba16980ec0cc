"""What the first attention call of a process costs on this GPU, by SDPA backend.

GPTQ's default mode runs its passes with SDPA attention (plan.attention_of), and on the
H100 PyTorch picks cuDNN's kernel, which the CUDA driver compiles from PTX at its first
call in a machine's life and keeps in its disk cache (~/.nv/ComputeCache, or
CUDA_CACHE_PATH). The benchmark's first nvfp4-ray run on a fresh machine paid that in its
first Hessian pass; a second run did not (docs/gptq.md#speed).

Each child process: torch, one causal SDPA call at the 8B shape (1 x 32 heads x 1024
tokens x 128, bf16) three times under the backend given, then a bf16 GEMM twice, each
timed with a synchronize. Twice over: the driver's cache emptied, then cuDNN twice, flash
twice, and PyTorch's default choice.

    python -m bench.sdpa_first_call_probe [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

BACKENDS = ("cudnn", "cudnn", "flash", "flash", "default")


def child(backend: str) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randn(1, 32, 1024, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "default": None}[backend]

    def attention():
        if chosen is None:
            return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        with sdpa_kernel(chosen):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)

    def timed(fn) -> float:
        began = time.monotonic()
        fn()
        torch.cuda.synchronize()
        return round(time.monotonic() - began, 4)

    weight = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    inputs = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    return {"backend": backend, "sdpa_s": [timed(attention) for _ in range(3)],
            "gemm_s": [timed(lambda: inputs @ weight.t()) for _ in range(2)]}  # fmt: skip


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the record here")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.sdpa_first_call_probe needs a CUDA GPU")
    cache = os.environ.get("CUDA_CACHE_PATH", os.path.expanduser("~/.nv/ComputeCache"))
    rounds = []
    for _ in range(2):
        shutil.rmtree(cache, ignore_errors=True)
        runs = []
        for backend in BACKENDS:
            child_run = subprocess.run([sys.executable, "-m", "bench.sdpa_first_call_probe", "--child", backend],
                                       capture_output=True, text=True)  # fmt: skip
            if child_run.returncode:
                raise SystemExit(f"the {backend} child failed:\n{child_run.stderr[-3000:]}")
            runs.append(json.loads(child_run.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
        rounds.append(runs)
    record = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "cache": cache,
              "rounds_after_emptying_the_cache": rounds}  # fmt: skip
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
