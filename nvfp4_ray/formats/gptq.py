"""GPTQ for NVFP4 weights, one fused group at a time: pure functions, no Ray, no I/O.

The steps, their order and their shapes are llm-compressor 0.14's (``modifiers/gptq``:
``accumulate_hessian``, ``prepare_batch``, ``quantize_weight``, ``apply_activation_ordering``,
``factorize_hessian``), kept with its batch dimension of one so that every kernel sees the
tensors it sees there; the block update is its own ``gptq_block_update``:

* Hessian: each forward adds ``(sqrt(2) x)(sqrt(2) x)^T`` over its tokens, in fp32, and
  counts its sequences; the solve divides by the count. (The default mode adds the lower
  triangle of ``2 x x^T`` instead, its products exact: ``add_products``.)
* Scales come from the weights as loaded (``linear.weight_qparams``: fused siblings
  share the global scale), before any column is quantized.
* Columns in order of descending Hessian diagonal (activation ordering "static", which
  compressed-tensors treats as an alias of "weight": each column keeps its own group
  scale), or in their order (``actorder: null``); dead columns (zero diagonal) zeroed; ``H += damp * mean(diag) * I``;
  Cholesky, inverse, upper Cholesky (the default mode: one Cholesky and a triangular
  inverse, ``_invert_reversed``), once for fused siblings; a Cholesky that fails falls
  back to the identity, which is round-to-nearest. Then blocks of columns, each quantized
  column's error spread over the rest of its block (llm-compressor's ``gptq_block_update``
  itself: its Triton kernel on CUDA, as the reference runs), each block's over the
  columns after it; the default mode solves the siblings' rows stacked, in one pass.

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
STRIPE_ROWS = 2048  # add_products: the least rows of a stripe of the lower triangle


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


def add_products(hessian: torch.Tensor, count: torch.Tensor, inputs: torch.Tensor | list[torch.Tensor],
                 stripes: int | None = None) -> None:  # fmt: skip
    """The default mode's sum: ``2 x x^T`` in place of ``(sqrt(2) x)(sqrt(2) x)^T``, the
    same value rounded differently. A product of two bf16 (or fp16) inputs is exact in
    fp32 (8 + 8, or 11 + 11, significant bits of 24), so on a GPU the half-precision
    tensor cores compute them, summing in fp32, at several times the fp32 rate: the fp32
    products bound llm-compressor's calibration pass (docs/gptq.md#speed). The factor 2
    is exact. Elsewhere the same products in fp32.

    Only the lower triangle is summed, by row stripes (each with its diagonal block
    whole: 5/8 of the products at 4 stripes; ``fill_upper`` completes the Hessian).
    ``inputs``: one forward's, or a list of several forwards' summed in one product."""
    parts = inputs if isinstance(inputs, list) else [inputs]
    count += sum(part.shape[0] if part.dim() == 3 else 1 for part in parts)
    rows = [part.reshape((-1, part.shape[-1])) for part in parts]
    x = torch.cat(rows) if len(rows) > 1 else rows[0]
    tensor_cores = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    if not tensor_cores:
        x = x.to(dtype=PRECISION)
    for a, b in _stripes(x.shape[1], stripes):
        out = hessian[a:b, :b]
        if tensor_cores:
            torch.addmm(out, x[:, a:b].t(), x[:, :b], out_dtype=PRECISION, alpha=2, out=out)
        else:
            out.addmm_(x[:, a:b].t(), x[:, :b], alpha=2)


def fill_upper(hessian: torch.Tensor) -> None:
    """A Hessian summed by ``add_products`` -> symmetric, its upper triangle the lower's
    (Cholesky and activation ordering read both)."""
    for a, b in _stripes(hessian.shape[0]):
        hessian[a:b, b:].copy_(hessian[b:, a:b].t())
        diagonal = hessian[a:b, a:b]
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).t())


def _stripes(n: int, stripes: int | None = None) -> list[tuple[int, int]]:
    """Row ranges of a Hessian's lower-triangle stripes: one per STRIPE_ROWS rows, at
    most 4 (on the H100, in 14336: 0.71 ms a forward of 1024 tokens at 4 stripes, 0.78 at
    2, 1.08 whole; in 4096: 0.115 ms at 2 stripes, 0.137 whole; narrower stripes are
    slower: docs/gptq.md#speed)."""
    stripes = stripes or max(1, min(4, n // STRIPE_ROWS))
    edges = [n * i // stripes for i in range(stripes + 1)]
    return list(zip(edges, edges[1:]))


@dataclass
class Solved:
    """One Linear's GPTQ result."""

    weight: torch.Tensor  # the quantized weight, dequantized, in the source weight's dtype
    tensors: dict[str, torch.Tensor]  # checkpoint tensors by suffix (weight_packed, ...)
    fell_back: bool  # its Hessian was not positive definite: round-to-nearest


@dataclass
class InverseFactor:
    """What a group's solves take from its Hessian: the same for every sibling, so it is
    computed once (llm-compressor computes it for each; the same bits)."""

    factor: torch.Tensor  # [1, n, n]: the upper Cholesky factor of the dampened inverse, columns in ``perm``'s order
    perm: torch.Tensor | None  # [1, n]: activation ordering, or None (column order)
    dead: torch.Tensor  # [n] bool, in ``perm``'s order: columns whose input was always zero
    fell_back: bool  # not positive definite: the factor is the identity (round-to-nearest)


def solve_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    count: torch.Tensor,
    scheme: QuantizationScheme,
    block_size: int,
    dampening: float,
    ordered: bool = True,
    *,
    exact: bool,
) -> list[Solved]:
    """GPTQ for fused siblings that share one input (and so one Hessian: q/k/v, gate/up).
    ``hessian`` and ``count`` are the sums over every calibration forward. ``exact``:
    llm-compressor's arithmetic, sibling by sibling; else the inverse factor from one
    Cholesky (``_invert_reversed``) and the siblings' rows solved together: rows are
    independent in GPTQ, so only the kernels' shapes, hence some roundings, change."""
    inverse = group_inverse(hessian, count, dampening, ordered, exact)
    return solve_with(weights, inverse, scheme, block_size, exact=exact)


def group_inverse(hessian: torch.Tensor, count: torch.Tensor, dampening: float, ordered: bool, exact: bool) -> InverseFactor:
    """The InverseFactor of a Hessian sum and its count (``hessian`` is left as it is):
    what every group of that input takes (solve_with)."""
    return inverse_factor(hessian / count.to(device=hessian.device), dampening, ordered, exact)


def solve_with(weights: list[torch.Tensor], inverse: InverseFactor, scheme: QuantizationScheme, block_size: int, *,
               exact: bool) -> list[Solved]:  # fmt: skip
    """solve_group's solve from the group's input's InverseFactor, which groups of one
    input share (the routed experts' gate/up: calibration/hessians.hessian_inputs)."""
    args = scheme.weights
    if args.strategy != QuantizationStrategy.TENSOR_GROUP or args.group_size != GROUP_SIZE:
        raise ValueError(f"GPTQ is implemented for NVFP4 weights only, not {args.strategy} / {args.group_size}")
    qparams = linear.weight_qparams(weights, args)
    global_scale, scales = qparams
    if exact:
        quantized = [quantize_weight(weight, inverse, scale, global_scale, args, block_size)
                     for weight, (scale, _) in zip(weights, scales)]  # fmt: skip
    else:
        stacked = quantize_weight(torch.cat(weights), inverse, torch.cat([scale for scale, _ in scales]), global_scale,
                                  args, block_size)  # fmt: skip
        quantized = list(stacked.split([weight.shape[0] for weight in weights]))
    fell_back = inverse.fell_back
    packed = linear.quantize_group(quantized, scheme, qparams)
    return [Solved(q, tensors, fell_back) for q, tensors in zip(quantized, packed)]


def warm_up(device: torch.device, exact: bool) -> None:
    """One small solve on ``device``, so that a job's first layer does not pay for loading
    the solve's kernels (and compiling llm-compressor's Triton block update, whose
    specialization, every size a multiple of 16, is that of the real shapes)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1, 64, 256, generator=generator).to(device, torch.bfloat16)
    hessian, count = new_hessian(256, device)
    if exact:
        add_to_hessian(hessian, count, inputs)
    else:
        add_products(hessian, count, inputs)
        fill_upper(hessian)
    weight = torch.randn(32, 256, generator=generator).to(device, torch.bfloat16)
    solve_group([weight], hessian, count, linear.preset("NVFP4"), 128, 0.01, True, exact=exact)


def inverse_factor(hessian: torch.Tensor, dampening: float, ordered: bool, exact: bool) -> InverseFactor:
    """The normalized Hessian (overwritten) -> its InverseFactor. ``ordered``: activation
    ordering ("static", an alias of "weight"); else column order."""
    columns = hessian.shape[-1]
    H = hessian.unsqueeze(0)
    perm = None
    if ordered:
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)
        H.copy_(torch.gather(torch.gather(H, -1, perm.unsqueeze(-2).expand(-1, columns, -1)), -2,
                             perm.unsqueeze(-1).expand(-1, -1, columns)))  # fmt: skip
    item = H[0]
    diag = torch.diagonal(item)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    damp = dampening * torch.mean(torch.diag(item))
    diag.add_(damp)
    fell_back = not (_cholesky_inverse_upper(item) if exact else _invert_reversed(item))
    if fell_back:
        item.copy_(torch.eye(columns, dtype=item.dtype, device=item.device))
    return InverseFactor(H, perm, dead, fell_back)


def _cholesky_inverse_upper(item: torch.Tensor) -> bool:
    """H (overwritten) -> the upper Cholesky factor U of its inverse (H^-1 = U^T U), as
    llm-compressor computes it: Cholesky, inverse, Cholesky. False: not positive definite."""
    info = torch.empty((), dtype=torch.int32, device=item.device)
    torch.linalg.cholesky_ex(item, check_errors=False, out=(item, info))
    if info.item() != 0:
        return False
    torch.cholesky_inverse(item, out=item)
    torch.linalg.cholesky(item, upper=True, out=item)
    return True


def _invert_reversed(item: torch.Tensor) -> bool:
    """The same factor from one Cholesky and a triangular inverse, half the arithmetic of
    llm-compressor's (down_proj's 14336^2 Hessian on the H100: 0.084 s against 0.236 s;
    docs/gptq.md#speed). With J the reversal of the columns, J H J = L L^T gives
    H^-1 = J L^-T L^-1 J = U^T U where U = J L^-1 J is upper triangular with a positive
    diagonal: the Cholesky factor, which is unique."""
    reversed_ = item.flip(0, 1)
    info = torch.empty((), dtype=torch.int32, device=item.device)
    torch.linalg.cholesky_ex(reversed_, check_errors=False, out=(reversed_, info))
    if info.item() != 0:
        return False
    invert_lower(reversed_)
    item.copy_(reversed_.flip(0, 1))
    return True


def invert_lower(L: torch.Tensor, leaf: int = 1024) -> None:
    """A lower triangular L -> L^-1 in place, by halves (LAPACK's trtri):
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]. Its products are matrix
    products, fast on a GPU; a triangular solve against the identity would do twice the
    arithmetic, in a slower kernel."""
    n = L.shape[0]
    if n <= leaf:
        L.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False))
        return
    k = leaf * math.ceil(n / 2 / leaf)
    A, B, C = L[:k, :k], L[k:, :k], L[k:, k:]
    invert_lower(A, leaf)
    invert_lower(C, leaf)
    B.copy_(torch.mm(torch.mm(C, B), A).neg_())


def quantize_weight(
    weight: torch.Tensor,
    inverse: InverseFactor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    args: QuantizationArgs,
    block_size: int,
) -> torch.Tensor:
    """One weight [rows, columns] and its Hessian's InverseFactor -> the solved weight in
    the weight's dtype."""
    rows, columns = weight.shape
    work = torch.empty((1, rows, columns), device=weight.device, dtype=PRECISION)
    torch.stack([weight], out=work)
    group_of = torch.arange(columns, device=weight.device, dtype=torch.int) // GROUP_SIZE
    perm, Hinv = inverse.perm, inverse.factor
    if perm is not None:
        work.copy_(torch.gather(work, -1, perm.unsqueeze(-2).expand(-1, rows, -1)))
        group_of = torch.gather(group_of.unsqueeze(0).expand(1, -1), 1, perm)[0]  # each column keeps its group
    work.masked_fill_(inverse.dead.reshape(1, 1, -1), 0)
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
    return work[0].to(weight.dtype)
