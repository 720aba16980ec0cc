"""Read-ahead through the page cache: the kernel reads the next layers of a local source
ahead of the loads (and of the object-store budget). Residency is asked of the kernel itself (mincore)."""

import ctypes
import mmap
import os
import shutil
import time

import pytest

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident(path: str, start: int, end: int) -> float:
    """The fraction of the pages of bytes [start, end) of ``path`` in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    first, last = start // PAGE * PAGE, end
    with open(path, "rb") as handle:
        # a private mapping faults nothing in; mincore reports the file's cached pages
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(mapped)
        pages = -(-(last - first) // PAGE)
        vector = (ctypes.c_ubyte * pages)()
        code = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor) + first), ctypes.c_size_t(last - first), vector)
        assert code == 0, os.strerror(ctypes.get_errno())
        del anchor
        return sum(v & 1 for v in vector) / pages
    finally:
        mapped.close()


def evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache, or skip where that cannot be done (tmpfs)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        if resident(path, 0, os.path.getsize(path)) > 0.01:
            pytest.skip(f"this filesystem keeps {path} in memory (no page cache to read ahead into)")


MIB = 1 << 20
# A range counts as read whole at this fraction of its pages: some machines reclaim cold
# memory on their own (this VM kind runs a DAMON "pageout" scheme, kdamond), and took
# pages of a range just read (6 of 8192 in one run of the suite, 4.4% of a layer in
# another). What the read-ahead is measured against, posix_fadvise(WILLNEED), brings one
# 128 KiB window of each range (under 2% of a SmolLM2 layer); a range never read, none.
WHOLE = 0.9


def test_read_ahead_brings_exactly_the_ranges_into_the_page_cache(tmp_path):
    """Whole ranges, far larger than a read-ahead window (what posix_fadvise(WILLNEED) would
    read), and nothing far from them."""
    from nvfp4_ray.io.storage import Store

    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(128 * MIB))
    evict([str(path)])
    Store(str(tmp_path)).read_ahead([("data.bin", 8 * MIB, 40 * MIB), ("data.bin", 80 * MIB, 88 * MIB + 5)])
    assert resident(str(path), 8 * MIB, 40 * MIB) >= WHOLE
    assert resident(str(path), 80 * MIB, 88 * MIB + 5) >= WHOLE
    assert resident(str(path), 52 * MIB, 76 * MIB) < 0.1  # beyond the kernel's own read-ahead after 40 MiB
    assert resident(str(path), 0, 8 * MIB) < 0.1
    # an object store has no page cache: asking is a no-op, not an error
    Store("s3://no-such-bucket/prefix").read_ahead([("x", 0, 10)])


@pytest.mark.parametrize("local", [False, True], ids=["object-store", "local"])
def test_layers_are_read_ahead_in_order_within_the_budgets(tmp_path, smollm2, ray_instance, local):
    """Budget below one layer. ``local`` (the workers read the layers themselves): the flow
    takes up one layer, reads none into the object store, and reads layers 0 and 1 into
    the page cache, READING_AHEAD at once, while they fit in ``readahead`` (2.5 layers
    past the loads, none yet). Object store (as for a remote SOURCE): it reads two layers (READING)
    into the object store and nothing into the page cache beside them. Nothing later is
    read. The model is one file."""
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.pipeline.layer_flow import LayerFlow
    from nvfp4_ray.pipeline.layer_reads import READING, READING_AHEAD
    from nvfp4_ray.pipeline.plan import build_plan, read_inputs
    import ray

    source = shutil.copytree(smollm2, tmp_path / "source")
    config = QuantizeConfig(source=str(source), dest=str(tmp_path / "out"), scheme="NVFP4A16")
    plan = build_plan(config, read_inputs(config))
    evict([os.path.join(source, name) for name in os.listdir(source) if name.endswith(".safetensors")])
    layer = plan.layer_units[0].nbytes
    node = ray.get_runtime_context().get_node_id()
    flow = LayerFlow(plan, [node], set(), 0, budget=1, readahead=2.5 * layer, local=local)
    taken, ahead, cached = (1, 2, [0, 1]) if local else (READING, 0, list(range(READING)))

    flow.pump(None)
    assert flow.reading_ahead == (READING_AHEAD if local else 0)  # asked for together, not one after the other
    deadline = time.monotonic() + 60
    while (flow.reading_ahead or flow.ahead < ahead) and time.monotonic() < deadline:
        flow.pump(None)
        flow.poll(block=False)
        time.sleep(0.02)
    for _ in range(5):  # nothing more is asked for once the window is full
        flow.pump(None)
        flow.poll(block=False)
        time.sleep(0.02)
    assert (flow.next, flow.ahead) == (taken, ahead)
    reads = [ref for layer in flow.layers.values() for ref in layer.reads.values()]  # held in the object store
    assert len(reads) == (0 if local else READING) and len(flow.layers) == taken
    # local: a layer counts as read on a node once its read-ahead there is asked for
    assert flow.reads_per_node == ({node: len(cached)} if local else {node: READING})

    def fraction(index: int) -> float:
        tensors = plan.layer_units[index].tensors
        cached = sum(resident(os.path.join(source, t.file), t.entry.start, t.entry.end) * t.entry.nbytes for t in tensors)
        return cached / sum(t.entry.nbytes for t in tensors)

    if local:  # a read-ahead request returns once its layer is in the page cache
        assert all(fraction(i) >= WHOLE for i in cached), {i: fraction(i) for i in cached}
    else:  # the layers' bytes, in the object store
        for index, bundle in zip(cached, ray.get(reads)):
            for tensor in plan.layer_units[index].tensors:
                with open(os.path.join(source, tensor.file), "rb") as handle:
                    handle.seek(tensor.entry.start)
                    assert bundle.raw(tensor.name).tobytes() == handle.read(tensor.entry.nbytes), tensor.name

    # Layers well past every range read (the kernel's own read-ahead after a read takes up
    # to a few windows, 8 MiB each here) are untouched; which ones those are depends on the
    # order of the tensors in the file.
    def bounds(index: int) -> tuple[int, int]:
        tensors = plan.layer_units[index].tensors
        return min(t.entry.start for t in tensors), max(t.entry.end for t in tensors)

    ends = [bounds(i)[1] for i in range(cached[-1] + 1)]
    far = [
        i for i in range(cached[-1] + 1, len(plan.layer_units)) if all(not 0 <= bounds(i)[0] - end < 32 * MIB for end in ends)
    ]
    assert len(far) >= 5
    assert all(fraction(i) < 0.05 for i in far), {i: round(fraction(i), 3) for i in far}


def test_a_failed_read_ahead_is_left_to_the_real_read(tmp_path, ray_instance):
    """Nobody takes a read-ahead's result: a missing file must not become an error of its
    own (Ray would log it as unhandled); the layer's real read reports it."""
    import ray

    from nvfp4_ray.pipeline.unit_tasks import read_ahead_task

    assert ray.get(read_ahead_task.remote(str(tmp_path), [("gone.safetensors", 0, 1 << 20)])) is None
