"""One quantization job, start to finish: plan, connect to Ray, execute, commit, report."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from nvfp4_ray.architecture import REFERENCE_DROPS_CAUSAL_MASK, text_model_type
from nvfp4_ray.config import QuantizeConfig
from nvfp4_ray.pipeline.events import Events
from nvfp4_ray.pipeline.plan import build_plan, read_inputs


@contextmanager
def ray_session(address: str | None):
    """Use the Ray instance already initialised in this process, join ``address``
    (or RAY_ADDRESS), or start a local instance for the duration of the job."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # A private, short-lived local instance: Ray 2.60 would otherwise enable token
        # authentication, which nothing outside this process needs, and start idle worker
        # processes for the first driver, ahead of any task. The job runs one process per
        # GPU and a few tasks, which start their own; the idle ones held 0.6 GiB of host
        # memory on a 16-CPU machine (bench records 1952 and 1953).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        # "local": a new instance even when `ray start` left a cluster on this machine.
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def run_quantize(config: QuantizeConfig, events: Events) -> dict:
    """Run the job; return the summary. Raises InputError (exit 2) or JobError (exit 3)."""
    started = time.monotonic()
    if config.evaluate:  # its input is checked first too: nothing is written at DEST before
        from nvfp4_ray.quality.evaluate import check_base

        check_base(config.source)
    # On a running Ray instance the workers are asked for first, and start up (imports and a
    # CUDA context: the largest fixed cost of a job) while the inputs are read and checked; a
    # bad input still fails before any data is read or written, and its workers are stopped.
    # A local instance is started, and an autoscaler asked for GPU nodes, only for good input.
    inputs = None if _workers_first(config) else _read_inputs(config, events)
    if inputs is not None and inputs.unchanged and config.if_changed:
        return _unchanged(config, inputs, started, events)
    with ray_session(config.ray_address):
        from nvfp4_ray.pipeline.commit import checkpoint_files, commit, write_checkpoint
        from nvfp4_ray.pipeline.driver import Execution
        from nvfp4_ray.pipeline.placement import Placement
        from nvfp4_ray.pipeline.worker_start import configure_workers, start_workers

        if inputs is None and not Placement.fits_now(config.num_workers, config.worker_device):
            inputs = _read_inputs(config, events)
        placement = Placement.request(config.num_workers, config.worker_device)
        try:
            workers = start_workers(placement, config)
            if inputs is None:
                inputs = _read_inputs(config, events)
            if inputs.unchanged and config.if_changed:
                return _unchanged(config, inputs, started, events)
            _warn(config, inputs, events)
            with events.stage("placement"):
                placement.wait(config.placement_timeout_minutes * 60)
            configure_workers(workers, config, inputs)
            with events.stage("plan"):
                plan = build_plan(config, inputs)
            events.info(
                f"planned {len(plan.layer_units)} decoder layers, {sum(len(u.spec.linears) for u in plan.layer_units)} "
                f"Linears to quantize, {len(plan.samples or [])} calibration samples",
                model=plan.spec.architecture,
            )
            run_class = Execution
            if plan.recipe.gptq is not None:  # its own per-layer loop: calibrate, solve, propagate
                from nvfp4_ray.pipeline.gptq_flow import GptqExecution as run_class
            execution = run_class(plan, placement, events, workers)
            _remove_unfinished_writes(config, events, "an earlier run left at DEST")
            execution.run()
        finally:
            placement.release()
        report = _report(plan, execution, events, started)
        report.update(execution.report_fields())
        with events.stage("commit"):
            _remove_unfinished_writes(config, events, "of workers lost in this run")
            small = checkpoint_files(plan, execution.files())
        quality = None
        if config.evaluate:  # before the commit: a finished DEST always has its quality report
            from nvfp4_ray.quality.evaluate import evaluate_checkpoint

            quality = evaluate_checkpoint(config.source, config.dest, small, [f.name for f in execution.files()], events)
        with events.stage("commit"):
            write_checkpoint(plan, small)
            manifest = commit(plan, execution.files(), small, execution.calibration_record(), report, quality)
    report["timings_s"] = {name: round(seconds, 3) for name, seconds in events.timings.items()}
    report["total_s"] = round(time.monotonic() - started, 3)
    summary = {"status": "succeeded", "dest": _display(config.dest), "version": manifest["version"], **report}
    return {**summary, "quality": quality}


def _remove_unfinished_writes(config: QuantizeConfig, events: Events, left_by: str) -> None:
    """Temporary files (on S3: unfinished uploads) at DEST: before the run writes anything,
    those a killed earlier run left; once every unit is written, those of this run's workers
    that were lost while writing (their stand-ins wrote the units again)."""
    from nvfp4_ray.io.destination import abort_stale_uploads
    from nvfp4_ray.io.storage import Store

    removed = abort_stale_uploads(Store(config.dest))
    if removed:
        events.info(f"removed {removed} unfinished writes {left_by}", removed=removed)


def _workers_first(config: QuantizeConfig) -> bool:
    """On a running Ray instance, unless an --if-changed run finds a committed checkpoint at
    DEST: then there is most likely nothing to do, and no worker should start for it."""
    import ray

    if not (ray.is_initialized() or config.ray_address or os.environ.get("RAY_ADDRESS")):
        return False
    if not config.if_changed:
        return True
    from nvfp4_ray.io.destination import SUCCESS
    from nvfp4_ray.io.storage import Store

    try:
        return not Store(config.dest).exists(SUCCESS)
    except Exception:  # unreachable or forbidden: reading the inputs reports it properly
        return False


def _read_inputs(config: QuantizeConfig, events: Events):
    with events.stage("plan"):
        return read_inputs(config)


def _warn(config: QuantizeConfig, inputs, events: Events) -> None:
    for note in inputs.notes:
        events.warning(note)
    if text_model_type(inputs.source.config) in REFERENCE_DROPS_CAUSAL_MASK:
        events.warning(
            "llm-compressor 0.14 calibrates this model type without a causal mask (bidirectional attention); "
            + (
                "--exact reproduces that, byte for byte"
                if config.exact
                else "this run uses the causal mask vLLM uses, so input scales differ from llm-compressor's "
                "(--exact reproduces them)"
            )
        )


def _unchanged(config: QuantizeConfig, inputs, started: float, events: Events) -> dict:
    events.info("DEST already holds a checkpoint of exactly these inputs: nothing to do")
    return {"status": "unchanged", "dest": _display(config.dest), "version": inputs.previous["version"],
            "total_s": round(time.monotonic() - started, 3)}  # fmt: skip


def _display(url: str) -> str:
    from nvfp4_ray.io.storage import redact

    return redact(url)


def _report(plan, execution, events: Events, started: float) -> dict:
    bytes_in = sum(t.entry.nbytes for t in plan.source.tensors.values())
    bytes_out = sum(f.size for f in execution.files())
    calibration = execution.calibration
    return {
        "model": plan.spec.architecture,
        "layers": len(plan.layer_units),
        "linears_quantized": sum(len(u.spec.linears) for u in plan.layer_units),
        "tensors_copied": len(plan.spec.other_tensors),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "units_computed": len(execution.computed),
        "units_reused": len(execution.reused),
        "calibration_samples": len(plan.samples or []),
        "calibration_tokens": calibration.tokens if calibration else 0,
        "workers": len(execution.workers),
        "calibration_workers": execution.calibration_workers if calibration else 0,
        "calibration_first_layer": calibration.first if calibration else None,
        "calibration_devices": sorted(set(calibration.devices)) if calibration else [],
        "calibration_compute_s": calibration.compute_s if calibration else 0.0,
        "calibration_load_wait_s": calibration.load_wait_s if calibration else 0.0,
        "snapshot_write_s": calibration.snapshot_write_s if calibration else 0.0,
        "calibration_cuda_graphs": calibration.cuda_graphs if calibration else False,
        "device_memory": {**execution.device_plan.record(), "max_layers_held": calibration.max_layers_held if calibration else 0},
        "worker_startup_s": execution.startup,
        "worker_replacements": execution.replacements,
        "layer_reads_per_node": dict(sorted(execution.reads.items())),
        "layer_reads_in_parts": execution.flow.reads_in_parts,
        "timings_s": {name: round(seconds, 3) for name, seconds in events.timings.items()},  # commit's comes after
        "elapsed_s": round(time.monotonic() - started, 3),
    }
