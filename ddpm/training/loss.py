"""The training objective: what the UNet should predict, and how each sample's error is weighted.

With x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4 of Ho et al. 2020) and SNR(t) = abar_t / (1 - abar_t)
(Kingma et al. 2021), the three parameterisations regress

    epsilon       eps                                      (Ho et al. 2020, Eq. 14, the "simple" loss)
    sample        x_0
    v_prediction  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0   (Salimans & Ho 2022, Sec. 4 and App. D)

Their squared errors are the x_0 error scaled by SNR (epsilon), 1 (sample) and SNR + 1 (v). Per sample we
take the mean over C, H, W of the squared error, multiply by a weight, and average over the batch:

    weight        no --snr_gamma                          --snr_gamma g (Min-SNR, Hang et al. 2023, Eq. 5)
    epsilon       1                                       min(SNR, g) / SNR
    sample        SNR  (as train_unconditional.py)        min(SNR, g)
    v_prediction  1                                       min(SNR, g) / (SNR + 1)

so Min-SNR weights every parameterisation to the same min(SNR, g)-weighted x_0 loss. All of it is float32.
"""

from __future__ import annotations

import torch

from ddpm import schedule as S
from ddpm.schedule import PREDICTION_TYPES, PredictionType


def signal_to_noise(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t), shape ``[B]``, float32."""
    abar = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]  # a no-op copy when already there
    return abar / (1.0 - abar)


def training_target(prediction_type: PredictionType, clean: torch.Tensor, noise: torch.Tensor,
                    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model should output for noisy images made from ``clean`` ``[B, C, H, W]`` and ``noise``
    (``alphas_cumprod`` on their device), float32."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "sample":
        return clean.float()
    if prediction_type == "v_prediction":
        return S.velocity(alphas_cumprod.float(), clean.float(), noise.float(), timesteps)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")


def loss_weights(prediction_type: PredictionType, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                 snr_gamma: float | None = None) -> torch.Tensor:
    """Per-sample loss weights ``[B]`` (see the module docstring's table)."""
    snr = signal_to_noise(alphas_cumprod, timesteps)
    if snr_gamma is None:
        return snr if prediction_type == "sample" else torch.ones_like(snr)
    clipped = snr.clamp(max=snr_gamma)  # min(SNR, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")


def diffusion_loss(model_output: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: PredictionType,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """The weighted mean squared error, a float32 scalar. Shapes: images ``[B, C, H, W]``, timesteps ``[B]``."""
    target = training_target(prediction_type, clean, noise, alphas_cumprod, timesteps)
    per_sample = (model_output.float() - target).pow(2).mean(dim=(1, 2, 3))  # [B]
    loss = (loss_weights(prediction_type, alphas_cumprod, timesteps, snr_gamma) * per_sample).mean()
    assert loss.dtype == torch.float32
    return loss
