"""A decoder layer's forward replayed as CUDA graphs, checked bit for bit against eager.

On a GPU, running a layer over 128 batches one at a time launches thousands of small
kernels from Python, and every launch waits for the GIL while the worker's load thread
copies and quantizes the next layer: the step took 0.29 to 0.35 s a layer in the job
against 0.18 s alone (bench/load_probe.py). A CUDA graph replays a whole forward with one
launch. For each group of batches whose inputs other than the hidden states are equal, the
first batch runs eagerly (its result is the reference), that forward is captured, a replay
of it must reproduce the eager output and amax bit for bit, and only then is it replayed
for the rest of the group. Anything else turns graphs off for the rest of the job.
"""

from __future__ import annotations

import torch

# A graphed group costs one forward more than an eager one (the check's replay of the first
# batch); smaller groups run eagerly.
MIN_GRAPH_BATCHES = 4


def merge(sink: dict, name: str, value: torch.Tensor) -> None:
    """The running max: exact, and the same in any order."""
    sink[name] = value if name not in sink else torch.maximum(sink[name], value)


def group_batches(states: list, index: int, equal: dict) -> list[list]:
    """The batch states, in groups whose inputs to layer ``index`` other than the hidden
    states are equal (same shapes, same values): one graph runs a whole group.
    ``equal`` remembers tensor comparisons (each costs a host sync) across layers."""
    groups: list[list] = []
    for state in states:
        for group in groups:
            if _same_inputs(group[0], state, index, equal):
                group.append(state)
                break
        else:
            groups.append([state])
    return groups


class LayerGraphs:
    def __init__(self, device: torch.device):
        self.device = device
        self.on = True
        self.notes: list[str] = []
        self.equal: dict = {}  # (id, id) of two kwargs tensors -> equal; cleared with the batches
        self._stream = torch.cuda.Stream(device)
        self._pool = torch.cuda.graph_pool_handle()  # one pool: a layer reuses the last one's memory
        # The last graph lives until the next one is captured: the pool must not be left
        # without a graph while a capture into it is pending (PyTorch asserts).
        self._graph = None

    def run(self, group: list, forward, amax: dict) -> None:
        """Advance ``group`` through the layer whose ``forward(state, hidden, sink)`` is given,
        merging the amax into ``amax``: the first batch eagerly, the rest by graph replays
        once a replay of the first has reproduced it."""
        compute, stream = torch.cuda.current_stream(self.device), self._stream
        first, rest = group[0], group[1:]
        eager: dict[str, torch.Tensor] = {}
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):  # the eager forward warms the capture stream up too
            output = forward(first, first.hidden, eager)
            try:
                graph, static_in, static_out, names, static_amax = self._capture(first, forward)
            except RuntimeError as exc:  # an op that cannot be captured, such as a host sync
                graph = None
                self._off(f"a layer's forward could not be captured as a CUDA graph ({_first_line(exc)})")
        compute.wait_stream(stream)
        for tensor in (output, *eager.values()):
            tensor.record_stream(compute)
        if graph is not None:
            static_in.copy_(first.hidden)
            graph.replay()
            same = names == sorted(eager) and torch.equal(static_out, output)
            if not (same and torch.equal(static_amax, torch.stack([eager[name] for name in names]))):
                graph = None
                self._off("a CUDA graph replay differed from the eager forward")
        first.hidden = output
        for name, value in eager.items():
            merge(amax, name, value)
        if graph is None:
            for state in rest:
                state.hidden = forward(state, state.hidden, amax)
            return
        self._graph = graph
        running = None
        for state in rest:
            static_in.copy_(state.hidden)
            graph.replay()
            state.hidden = static_out.clone()  # the next replay overwrites static_out
            running = static_amax.clone() if running is None else torch.maximum(running, static_amax)
        for name, value in zip(names, running.unbind()):
            merge(amax, name, value)

    def _capture(self, first, forward):
        """A graph of ``forward`` for batches shaped like ``first``: its input and output
        tensors, and the stacked amax it records (named by ``names``). capture_begin and
        capture_end directly: ``torch.cuda.graph`` would also synchronize the device, run
        the garbage collector and empty the allocator's cache at every layer."""
        graph, captured = torch.cuda.CUDAGraph(), {}
        static_in = torch.empty_like(first.hidden)
        graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")  # the load thread goes on
        try:
            static_out = forward(first, static_in, captured)
            names = sorted(captured)
            static_amax = torch.stack([captured[name] for name in names])
        finally:
            graph.capture_end()
        return graph, static_in, static_out, names, static_amax

    def _off(self, why: str) -> None:
        self.on = False
        self.notes.append(f"{why}: the remaining layers run eagerly (same results, launched one kernel at a time)")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _same_inputs(a, b, index: int, equal: dict) -> bool:
    if a.hidden.shape != b.hidden.shape or not _same_value(a.valid, b.valid, equal):
        return False
    kwargs_a, kwargs_b = a.layer_kwargs[index], b.layer_kwargs[index]
    return kwargs_a.keys() == kwargs_b.keys() and all(_same_value(kwargs_a[k], kwargs_b[k], equal) for k in kwargs_a)


def _same_value(a, b, equal: dict) -> bool:
    """Equal kwargs values; tensor comparisons are remembered in ``equal``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        key = (id(a), id(b))
        if key not in equal:
            equal[key] = a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
        return equal[key]
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y, equal) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k], equal) for k in a)
    return type(a) is type(b) and a == b
