"""GPTQ for NVFP4 weights, one fused group at a time: pure functions, no Ray, no I/O.

The steps, their order and their shapes are llm-compressor 0.14's (``modifiers/gptq``:
``accumulate_hessian``, ``prepare_batch``, ``quantize_weight``, ``apply_activation_ordering``,
``factorize_hessian``), kept with its batch dimension of one so that every kernel sees the
tensors it sees there; the block update is its own ``gptq_block_update``:

* Hessian: each forward adds ``(sqrt(2) x)(sqrt(2) x)^T`` over its tokens, in fp32, and
  counts its sequences; the solve divides by the count. (The default mode adds
  ``2 x x^T`` instead, its products exact: ``add_products``.)
* Scales come from the weights as loaded (``linear.weight_qparams``: fused siblings
  share the global scale), before any column is quantized.
* Columns in order of descending Hessian diagonal (activation ordering "static", which
  compressed-tensors treats as an alias of "weight": each column keeps its own group
  scale), or in their order (``actorder: null``); dead columns (zero diagonal) zeroed; ``H += damp * mean(diag) * I``;
  Cholesky, inverse, upper Cholesky; a Cholesky that fails falls back to the identity,
  which is round-to-nearest. Then blocks of columns, each quantized column's error
  spread over the rest of its block (llm-compressor's ``gptq_block_update`` itself: its
  Triton kernel on CUDA, as the reference runs), each block's over the columns after it.

The solved weight (dequantized, in the weight's dtype) is what the next layers see; the
checkpoint holds it quantized again with the same scales, as llm-compressor saves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStrategy
from llmcompressor.modifiers.gptq.gptq_quantize import gptq_block_update

from nvfp4_ray.formats import linear

PRECISION = torch.float32
GROUP_SIZE = 16  # NVFP4: one FP8 scale per 16 input columns


def new_hessian(in_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty Hessian and its sample count (a 0-dim fp32 tensor, as llm-compressor keeps it)."""
    return torch.zeros((in_features, in_features), device=device, dtype=PRECISION), torch.zeros((), device=device)


def add_to_hessian(hessian: torch.Tensor, count: torch.Tensor, inputs: torch.Tensor) -> None:
    """Add one forward's Linear input ([batch, tokens, in] or [tokens, in]) in place, as
    llm-compressor does (--exact)."""
    if inputs.dim() == 2:
        inputs = inputs.unsqueeze(0)
    count += inputs.shape[0]
    inputs = inputs.reshape((-1, inputs.shape[-1])).t()
    inputs = math.sqrt(2) * inputs.to(dtype=PRECISION)
    hessian += inputs.matmul(inputs.t())


def add_products(hessian: torch.Tensor, count: torch.Tensor, inputs: torch.Tensor) -> None:
    """The default mode's sum: ``2 x x^T`` in place of ``(sqrt(2) x)(sqrt(2) x)^T``, the
    same value rounded differently. A product of two bf16 (or fp16) inputs is exact in
    fp32 (8 + 8, or 11 + 11, significant bits of 24), so on a GPU the half-precision
    tensor cores compute them, summing in fp32, at several times the fp32 rate: the fp32
    products bound llm-compressor's calibration pass (docs/gptq.md#speed). The factor 2
    is exact. Elsewhere the same products in fp32."""
    if inputs.dim() == 2:
        inputs = inputs.unsqueeze(0)
    count += inputs.shape[0]
    x = inputs.reshape((-1, inputs.shape[-1]))
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(hessian, x.t(), x, out_dtype=PRECISION, alpha=2, out=hessian)
    else:
        x = x.to(dtype=PRECISION)
        hessian.addmm_(x.t(), x, alpha=2)


@dataclass
class Solved:
    """One Linear's GPTQ result."""

    weight: torch.Tensor  # the quantized weight, dequantized, in the source weight's dtype
    tensors: dict[str, torch.Tensor]  # checkpoint tensors by suffix (weight_packed, ...)
    fell_back: bool  # its Hessian was not positive definite: round-to-nearest


def solve_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    count: torch.Tensor,
    scheme: QuantizationScheme,
    block_size: int,
    dampening: float,
    ordered: bool = True,
) -> list[Solved]:
    """GPTQ for fused siblings that share one input (and so one Hessian: q/k/v, gate/up).
    ``hessian`` and ``count`` are the sums over every calibration forward."""
    args = scheme.weights
    if args.strategy != QuantizationStrategy.TENSOR_GROUP or args.group_size != GROUP_SIZE:
        raise ValueError(f"GPTQ is implemented for NVFP4 weights only, not {args.strategy} / {args.group_size}")
    qparams = linear.weight_qparams(weights, args)
    global_scale, scales = qparams
    normalized = hessian / count.to(device=hessian.device)
    solved = []
    for weight, (scale, _) in zip(weights, scales):
        quantized, fell_back = quantize_weight(
            weight, normalized.clone(), scale, global_scale, args, block_size, dampening, ordered
        )
        solved.append((quantized, fell_back))
    packed = linear.quantize_group([q for q, _ in solved], scheme, qparams)
    return [Solved(q, tensors, fell_back) for (q, fell_back), tensors in zip(solved, packed)]


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    args: QuantizationArgs,
    block_size: int,
    dampening: float,
    ordered: bool = True,
) -> tuple[torch.Tensor, bool]:
    """One weight [rows, columns] and its normalized Hessian (overwritten) -> the solved
    weight in the weight's dtype, and whether the Cholesky failed (round-to-nearest).
    ``ordered``: activation ordering ("static", an alias of "weight"); else column order."""
    rows, columns = weight.shape
    work = torch.empty((1, rows, columns), device=weight.device, dtype=PRECISION)
    torch.stack([weight], out=work)
    H = hessian.unsqueeze(0)
    group_of = torch.arange(columns, device=weight.device, dtype=torch.int) // GROUP_SIZE
    perm = None
    if ordered:
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)
        H.copy_(torch.gather(torch.gather(H, -1, perm.unsqueeze(-2).expand(-1, columns, -1)), -2,
                             perm.unsqueeze(-1).expand(-1, -1, columns)))  # fmt: skip
        work.copy_(torch.gather(work, -1, perm.unsqueeze(-2).expand(-1, rows, -1)))
        group_of = torch.gather(group_of.unsqueeze(0).expand(1, -1), 1, perm)[0]  # each column keeps its group
    Hinv, fell_back = _factorize(work, H, dampening)
    scale, global_scale = scale.unsqueeze(0), global_scale.reshape(1, -1)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = work[:, :, i1:i2].clone()
        Q1, Err1, losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        # llm-compressor's own block update: on CUDA its Triton kernel (one launch per block),
        # elsewhere or with LLMCOMPRESSOR_DISABLE_GPTQ_TRITON=1 its eager column loop, as the
        # reference chooses; both quantize each column with compressed-tensors' rounding
        gptq_block_update(W1, Hinv[:, i1:i2, i1:i2], Q1, Err1, losses1, scale=scale, zero_point=None,
                          global_scale=global_scale, g_idx=group_of.unsqueeze(0), quant_args=args, i1=i1)  # fmt: skip
        work[:, :, i1:i2] = Q1
        work[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])
    if perm is not None:
        work = torch.gather(work, -1, torch.argsort(perm, dim=-1).unsqueeze(-2).expand(-1, rows, -1))
    return work[0].to(weight.dtype), fell_back


def _factorize(work: torch.Tensor, H: torch.Tensor, dampening: float) -> tuple[torch.Tensor, bool]:
    """H (overwritten) -> the upper Cholesky factor of its dampened inverse; the identity
    (and True) when it is not positive definite. Dead columns are zeroed in ``work``."""
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    if dead.any():
        diag.masked_fill_(dead, 1.0)
        work.masked_fill_(dead.unsqueeze(1), 0)
    item = H[0]
    info = torch.empty((), dtype=torch.int32, device=H.device)
    damp = dampening * torch.mean(torch.diag(item))
    torch.diagonal(item).add_(damp)
    torch.linalg.cholesky_ex(item, check_errors=False, out=(item, info))
    if info.item() != 0:
        item.copy_(torch.eye(item.shape[0], dtype=item.dtype, device=item.device))
        return H, True
    torch.cholesky_inverse(item, out=item)
    torch.linalg.cholesky(item, upper=True, out=item)
    return H, False
