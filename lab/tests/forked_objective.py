"""LMD with a falling mask ratio and an L1 loss on the masked tokens: a new objective in one file.

Saved as lab/falling_l1.py, it is found by python -m lab.train (--objective falling-l1) and lab.finetune.
"""

import lmd
from util.objective import Objective, flag


class FallingL1(lmd.MaskedLatentViT):
    """lmd's masked autoencoder (same weights, same names), scored by the absolute error of the masked tokens."""

    def forward(self, latents, mask_ratio, normalize_targets=False, generator=None):
        """latents [B, C, H, W] -> (loss [], predictions [B, L, p*p*C], mask [B, L]), as lmd's forward."""
        encoded, mask, restore_indices = self.forward_encoder(latents, mask_ratio, generator)   # visible only
        predictions = self.forward_decoder(encoded, restore_indices)                           # every token
        per_token = (predictions.float() - self.patchify(latents).float()).abs().mean(dim=-1)
        return (per_token * mask).sum() / mask.sum(), predictions, mask                        # masked only


def falling(config):
    """Hard first, easier later: --mask-start down to --mask-end, linear in training progress."""
    start, end = config["mask_start"], config["mask_end"]
    return lmd.check_schedule(lambda progress: start + (end - start) * progress)


OBJECTIVE = Objective(
    name="falling-l1", summary="LMD with a falling mask ratio and an L1 loss (docs/forking.md)",
    build=lambda config, grid, channels: FallingL1(config["model"], grid, config["patch_size"], channels),
    schedule=falling,
    flags=dict(mask_start=flag(0.9, "the ratio at the start", type=float),
               mask_end=flag(0.6, "the ratio at the end", type=float)),
    defaults=dict(normalize_targets=False),   # raw targets: the grids show the predictions as they are
    held_out_ratio=lambda config: 0.75, loss_name="masked-token L1 loss", held_out_key="held_out_l1_at_0_75",
    describe=lambda config: f"mask ratio {config['mask_start']} falling to {config['mask_end']}, L1 loss",
    decoder_transfers=False,   # --init from it takes the encoder only, as from LMD
)
