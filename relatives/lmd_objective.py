"""
LMD's record (the method itself is ../lmd.py): a masked autoencoder on the latents with a mask ratio that grows over
training. Its loss is the masked-token MSE; its grids are reconstructions of masked validation images.
"""

import argparse

import lmd
from relatives.objective import Objective, flag

HELD_OUT_RATIO = 0.75   # LMD's held-out loss is measured at MAE's ratio, whatever the schedule: runs compare


def build(config, grid, channels):
    """The masked latent ViT of lmd.py."""
    return lmd.MaskedLatentViT(config["model"], grid, config["patch_size"], channels)


def schedule(config):
    """lmd.MaskSchedule from the run's flags."""
    return lmd.MaskSchedule(config["scheduler"], config["mask_start"], config["mask_end"], config["mask_plateau"],
                            config["ramp_fraction"], config["mask_ratio"])


OBJECTIVE = Objective(
    name="lmd", summary="the masked autoencoder with a mask-ratio curriculum", build=build, schedule=schedule,
    flags=dict(
        scheduler=flag("cosine", "mask-ratio schedule; 'constant' is the MAE baseline", choices=lmd.SCHEDULERS),
        mask_ratio=flag(0.75, "the fixed ratio of --scheduler constant", type=float),
        mask_start=flag(0.15, "mask ratio at the start of the progressive schedules", type=float),
        mask_end=flag(0.75, "mask ratio at the end of the ramp, held afterwards", type=float),
        mask_plateau=flag(0.40, "the middle plateau of --scheduler piecewise", type=float),
        ramp_fraction=flag(2 / 3, "fraction of training over which the ratio ramps", type=float),
        normalize_targets=flag(True, "predict per-token normalised targets (MAE's norm_pix_loss; the authors used "
                                     "it)", action=argparse.BooleanOptionalAction),
    ),
    held_out_ratio=lambda config: HELD_OUT_RATIO, held_out_key="held_out_loss_at_0_75",
    describe=lambda config: f"{config['scheduler']} schedule", decoder_transfers=False,
)
