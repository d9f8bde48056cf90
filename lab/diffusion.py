"""
What LMD's diffusion relatives share, in one module: the noise, the time, a time-conditioned ViT and the sampler.

LMD keeps masking and drops the noise; its relatives keep both. Read this file top to bottom:

    1. the noise schedule    DDPM, cosine betas, T = 1000 (diffusers' DDPMScheduler); model time t + 1, 0 = clean;
                             the eps loss, each noise level weighted by min-SNR
    2. time conditioning     sinusoidal time embedding -> adaLN-Zero (DiT) in every transformer block
    3. the diffusion ViT     lmd.MaskedLatentViT with adaLN-Zero blocks in encoder and decoder, eps (and x0) heads
    4. the sampler           DDIM (diffusers' DDIMScheduler) with the eps head
    5. probing               a diffusion encoder's input at a model time, for the probes (finetune.py)
    6. their records         what the diffusion objectives' records (util/objective.py) have in common

The objectives themselves (ddpm.py, maskdm.py, umd.py) choose which tokens the network sees and which it is scored
on.
"""

import functools
import math

import torch
import torch.nn as nn

import lmd
from lab import pictures
from util.objective import flag


#################################################################################
#                              1. The noise schedule                            #
#################################################################################

NUM_TIMESTEPS = 1000                 # T: noise levels t = 0 .. 999, as in DDPM, MaskDM and UMD
BETA_SCHEDULE = "squaredcos_cap_v2"  # the cosine schedule of improved DDPM (s = 0.008), MaskDM's main setting
CLEAN_TIME = 0                       # model time 0 is reserved for clean inputs (UMD's MAE half); noise t -> t + 1


@functools.lru_cache(maxsize=1)
def noise_schedule():
    """The forward process: diffusers' DDPMScheduler (cosine betas, T = 1000, eps prediction, no clipping)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule=BETA_SCHEDULE,
                         prediction_type="epsilon", clip_sample=False)


def model_time(t):
    """Noise level t [B] in 0 .. T-1 -> the time the network is told [B] in 1 .. T (0 stays free for clean)."""
    return t + 1


def draw_times_and_noise(latents, generator=None):
    """latents [B, C, H, W] -> (t [B] uniform in 0 .. T-1, eps [B, C, H, W] standard normal), from `generator`.

    train.py passes the step's own generator, so a resumed run draws exactly the times and noise it would have.
    """
    random = {"generator": generator} if generator is not None else {}   # torch.compile rejects generator=None
    t = torch.randint(0, NUM_TIMESTEPS, (latents.shape[0],), device=latents.device, **random)
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, **random)
    return t, noise


def add_noise(latents, noise, t):
    """x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps, all [B, C, H, W]; t [B]."""
    return noise_schedule().add_noise(latents, noise, t)


SNR_GAMMA = 5.0   # min-SNR-5 (Hang et al. 2023); 0 = the plain eps-MSE of DDPM, MaskDM and UMD


def min_snr_weights(t, gamma=SNR_GAMMA):
    """t [B] -> each sample's weight in the eps loss [B]: min(SNR_t, gamma) / SNR_t, SNR_t = a_t / (1 - a_t).

    The nearly clean levels (SNR above gamma) have large, uninformative eps gradients that fight the rest; capping
    their weight is Min-SNR's fix, and on digits it halves the steps to a given sample quality (lab/docs/relatives.md).
    gamma 0 weighs every level 1.
    """
    if not gamma:
        return torch.ones(t.shape, device=t.device)
    alpha_bar = noise_schedule().alphas_cumprod.to(t.device)[t]
    snr = alpha_bar / (1 - alpha_bar)
    return gamma / snr.clamp(min=gamma)   # = min(snr, gamma) / snr, and 1 where snr is 0


def eps_loss(predictions, noise_tokens, scored, weights):
    """The eps-MSE per scored token, each sample's tokens weighted: predictions, noise_tokens [B, L, D]; scored [B, L]
    with 1 = scored; weights [B] (min_snr_weights). Divided by the number of scored tokens, as lmd's loss."""
    per_token = ((predictions.float() - noise_tokens.float()) ** 2).mean(dim=-1)
    return (per_token * scored * weights.unsqueeze(1)).sum() / scored.sum()


#################################################################################
#                             2. Time conditioning                              #
#################################################################################

def timestep_embedding(time, dim, max_period=10_000):
    """time [B] (any real values) -> [B, dim]: cosines then sines of time at geometric frequencies (as DiT)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=time.device) / half)
    angles = time.float().unsqueeze(1) * frequencies
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimestepEmbedder(nn.Module):
    """model time [B] -> the conditioning vector c [B, width]: a sinusoidal embedding, then a two-layer MLP."""

    def __init__(self, width, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, time):
        return self.mlp(timestep_embedding(time, self.frequency_dim))


def modulate(x, shift, scale):
    """x [B, N, D], shift and scale [B, 1, D] -> x * (1 + scale) + shift: a zero modulation leaves x as it is."""
    return x * (1 + scale) + shift


class AdaLNBlock(lmd.Block):
    """lmd's pre-norm block, conditioned on c (adaLN-Zero, as in DiT): a linear map of c gives a shift, a scale and
    a gate for the attention and for the MLP. The map starts at zero, so every gate is 0 and the block starts as the
    identity: a deep stack of them trains like a shallow one at first.

    Its attention, MLP and norms are lmd.Block's, with the same names: an LMD encoder's weights load into it.
    """

    def __init__(self, dim, num_heads, condition_dim, mlp_ratio=4.0):
        super().__init__(dim, num_heads, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(condition_dim, 6 * dim))
        self.zero_modulation()

    def zero_modulation(self):
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x, c):
        """x [B, N, dim], c [B, condition_dim] -> [B, N, dim]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


#################################################################################
#                              3. The diffusion ViT                             #
#################################################################################

def gather_tokens(tokens, indices):
    """tokens [B, L, D], indices [B, K] -> tokens [B, K, D] at those positions."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class DiffusionViT(lmd.MaskedLatentViT):
    """lmd.MaskedLatentViT told the model time in every block: its patches, position embeddings, class token,
    masking and decoder layout, with adaLN-Zero blocks (encoder and decoder) and a head per prediction.

    `heads` names what the decoder predicts per token, each p*p*C values side by side ("eps"; UMD adds "x0").
    `mask_token=False` drops the learned mask token for objectives that never insert one (ddpm, MaskDM): an unused
    parameter would stall DDP. `snr_gamma` weighs the eps loss (min_snr_weights). The head and every modulation
    start at zero (DiT): at first the network predicts 0.
    """

    DECODER_PARTS = (*lmd.MaskedLatentViT.DECODER_PARTS, "decoder_modulation")

    def __init__(self, size="tiny", grid_size=8, patch_size=2, channels=4, mlp_ratio=4.0, heads=("eps",),
                 mask_token=True, snr_gamma=SNR_GAMMA):
        super().__init__(size, grid_size, patch_size, channels, mlp_ratio)
        self.snr_gamma = snr_gamma   # the eps loss's min-SNR weighting (min_snr_weights)
        (width, depth, num_heads), (decoder_width, decoder_depth, decoder_heads) = lmd.MODEL_SIZES[size].values()
        self.heads, self.token_dim = tuple(heads), patch_size * patch_size * channels
        self.time_embed = TimestepEmbedder(width)
        self.blocks = nn.ModuleList(AdaLNBlock(width, num_heads, width, mlp_ratio) for _ in range(depth))
        self.decoder_blocks = nn.ModuleList(AdaLNBlock(decoder_width, decoder_heads, width, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * decoder_width))  # the final norm's
        self.decoder_head = nn.Linear(decoder_width, self.token_dim * len(self.heads))
        self._init_weights()   # lmd's initialisation for every new layer, then DiT's zeros
        for block in (*self.blocks, *self.decoder_blocks):
            block.zero_modulation()
        for layer in (self.decoder_modulation[1], self.decoder_head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if not mask_token:
            del self.mask_token

    def time_condition(self, time, batch, device):
        """model time [B] (None: CLEAN_TIME for all) -> c [B, width]."""
        if time is None:
            time = torch.full((batch,), CLEAN_TIME, device=device)
        return self.time_embed(time)

    def encode_tokens(self, tokens, time=None):
        """tokens [B, K, width] (embedded, with position) -> [B, 1 + K, width], the class token first.

        With time None the input counts as clean (model time 0): that is what lmd.LatentClassifier (the probes)
        calls, so the features of every objective's encoder are read the same way.
        """
        c = self.time_condition(time, tokens.shape[0], tokens.device)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x, c)
        return self.norm(x)

    def forward_encoder(self, noisy_latents, time, keep_indices=None):
        """noisy_latents [B, C, H, W], time [B] -> encoded [B, 1 + K, width]: the tokens at keep_indices [B, K]
        (all L of them when None), each with its position."""
        tokens = self.embed(noisy_latents)
        if keep_indices is not None:
            tokens = gather_tokens(tokens, keep_indices)
        return self.encode_tokens(tokens, time)

    def forward_decoder(self, encoded, time, keep_indices=None, restore_indices=None):
        """encoded [B, 1 + K, width], time [B] -> predictions [B, L', len(heads) * p*p*C].

        - restore_indices [B, L] (from lmd.random_masking): mask tokens fill the hidden places, every token is
          predicted (L' = L), as in LMD and UMD;
        - keep_indices [B, K] alone: only the visible tokens go on, each at its own position (L' = K): nothing is
          predicted where nothing was seen (MaskDM);
        - neither: every token was visible (L' = L).
        """
        x = self.decoder_embed(encoded)
        if restore_indices is not None:
            x = lmd.insert_mask_tokens(x, self.mask_token, restore_indices) + self.decoder_pos_embed
        elif keep_indices is not None:
            positions = self.decoder_pos_embed.expand(x.shape[0], -1, -1)
            x = x + torch.cat([positions[:, :1], gather_tokens(positions[:, 1:], keep_indices)], dim=1)
        else:
            x = x + self.decoder_pos_embed
        c = self.time_condition(time, x.shape[0], x.device)
        for block in self.decoder_blocks:
            x = block(x, c)
        shift, scale = self.decoder_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.decoder_head(modulate(self.decoder_norm(x), shift, scale))[:, 1:]   # class token dropped

    def head(self, predictions, name):
        """predictions [B, L, len(heads) * D] -> the named head's [B, L, D]."""
        index = self.heads.index(name)
        return predictions[..., index * self.token_dim:(index + 1) * self.token_dim]

    def predict_eps(self, noisy_latents, t):
        """noisy_latents [B, C, H, W] at noise levels t [B] -> the predicted noise [B, C, H, W], every token seen."""
        time = model_time(t)
        predictions = self.forward_decoder(self.forward_encoder(noisy_latents, time), time)
        return self.unpatchify(self.head(predictions, "eps").float())


#################################################################################
#                                  4. The sampler                               #
#################################################################################

def sampling_schedule(clip_sample=False):
    """DDIM over the training schedule (diffusers' DDIMScheduler from the DDPMScheduler's config). `clip_sample`
    clamps each step's x_0 estimate to [-1, 1]: right for pixels, wrong for latents (their range is wider)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(noise_schedule().config, clip_sample=clip_sample)


@torch.no_grad()
def ddim_sample(model, num_images, steps=50, eta=0.0, generator=None, clip_sample=False, device="cpu"):
    """Generate num_images latents [N, C, G, G] with `steps` DDIM steps from noise drawn by `generator`.

    eta = 0 is deterministic DDIM (the noise at the start fixes the sample); eta = 1 adds DDPM-like noise at each
    step, from the same generator. The model is put in eval mode for the call and left as it was.
    """
    scheduler = sampling_schedule(clip_sample)
    scheduler.set_timesteps(steps)
    side = model.grid * model.patch_size
    random = {"generator": generator} if generator is not None else {}
    x = torch.randn(num_images, model.channels, side, side, device=device, **random)
    was_training = model.training
    model.eval()
    for t in scheduler.timesteps:
        eps = model.predict_eps(x, torch.full((num_images,), int(t), device=device))
        x = scheduler.step(eps, t, x, eta=eta, **random).prev_sample
    model.train(was_training)
    return x


@torch.no_grad()
def sample_images(model, projection, num_images, steps=50, eta=0.0, generator=None, device="cpu"):
    """DDIM samples decoded to images [N, 3, S, S] in [0, 1] through the run's frozen projection (its VAE, or none
    for pixels, where each step's x_0 estimate is clipped to the pixel range)."""
    latents = ddim_sample(model, num_images, steps, eta, generator, projection.is_pixels, device)
    return projection.decode(latents)


#################################################################################
#                          5. Probing a diffusion encoder                        #
#################################################################################

def image_noise(shape, indices, seed):
    """Standard normal noise [B, *shape], image i's drawn by a generator of its own (seed, i): the same in any
    batch, on any number of processes, for both views of an image."""
    seeds = [(seed * 0x9E3779B1 + int(i)) % 2**32 for i in indices]   # a generator reads 32 bits of its seed
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def at_time(latents, time, indices, seed):
    """latents [B, C, H, W] of images `indices` [B] -> (inputs [B, C, H, W], model time [B]): the probes' input of a
    diffusion encoder (its records' probe_inputs; util/probes.py).

    time None: as they are, no time; 0: clean, at model time 0; k >= 1: noised at level
    k - 1 (x = sqrt(a) x0 + sqrt(1 - a) eps, as in training; level 0 on the cosine schedule: sqrt(1 - a) = 0.0064)
    with each image's own noise (image_noise), at model time k.
    """
    if time is None:
        return latents, None
    times = torch.full((len(latents),), time, device=latents.device)
    if time == 0:
        return latents, times
    noise = image_noise(latents.shape[1:], indices, seed).to(latents.device, latents.dtype)
    return add_noise(latents, noise, times - 1), times



#################################################################################
#                                6. Their records                               #
#################################################################################

# The diffusion objectives' training defaults where they differ from LMD's (train.py's): small batches and no
# weight decay, as DiT; peak lr 2e-3 at batch 64 (ddpm tiny on the digits' VAE latents, 3000 steps, min-SNR-5:
# fd_normalised 0.31 at lr 1e-3, 0.21 at 2e-3; plain eps-MSE 0.56 at 1e-3, 0.36 at 2e-3, 0.38 at 4e-3). The targets
# (the noise) are never normalised.
TRAINING_DEFAULTS = dict(batch_size=64, base_lr=8e-3, weight_decay=0.0, normalize_targets=False)
SNR_GAMMA_FLAG = flag(SNR_GAMMA, "weigh each noise level's eps loss by min(SNR, gamma) / SNR (Min-SNR, Hang et al. "
                                 "2023); 0 = the plain eps-MSE of the papers", type=float)
DDIM_50 = dict(sampling_steps=50, eta=0.0)   # how sample.py samples unless told: DDIM, 50 steps, eta 0
NOISE_WORDS = "cosine betas, T = 1000"          # the noise, in words, for the line a run starts with
RECORD = dict(loss_name="eps loss", held_out_key="held_out_eps_loss", sampler=DDIM_50, probe_inputs=at_time,
              sample_grid=lambda *run: pictures.SampleGridWriter(*run),   # grids of samples, not reconstructions
              lowest_time=lambda config: 1)   # only ever told t + 1 >= 1


def fixed_ratio(config):
    """The schedule of an objective that masks a fixed share of tokens all along: its --mask-ratio."""
    ratio = config["mask_ratio"]
    return lambda progress: ratio


def snr_gamma(config):
    """The run's min-SNR gamma; runs from before the weighting trained with the plain eps-MSE (0)."""
    return config.get("snr_gamma", 0.0)
