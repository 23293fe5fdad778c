"""The ResNet block and the attention layer in fewer passes over memory, from their modules' parameters."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm.kernels.convolution import conv2d
from ddpm.kernels.narrow_heads import attention
from ddpm.kernels.normalization import norm_conv

# --- the ResNet block and the attention layer in fewer passes -------------------------------------------------
# They compute what layers.ResnetBlock2D / layers.Attention compute, from the same parameters, without calling
# their submodules one by one (applies(x, block) makes sure no hook is waiting on one).

def resnet_block(block: Any, x: Tensor, temb: Tensor) -> Tensor:
    """``layers.ResnetBlock2D`` (time_embedding_norm "default", SiLU, no resampling, no dropout): both
    GroupNorm -> SiLU -> conv pairs fused, and the time embedding and the residual added in place (to
    convolution outputs, which no backward formula reads)."""
    h = norm_conv(x, block.norm1, block.conv1.weight, block.conv1.bias, silu=True, padding=1, packed=block.conv1.packed)
    t = block.time_emb_proj(F.silu(temb))[:, :, None, None]  # (N, C_out, 1, 1)
    h = norm_conv(h.add_(t), block.norm2, block.conv2.weight, block.conv2.bias, silu=True, padding=1,
                  packed=block.conv2.packed)
    shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    h = _add(h, shortcut)
    return h.div_(block.output_scale_factor) if block.output_scale_factor != 1.0 else h


def attention_block(attn: Any, x: Tensor) -> Tensor:
    """``layers.Attention`` with q, k and v as one 1x1 convolution of the map (fused with the GroupNorm) and the
    output projection as another: oneDNN's GEMM, 2x MKL's speed on this CPU, and no token copies."""
    qkv_weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])[:, :, None, None]  # (3 I, C)
    qkv_bias = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
    if attn.group_norm is not None:  # (N, 3 I, H, W)
        qkv = norm_conv(x, attn.group_norm, qkv_weight, qkv_bias, silu=False, padding=0)
    else:
        qkv = conv2d(x, qkv_weight, qkv_bias)
    proj = attn.to_out[0]
    out = _add(conv2d(attention(qkv, attn.heads), proj.weight[:, :, None, None], proj.bias), x)  # + residual
    return out.div_(attn.rescale_output_factor) if attn.rescale_output_factor != 1.0 else out


def _add(h: Tensor, residual: Tensor) -> Tensor:
    # h + residual, in h's memory where the result has h's dtype (h: a convolution's output, read by no backward)
    return h.add_(residual) if torch.result_type(h, residual) == h.dtype else h + residual
