"""
LMD: Latent Masking Diffusion (Ma et al., AAAI 2024, arXiv 2312.07971): the method, in one readable module.

LMD is a masked autoencoder trained on the latents of a frozen VAE, with a mask ratio that grows over
training ("from simple to difficult"). Read this file top to bottom:

    1. latent projection      images in [0, 1] -> frozen VAE -> scaled latents (or pixels, for the MAE baseline)
    2. patches and masking    latents -> tokens -> a random subset kept visible
    3. transformer blocks     pre-norm ViT blocks, fixed 2-D sine-cosine position embeddings
    4. the model              encoder on visible tokens, decoder with mask tokens
    5. schedulers             the mask ratio as a function of training progress
    6. loss                   mean squared error over masked tokens only
    7. the classifier         the pretrained encoder's features, and a head on them

Loading a VAE, data, the latent cache, checkpoints, devices and pictures live in util/; train.py (whose loop holds
the training step: the step's ratio, forward, loss, backward, optimiser step) and finetune.py use both.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConfigError(ValueError):
    """A setting the method cannot use (unknown model size or scheduler, a mask ratio outside (0, 1))."""


#################################################################################
#                              1. Latent projection                             #
#################################################################################

class LatentProjection(nn.Module):
    """A frozen map between images and the space the masked autoencoder works in.

    `vae=None` is the identity (pixel space: the model is then the pixel MAE baseline). Otherwise a diffusers
    `AutoencoderKL` (the posterior mode is used, as the authors did) or `AutoencoderTiny`.
    """

    def __init__(self, vae=None, name="none", trained=True):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.name = name
        self.trained = trained
        config = vae.config if vae is not None else None
        self.channels = config.latent_channels if vae is not None else 3
        # Each encoder stage after the first halves the resolution (8 for the SD layout and for TAESD).
        stages = getattr(config, "block_out_channels", None) or getattr(config, "encoder_block_out_channels", ())
        self.downsample = 2 ** (len(stages) - 1) if vae is not None else 1
        # Latents are multiplied by the VAE's own factor so they have roughly unit variance (0.18215 for SD).
        self.scaling_factor = float(getattr(config, "scaling_factor", 1.0) or 1.0) if vae is not None else 1.0
        self.shift_factor = float(getattr(config, "shift_factor", 0.0) or 0.0) if vae is not None else 0.0

    @property
    def is_pixels(self):
        return self.vae is None

    def train(self, mode=True):
        return super().train(False)  # the VAE is frozen: never leave eval mode

    @torch.no_grad()
    def encode(self, images):
        """images [B, 3, H, W] in [0, 1] -> latents [B, C, H/f, W/f] (pixels in [-1, 1] when there is no VAE)."""
        images = images * 2 - 1
        if self.vae is None:
            return images
        images = images.to(self.vae.dtype)
        output = self.vae.encode(images)
        raw = output.latent_dist.mode() if hasattr(output, "latent_dist") else output.latents
        return ((raw - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents):
        """latents [B, C, h, w] -> images [B, 3, h*f, w*f] in [0, 1]."""
        if self.vae is not None:
            raw = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
            latents = self.vae.decode(raw).sample.float()
        return ((latents + 1) / 2).clamp(0, 1)


#################################################################################
#                             2. Patches and masking                            #
#################################################################################

def patchify(latents, patch_size):
    """latents [B, C, H, W] -> tokens [B, (H/p)*(W/p), p*p*C], row-major over the patch grid."""
    batch, channels, height, width = latents.shape
    p = patch_size
    x = latents.reshape(batch, channels, height // p, p, width // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(tokens, patch_size, channels, grid_height, grid_width=None):
    """tokens [B, h*w, p*p*C] -> latents [B, C, h*p, w*p]; the inverse of patchify."""
    grid_width = grid_width or grid_height
    p = patch_size
    x = tokens.reshape(tokens.shape[0], grid_height, grid_width, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(tokens.shape[0], channels, grid_height * p, grid_width * p)


def num_visible_tokens(num_tokens, mask_ratio):
    """How many tokens stay visible: at least one, and at least one masked, whatever the ratio.

    The authors' code let the ratio pass 1.0 and sliced with a negative keep count, which silently kept
    almost every token; clamping here makes any ratio safe.
    """
    return min(max(round(num_tokens * (1 - mask_ratio)), 1), num_tokens - 1)


def random_masking(tokens, mask_ratio, generator=None):
    """Per-sample random masking by sorting uniform noise (as in MAE).

    tokens [B, L, D] -> visible_tokens [B, K, D], mask [B, L] (1 = masked, 0 = visible),
    restore_indices [B, L] (gathering the shuffled sequence with it restores the original order).
    """
    batch, length, dim = tokens.shape
    keep = num_visible_tokens(length, mask_ratio)
    noise = torch.rand(batch, length, device=tokens.device, generator=generator)   # None: the global generator
    shuffle_indices = torch.argsort(noise, dim=1)          # ascending: the first `keep` are kept
    restore_indices = torch.argsort(shuffle_indices, dim=1)
    keep_indices = shuffle_indices[:, :keep]
    visible_tokens = torch.gather(tokens, 1, keep_indices.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore_indices)
    return visible_tokens, mask, restore_indices


def insert_mask_tokens(x, mask_token, restore_indices):
    """x [B, 1 + K, D] (class token, then the K visible tokens, shuffled), mask_token [1, 1, D], restore_indices
    [B, L] -> [B, 1 + L, D]: the class token, then every token in its place, mask tokens where hidden."""
    batch, length = restore_indices.shape
    mask_tokens = mask_token.expand(batch, length + 1 - x.shape[1], -1)
    shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)      # visible first, then masked
    unshuffled = torch.gather(shuffled, 1, restore_indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], unshuffled], dim=1)


#################################################################################
#                             3. Transformer blocks                             #
#################################################################################

def sincos_position_embedding(dim, grid_size):
    """Fixed 2-D sine-cosine embedding [grid*grid, dim]: half the channels encode the row, half the column."""
    assert dim % 4 == 0, "the embedding width must be divisible by 4"
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(positions):  # [N] -> [N, dim/2]
        angles = positions.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """x [B, N, D] -> [B, N, D]."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, D/heads]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


#################################################################################
#                                  4. The model                                 #
#################################################################################

# (encoder width, depth, heads), (decoder width, depth, heads). `base` is the paper's setting.
MODEL_SIZES = {
    "tiny": dict(encoder=(192, 4, 3), decoder=(128, 2, 4)),
    "small": dict(encoder=(384, 6, 6), decoder=(256, 4, 8)),
    "base": dict(encoder=(768, 12, 12), decoder=(512, 8, 16)),
    "large": dict(encoder=(1024, 24, 16), decoder=(512, 8, 16)),
}


class MaskedLatentViT(nn.Module):
    """The masked autoencoder on a C x G x G latent grid cut into p x p patches (G*G/p^2 tokens of p*p*C values)."""

    # What only pretraining uses: the classifier (section 7) is this network without them.
    DECODER_PARTS = ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm",
                     "decoder_head")

    def __init__(self, size="tiny", grid_size=8, patch_size=2, channels=4, mlp_ratio=4.0):
        super().__init__()
        if size not in MODEL_SIZES:
            raise ConfigError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
        width, depth, heads = MODEL_SIZES[size]["encoder"]
        dec_width, dec_depth, dec_heads = MODEL_SIZES[size]["decoder"]
        self.patch_size, self.channels = patch_size, channels
        self.grid = grid_size // patch_size                      # tokens per side
        self.num_tokens = self.grid ** 2
        token_dim = patch_size * patch_size * channels
        # Encoder: a linear patch embedding (tokens are already patchified), a class token, ViT blocks.
        self.patch_embed = nn.Linear(token_dim, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", self._position_embedding(width), persistent=False)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        # Decoder: its own width, a learned mask token, its own fixed position embedding, a linear head.
        self.decoder_embed = nn.Linear(width, dec_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_width))
        self.register_buffer("decoder_pos_embed", self._position_embedding(dec_width), persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(dec_width, dec_heads, mlp_ratio) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_width, eps=1e-6)
        self.decoder_head = nn.Linear(dec_width, token_dim)
        self._init_weights()

    def _position_embedding(self, dim):
        """[1, 1 + L, dim]: zeros for the class token, then the 2-D sine-cosine grid."""
        return torch.cat([torch.zeros(1, dim), sincos_position_embedding(dim, self.grid)]).unsqueeze(0)

    def _init_weights(self):
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def patchify(self, latents):
        """latents [B, C, H, W] -> tokens [B, L, p*p*C]."""
        return patchify(latents, self.patch_size)

    def unpatchify(self, tokens):
        """tokens [B, L, p*p*C] -> latents [B, C, H, W]."""
        return unpatchify(tokens, self.patch_size, self.channels, self.grid)

    def embed(self, latents):
        """latents [B, C, H, W] -> token embeddings with position [B, L, width] (no class token)."""
        return self.patch_embed(self.patchify(latents)) + self.pos_embed[:, 1:]

    def encode_tokens(self, tokens):
        """tokens [B, K, width] (already embedded) -> [B, 1 + K, width], the class token first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_encoder(self, latents, mask_ratio, generator=None):
        """latents [B, C, H, W] -> encoded [B, 1 + K, width], mask [B, L], restore_indices [B, L].

        Only the K visible tokens enter the encoder: that, and the short latent sequence, is where the speed is.
        """
        tokens = self.embed(latents)                                                  # patches -> embeddings
        visible_tokens, mask, restore_indices = random_masking(tokens, mask_ratio, generator)   # hide most of them
        return self.encode_tokens(visible_tokens), mask, restore_indices              # encode what is left

    def forward_decoder(self, encoded, restore_indices):
        """encoded [B, 1 + K, width] -> predictions [B, L, p*p*C] for every token."""
        x = self.decoder_embed(encoded)                           # to the decoder's width
        # every token back in its place, mask tokens where hidden; the position is added (the authors subtract it)
        x = insert_mask_tokens(x, self.mask_token, restore_indices) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_head(self.decoder_norm(x))[:, 1:]     # a guess for every token, the class token dropped

    def forward(self, latents, mask_ratio, normalize_targets=True, generator=None):
        """latents [B, C, H, W] -> (loss [], predictions [B, L, p*p*C], mask [B, L])."""
        encoded, mask, restore_indices = self.forward_encoder(latents, mask_ratio, generator)   # visible only
        predictions = self.forward_decoder(encoded, restore_indices)                           # every token
        loss = masked_token_loss(predictions, self.patchify(latents), mask, normalize_targets)  # scored if hidden
        return loss, predictions, mask


#################################################################################
#                                 5. Schedulers                                 #
#################################################################################

SCHEDULERS = ("constant", "linear", "piecewise", "cosine")
MAE_MASK_RATIO = 0.75   # MAE's fixed ratio: the constant baseline, the end of the ramp, and where runs are compared
COSINE_OFFSET = 0.008   # s in the cosine formula, as in improved-DDPM's cosine noise schedule


@dataclass
class MaskSchedule:
    """The mask ratio as a pure function of training progress p = step / total_steps in [0, 1].

    The progressive schedules ramp from `mask_start` to `mask_end` over the first `ramp_fraction` of training, then
    hold `mask_end` (the paper's grow; a falling ramp is allowed). `piecewise` passes through a plateau at
    `mask_plateau`. `constant` is the MAE baseline at `mask_ratio`. The fields are train.py's flags of the same names,
    and these are their defaults. Any other function of progress into (0, 1) serves as a schedule too
    (check_schedule). Because it depends on progress only, a resumed run continues the schedule where it stopped.
    """
    scheduler: str = "cosine"
    mask_start: float = 0.15
    mask_end: float = MAE_MASK_RATIO
    mask_plateau: float = 0.40
    ramp_fraction: float = 2 / 3
    mask_ratio: float = MAE_MASK_RATIO

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        for label in ("mask_start", "mask_end", "mask_plateau", "mask_ratio"):
            if not 0 < getattr(self, label) < 1:   # a falling ratio is allowed: one that hides nothing or all is not
                raise ConfigError(f"--{label.replace('_', '-')} {getattr(self, label)} must lie strictly between 0 "
                                  "and 1")
        if not 0 < self.ramp_fraction <= 1:
            raise ConfigError(f"--ramp-fraction {self.ramp_fraction} must lie in (0, 1]")

    @staticmethod
    def _cosine_curve(u):
        return math.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    def __call__(self, progress):
        """progress in [0, 1] -> mask ratio."""
        if self.scheduler == "constant":
            return self.mask_ratio
        start, end, plateau = self.mask_start, self.mask_end, self.mask_plateau
        u = min(max(progress, 0.0) / self.ramp_fraction, 1.0)   # position along the ramp
        if self.scheduler == "linear":
            return start + (end - start) * u
        if self.scheduler == "piecewise":   # start -> plateau over the ramp's first quarter (1/6 of training), hold,
            # then -> end
            if u < 0.25:
                return start + (plateau - start) * u / 0.25
            if u < 0.5:
                return plateau
            return plateau + (end - plateau) * (u - 0.5) / 0.5
        return start + (end - start) * (1 - self._cosine_curve(u) / self._cosine_curve(0.0))


def check_schedule(schedule, points=101):
    """A schedule (any function of progress) -> itself, if its ratio lies in (0, 1) at `points` evenly spaced
    points of training; else a ConfigError: a ratio of 0 or 1 leaves nothing to predict or nothing to see."""
    for i in range(points):
        ratio = schedule(i / (points - 1))
        if not 0 < ratio < 1:
            raise ConfigError(f"the mask ratio is {ratio} at progress {i / (points - 1):.2f}; a schedule must stay "
                              "strictly between 0 and 1")
    return schedule


#################################################################################
#                                    6. Loss                                    #
#################################################################################

def masked_token_loss(predictions, targets, mask, normalize_targets=True):
    """Mean squared error per token, averaged over the masked tokens only.

    predictions, targets [B, L, D]; mask [B, L] with 1 = masked. Dividing by the number of masked tokens
    (not by the nominal ratio) keeps the loss an honest per-token mean at every point of the schedule.
    `normalize_targets` standardises each target token by its own mean and variance (MAE's norm_pix_loss).
    """
    targets = targets.float()
    if normalize_targets:
        mean = targets.mean(dim=-1, keepdim=True)
        variance = targets.var(dim=-1, keepdim=True)
        targets = (targets - mean) / (variance + 1e-6).sqrt()
    per_token = ((predictions.float() - targets) ** 2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum()


#################################################################################
#                               7. The classifier                               #
#################################################################################

class LatentClassifier(nn.Module):
    """The downstream classifier: the pretrained (or a fresh) encoder on all tokens, its features, a head.

    The features are defined here, once for every use:
    - a probe (`linear_probe=True`, and the kNN probe) reads the class token after the encoder's final norm, with
      the encoder frozen in eval mode; the head is BatchNorm without affine parameters, then a linear layer (MAE);
    - fine-tuning reads the mean of the patch tokens, then a fresh LayerNorm and a linear layer; all of it trains.
    The decoder only serves pretraining: the classifier keeps a copy of `autoencoder` without it, so that the
    optimiser, DDP and the saved classifier never see it. The `autoencoder` given is left as it was.
    """

    def __init__(self, autoencoder, num_classes, linear_probe=False):
        super().__init__()
        encoder = copy.deepcopy(autoencoder)
        for part in autoencoder.DECODER_PARTS:   # the copy keeps the encoder and loses the decoder
            setattr(encoder, part, None)
        self.encoder = encoder.requires_grad_(not linear_probe)
        self.linear_probe = linear_probe
        width = encoder.norm.normalized_shape[0]
        norm = nn.BatchNorm1d(width, affine=False, eps=1e-6) if linear_probe else nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Sequential(norm, nn.Linear(width, num_classes))
        nn.init.normal_(self.head[1].weight, std=0.01 if linear_probe else 2e-5)
        nn.init.zeros_(self.head[1].bias)

    def features(self, latents):
        """latents [B, C, H, W] -> [B, width]: the class token (probes) or the mean patch token (fine-tuning)."""
        encoded = self.encoder.encode_tokens(self.encoder.embed(latents))   # [B, 1 + L, width], after the norm
        return encoded[:, 0] if self.linear_probe else encoded[:, 1:].mean(dim=1)

    def forward(self, latents):
        """latents [B, C, H, W] -> logits [B, num_classes]."""
        return self.head(self.features(latents))

    def train(self, mode=True):
        super().train(mode)
        if self.linear_probe:
            self.encoder.eval()   # a frozen encoder gives the same features in training as at test time
        return self
