"""The prior-preservation loss, its targets and Min-SNR weights, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from harness.losses import diffusion_target, min_snr_weights, prior_preservation_loss, signal_to_noise
from harness.models import make_scheduler, sd15_scheduler_config


def halves(instance_error: float, class_error: float, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions off the target by `instance_error` in the first n samples and `class_error` in the last n."""
    target = torch.zeros(2 * n, 4, 3, 3)
    prediction = target.clone()
    prediction[:n] += instance_error
    prediction[n:] += class_error
    return prediction, target


def test_weight_zero_is_the_instance_mse():
    prediction = torch.randn(3, 4, 5, 5)
    target = torch.randn(3, 4, 5, 5)
    parts = prior_preservation_loss(prediction, target, num_instance=3, prior_weight=0.0)
    expected = ((prediction - target) ** 2).mean()
    assert parts.prior is None
    assert torch.allclose(parts.total, expected) and torch.allclose(parts.instance, expected)


def test_instance_half_first_class_half_second():
    prediction, target = halves(instance_error=1.0, class_error=2.0)
    parts = prior_preservation_loss(prediction, target, num_instance=2, prior_weight=0.5)
    assert parts.instance.item() == pytest.approx(1.0)  # (1)^2
    assert parts.prior.item() == pytest.approx(4.0)  # (2)^2
    assert parts.total.item() == pytest.approx(1.0 + 0.5 * 4.0)


def test_instance_weights_apply_to_the_instance_half_only():
    prediction, target = halves(instance_error=1.0, class_error=2.0)
    weights = torch.tensor([0.0, 2.0])
    parts = prior_preservation_loss(prediction, target, 2, 1.0, instance_weights=weights)
    assert parts.instance.item() == pytest.approx((0.0 * 1 + 2.0 * 1) / 2)
    assert parts.prior.item() == pytest.approx(4.0)


def test_half_precision_inputs_give_a_float32_loss():
    prediction, target = halves(1.0, 2.0)
    parts = prior_preservation_loss(prediction.half(), target.bfloat16(), 2, 1.0)
    assert parts.total.dtype == torch.float32


def test_batch_that_does_not_match_the_split_is_refused():
    with pytest.raises(ValueError, match="expected 4"):
        prior_preservation_loss(torch.zeros(3, 1), torch.zeros(3, 1), num_instance=2, prior_weight=1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        prior_preservation_loss(torch.zeros(2, 1), torch.zeros(2, 2), num_instance=2, prior_weight=0.0)


def test_targets_epsilon_and_velocity():
    scheduler = make_scheduler(sd15_scheduler_config(), "ddpm")
    latents, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    timesteps = torch.tensor([10, 900])
    assert diffusion_target("epsilon", latents, noise, timesteps, scheduler) is noise
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    assert torch.allclose(diffusion_target("v_prediction", latents, noise, timesteps, scheduler), velocity, atol=1e-6)
    with pytest.raises(ValueError, match="sample"):
        diffusion_target("sample", latents, noise, timesteps, scheduler)


def test_min_snr_weights():
    scheduler = make_scheduler(sd15_scheduler_config(), "ddpm")
    timesteps = torch.tensor([1, 999])  # very high SNR, very low SNR
    snr = signal_to_noise(scheduler.alphas_cumprod, timesteps)
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    assert torch.allclose(snr, alpha_bar / (1 - alpha_bar))
    eps = min_snr_weights(snr, gamma=5.0, prediction_type="epsilon")
    assert eps[0].item() == pytest.approx(5.0 / snr[0].item())  # clipped at gamma
    assert eps[1].item() == pytest.approx(1.0)  # SNR below gamma: weight 1
    v = min_snr_weights(snr, gamma=5.0, prediction_type="v_prediction")
    assert v[0].item() == pytest.approx(5.0 / (snr[0].item() + 1))
    assert v[1].item() == pytest.approx(snr[1].item() / (snr[1].item() + 1))
