"""Starting the LayerWorkers and making the first ones calibration workers.

The job asks for its workers before it reads its inputs (start_workers), and a lost
worker's stand-in is started the same way (Execution._start_workers); a calibration
worker is given the model and the way its passes run (configure) before any other call.
"""

from __future__ import annotations

import time

from nvfp4_ray.calibration.batches import gptq_workers, make_batches, most_gptq_workers
from nvfp4_ray.pipeline.placement import Placement
from nvfp4_ray.pipeline.plan import attention_of, reference_drops_causal_mask
from nvfp4_ray.pipeline.workers import LayerWorker


def calibration_worker_count(workers: int, config, samples, gptq: bool) -> int:
    """The workers that calibrate: one per batch at most; in a GPTQ job (one sample a
    batch) one per Hessian block at most."""
    if samples is None:
        return 0
    if gptq:
        return gptq_workers(workers, len(samples), config.exact)
    return min(workers, len(make_batches(samples, config.batch_tokens)))


def start_workers(placement: Placement, config) -> list:
    """One worker per bundle, asked for before the inputs are read: the seconds a process
    takes to import torch and transformers and create a CUDA context pass meanwhile. In a
    GPTQ job, each that may calibrate (the first ``most_gptq_workers``: how many do is
    known once the samples are read) makes GPTQ's steps ready from its start."""
    gptq = most_gptq_workers(config.num_samples, config.exact) if expects_gptq(config) else 0
    return [new_worker(placement, i, i < gptq, config.exact) for i in range(placement.size)]


def expects_gptq(config) -> bool:
    """Whether the command line asks for GPTQ: --algorithm gptq, or a recipe that names a
    GPTQModifier (read here, before its workers start; a recipe that can't be read is
    reported when the inputs are read)."""
    if config.recipe is None:
        return config.algorithm == "gptq"
    from nvfp4_ray.recipe import names_gptq

    return names_gptq(config.recipe)


def configure_workers(workers: list, config, inputs) -> None:
    """The first workers calibrate (calibration_worker_count); the others only quantize."""
    gptq = inputs.recipe.gptq is not None
    for worker in workers[: calibration_worker_count(len(workers), config, inputs.samples, gptq)]:
        configure(worker, config, inputs.source.config, gptq)


def new_worker(placement: Placement, bundle: int, gptq: bool, exact: bool):
    """``gptq``: the worker makes GPTQ's steps ready from its start (``exact``: --exact's)."""
    import torch

    # the driver is a plain process: its thread count is what llm-compressor would use here
    threads = torch.get_num_threads()
    return LayerWorker.options(**placement.worker_options(bundle)).remote(threads, time.time(), gptq, exact)


def configure(worker, config, model_config: dict, gptq: bool) -> None:
    drop_mask = reference_drops_causal_mask(config, model_config)
    # GPTQ's passes run without CUDA graphs: the Hessian pass's hooks run per forward, and
    # the propagation pass records no amax, which LayerGraphs' checked replay compares
    graphs = not (config.no_cuda_graphs or gptq)
    attention = attention_of(config, gptq)
    worker.configure.remote(model_config, attention, drop_mask, graphs, gptq, config.exact)  # runs before any later call
