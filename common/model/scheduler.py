"""The few-step flow-matching schedule of Self-Forcing, as a small diffusers-style scheduler.

A denoising list such as [1000, 750, 500, 250] is warped through the flow-matching shift
(sigma = shift * s / (1 + (shift - 1) * s), s = t / num_train_timesteps), giving Self-Forcing's
sigmas [1.0, 0.9375, 0.8333, 0.625] for shift 5. One consistency step predicts the clean latent
x0 = x_t - sigma * flow and, unless it was the last step, re-noises it to the next sigma with fresh
("solver") noise: x_next = (1 - sigma_next) * x0 + sigma_next * eps.
"""

from __future__ import annotations

import torch


class FewStepFlowScheduler:
    def __init__(
        self, denoising_steps: list[int], shift: float = 5.0, num_train_timesteps: int = 1000, context_noise: int = 0
    ):
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.sigmas = [self.warp(t) for t in denoising_steps]
        # The model is conditioned on the warped timestep, sigma * num_train_timesteps.
        self.timesteps = [s * num_train_timesteps for s in self.sigmas]
        self.context_sigma = self.warp(context_noise)
        self.context_timestep = self.context_sigma * num_train_timesteps

    def warp(self, t: float) -> float:
        s = t / self.num_train_timesteps
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def predict_x0(self, x_t: torch.Tensor, flow: torch.Tensor, step: int) -> torch.Tensor:
        return x_t - self.sigmas[step] * flow

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return (1.0 - sigma) * x0 + sigma * noise

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, next_step: int) -> torch.Tensor:
        return self.add_noise(x0, noise, self.sigmas[next_step])
