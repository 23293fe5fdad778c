"""Softmax attention over a map's tokens; heads narrower than 64 as chunked float32 GEMMs (``_NarrowHeads``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ddpm.kernels.door import compute_dtype

def attention(qkv: Tensor, heads: int) -> Tensor:
    """Softmax attention of the ``H*W`` tokens of ``qkv`` (``[N, 3 I, H, W]``: q, k, v stacked along channels, each
    ``heads`` heads of ``I / heads``), scale ``(I / heads) ** -0.5``, as ``[N, I, H, W]``. Heads narrower than 64
    (diffusers' default is 8) run ``_NarrowHeads`` in float32; wider ones ``F.scaled_dot_product_attention`` in
    ``compute_dtype`` (CPU's flash kernel, which keeps float32 accumulators for bf16)."""
    if qkv.shape[1] // (3 * heads) < 64:
        return cast(Tensor, _NarrowHeads.apply(qkv, heads)).to(compute_dtype(qkv))
    q, k, v = (rearrange(t, "b (n d) x y -> b n (x y) d", n=heads) for t in qkv.chunk(3, dim=1))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b n (x y) d -> b (n d) x y", x=qkv.shape[2])


# CPU's flash-attention kernel multiplies each head's tiny matrices one block at a time; for narrow heads it is
# faster as batched GEMMs over many heads at once, a chunk of heads small enough that their L x L scores stay in
# cache, with each product laid out so that no GEMM has an output 8 wide. unet-small's attention at batch 64
# (8 heads of 8, 64 tokens): forward + backward 5.5-5.7 ms against 8.3-8.4 (forward 1.6 against 2.2); heads of 16
# or 32 and 256 tokens likewise 1.4-1.7x faster; heads of 64 are slower (1.1x), and stay with the flash kernel
# (30 Nov 2026, training's allocator settings; float32, max error against the flash kernel 1e-6).
_SCORES_PER_CHUNK = 1 << 18  # float32 scores per chunk of heads: 1 MiB


class _NarrowHeads(torch.autograd.Function):
    # Per head, with tokens as rows: S = scale q k^T, P = softmax(S) by rows, out = P v. Stored: q, k^T, v^T in
    # float32 (the size of qkv); P is recomputed chunk by chunk in the backward pass, as in flash attention
    # (Dao et al. 2022): dv = P^T dout, dP = dout v^T, dS = P * (dP - rowsum(dP * P)), dq = scale dS k,
    # dk = scale dS^T q. Products are taken transposed where that is the faster GEMM: out^T = v^T P^T.
    @staticmethod
    @torch.autocast("cpu", enabled=False)  # float32 throughout
    def forward(ctx: Any, qkv: Tensor, heads: int) -> Tensor:
        n, _, height, width = qkv.shape
        tokens = qkv.permute(0, 2, 3, 1).reshape(n, height * width, 3, heads, -1)  # a view of channels_last qkv
        q = tokens[:, :, 0].transpose(1, 2).reshape(-1, height * width, tokens.shape[-1]).float()  # (N h, L, d)
        k_t, v_t = (tokens[:, :, i].permute(0, 2, 3, 1).reshape(-1, tokens.shape[-1], height * width).float()
                    for i in (1, 2))  # (N h, d, L)
        out_t = torch.empty_like(k_t)
        scores, probs = _chunk_buffers(q, 2)
        for rows, s, p in _head_chunks(q, scores, probs):
            _softmax_rows(q[rows], k_t[rows], s, p)
            torch.bmm(v_t[rows], p.transpose(1, 2), out=out_t[rows])  # out^T = v^T P^T
        ctx.save_for_backward(q, k_t, v_t)
        ctx.shape, ctx.dtype = qkv.shape, qkv.dtype
        return out_t.view(n, -1, height, width)  # (N, h d, H, W): out^T's memory is the map's, NCHW

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        q, k_t, v_t = ctx.saved_tensors
        n, _, height, width = ctx.shape
        scale = q.shape[-1] ** -0.5
        grad_t = grad.float().contiguous().view(k_t.shape)  # dout^T, (N h, d, L)
        grad_q_t, grad_k_t, grad_v_t = (torch.empty_like(k_t) for _ in range(3))
        scores, probs, grad_probs = _chunk_buffers(q, 3)
        for rows, s, p, grad_p in _head_chunks(q, scores, probs, grad_probs):
            _softmax_rows(q[rows], k_t[rows], s, p)
            torch.bmm(grad_t[rows], p, out=grad_v_t[rows])  # dv^T = dout^T P
            torch.bmm(grad_t[rows].transpose(1, 2), v_t[rows], out=grad_p)  # dP = dout v^T
            grad_s = torch._softmax_backward_data(grad_p, p, -1, p.dtype, grad_input=s)  # dS, over S
            _scaled_product(k_t[rows], grad_s.transpose(1, 2), scale, grad_q_t[rows])  # dq^T = scale k^T dS^T
            _scaled_product(q[rows].transpose(1, 2), grad_s, scale, grad_k_t[rows])  # dk^T = scale q^T dS
        heads = q.shape[0] // n
        grad_qkv = torch.empty(n, height, width, 3, heads, q.shape[-1], dtype=ctx.dtype)  # channels_last qkv
        for i, g in enumerate((grad_q_t, grad_k_t, grad_v_t)):
            grad_qkv[:, :, :, i] = g.view(n, heads, -1, height, width).permute(0, 3, 4, 1, 2)
        return grad_qkv.view(n, height, width, -1).permute(0, 3, 1, 2), None


def _chunk_buffers(q: Tensor, count: int) -> list[Tensor]:
    # L x L buffers for one chunk of heads, reused chunk after chunk (instead of 3-5 allocations per chunk)
    size = min(q.shape[0], max(1, _SCORES_PER_CHUNK // q.shape[1] ** 2))
    return [q.new_empty(size, q.shape[1], q.shape[1]) for _ in range(count)]


def _head_chunks(q: Tensor, *buffers: Tensor) -> Iterator[tuple[Any, ...]]:
    # (rows of the chunk, each buffer cut to the chunk's length): the last chunk may be shorter
    size = buffers[0].shape[0]
    for start in range(0, q.shape[0], size):
        rows = slice(start, min(start + size, q.shape[0]))
        yield (rows, *(b[: rows.stop - start] for b in buffers))


def _scaled_product(a: Tensor, b: Tensor, scale: float, out: Tensor) -> None:
    # out = scale a b, batched (baddbmm with beta = 0 never reads its input: out stands in for it)
    torch.baddbmm(out, a, b, beta=0.0, alpha=scale, out=out)


def _softmax_rows(q: Tensor, k_t: Tensor, scores: Tensor, probs: Tensor) -> None:
    # probs = softmax(scale q k^T) by rows, the scores written to scores first
    _scaled_product(q, k_t, q.shape[-1] ** -0.5, scores)
    torch._softmax(scores, -1, False, out=probs)
