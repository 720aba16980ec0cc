"""How fast GPTQ's Hessian subtrees travel between two workers through Ray's object store:
one actor makes float32 Hessians of a given size and returns them (as gptq_worker's
partials_of does), a second receives them as call arguments and adds them on its device
(as solve does). Prints, per size, the seconds from call to sum and the GB/s; on a
cluster started with several nodes (ray start), the actors go to different nodes.

    python -m bench.transport_probe [--sizes 4096,14336] [--repeat 3] [--gpu] [--numpy] [--out FILE.json]

--gpu: each actor takes half of the machine's GPU, so a Hessian goes device -> host ->
object store -> host -> device, as between two GPU workers of one node.
--numpy: the Hessians travel as numpy arrays (which Ray reads in place from the object
store), as gptq_worker ships them, instead of torch tensors (pickled and copied).
The record is rewritten after every transfer (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import ray

from bench import log


@ray.remote(num_cpus=0)
class Sender:
    def partial(self, columns: int, seed: int, as_numpy: bool):
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hessian = torch.rand((columns, columns), generator=torch.Generator(device).manual_seed(seed), device=device)
        return [(0, 1, hessian.cpu().numpy() if as_numpy else hessian.cpu(), torch.ones(()))]


@ray.remote(num_cpus=0)
class Receiver:
    def add(self, *subtrees):
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        total = None
        for partials in subtrees:
            for _, _, hessian, _ in partials:
                if isinstance(hessian, torch.Tensor):  # unpickled: a private copy already
                    hessian = hessian.to(device)
                else:  # numpy: read in place from the object store (read-only), copied once
                    hessian = torch.tensor(hessian, device=device)
                total = hessian if total is None else total.add_(hessian)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.monotonic()

    def ready(self) -> bool:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4096,14336", help="in_features of the Hessians, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="both actors on the GPU (half of it each)")
    parser.add_argument("--numpy", action="store_true", help="ship numpy arrays instead of torch tensors")
    parser.add_argument("--out", help="write the record here as JSON")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    gpus = {"num_gpus": 0.5} if args.gpu else {}
    sender, receiver = Sender.options(**gpus).remote(), Receiver.options(**gpus).remote()
    ray.get([sender.partial.remote(16, 0, args.numpy), receiver.ready.remote()])  # both started
    results = []
    for columns in (int(c) for c in args.sizes.split(",")):
        gb = columns**2 * 4 / 1e9
        for attempt in range(args.repeat):
            made = sender.partial.remote(columns, attempt, args.numpy)
            ray.wait([made], fetch_local=False)  # made and in the object store: time the transfer and the sum
            start = time.monotonic()
            ray.get(receiver.add.remote(made))
            seconds = time.monotonic() - start
            results.append({"in_features": columns, "gb": round(gb, 3), "seconds": round(seconds, 3),
                            "gb_per_s": round(gb / seconds, 2)})  # fmt: skip
            log(json.dumps(results[-1]))
            record = {"nodes": len(ray.nodes()), "cpus": os.cpu_count(), "gpu": args.gpu, "numpy": args.numpy,
                      "results": results}  # fmt: skip
            if args.out:
                with open(args.out, "w") as handle:
                    json.dump(record, handle, indent=2)
    ray.shutdown()
    print(json.dumps(record))


if __name__ == "__main__":
    main()
