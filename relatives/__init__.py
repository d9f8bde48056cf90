"""LMD's relatives: masked diffusion models built from lmd.py's parts, one file per method.

    diffusion   what they share: the noise schedule (diffusers' DDPMScheduler), time conditioning (adaLN-Zero),
                the time-conditioned ViT (lmd.MaskedLatentViT with adaLN-Zero blocks) and the DDIM sampler
    ddpm        plain diffusion: the masked ViT with no mask, predicting the noise (train.py --objective ddpm)
    maskdm      MaskDM stage 1: block masks, the noise of the visible tokens only (train.py --objective maskdm);
                stage 2 is ddpm fine-tuning (train.py --objective ddpm --init RUN)
    umd         UMD: a clean half (MAE: time 0, no noise, x0 on the masked tokens) and a noised half (eps on the
                visible tokens, x0 on the masked ones) of every batch, one model (train.py --objective umd)

LMD itself (lmd.py) keeps masking and drops the noise. Every model here has train.py's training call,
model(latents, mask_ratio, normalize_targets, generator=...) -> (loss, predictions, mask), and draws its times and
noise from the step's generator, so that a resumed run is bit-identical to an uninterrupted one.
"""

import lmd
from relatives import ddpm
from relatives import maskdm
from relatives import umd

OBJECTIVES = ("lmd", "ddpm", "maskdm", "umd")
GENERATIVE = ("ddpm", "maskdm", "umd")  # the objectives whose models predict noise: sample.py can sample them
LMD_HELD_OUT_RATIO = 0.75               # LMD's held-out loss is measured at MAE's ratio, whatever the schedule

# The diffusion objectives' training defaults where they differ from LMD's (train.py's): small batches and no
# weight decay, as DiT; peak lr 2e-3 at batch 64 (ddpm tiny on the digits' VAE latents, 3000 steps, min-SNR-5:
# fd_normalised 0.31 at lr 1e-3, 0.21 at 2e-3; plain eps-MSE 0.56 at 1e-3, 0.36 at 2e-3, 0.38 at 4e-3). MaskDM's
# ratio 0.75 in blocks of 2 x 2 tokens keeps one block of four on a 4 x 4 token grid. UMD's batch of 128 is two
# halves of 64, so that its noised half is ddpm's batch (peak lr 4e-3 by the same base lr; docs/family.md: at batch
# 64, 32 noised images a step, its samples after 3000 steps fail the bar).
TRAINING_DEFAULTS = {
    "ddpm": dict(batch_size=64, base_lr=8e-3, weight_decay=0.0, normalize_targets=False),
    "maskdm": dict(batch_size=64, base_lr=8e-3, weight_decay=0.0, normalize_targets=False,
                   mask_ratio=0.75),
    "umd": dict(batch_size=128, base_lr=8e-3, weight_decay=0.0, normalize_targets=False,
                mask_ratio=0.375),
}
# How sample.py samples each objective unless told: DDIM, 50 steps, eta 0; UMD as its paper does, 125 steps with
# eta 1 (on the digits 0.08 to 0.18 lower fd_normalised than 50 steps with eta 0, in each of its runs measured in
# docs/family.md).
SAMPLING_DEFAULTS = {"ddpm": dict(sampling_steps=50, eta=0.0), "maskdm": dict(sampling_steps=50, eta=0.0),
                     "umd": dict(sampling_steps=125, eta=1.0)}
# The flags only some objectives read (train.py refuses them for the others): LMD's curriculum, MaskDM's blocks,
# UMD's clean half, the diffusion objectives' loss weighting, and the mask ratio that plain diffusion never uses.
OWN_FLAGS = {
    "lmd": {"scheduler", "mask_start", "mask_end", "mask_plateau", "ramp_fraction", "normalize_targets", "mask_ratio"},
    "ddpm": {"snr_gamma"},
    "maskdm": {"block_size", "mask_ratio", "snr_gamma"},
    "umd": {"clean_share", "clean_mask_ratio", "mask_ratio", "snr_gamma"},
}


def flags_not_read(objective):
    """The flags (config keys) that `objective` ignores: given on the command line, they are an error."""
    return set().union(*OWN_FLAGS.values()) - OWN_FLAGS[objective]


def build_model(config, grid, channels):
    """The model of a run config (objective, model, patch_size, block_size) on a grid x grid x channels latent."""
    objective = config.get("objective", "lmd")   # runs from before the relatives existed are LMD runs
    size, patch = config["model"], config["patch_size"]
    if objective == "lmd":
        return lmd.MaskedLatentViT(size, grid, patch, channels)
    snr_gamma = config.get("snr_gamma", 0.0)   # runs from before the weighting trained with the plain eps-MSE
    if objective == "ddpm":
        return ddpm.DDPM(size, grid, patch, channels, snr_gamma=snr_gamma)
    if objective == "maskdm":
        return maskdm.MaskDM(size, grid, patch, channels, block_size=config["block_size"], snr_gamma=snr_gamma)
    if objective == "umd":
        return umd.UMD(size, grid, patch, channels, clean_share=config["clean_share"],
                       clean_mask_ratio=config["clean_mask_ratio"], snr_gamma=snr_gamma)
    raise lmd.ConfigError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def mask_schedule(config):
    """The mask ratio as a function of training progress: LMD's curriculum, MaskDM's fixed ratio, UMD's noised
    half's fixed ratio (0 allowed: generation fine-tuning), 0 for ddpm."""
    objective = config.get("objective", "lmd")
    if objective == "lmd":
        return lmd.MaskSchedule(config["scheduler"], config["mask_start"], config["mask_end"],
                                config["mask_plateau"], config["ramp_fraction"], config["mask_ratio"])
    if objective == "maskdm":
        if not 0 < config["mask_ratio"] < 1:
            raise lmd.ConfigError(f"mask ratio {config['mask_ratio']} must lie strictly between 0 and 1")
        return lambda progress: config["mask_ratio"]
    if objective == "umd":
        if not 0 <= config["mask_ratio"] < 1:
            raise lmd.ConfigError(f"UMD's mask ratio {config['mask_ratio']} must lie in [0, 1)")
        return lambda progress: config["mask_ratio"]
    return lambda progress: 0.0


def held_out_mask_ratio(config):
    """The ratio of the held-out loss: 0.75 for LMD (runs with different schedules compare), the objective's own
    ratio for the others (their loss is an eps-MSE at that ratio)."""
    if config.get("objective", "lmd") == "lmd":
        return LMD_HELD_OUT_RATIO
    return mask_schedule(config)(1.0)
