"""A layer worker writes the units it quantizes from a thread of its own, and its load
thread waits for that thread: with a DEST slower than the worker, the quantized layers it
holds stay bounded (the packed layers never go through the object store)."""

import hashlib
import time

import pytest
from conftest import session_processes
from tcp_proxy import TcpProxy


@pytest.mark.usefixtures("ray_instance")
def test_quantized_layers_wait_for_a_slow_dest_at_most_writes_queued_deep(smollm2, bucket, s3_server):
    """DEST on S3 behind a relay at 1 MiB/s (a layer's unit is 2 MB): at no time has the
    worker finished more loads than WRITES_QUEUED beyond the units whose completion record
    is at DEST, and it does reach that depth; every unit arrives whole."""
    import ray

    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.io import destination
    from nvfp4_ray.io.storage import Store
    from nvfp4_ray.io.tensors import LocalRead
    from nvfp4_ray.pipeline.plan import build_plan, read_inputs
    from nvfp4_ray.pipeline.worker_loads import WRITES_QUEUED
    from nvfp4_ray.pipeline.workers import LayerWorker

    dest = f"s3://{bucket}/out"
    config = QuantizeConfig(source=smollm2, dest=dest, scheme="NVFP4A16")
    plan = build_plan(config, read_inputs(config))
    units = plan.layer_units[: WRITES_QUEUED + 4]
    relay = TcpProxy(s3_server.ports["s3"], connection_bytes_per_s=1 << 20)
    slow = {"env_vars": {"AWS_ENDPOINT_URL": relay.endpoint}}  # the worker's requests cross the relay
    worker = LayerWorker.options(runtime_env=slow).remote(1, time.time())
    try:
        loads = [
            worker.load.remote(i, LocalRead(smollm2, unit.tensors), dict(unit.spec.tensors), False,
                               (unit.spec, unit.file, unit.key, dest))  # fmt: skip
            for i, unit in enumerate(units)
        ]
        writes = [worker.written.remote(i) for i in range(len(units))]
        store, deepest = Store(dest), 0
        deadline = time.monotonic() + 300
        while ray.wait(writes, num_returns=len(writes), timeout=0)[1] and time.monotonic() < deadline:
            loaded = len(ray.wait(loads, num_returns=len(loads), timeout=0)[0])
            recorded = sum(destination.load_done(store, u.key, u.file) is not None for u in units)  # after `loaded`
            assert loaded <= recorded + WRITES_QUEUED, (loaded, recorded)
            deepest = max(deepest, loaded - recorded)
            time.sleep(0.05)
        files = ray.get(writes, timeout=1)
    finally:
        ray.kill(worker)  # later tests count the session's layer workers
        gone = time.monotonic() + 60
        while session_processes("ray::LayerWorker") and time.monotonic() < gone:
            time.sleep(0.1)
        relay.close()
    assert deepest == WRITES_QUEUED  # the loads did run ahead of the writes, up to the bound
    assert ray.get(loads) == [None] * len(units)  # nothing for the object store
    for unit, written in zip(units, files):
        assert written.name == unit.file and written.sha256 == hashlib.sha256(store.read_bytes(unit.file)).hexdigest()
        assert destination.load_done(store, unit.key, unit.file) == written
