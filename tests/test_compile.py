"""torch.compile on CPU: the UNet is one graph (no breaks), compiled outputs and gradients match eager, and Pipeline
runs a compiled UNet.

Compiling traces the plain PyTorch layers: ``kernels.applies`` is false under dynamo, so the eager side of each
comparison (which takes the CPU kernels) is an independent reference for the compiled one.

Cost on the 2 shared cores, measured (cold inductor cache): this file 33 s at load 3 (inductor forward 21 s,
aot_eager forward+backward 4 s, explain 3 s, Pipeline 3 s); at load 8, inductor took 113 s for the forward and
233 s for forward+backward. So inductor (``torch.compile``'s default) is tested on the forward pass, and
forward+backward goes through aot_eager (dynamo + AOTAutograd, no C++ build), which captures the same joint graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo

from ddpm import DDPMScheduler, Pipeline, kernels
from ddpm.unet import UNet

TINY: dict[str, Any] = dict(
    sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention_head_dim=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


@pytest.fixture
def unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(**TINY)
    with torch.no_grad():  # every parameter away from its init, so that no term is trivially zero
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


def test_one_graph_without_breaks(unet: UNet) -> None:
    x, t = inputs()
    assert kernels.applies(x)  # eager takes the CPU kernels here; the trace must not
    explanation = torch._dynamo.explain(unet)(x, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_inductor_forward_matches_eager(unet: UNet) -> None:
    x, t = inputs()
    compiled = torch.compile(unet, fullgraph=True)
    with torch.no_grad():
        expected = unet.eval()(x, t).sample
        got = compiled(x, t).sample
    assert rel_err(got, expected) <= 1e-5


def test_compiled_forward_backward_matches_eager(unet: UNet) -> None:
    x, t = inputs()
    weight = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")

    def grads(model: Any) -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        (model(x, t).sample * weight).sum().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    unet.train()
    expected, got = grads(unet), grads(compiled)
    assert got.keys() == expected.keys() and len(got) == len(list(unet.parameters()))
    floor = 1e-2 * max(g.abs().max().item() for g in expected.values())  # as in test_unet_parity.py
    for name, g in expected.items():
        assert (got[name] - g).abs().max().item() <= 1e-5 * max(g.abs().max().item(), floor), name


def test_pipeline_runs_a_compiled_unet(unet: UNet) -> None:
    unet.eval()
    scheduler = DDPMScheduler(num_train_timesteps=20)
    eager = Pipeline(unet=unet, scheduler=scheduler)
    compiled = Pipeline(unet=torch.compile(unet, fullgraph=True, backend="aot_eager"),  # type: ignore[arg-type]
                        scheduler=scheduler)
    for pipe in (eager, compiled):
        pipe.set_progress_bar_config(disable=True)
    expected = eager(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                     output_type="np").images
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph serves every step, in frozen_weights()
        got = compiled(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                       output_type="np").images
    assert np.abs(np.asarray(got) - np.asarray(expected)).max() <= 1e-5
