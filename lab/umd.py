"""
UMD (Hansen-Estruch et al., "Unified Auto-Encoding with Masked Diffusion", arXiv 2406.17688): one autoencoder for
representations and for generation. Every batch is cut in two halves, each its own forward pass:

    1. the clean half    a share r of the batch at model time 0, no noise, 75% of its tokens masked: an MAE step,
                         the x0 head scored on the masked tokens
    2. the noised half   the rest, noised at t uniform in 0 .. T-1 and told model time t + 1, 37.5% masked: the
                         eps head scored on the visible tokens, the x0 head on the masked ones
    3. the loss          L = (1 - r) * (eps loss + x0 loss) / 2 + r * clean loss, r = 0.5

The parts are lmd.py's (patches, per-sample random masking, blocks, position embeddings, the masked-token loss) and
lab/diffusion.py's (the noise schedule, adaLN-Zero time conditioning in encoder and decoder, DDIM): this file
only says which tokens each half sees and on which each head is scored. What reads the model afterwards:
- the probes (finetune.py) read the encoder at model time 0, with no noise and no mask: lmd.LatentClassifier calls
  encode_tokens without a time, which diffusion.DiffusionViT takes as clean;
- sample.py samples with the eps head (diffusion.DiffusionViT.predict_eps, every token seen), by the paper's DDIM (125
  steps, eta 1: its record's sampler);
- generation fine-tuning, as in the paper: train.py --objective umd --init RUN --mask-ratio 0 --clean-share 0.05.

Differences from the paper's code (JAX): one class token and no register tokens (lmd's encoder); the tokens are
latent patches of a frozen VAE (or pixels), and the eps term is min-SNR weighted (--snr-gamma 0: the paper's), as
for every objective here.
"""

import torch

import lmd
from lab import diffusion
from util.objective import Objective, flag

# The paper's ratios; each is a train.py flag (--clean-share, --clean-mask-ratio, --mask-ratio).
CLEAN_SHARE = 0.5          # r: the share of every batch that is clean, and the clean loss's weight
CLEAN_MASK_RATIO = 0.75    # MAE's ratio, for the clean half
NOISED_MASK_RATIO = 0.375  # the noised half's ratio (0 for generation fine-tuning)


class UMD(diffusion.DiffusionViT):
    """The time-conditioned masked ViT with two heads per token, eps and x0, trained on a clean and a noised half."""

    def __init__(self, size="tiny", grid_size=8, patch_size=2, channels=4, mlp_ratio=4.0, clean_share=CLEAN_SHARE,
                 clean_mask_ratio=CLEAN_MASK_RATIO, snr_gamma=diffusion.SNR_GAMMA):
        super().__init__(size, grid_size, patch_size, channels, mlp_ratio, heads=("eps", "x0"), mask_token=True,
                         snr_gamma=snr_gamma)
        if not 0 <= clean_share <= 1:
            raise lmd.ConfigError(f"the clean share r = {clean_share} must lie in [0, 1] (0: diffusion only, "
                                  "1: MAE only)")
        if not 0 < clean_mask_ratio < 1:
            raise lmd.ConfigError(f"the clean half's mask ratio {clean_mask_ratio} must lie strictly between 0 and 1")
        self.clean_share, self.clean_mask_ratio = clean_share, clean_mask_ratio

    def forward(self, latents, mask_ratio=NOISED_MASK_RATIO, normalize_targets=False, generator=None):
        """latents [B, C, H, W] (clean) -> (loss [], predictions [B, L, 2 * p*p*C] (eps, then x0), mask [B, L]).

        The training call of every objective. The first round(r * B) samples are the clean half, the rest the
        noised half (a batch comes in random order); mask_ratio is the noised half's. The times, the noise and
        both halves' masks come from `generator`, in that order. The targets are never normalised (the paper's).
        """
        if normalize_targets:
            raise lmd.ConfigError("UMD's targets (the noise and the clean tokens) are never normalised")
        num_clean = round(len(latents) * self.clean_share)
        clean, noised = latents[:num_clean], latents[num_clean:]
        t, noise = diffusion.draw_times_and_noise(noised, generator)
        terms, predictions, mask = self.losses(clean, noised, t, noise, mask_ratio, generator)
        return self.total_loss(terms), predictions, mask

    def predict(self, inputs, time, mask_ratio, generator=None):
        """inputs [B, C, H, W] at model time [B] -> predictions [B, L, 2 * p*p*C] for every token, mask [B, L].

        Per-sample random masking as in LMD; at ratio 0 every token is seen (lmd.random_masking hides one at least).
        """
        tokens = self.embed(inputs)                                                   # patches -> embeddings
        if mask_ratio == 0:
            return self.forward_decoder(self.encode_tokens(tokens, time), time), tokens.new_zeros(tokens.shape[:2])
        visible_tokens, mask, restore_indices = lmd.random_masking(tokens, mask_ratio, generator)   # hide some
        encoded = self.encode_tokens(visible_tokens, time)                            # encode what is left
        return self.forward_decoder(encoded, time, restore_indices=restore_indices), mask   # a guess for every token

    def losses(self, clean, noised, t, noise, mask_ratio, generator=None):
        """The loss terms of a batch already cut in two: clean [Bc, C, H, W]; noised, noise [Bn, C, H, W], t [Bn].

        -> (terms: dict of the terms that have tokens to score, each [], of "clean", "eps", "x0"; predictions
        [Bc + Bn, L, 2 * p*p*C] and mask [Bc + Bn, L], the clean half first). The masks come from `generator`.
        """
        terms, predictions, masks = {}, [], []
        if len(clean):   # 1. the clean half: time 0, no noise, MAE's ratio; x0 scored on the masked tokens
            time = torch.full((len(clean),), diffusion.CLEAN_TIME, device=clean.device)
            clean_predictions, clean_mask = self.predict(clean, time, self.clean_mask_ratio, generator)
            terms["clean"] = lmd.masked_token_loss(self.head(clean_predictions, "x0"), self.patchify(clean),
                                                   clean_mask, normalize_targets=False)
            predictions.append(clean_predictions)
            masks.append(clean_mask)
        if len(noised):  # 2. the noised half: x_t at t + 1; eps scored on the visible tokens, x0 on the masked ones
            noisy = diffusion.add_noise(noised, noise, t)
            noised_predictions, noised_mask = self.predict(noisy, diffusion.model_time(t), mask_ratio, generator)
            terms["eps"] = diffusion.eps_loss(self.head(noised_predictions, "eps"), self.patchify(noise),
                                              1 - noised_mask, diffusion.min_snr_weights(t, self.snr_gamma))
            if mask_ratio > 0:   # with no mask there is no x0 term: the diffusion loss is the eps loss
                terms["x0"] = lmd.masked_token_loss(self.head(noised_predictions, "x0"), self.patchify(noised),
                                                    noised_mask, normalize_targets=False)
            predictions.append(noised_predictions)
            masks.append(noised_mask)
        return terms, torch.cat(predictions), torch.cat(masks)

    def total_loss(self, terms):
        """3. L = (1 - r) * diffusion loss + r * clean loss, the diffusion loss the mean of its eps and x0 terms.
        A half with no samples (r * B rounds to 0 or to B) adds nothing."""
        diffusion_terms = [terms[name] for name in ("eps", "x0") if name in terms]
        loss = 0.0
        if diffusion_terms:
            loss = loss + (1 - self.clean_share) * sum(diffusion_terms) / len(diffusion_terms)
        if "clean" in terms:
            loss = loss + self.clean_share * terms["clean"]
        return loss


#################################################################################
#                                  Its record                                   #
#################################################################################

def schedule(config):
    """The noised half's fixed ratio, 0 allowed (generation fine-tuning)."""
    if not 0 <= config["mask_ratio"] < 1:
        raise lmd.ConfigError(f"UMD's mask ratio {config['mask_ratio']} must lie in [0, 1)")
    return diffusion.fixed_ratio(config)


# Its batch of 128 is two halves of 64, so that its noised half is ddpm's batch (peak lr 4e-3 by the same base lr;
# lab/docs/family_digits.md: at batch 64, 32 noised images a step, its samples after 3000 steps are poor). It
# samples as its paper does, DDIM with 125 steps and eta 1 (on the digits 0.08 to 0.18 lower fd_normalised than 50
# steps with eta 0, in each of its runs measured in lab/docs/family_digits.md).
OBJECTIVE = Objective(
    name="umd", summary="UMD; its generation fine-tuning: --objective umd --init RUN --mask-ratio 0 --clean-share 0.05",
    build=lambda config, grid, channels: UMD(config["model"], grid, config["patch_size"], channels,
                                             clean_share=config["clean_share"],
                                             clean_mask_ratio=config["clean_mask_ratio"],
                                             snr_gamma=diffusion.snr_gamma(config)),
    schedule=schedule,
    flags=dict(clean_share=flag(CLEAN_SHARE, "r, the share of every batch that is clean (time 0, no noise, an MAE "
                                             "step) and the clean loss's weight", type=float),
               clean_mask_ratio=flag(CLEAN_MASK_RATIO, "the clean half's mask ratio", type=float),
               mask_ratio=flag(NOISED_MASK_RATIO, "the noised half's mask ratio", type=float),
               snr_gamma=diffusion.SNR_GAMMA_FLAG),
    defaults=dict(diffusion.TRAINING_DEFAULTS, batch_size=128),
    describe=lambda config: f"a clean share {config.get('clean_share')} at mask {config.get('clean_mask_ratio')}, "
                            f"the rest noised at mask {config['mask_ratio']}, {diffusion.NOISE_WORDS}",
    **{**diffusion.RECORD, "sampler": dict(sampling_steps=125, eta=1.0),
       "lowest_time": lambda config: 0 if config.get("clean_share", 0) > 0 else 1})   # its clean half: time 0
