"""CPU kernels behind one door: faster forms of what ``layers.py`` computes, used only where ``applies(x)`` says.

``applies(x)`` is true for a CPU tensor when oneDNN is built in, the compute dtype (autocast's, or ``x``'s) is
float32 or a bfloat16 the CPU supports, nothing is tracing the model (``torch.compile``, ``torch.jit.trace``,
``torch.fx``, ``torch.func`` transforms), and the kernels are switched on: ``DDPM_CPU_KERNELS=0`` in the
environment switches them off for the process, ``enabled(False)`` for a block (the parity tests run both ways).
Everywhere else (CUDA, compile, tracing) the layers run their plain PyTorch, which is what the kernels are tested
against.

One file per kernel family, each importing only the ones above it; measured on a 2-core AVX-512 CPU
(benchmarks/RESULTS.md, shared/PERF_NOTES.md):
- door.py: ``applies``, ``enabled``, ``switched_on``, ``compute_dtype``.
- convolution.py: ``conv2d``, every convolution through oneDNN in channels_last (PyTorch's own choice sends small
  maps to a reference kernel 5-7x slower, and NCHW input makes oneDNN reorder it on every call);
  ``PackedWeights``, convolution weights kept in oneDNN's blocked layout while they do not change
  (``UNet.frozen_weights()``) instead of being reordered on every call; ``upsample_conv``, nearest 2x upsampling
  then a 3x3 convolution as four 2x2 convolutions of the small map (2.25x fewer FLOPs, no 4x-size map stored for
  the backward pass).
- normalization.py: ``group_norm``, GroupNorm in float32 with its backward written out, which can write into a
  buffer it is given (the fused GroupNorm -> SiLU -> conv relies on that to stay small). Written when PyTorch's
  channels_last GroupNorm backward measured several times its NCHW time; on torch 2.14.1 it is 1.2-1.7x, faster
  than this one on most shapes measured (up to 4x on 8x8 maps) and slower at 16 channels on 32x32, a wash over
  whole training steps (30 Nov 2026). ``norm_conv``, GroupNorm -> SiLU -> convolution fused, storing only its
  input (recomputed in the backward pass).
- narrow_heads.py: ``attention``, heads narrower than 64 (diffusers' default is 8) as batched float32 GEMMs over
  chunks of heads whose scores stay in cache, 1.4-1.7x faster than CPU's flash-attention kernel forward +
  backward (and than its bf16 backward, 4x slower still at head_dim 8).
- fused_blocks.py: ``resnet_block``, ``attention_block``, a ResNet block's two fused pairs with its adds in place,
  and the attention's q/k/v as one 1x1 convolution of the map: fewer passes over memory and fewer pages freed and
  refilled per step. They stand in for the block's submodules, so ``applies(x, block)`` also asks that no hook
  waits on one.

Private torch ops, each with a fallback, checked on torch 2.14.1: ``torch.ops.mkldnn._reorder_convolution_weight``
and ``torch.ops.mkldnn._convolution_pointwise`` (without them ``PackedWeights`` packs nothing), and
``torch.ops.mkldnn._is_mkldnn_bf16_supported`` (without it bfloat16 stays on the plain path); and, for the door,
``torch._C._are_functorch_transforms_active`` (without it, torch.func transforms are not detected).
"""

from ddpm.kernels.convolution import PackedWeights, conv2d, upsample_conv
from ddpm.kernels.door import applies, compute_dtype, enabled, switched_on
from ddpm.kernels.fused_blocks import attention_block, resnet_block
from ddpm.kernels.narrow_heads import attention
from ddpm.kernels.normalization import group_norm, norm_conv

__all__ = ["PackedWeights", "applies", "attention", "attention_block", "compute_dtype", "conv2d", "enabled",
           "group_norm", "norm_conv", "resnet_block", "switched_on", "upsample_conv"]
