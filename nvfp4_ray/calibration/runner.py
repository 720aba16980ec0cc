"""Run a decoder one layer at a time over fixed batches, recording Linear input amax.

Only one decoder layer's weights are resident at a time. The kwargs each layer receives
(causal or padding mask, rotary position embeddings, ...) are captured once per batch
from the model's own backbone forward, with the decoder layers swapped for stubs; so
every model computes its masks and positions exactly as transformers does, and each
layer then runs as it would inside the full model. Activations propagate unquantized,
as in llm-compressor 0.14.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4_ray.architecture import build_meta_model, find_backbone
from nvfp4_ray.calibration.batches import Batch


class _StopForward(Exception):
    pass


class _CaptureLayer(torch.nn.Module):
    """Stands in for decoder layer ``index``: records its kwargs and passes hidden states on."""

    def __init__(self, index: int, last: int, sink: dict, attention_type: str | None):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to take keyword arguments after hidden_states")
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink[self.index] = kwargs
        if self.index == self.last:
            raise _StopForward
        return hidden_states


class _KVRecorder:
    """Stands in for the KV cache: attention hands ``update()`` its post-RoPE keys and
    values, which is where the reference observes them for k_scale and v_scale."""

    def __init__(self, valid: torch.Tensor | None):
        self.valid = valid  # [B, T] bool, or None without padding
        self.amax: dict[str, torch.Tensor] = {}

    def _observe(self, name: str, states: torch.Tensor) -> None:
        magnitude = states.abs()  # [B, heads, T, head_dim]
        if self.valid is not None:
            magnitude = torch.where(self.valid[:, None, :, None], magnitude, 0)
        value = magnitude.amax()
        self.amax[name] = value if name not in self.amax else torch.maximum(self.amax[name], value)

    def update(self, key_states, value_states, *args, **kwargs):
        self._observe("k", key_states)
        self._observe("v", value_states)
        return key_states, value_states


_MIN_GRAPH_BATCHES = 4  # fewer: capturing costs more than launching from Python saves


def _merge(sink: dict, name: str, value: torch.Tensor) -> None:
    """The running max: exact, and the same in any order."""
    sink[name] = value if name not in sink else torch.maximum(sink[name], value)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _same_inputs(a: "_BatchState", b: "_BatchState", index: int, equal: dict) -> bool:
    if a.hidden.shape != b.hidden.shape:
        return False
    if not _same_value(a.valid, b.valid, equal):
        return False
    kwargs_a, kwargs_b = a.layer_kwargs[index], b.layer_kwargs[index]
    return kwargs_a.keys() == kwargs_b.keys() and all(_same_value(kwargs_a[k], kwargs_b[k], equal) for k in kwargs_a)


def _same_value(a, b, equal: dict) -> bool:
    """Equal kwargs values; tensor comparisons are remembered (one host sync each)."""
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


@dataclass
class _BatchState:
    batch: Batch
    hidden: torch.Tensor  # [B, T, H] in the model dtype, on the runner's device
    layer_kwargs: dict[int, dict]
    valid: torch.Tensor | None  # [B, T] bool, None when there is no padding


class DecoderRunner:
    def __init__(
        self, config: dict, device: str, batched: bool = False, drop_causal_mask: bool = False, graphs: bool = False
    ):
        """``batched``: SDPA attention for padded batches; otherwise eager, as the reference.
        ``graphs``: on a GPU, replay each layer's forward as a CUDA graph (checked bit for
        bit against the eager forward) for batches whose other inputs are equal."""
        self.device = torch.device(device)
        self.graphs = graphs and self.device.type == "cuda"
        self.notes: list[str] = []  # what the job should know about how the layers ran
        self._equal: dict = {}  # (id, id) of two kwargs tensors -> equal
        if self.graphs:
            self._capture_stream = torch.cuda.Stream(self.device)
            self._pool = torch.cuda.graph_pool_handle()  # one pool: a layer reuses the last one's memory
            self._graph = None  # the last graph captured
        self.drop_causal_mask = drop_causal_mask
        model = build_meta_model(config, "sdpa" if batched else "eager")
        _, self.backbone = find_backbone(model)
        self.layers = list(self.backbone.layers)
        self._sink: dict = {}
        count = len(self.layers)
        self.backbone.layers = torch.nn.ModuleList(
            _CaptureLayer(i, count - 1, self._sink, getattr(layer, "attention_type", None))
            for i, layer in enumerate(self.layers)
        )
        # The rotary embedding's inverse frequencies are computed at construction, so a
        # meta-device copy has none. Build them on the CPU, as the reference does when it
        # loads the model (``base ** x`` on a GPU can differ in the last bit), then move them.
        rotary = getattr(self.backbone, "rotary_emb", None)
        if rotary is not None:
            with torch.device("cpu"):
                self.backbone.rotary_emb = type(rotary)(config=rotary.config).to(self.device)
        self.states: list[_BatchState] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def start(self, batches: list[Batch], embed_weight: torch.Tensor) -> None:
        """Embed the batches and capture every layer's kwargs for each of them."""
        embed = self.backbone.embed_tokens
        embed.load_state_dict({"weight": embed_weight.to(self.device)}, assign=True)
        self.states = []
        self._equal.clear()
        for batch in batches:
            self._sink.clear()
            ids = batch.input_ids.to(self.device)
            mask = batch.attention_mask.to(self.device)
            try:
                self.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            valid = None if bool(batch.attention_mask.all()) else mask.bool()
            kwargs = {i: self._sink[i] for i in range(self.num_layers)}
            if self.drop_causal_mask:  # reproduce the reference (see REFERENCE_DROPS_CAUSAL_MASK)
                kwargs = {i: {**layer_kwargs, "attention_mask": None} for i, layer_kwargs in kwargs.items()}
            self.states.append(_BatchState(batch, self._sink["hidden"], kwargs, valid))
        self._sink.clear()
        embed.to("meta")

    @torch.no_grad()
    def run_layer(
        self, index: int, weights: dict[str, torch.Tensor], record: list[str], attention: list[str] = ()
    ) -> dict[str, float]:
        """Advance every batch through layer ``index``; return the amax of each recorded
        Linear's input and, for each named attention module, of its keys and values
        ("<attention>.k", "<attention>.v")."""
        if len(attention) > 1:
            raise ValueError("one attention module per decoder layer is supported for KV-cache scales")
        layer = self.layers[index]
        layer.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, assign=True, strict=True)
        modules = dict(layer.named_modules())
        amax: dict[str, torch.Tensor] = {}
        current: dict = {}

        def make_hook(name):
            def hook(_module, args):
                x = args[0]
                # q/k/v (and gate/up) receive the same tensor object: reduce it once. The
                # cache holds the tensor itself so its id cannot be reused in this batch.
                cached = current.get(id(x))
                if cached is None:
                    magnitude = x.abs()
                    if current["valid"] is not None:
                        magnitude = torch.where(current["valid"].unsqueeze(-1), magnitude, 0)
                    cached = current[id(x)] = (x, magnitude.amax())
                _merge(current["sink"], name, cached[1])

            return hook

        def forward(state: _BatchState, hidden: torch.Tensor, sink: dict) -> torch.Tensor:
            """``state``'s batch through the layer from ``hidden``; its amax go to ``sink``."""
            current.clear()
            current["valid"], current["sink"] = state.valid, sink
            kwargs = state.layer_kwargs[index]
            if attention:
                recorder = _KVRecorder(state.valid)
                kwargs = {**kwargs, "past_key_values": recorder}
            out = layer(hidden, **kwargs)
            if attention:
                for kv, value in recorder.amax.items():
                    _merge(sink, f"{attention[0]}.{kv}", value)
            return out[0] if isinstance(out, tuple) else out

        handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in record]
        try:
            for group in self._groups(index):
                if self.graphs and len(group) >= _MIN_GRAPH_BATCHES:
                    self._run_graphed(group, forward, amax)
                    continue
                for state in group:
                    state.hidden = forward(state, state.hidden, amax)
        finally:
            for handle in handles:
                handle.remove()
            layer.to("meta")
        return {name: float(value) for name, value in amax.items()}

    def _groups(self, index: int) -> list[list[_BatchState]]:
        """The batches, in groups whose inputs to layer ``index`` other than the hidden
        states are equal (same shapes, same values): a graph captured for one runs them all."""
        if not self.graphs:
            return [self.states]
        groups: list[list[_BatchState]] = []
        for state in self.states:
            for group in groups:
                if _same_inputs(group[0], state, index, self._equal):
                    group.append(state)
                    break
            else:
                groups.append([state])
        return groups

    def _run_graphed(self, group: list[_BatchState], forward, amax: dict) -> None:
        """Run the group's first batch eagerly, capture that forward as a CUDA graph, check
        that a replay reproduces it bit for bit, and replay it for the other batches: the
        same kernels, without launching each one from Python. A forward that cannot be
        captured, or a replay that differs, turns graphs off for the rest of the job (the
        eager forward is the reference)."""
        compute, stream = torch.cuda.current_stream(self.device), self._capture_stream
        first, rest = group[0], group[1:]
        eager: dict[str, torch.Tensor] = {}
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):  # the eager forward warms the capture stream up too
            output = forward(first, first.hidden, eager)
            try:
                graph, static_in, static_out, names, static_amax = self._capture(first, forward)
            except RuntimeError as exc:  # an op that cannot be captured, such as a host sync
                graph = None
                self._graphs_off(f"a layer's forward could not be captured as a CUDA graph ({_first_line(exc)})")
        compute.wait_stream(stream)
        for tensor in (output, *eager.values()):
            tensor.record_stream(compute)
        if graph is not None:
            static_in.copy_(first.hidden)
            graph.replay()
            same = names == sorted(eager) and torch.equal(static_out, output)
            if not (same and torch.equal(static_amax, torch.stack([eager[name] for name in names]))):
                graph = None
                self._graphs_off("a CUDA graph replay differed from the eager forward")
        first.hidden = output
        for name, value in eager.items():
            _merge(amax, name, value)
        if graph is None:
            for state in rest:
                state.hidden = forward(state, state.hidden, amax)
            return
        # The graph lives until the next one is captured: graphs share one memory pool, and
        # the pool must not be left without a graph while a capture into it is pending.
        self._graph = graph
        running = None
        for state in rest:
            static_in.copy_(state.hidden)
            graph.replay()
            state.hidden = static_out.clone()  # the next replay overwrites static_out
            running = static_amax.clone() if running is None else torch.maximum(running, static_amax)
        for name, value in zip(names, running.unbind()):
            _merge(amax, name, value)

    def _capture(self, first: _BatchState, forward):
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

    def _graphs_off(self, why: str) -> None:
        self.graphs = False
        self.notes.append(f"{why}: the remaining layers run eagerly (same results, launched one kernel at a time)")

    def restore_hidden_states(self, hidden: dict[int, torch.Tensor]) -> None:
        for state in self.states:
            state.hidden = hidden[state.batch.index].to(self.device)
