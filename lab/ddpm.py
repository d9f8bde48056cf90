"""
Plain diffusion (DDPM, Ho et al. 2020; the network and its conditioning as in DiT, Peebles & Xie 2023): lmd's
masked ViT with no mask, told the noise level, predicting the noise. The baseline every relative is measured by.

    1. the model    diffusion.DiffusionViT: every token seen by encoder and decoder, one head (eps)
    2. the loss     eps-MSE over every token (min-SNR weighted), t uniform in 0 .. T-1, cosine betas, T = 1000

Sampling (DDIM) is diffusion.ddim_sample; sample.py runs it and judges the images.
"""

import torch

import lmd
from lab import diffusion
from util.objective import Objective


class DDPM(diffusion.DiffusionViT):
    """A diffusion model on the latent grid: noise the latents, predict the noise from every (noisy) token."""

    def __init__(self, size="tiny", grid_size=8, patch_size=2, channels=4, mlp_ratio=4.0,
                 snr_gamma=diffusion.SNR_GAMMA):
        super().__init__(size, grid_size, patch_size, channels, mlp_ratio, heads=("eps",), mask_token=False,
                         snr_gamma=snr_gamma)

    def forward(self, latents, mask_ratio=0.0, normalize_targets=False, generator=None):
        """latents [B, C, H, W] (clean) -> (loss [], eps predictions [B, L, p*p*C], mask [B, L], all zeros).

        The training call of every objective (train.py's loop does not know which it runs). No token is masked,
        so mask_ratio must be 0; the targets are the noise itself, never normalised. The times and the noise come
        from `generator`.
        """
        if mask_ratio:
            raise lmd.ConfigError(f"ddpm sees every token: its mask ratio is 0, not {mask_ratio}")
        t, noise = diffusion.draw_times_and_noise(latents, generator)
        return self.loss(latents, t, noise)

    def loss(self, latents, t, noise):
        """latents, noise [B, C, H, W], t [B] -> (loss, predictions, mask): the eps-MSE of every token."""
        noisy = diffusion.add_noise(latents, noise, t)                              # x_t
        time = diffusion.model_time(t)                                             # t + 1: 0 is for clean inputs
        predictions = self.forward_decoder(self.forward_encoder(noisy, time), time)  # every token, both stacks
        every_token = torch.ones(predictions.shape[:2], device=latents.device)
        loss = diffusion.eps_loss(predictions, self.patchify(noise), every_token,
                                  diffusion.min_snr_weights(t, self.snr_gamma))
        return loss, predictions, 1 - every_token


OBJECTIVE = Objective(
    name="ddpm", summary="diffusion, no mask",
    build=lambda config, grid, channels: DDPM(config["model"], grid, config["patch_size"], channels,
                                              snr_gamma=diffusion.snr_gamma(config)),
    schedule=lambda config: (lambda progress: 0.0), flags=dict(snr_gamma=diffusion.SNR_GAMMA_FLAG),
    defaults=diffusion.TRAINING_DEFAULTS, describe=lambda config: f"no mask, {diffusion.NOISE_WORDS}",
    **diffusion.RECORD)
