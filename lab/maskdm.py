"""
MaskDM stage 1 (Lei et al., "Masked Diffusion Models Are Fast Distribution Learners", arXiv 2306.11363): masked
denoising pretraining. Noise the whole latent, drop most of its tokens in square blocks, and train the network to
predict the noise of the tokens it still sees. Stage 2 is ordinary diffusion on the same network, with no mask:
`train.py --objective ddpm --init STAGE1_RUN`.

    1. block masks   per sample, a random subset of b x b blocks of tokens stays visible (the rest is dropped)
    2. the model     diffusion.DiffusionViT on the visible tokens only, encoder and decoder: no mask tokens, so
                     nothing is predicted at masked positions
    3. the loss      eps-MSE over the visible tokens only (min-SNR weighted, as every objective here)

Differences from the paper's code (a U-ViT): the time enters by adaLN-Zero (diffusion.py), not as a time token,
so that stage 2 is exactly train.py's ddpm network; its long skips are not used.
"""

import torch

import lmd
from lab import diffusion
from util.objective import Objective, flag


#################################################################################
#                                 1. Block masks                                #
#################################################################################

def block_masking(batch, grid, block_size, mask_ratio, generator=None, device="cpu"):
    """Per-sample block masks on a grid x grid token layout cut into (grid / b)^2 blocks of b x b tokens.

    -> keep_indices [B, K] (the visible tokens, row-major order), mask [B, L] (1 = masked, 0 = visible).
    The same number of blocks is kept in every sample (lmd.num_visible_tokens of the blocks: at least one
    visible, at least one masked), so a batch stays rectangular; K = kept blocks * b^2.
    """
    if grid % block_size:
        raise lmd.ConfigError(f"the {grid}x{grid} token grid cannot be cut into blocks of {block_size}x{block_size} "
                              "tokens; pick a --block-size that divides it")
    per_side = grid // block_size
    kept_blocks = lmd.num_visible_tokens(per_side ** 2, mask_ratio)
    random = {"generator": generator} if generator is not None else {}
    noise = torch.rand(batch, per_side ** 2, device=device, **random)
    blocks = torch.argsort(noise, dim=1)[:, :kept_blocks]                                  # [B, kept blocks]
    corners = (blocks // per_side) * block_size * grid + (blocks % per_side) * block_size  # top-left token
    inside = torch.arange(block_size, device=device)
    offsets = (inside.unsqueeze(1) * grid + inside).flatten()                               # [b*b]
    keep_indices = (corners.unsqueeze(-1) + offsets).flatten(1).sort(dim=1).values          # [B, K]
    mask = torch.ones(batch, grid * grid, device=device).scatter_(1, keep_indices, 0.0)
    return keep_indices, mask


#################################################################################
#                                   2. The model                                #
#################################################################################

class MaskDM(diffusion.DiffusionViT):
    """The ddpm network (same weights, same names) trained on the visible blocks of noised latents."""

    def __init__(self, size="tiny", grid_size=8, patch_size=2, channels=4, mlp_ratio=4.0, block_size=2,
                 snr_gamma=diffusion.SNR_GAMMA):
        super().__init__(size, grid_size, patch_size, channels, mlp_ratio, heads=("eps",), mask_token=False,
                         snr_gamma=snr_gamma)
        self.block_size = block_size
        if self.grid % block_size:
            raise lmd.ConfigError(f"--block-size {block_size} does not divide the {self.grid}x{self.grid} token "
                                  "grid; pick one that does (1 = random single tokens)")

    def forward(self, latents, mask_ratio, normalize_targets=False, generator=None):
        """latents [B, C, H, W] (clean) -> (loss [], predictions [B, L, p*p*C] (zeros where masked), mask [B, L]).

        The times, the noise and the blocks come from `generator`; the targets are never normalised.
        """
        t, noise = diffusion.draw_times_and_noise(latents, generator)
        keep_indices, mask = block_masking(len(latents), self.grid, self.block_size, mask_ratio, generator,
                                           latents.device)
        return self.loss(latents, t, noise, keep_indices, mask)

    def loss(self, latents, t, noise, keep_indices, mask):
        """3. The loss: the eps-MSE of the visible tokens keep_indices [B, K] only. latents, noise [B, C, H, W],
        t [B]; mask [B, L] is returned as it came."""
        noisy = diffusion.add_noise(latents, noise, t)                    # the whole image is noised ...
        time = diffusion.model_time(t)
        encoded = self.forward_encoder(noisy, time, keep_indices)          # ... and only its visible tokens seen
        eps_visible = self.forward_decoder(encoded, time, keep_indices)    # [B, K, D]: no decoder for the rest
        targets = diffusion.gather_tokens(self.patchify(noise), keep_indices)
        every_visible = torch.ones(eps_visible.shape[:2], device=latents.device)
        weights = diffusion.min_snr_weights(t, self.snr_gamma)
        loss = diffusion.eps_loss(eps_visible, targets, every_visible, weights)
        predictions = torch.zeros(*mask.shape, eps_visible.shape[-1], device=latents.device, dtype=eps_visible.dtype)
        predictions.scatter_(1, keep_indices.unsqueeze(-1).expand_as(eps_visible), eps_visible)
        return loss, predictions, mask


#################################################################################
#                                  Its record                                   #
#################################################################################

def schedule(config):
    """A fixed ratio, strictly between 0 and 1 (some blocks seen, some masked)."""
    if not 0 < config["mask_ratio"] < 1:
        raise lmd.ConfigError(f"mask ratio {config['mask_ratio']} must lie strictly between 0 and 1")
    return diffusion.fixed_ratio(config)


# Its ratio 0.75 in blocks of 2 x 2 tokens keeps one block of four on a 4 x 4 token grid.
OBJECTIVE = Objective(
    name="maskdm", summary="MaskDM stage 1; stage 2: --objective ddpm --init RUN",
    build=lambda config, grid, channels: MaskDM(config["model"], grid, config["patch_size"], channels,
                                                block_size=config["block_size"], snr_gamma=diffusion.snr_gamma(config)),
    schedule=schedule,
    flags=dict(block_size=flag(2, "side of the square blocks of tokens that are masked together (1 = single tokens)",
                               type=int),
               mask_ratio=flag(0.75, "the share of the blocks masked", type=float),
               snr_gamma=diffusion.SNR_GAMMA_FLAG),
    defaults=diffusion.TRAINING_DEFAULTS,
    describe=lambda config: f"{config['mask_ratio']} of {config.get('block_size')}x{config.get('block_size')} blocks "
                            f"masked, {diffusion.NOISE_WORDS}",
    **diffusion.RECORD)
