"""The DreamBooth training loss as pure functions of tensors.

`prior_preservation_loss` splits a batch into its instance half (first) and its class half (second) and returns
MSE(instance) + lambda * MSE(class) together with both parts. `diffusion_target` gives what the UNet must predict
(the noise, or the velocity for v-prediction); `min_snr_weights` gives the optional Min-SNR-gamma weights of the
instance term (Hang et al., 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").

Nothing here owns a model, an optimizer or a random generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class LossParts:
    """The loss to minimise and its two parts (prior is None without prior preservation)."""

    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def prior_preservation_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_instance: int,
    prior_weight: float,
    instance_weights: torch.Tensor | None = None,
) -> LossParts:
    """MSE of the first `num_instance` samples plus `prior_weight` times the MSE of the rest (the class samples).

    With `prior_weight` 0 the batch holds instance samples only. `instance_weights` (one per instance sample, e.g.
    Min-SNR weights) weight each instance sample's mean squared error. Computed in float32 whatever the inputs.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape.")
    has_prior = prior_weight > 0
    expected = 2 * num_instance if has_prior else num_instance
    if prediction.shape[0] != expected:
        raise ValueError(f"the batch holds {prediction.shape[0]} samples; expected {expected} "
                         f"({num_instance} instance{' + as many class' if has_prior else ''} samples).")
    prediction, target = prediction.float(), target.float()
    instance = _weighted_mse(prediction[:num_instance], target[:num_instance], instance_weights)
    if not has_prior:
        return LossParts(total=instance, instance=instance, prior=None)
    prior = F.mse_loss(prediction[num_instance:], target[num_instance:], reduction="mean")
    return LossParts(total=instance + prior_weight * prior, instance=instance, prior=prior)


def _weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(prediction, target, reduction="mean")
    per_sample = F.mse_loss(prediction, target, reduction="none").flatten(1).mean(dim=1)
    return (per_sample * weights.to(per_sample)).mean()


def diffusion_target(
    prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noise_scheduler
) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} in the scheduler config; "
                     f"expected one of {', '.join(PREDICTION_TYPES)}.")


def signal_to_noise(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) of each timestep, in float32."""
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}.")
