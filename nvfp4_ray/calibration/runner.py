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
from nvfp4_ray.calibration.graphs import MIN_GRAPH_BATCHES, LayerGraphs, group_batches, merge


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
        merge(self.amax, name, value)

    def update(self, key_states, value_states, *args, **kwargs):
        self._observe("k", key_states)
        self._observe("v", value_states)
        return key_states, value_states


@dataclass
class _BatchState:
    batch: Batch
    hidden: torch.Tensor  # [B, T, H] in the model dtype, on the runner's device
    layer_kwargs: dict[int, dict]
    valid: torch.Tensor | None  # [B, T] bool, None when there is no padding


class DecoderRunner:
    def __init__(
        self, config: dict, device: str, attention: str = "eager", drop_causal_mask: bool = False, graphs: bool = False
    ):
        """``attention``: transformers' attention implementation, "eager" as the reference
        computes it, or "sdpa" (PyTorch's fused kernels: padded batches, GPTQ's default mode).
        ``graphs``: on a GPU, replay each layer's forward as a CUDA graph (checked bit for
        bit against the eager forward) for batches whose other inputs are equal."""
        if drop_causal_mask and attention != "eager":  # SDPA would stay causal without its mask
            raise ValueError("dropping the causal mask reproduces the reference's eager attention: attention must be eager")
        self.device = torch.device(device)
        self.graphs = LayerGraphs(self.device) if graphs and self.device.type == "cuda" else None
        self.drop_causal_mask = drop_causal_mask
        model = build_meta_model(config, attention)
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
        if self.graphs is not None:
            self.graphs.equal.clear()
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
        self, index: int, weights: dict[str, torch.Tensor], record: list[str], attention: list[str] = (),
        advance: bool = True, inputs_to: dict | None = None, eager: bool = False, inputs_only: bool = False,
    ) -> dict[str, float]:
        """Advance every batch through layer ``index``; return the amax of each recorded
        Linear's input and, for each named attention module, of its keys and values
        ("<attention>.k", "<attention>.v"). ``advance`` False: the hidden states stay
        (GPTQ runs the layer again with its quantized weights). ``inputs_to``: module name
        -> callable(batch index, input), given each batch's input of that module. ``eager``:
        no CUDA graphs (the batches run one by one, in order: expert_groups.py).
        ``inputs_only`` (eager, not advancing): a forward stops once every module of
        ``record`` and ``inputs_to`` has seen its input, and the keys and values theirs:
        what comes after (a dense layer's down_proj product, a quarter of its FLOPs, and
        the residual add) feeds nothing recorded. A forward where one of them is not
        called (an expert no token chose) runs whole."""
        if len(attention) > 1:
            raise ValueError("one attention module per decoder layer is supported for KV-cache scales")
        if inputs_only and (advance or not eager):
            raise ValueError("inputs_only runs eagerly and leaves the hidden states where they are")
        layer = self.layers[index]
        layer.load_state_dict(_as_declared(layer, weights, self.device), assign=True, strict=True)
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
                    if current["valid"] is not None:  # [B, T, H], or [B*T, H] inside an MoE block
                        valid = current["valid"].reshape(*x.shape[:-1], 1)
                        magnitude = torch.where(valid, magnitude, 0)
                    cached = current[id(x)] = (x, magnitude.amax())
                merge(current["sink"], name, cached[1])

            return hook

        def forward(state: _BatchState, hidden: torch.Tensor, sink: dict) -> torch.Tensor:
            """``state``'s batch through the layer from ``hidden``; its amax go to ``sink``."""
            current.clear()
            current["valid"], current["sink"], current["batch"] = state.valid, sink, state.batch.index
            kwargs = state.layer_kwargs[index]
            if attention:
                recorder = current["recorder"] = _KVRecorder(state.valid)
                kwargs = {**kwargs, "past_key_values": recorder}
            try:
                out = layer(hidden, **kwargs)
            except _StopForward:  # inputs_only: every input is in
                out = None
            if attention:
                for kv, value in recorder.amax.items():
                    merge(sink, f"{attention[0]}.{kv}", value)
            return out[0] if isinstance(out, tuple) else out

        stop_after = set(record) | set(inputs_to or {}) if inputs_only else set()

        def stop_hook(name):
            def hook(_module, _args):  # registered last: the module's other hooks have run
                seen = current.setdefault("seen", set())
                seen.add(name)
                if len(seen) == len(stop_after) and (not attention or len(current["recorder"].amax) == 2):
                    raise _StopForward

            return hook

        handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in record]
        for name, take in (inputs_to or {}).items():
            handles.append(modules[name].register_forward_pre_hook(lambda _m, args, take=take: take(current["batch"], args[0])))
        handles.extend(modules[name].register_forward_pre_hook(stop_hook(name)) for name in stop_after)
        try:
            graphed = self.graphed and not eager
            groups = group_batches(self.states, index, self.graphs.equal) if graphed else [self.states]
            for group in groups:
                if graphed and len(group) >= MIN_GRAPH_BATCHES:
                    self.graphs.run(group, forward, amax)
                    continue
                for state in group:
                    out = forward(state, state.hidden, amax)
                    if advance:
                        state.hidden = out
        finally:
            for handle in handles:
                handle.remove()
            layer.to("meta")
        return {name: float(value) for name, value in amax.items()}

    @property
    def graphed(self) -> bool:
        """Whether the layers still replay as CUDA graphs."""
        return self.graphs is not None and self.graphs.on

    @property
    def notes(self) -> list[str]:
        """What the job should know about how the layers ran."""
        return self.graphs.notes if self.graphs is not None else []

    def restore_hidden_states(self, hidden: dict[int, torch.Tensor]) -> None:
        for state in self.states:
            state.hidden = hidden[state.batch.index].to(self.device)


def _as_declared(layer: torch.nn.Module, weights: dict[str, torch.Tensor], device: torch.device) -> dict:
    """The layer's tensors on ``device``; those the model keeps in float32 whatever the
    checkpoint's dtype (MoE routers' ``e_score_correction_bias``, transformers'
    ``_keep_in_fp32_modules_strict``) are upcast, as transformers does when it loads them."""
    declared = dict(layer.state_dict(keep_vars=True))
    out = {}
    for name, tensor in weights.items():
        dtype = declared[name].dtype if name in declared and declared[name].dtype == torch.float32 else tensor.dtype
        out[name] = tensor.to(device, dtype=dtype)
    return out
