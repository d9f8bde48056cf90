"""
LMD: Latent Masking Diffusion (Ma et al., AAAI 2024, arXiv 2312.07971), in one readable module.

LMD is a masked autoencoder trained on the latents of a frozen VAE, with a mask ratio that grows over
training ("from simple to difficult"). Read this file top to bottom:

    1. latent projection      images in [0, 1] -> frozen VAE -> scaled latents (or pixels, for the MAE baseline)
    2. patches and masking    latents -> tokens -> a random subset kept visible
    3. transformer blocks     pre-norm ViT blocks, fixed 2-D sine-cosine position embeddings
    4. the model              encoder on visible tokens, decoder with mask tokens, and the downstream classifier
    5. schedulers             the mask ratio as a function of training progress
    6. loss                   mean squared error over masked tokens only
    7. data                   CIFAR, ImageNet-style folders, a procedural synthetic set, the latent cache
    8. training utilities     optimiser, learning rate, checkpoints, devices, errors shared by the scripts
    9. pictures               reconstruction grids, training curves and the schedules figure
"""

import argparse
import hashlib
import json
import math
import os
import socket
import sys
from dataclasses import dataclass

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# diffusers passes this deprecated argument to huggingface_hub on every download; the warning is not the user's.
warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, no network). Scripts print it as one line and exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (what was wrong, and where to look) instead of the usage block."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main):
    """Run a script's main(), turning a UserError into a one-line message and exit status 2."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as error:
        # A UserError raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its last line.
        message = str(error).strip().splitlines()[-1].removeprefix("lmd.UserError: ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


#################################################################################
#                              1. Latent projection                             #
#################################################################################

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


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

    def fingerprint(self):
        """A short hash of the VAE's config and weights, so a latent cache can tell one VAE from another."""
        if self.vae is None:
            return "pixels"
        # Private keys such as diffusers' `_use_default_values` (built from a set, so its order changes from one
        # process to the next) say nothing about the VAE and would make the hash unstable.
        config = {key: value for key, value in self.vae.config.items() if not key.startswith("_")}
        digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
        for parameter in list(self.vae.parameters())[:2] + list(self.vae.parameters())[-2:]:
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


def tiny_vae():
    """A small, randomly initialised AutoencoderKL in the SD layout (4 latent channels, downsampling 8).

    For offline runs and tests only: its latents mean nothing. The seed is fixed so that every run, the
    latent cache and finetune.py all see the same untrained VAE.
    """
    from diffusers import AutoencoderKL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             latent_channels=4, mid_block_add_attention=False)


def _hub_reachable(timeout=5.0):
    """One quick TCP connection instead of the hub client's minute of retries when there is no network."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _vae_class(name_or_path):
    """AutoencoderTiny for TAESD-style checkpoints (by config when local, by name otherwise), else AutoencoderKL."""
    from diffusers import AutoencoderKL, AutoencoderTiny
    config_path = os.path.join(name_or_path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as file:
            return AutoencoderTiny if json.load(file).get("_class_name") == "AutoencoderTiny" else AutoencoderKL
    return AutoencoderTiny if "taesd" in name_or_path.lower() else AutoencoderKL


def load_projection(vae, device="cpu", dtype=torch.float32, announce=True):
    """Build the frozen projection from a `--vae` value: `none`, `tiny`, a local directory or a Hub id."""
    if vae == "none":
        return LatentProjection().to(device)
    if vae == "tiny":
        if announce:
            print("note: --vae tiny is a randomly initialised, UNTRAINED VAE for offline runs and tests; "
                  "its latents carry no pretrained meaning.", file=sys.stderr)
        return LatentProjection(tiny_vae(), "tiny", trained=False).to(device, dtype)
    cls = _vae_class(vae)
    looks_local = vae.startswith(("/", ".", "~")) or vae.count("/") > 1 or os.path.exists(vae)
    if os.path.isdir(vae):
        try:
            model = cls.from_pretrained(vae, low_cpu_mem_usage=False)  # needs no `accelerate`
        except Exception as error:
            raise UserError(f"could not load a VAE from directory {vae!r} ({type(error).__name__}: "
                            f"{str(error).splitlines()[0]}); it should hold config.json and the weights "
                            "written by save_pretrained") from None
        return LatentProjection(model, vae).to(device, dtype)
    if looks_local:
        raise UserError(f"--vae {vae!r}: no such directory. Give a Hub id (e.g. {DEFAULT_VAE}), a local "
                        "directory made by save_pretrained, 'tiny' (untrained, offline) or 'none' (pixels)")
    try:  # the local Hub cache first: it needs no network
        model = cls.from_pretrained(vae, local_files_only=True, low_cpu_mem_usage=False)
        return LatentProjection(model, vae).to(device, dtype)
    except Exception:
        pass
    if not _hub_reachable():
        raise UserError(f"could not download the VAE {vae!r}: the Hugging Face Hub is unreachable (offline?). "
                        "Pass a local directory with --vae DIR (made by save_pretrained), or run fully offline "
                        "with --dataset synthetic --vae tiny")
    try:
        model = cls.from_pretrained(vae, low_cpu_mem_usage=False)  # needs no `accelerate`
    except Exception as error:
        raise UserError(f"could not load the VAE {vae!r} from the Hub ({type(error).__name__}: "
                        f"{str(error).splitlines()[0]}); check the id or pass a local directory") from None
    return LatentProjection(model, vae).to(device, dtype)


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
    # No generator is passed as no argument at all: torch.compile rejects an explicit generator=None.
    random = {"generator": generator} if generator is not None else {}
    noise = torch.rand(batch, length, device=tokens.device, **random)
    shuffle_indices = torch.argsort(noise, dim=1)          # ascending: the first `keep` are kept
    restore_indices = torch.argsort(shuffle_indices, dim=1)
    keep_indices = shuffle_indices[:, :keep]
    visible_tokens = torch.gather(tokens, 1, keep_indices.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore_indices)
    return visible_tokens, mask, restore_indices


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

    def __init__(self, size="tiny", grid_size=8, patch_size=2, channels=4, mlp_ratio=4.0):
        super().__init__()
        if size not in MODEL_SIZES:
            raise UserError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
        (width, depth, heads), (dec_width, dec_depth, dec_heads) = MODEL_SIZES[size].values()
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
        visible_tokens, mask, restore_indices = random_masking(self.embed(latents), mask_ratio, generator)
        return self.encode_tokens(visible_tokens), mask, restore_indices

    def forward_decoder(self, encoded, restore_indices):
        """encoded [B, 1 + K, width] -> predictions [B, L, p*p*C] for every token."""
        x = self.decoder_embed(encoded)
        batch, length = restore_indices.shape
        mask_tokens = self.mask_token.expand(batch, length + 1 - x.shape[1], -1)
        shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)      # visible first, then masked
        unshuffled = torch.gather(shuffled, 1, restore_indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], unshuffled], dim=1) + self.decoder_pos_embed  # added (the authors subtract it)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_head(self.decoder_norm(x))[:, 1:]

    def forward(self, latents, mask_ratio, normalize_targets=True, generator=None):
        """latents [B, C, H, W] -> (loss [], predictions [B, L, p*p*C], mask [B, L])."""
        encoded, mask, restore_indices = self.forward_encoder(latents, mask_ratio, generator)
        predictions = self.forward_decoder(encoded, restore_indices)
        loss = masked_token_loss(predictions, self.patchify(latents), mask, normalize_targets)
        return loss, predictions, mask


class LatentClassifier(nn.Module):
    """The downstream classifier: a pretrained (or fresh) encoder, average pooling over patch tokens, a head.

    `linear_probe=True` is MAE's recipe: the encoder is frozen and stays in eval mode, the head is BatchNorm
    without affine parameters, then a linear layer. Otherwise a LayerNorm and a linear layer, and everything trains.
    The autoencoder's decoder only serves pretraining: it is removed from `autoencoder` (in place), so that the
    optimiser, DDP and the saved classifier never see it.
    """

    def __init__(self, autoencoder, num_classes, linear_probe=False):
        super().__init__()
        for name in ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm",
                     "decoder_head"):
            if hasattr(autoencoder, name):
                delattr(autoencoder, name)
        self.encoder = autoencoder.requires_grad_(not linear_probe)
        self.linear_probe = linear_probe
        width = autoencoder.norm.normalized_shape[0]
        norm = nn.BatchNorm1d(width, affine=False, eps=1e-6) if linear_probe else nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Sequential(norm, nn.Linear(width, num_classes))
        nn.init.normal_(self.head[1].weight, std=0.01 if linear_probe else 2e-5)
        nn.init.zeros_(self.head[1].bias)

    def features(self, latents):
        """latents [B, C, H, W] -> pooled features [B, width], the mean over all (unmasked) patch tokens."""
        return self.encoder.encode_tokens(self.encoder.embed(latents))[:, 1:].mean(dim=1)

    def forward(self, latents):
        """latents [B, C, H, W] -> logits [B, num_classes]."""
        return self.head(self.features(latents))

    def train(self, mode=True):
        super().train(mode)
        if self.linear_probe:
            self.encoder.eval()   # a frozen encoder gives the same features in training as at test time
        return self


#################################################################################
#                                 5. Schedulers                                 #
#################################################################################

SCHEDULERS = ("constant", "linear", "piecewise", "cosine")


@dataclass
class MaskSchedule:
    """The mask ratio as a pure function of training progress p = step / total_steps in [0, 1].

    The progressive schedules ramp from `start` to `end` over the first `ramp` fraction of training, then hold
    `end`. `piecewise` passes through a plateau at `mid`. `constant` is the MAE baseline at `constant_ratio`.
    Because it depends on progress only, a resumed run continues the schedule where it stopped.
    """
    name: str = "cosine"
    start: float = 0.15
    end: float = 0.75
    mid: float = 0.40
    ramp: float = 2 / 3
    constant_ratio: float = 0.75
    cosine_offset: float = 0.008   # s in the cosine formula, as in improved-DDPM's cosine noise schedule

    def __post_init__(self):
        if self.name not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.name!r}; choose one of {', '.join(SCHEDULERS)}")
        for label, value in (("start", self.start), ("end", self.end), ("mid", self.mid),
                             ("constant", self.constant_ratio)):
            if not 0 < value < 1:
                raise UserError(f"mask ratio {label}={value} must lie strictly between 0 and 1")
        if self.start > self.end:
            raise UserError(f"mask ratio start ({self.start}) is above end ({self.end}); the ratio must grow")
        if self.name == "piecewise" and not self.start <= self.mid <= self.end:
            raise UserError(f"piecewise plateau ({self.mid}) must lie between start ({self.start}) "
                            f"and end ({self.end})")
        if not 0 < self.ramp <= 1:
            raise UserError(f"ramp fraction {self.ramp} must lie in (0, 1]")

    def _cosine_curve(self, u):
        return math.cos((u + self.cosine_offset) / (1 + self.cosine_offset) * math.pi / 2) ** 2

    def __call__(self, progress):
        """progress in [0, 1] -> mask ratio."""
        if self.name == "constant":
            return self.constant_ratio
        u = min(max(progress, 0.0) / self.ramp, 1.0)   # position along the ramp
        if self.name == "linear":
            return self.start + (self.end - self.start) * u
        if self.name == "piecewise":                   # start -> mid over the first quarter, hold, mid -> end
            if u < 0.25:
                return self.start + (self.mid - self.start) * u / 0.25
            if u < 0.5:
                return self.mid
            return self.mid + (self.end - self.mid) * (u - 0.5) / 0.5
        return self.start + (self.end - self.start) * (1 - self._cosine_curve(u) / self._cosine_curve(0.0))


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
#                                    7. Data                                    #
#################################################################################

DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")

# Per-dataset defaults. CIFAR's 32 px images are upsampled so that the SD VAE's latent grid is 16 x 16
# (64 latent tokens of patch 2). Pixel patches are 4x the latent patch, the paper's ratio (16 px vs 4 latent):
# the pixel MAE sees 4x more tokens, which is where LMD's speed-up comes from.
DATASET_DEFAULTS = {
    "cifar10": dict(image_size=128, latent_patch=2, pixel_patch=8),
    "cifar100": dict(image_size=128, latent_patch=2, pixel_patch=8),
    "imagefolder": dict(image_size=224, latent_patch=4, pixel_patch=16),
    "synthetic": dict(image_size=64, latent_patch=2, pixel_patch=8),
}
SYNTHETIC_CLASSES = ("disk", "square", "triangle", "ring", "plus", "cross", "diamond", "frame", "bar", "two-dots")


def default_patch_size(dataset, vae):
    key = "pixel_patch" if vae == "none" else "latent_patch"
    return DATASET_DEFAULTS[dataset][key]


def check_geometry(image_size, downsample, patch_size):
    """Refuse an image size that the VAE factor times the patch size does not divide. Returns the latent grid."""
    if image_size % (downsample * patch_size):
        raise UserError(f"--image-size {image_size} is not divisible by the VAE factor ({downsample}) times "
                        f"--patch-size {patch_size} = {downsample * patch_size}; pick a multiple of it, e.g. "
                        f"{max(1, round(image_size / (downsample * patch_size))) * downsample * patch_size}")
    grid = image_size // downsample
    if grid // patch_size < 2:
        raise UserError(f"--image-size {image_size} gives a {grid // patch_size}x{grid // patch_size} token grid; "
                        "masking needs at least 2x2 tokens: raise --image-size or lower --patch-size")
    return grid


def _shape_mask(kind, u, v):
    """Inside-test of shape `kind` on coordinates u, v [S, S] centred on the shape, radius ~1."""
    r = (u ** 2 + v ** 2).sqrt()
    box = torch.maximum(u.abs(), v.abs())
    a, b = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
    return [
        r < 1,                                                            # disk
        box < 0.85,                                                       # square
        (v > -0.8) & (v < 0.8) & (u.abs() < (v + 0.8) * 0.6),             # triangle
        (r > 0.55) & (r < 1),                                             # ring
        ((u.abs() < 0.3) & (v.abs() < 1)) | ((v.abs() < 0.3) & (u.abs() < 1)),  # plus
        ((a.abs() < 0.3) & (b.abs() < 1)) | ((b.abs() < 0.3) & (a.abs() < 1)),  # diagonal cross
        u.abs() + v.abs() < 1,                                            # diamond
        (box > 0.55) & (box < 0.9),                                       # hollow square frame
        (v.abs() < 0.3) & (u.abs() < 1),                                  # horizontal bar
        ((u - 0.5) ** 2 + v ** 2 < 0.16) | ((u + 0.5) ** 2 + v ** 2 < 0.16),  # two dots
    ][kind]


def synthetic_image(index, image_size, seed=0):
    """One procedural image [3, S, S] in [0, 1] and its label: a coloured shape on a striped, noisy background.

    The label is the shape (10 classes); colours, position, size and texture are nuisances, so the label can be
    learned from the image but not from its mean colour. Fully determined by (seed, index).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    label = index % len(SYNTHETIC_CLASSES)
    uniform = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    axis = (torch.arange(image_size) + 0.5) / image_size * 2 - 1                      # [-1, 1]
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    angle, frequency = uniform(1) * math.pi, 2 + 6 * uniform(1)
    stripes = 0.5 + 0.5 * torch.sin(frequency * math.pi * (x * angle.cos() + y * angle.sin()) + 6 * uniform(1))
    background_a, background_b = uniform(3, 1, 1), uniform(3, 1, 1)
    background = background_a + 0.35 * (background_b - background_a) * stripes
    background = background + 0.04 * torch.randn(3, image_size, image_size, generator=g)
    radius = 0.35 + 0.25 * uniform(1)
    centre = (uniform(2) * 2 - 1) * (1 - radius)
    inside = _shape_mask(label, (x - centre[0]) / radius, (y - centre[1]) / radius)
    colour = (1 - background_a + 0.3 * (uniform(3, 1, 1) - 0.5)).clamp(0, 1)        # contrasts with the background
    return torch.where(inside, colour, background).clamp(0, 1), label


class SyntheticShapes(torch.utils.data.Dataset):
    """A procedural 10-class dataset for offline runs: a fixed train/val split, any image size, no download."""

    def __init__(self, split="train", image_size=64, train_size=5000, seed=0):
        self.size = train_size if split == "train" else max(train_size // 5, 1)
        self.offset = 0 if split == "train" else 10_000_000     # disjoint indices: a fixed split
        self.image_size, self.seed = image_size, seed
        self.classes = list(SYNTHETIC_CLASSES)
        self.targets = [(self.offset + i) % len(SYNTHETIC_CLASSES) for i in range(self.size)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return synthetic_image(self.offset + index, self.image_size, self.seed)


def _image_transform(image_size, augment):
    """augment: 'none' (resize), 'flip' (resize + random horizontal flip) or 'full' (random resized crop + flip)."""
    from torchvision import transforms
    steps = [transforms.ToTensor()]
    if augment == "full":
        steps.append(transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True))
    else:
        steps.append(transforms.Resize((image_size, image_size), antialias=True))
    if augment in ("flip", "full"):
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps)


class ImageDataset(torch.utils.data.Dataset):
    """Images [3, S, S] in [0, 1] with labels, from any source, with reproducible augmentation.

    Indexing with (index, seed) applies the random augmentation under that seed, so the batches of a run are a
    function of the run's seed and step alone, whatever the number of loader workers, and a resumed run sees
    exactly the images it would have seen.
    """

    def __init__(self, source, image_size, augment="none"):
        self.source, self.image_size = source, image_size
        self.transform = _image_transform(image_size, augment)
        self.classes = source.classes

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.source[index]
        if isinstance(image, torch.Tensor):       # the synthetic set is already a tensor: convert back for ToTensor
            image = image.permute(1, 2, 0).mul(255).round().byte().numpy()
        elif image.mode != "RGB":                 # CIFAR is RGB already; this is for other sources
            image = image.convert("RGB")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return self.transform(image), label


def load_image_source(dataset, data_dir, split, image_size, synthetic_size=5000):
    """The raw dataset for `split` ('train' or 'val'): items are (PIL image or tensor, label), with `.classes`."""
    import torchvision
    if dataset == "synthetic":
        return SyntheticShapes(split, image_size, synthetic_size)
    if dataset in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        try:
            return cls(data_dir, train=(split == "train"), download=True)
        except Exception as error:  # urllib and checksum errors: one line, and the way out
            raise UserError(f"could not download {dataset} into {data_dir!r} ({type(error).__name__}: {error}). "
                            f"Offline? Put the extracted {cls.base_folder} folder in --data-dir, or run with no "
                            "download at all: --dataset synthetic --vae tiny") from None
    if dataset == "imagefolder":
        images = load_image_folder(os.path.join(data_dir, split))
        if split != "train":
            check_same_classes(os.path.join(data_dir, "train"), images)
        return images
    raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def load_image_folder(folder):
    """An ImageNet-style folder (one sub-folder per class) with a clear error when it is missing or empty."""
    import torchvision
    require_folder(folder)
    try:
        return torchvision.datasets.ImageFolder(folder, loader=read_image)
    except (FileNotFoundError, RuntimeError) as error:
        raise UserError(f"image folder {folder!r} holds no images in class sub-folders ({error})") from None


def require_folder(folder):
    if not os.path.isdir(folder):
        raise UserError(f"image folder {folder!r} does not exist; --dataset imagefolder expects "
                        "DATA_DIR/train/CLASS/*.jpg and DATA_DIR/val/CLASS/*.jpg")


def read_image(path):
    """Open one image file as RGB. An unreadable file stops the run with its name: silently training on fewer
    images than the user has would be worse."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.convert("RGB")   # grayscale, palette, RGBA and CMYK all become RGB
    except OSError as error:
        raise UserError(f"cannot read image {path} ({error}); delete or replace the file") from None


def check_same_classes(train_folder, val):
    """Validation classes must be the training classes, in the same order, or labels would silently differ.

    Only the class folder names of train are listed: scanning its images (a million for ImageNet) is not needed.
    """
    from torchvision.datasets.folder import find_classes
    require_folder(train_folder)
    train_classes = find_classes(train_folder)[0]
    if train_classes != val.classes:
        only_train = sorted(set(train_classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train_classes))
        raise UserError(f"the val split's classes differ from train's (only in train: {only_train[:5]}, only in "
                        f"val: {only_val[:5]}); give both splits the same class folders")


#################################################################################
#                                 Latent cache                                  #
#################################################################################

def cache_file(data_dir, dataset, split, vae, image_size, count):
    """Where the latents of (dataset, split, VAE, image size) live: DATA_DIR/lmd_latents/<name>.pt."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in vae.strip("/"))[-60:]
    return os.path.join(data_dir, "lmd_latents", f"{dataset}-{split}{count}-{slug}-{image_size}px.pt")


def cache_provenance(dataset, split, projection, image_size, count):
    return dict(dataset=dataset, split=split, vae=projection.name, vae_fingerprint=projection.fingerprint(),
                image_size=image_size, scaling_factor=projection.scaling_factor, dtype="float16", count=count)


@torch.no_grad()
def encode_dataset(images, projection, device, batch_size=64, num_workers=0, description="encoding latents"):
    """Encode every image and its horizontal flip once: -> latents [N, 2, C, h, w] fp16, labels [N].

    Both flips are stored because the VAE is not flip-equivariant: caching one randomly flipped sample would
    freeze the augmentation, caching both keeps it.
    """
    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    latents, labels = [], []
    for batch, label in tqdm(loader, desc=description, unit="batch", dynamic_ncols=True):
        batch = batch.to(device)
        pair = torch.stack([projection.encode(batch), projection.encode(batch.flip(-1))], dim=1)
        latents.append(pair.half().cpu())
        labels.append(torch.as_tensor(label))
    return torch.cat(latents), torch.cat(labels)


def load_or_build_cache(path, provenance, build):
    """Load the cache at `path` if its provenance matches, else build it with `build()` and write it atomically.

    Returns dict(latents [N, 2, C, h, w] fp16, labels [N], provenance). Memory-mapped, so a large cache is paged
    in on demand instead of read whole.
    """
    if os.path.exists(path):
        try:
            cache = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            if cache.get("provenance") == provenance:
                return cache
            print(f"latent cache {path} was made with other settings ({_provenance_difference(cache, provenance)}); "
                  "rebuilding it", file=sys.stderr)
        except Exception:
            print(f"latent cache {path} is unreadable; rebuilding it", file=sys.stderr)
    latents, labels = build()
    cache = dict(latents=latents, labels=labels, provenance=provenance)
    save_atomic(cache, path)
    return cache


def dataset_latents(config, split, projection, dist, source=None):
    """The cached latents of one split for a run config; rank 0 builds the cache while the other ranks wait.

    config: dataset, data_dir, image_size, vae, synthetic_size. Returns dict(latents [N, 2, C, h, w] fp16,
    labels [N], provenance).
    """
    source = source or load_image_source(config["dataset"], config["data_dir"], split, config["image_size"],
                                         config.get("synthetic_size", 5000))
    path = cache_file(config["data_dir"], config["dataset"], split, config["vae"], config["image_size"], len(source))
    provenance = cache_provenance(config["dataset"], split, projection, config["image_size"], len(source))
    build = lambda: encode_dataset(ImageDataset(source, config["image_size"]), projection, dist.device,  # noqa: E731
                                   description=f"encoding {config['dataset']} {split} latents")
    if dist.is_main:
        load_or_build_cache(path, provenance, build)
    dist.barrier()
    return load_or_build_cache(path, provenance, build)


def _provenance_difference(cache, provenance):
    old = cache.get("provenance") or {}
    return ", ".join(f"{k}: {old.get(k)!r} != {v!r}" for k, v in provenance.items() if old.get(k) != v)


#################################################################################
#                             8. Training utilities                             #
#################################################################################

def select_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; asking for an absent device is an error, not a silent fallback."""
    available = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    if name == "auto":
        name = next(device for device, present in available.items() if present)
    if not available.get(name, False):
        raise UserError(f"--device {name} is not available on this machine; use --device auto or cpu")
    return torch.device(name)


def autocast_dtype(precision, device):
    """bf16 autocast on CUDA when supported ('auto'), fp32 elsewhere unless bf16 is asked for explicitly."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise UserError("this GPU does not support bf16; use --precision fp32")
        return None
    return torch.bfloat16


def skips_weight_decay(name, parameter):
    """Biases, norms (all 1-D) and the class and mask tokens are not decayed, as in MAE."""
    return parameter.ndim <= 1 or name.endswith(("cls_token", "mask_token"))


def parameter_groups(model, weight_decay):
    """AdamW groups: weight decay on the matrices only (see skips_weight_decay)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if skips_weight_decay(name, parameter) else decay).append(parameter)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def learning_rate(step, total_steps, warmup_steps, peak_lr, min_lr=0.0):
    """Per-step linear warm-up to `peak_lr`, then a half-cycle cosine down to `min_lr`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def epoch_permutation(num_items, seed, epoch):
    """The data order of one epoch: a permutation that depends only on (seed, epoch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step, num_items, global_batch, seed, rank=0, world_size=1):
    """The dataset indices of this rank's share of the global batch at `step` [global_batch / world_size].

    Every epoch is a fresh permutation (what DistributedSampler does after set_epoch); each rank takes its own
    slice of the same global batch. Being a pure function of the step, it makes resuming mid-epoch exact.
    """
    steps_per_epoch = num_items // global_batch
    epoch, position = divmod(step, steps_per_epoch)
    per_rank = global_batch // world_size
    start = position * global_batch + rank * per_rank
    return epoch_permutation(num_items, seed, epoch)[start:start + per_rank]


def step_generator(seed, step, rank=0, device="cpu"):
    """A generator for the random choices of one step (masks, flips), so they too are a function of the step."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def loader_workers(requested=None):
    """Image-loading processes: the requested number, or one per core but one (for the training loop), at most 8."""
    return requested if requested is not None else min(8, max((os.cpu_count() or 2) - 1, 0))


def augmentation_seed(seed, step, index):
    """The seed of one image's random crop and flip at one step."""
    return ((seed * 1_000_003 + step) * 1_000_033 + index) % (2 ** 31)


def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, fsync, then rename into place: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


class Distributed:
    """torchrun's environment, or a single process. NCCL on CUDA, gloo on CPU."""

    def __init__(self, device_name):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.enabled = self.world_size > 1
        device = select_device(device_name)
        if device.type == "cuda" and self.enabled:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def any(self, flag):
        """True on every rank if `flag` is true on any rank (keeps the ranks stepping in lockstep)."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())


CHECKPOINT_KIND = "lmd-pretraining"


def load_checkpoint(path, kind=CHECKPOINT_KIND):
    """Load a checkpoint written by train.py (a run directory or a file); anything else is a clear UserError."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist; give a run directory or its checkpoint.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"checkpoint {path!r} is unreadable (truncated or not a torch file: "
                        f"{type(error).__name__}); use an earlier checkpoint or rerun") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != kind:
        raise UserError(f"{path!r} is not an LMD {kind.split('-')[-1]} checkpoint (made by "
                        f"{'train.py' if kind == CHECKPOINT_KIND else 'finetune.py'})")
    return checkpoint


def load_model_state(model, state_dict, path):
    """load_state_dict with a one-line error when the checkpoint's architecture differs from the model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UserError(f"checkpoint {path!r} does not match the model ({first}); "
                        "check --model, --patch-size, --image-size and --vae") from None


def compile_transformer_blocks(model):
    """torch.compile every transformer block in place (where nearly all the FLOPs are), not the whole model.

    The masking step turns the mask ratio, a Python float that changes at every step of a progressive schedule,
    into a token count; a compiled whole model would recompile at each new ratio (and give up after eight). The
    blocks only see tensors whose length varies, which dynamic shapes handle without recompiling.
    """
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(dynamic=True)
    return model


def build_model(config, projection):
    """The masked latent ViT described by a run config (dict with model, image_size, patch_size)."""
    grid = check_geometry(config["image_size"], projection.downsample, config["patch_size"])
    return MaskedLatentViT(config["model"], grid, config["patch_size"], projection.channels)


def layer_decay_groups(classifier, weight_decay, layer_decay):
    """Optimiser groups of a LatentClassifier with layer-wise lr decay; each group carries `lr_scale`.

    With n encoder blocks, the patch embedding and class token are layer 0, block k is layer k + 1, the final norm
    and the head are layer n + 1; layer i trains at lr * layer_decay ** (n + 1 - i), so the head gets the full lr
    and early layers, which hold the most general features, move least. Frozen parameters are skipped; no weight
    decay where skips_weight_decay says so.
    """
    top = len(classifier.encoder.blocks) + 1
    groups = {}
    for name, parameter in classifier.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = 0 if name.startswith(("encoder.patch_embed", "encoder.cls_token")) else top
        no_decay = skips_weight_decay(name, parameter)
        group = groups.setdefault((layer, no_decay), dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                                                          lr_scale=layer_decay ** (top - layer)))
        group["params"].append(parameter)
    return list(groups.values())


#################################################################################
#                                  9. Pictures                                  #
#################################################################################
# What a student looks at: reconstruction grids decoded back to pixels through the frozen VAE, and plots.
# Rendering only reads the model and draws its masks from its own generator, so a grid written in the middle of
# training changes neither the weights nor any random stream of the run (resume stays exact).

GRID_MASK_RATIO = 0.75   # grids mask as much as the held-out loss does, whatever the schedule is at


def grid_images(config, count=8):
    """The first `count` validation images of a run config, un-augmented: [count, 3, S, S] in [0, 1]."""
    source = load_image_source(config["dataset"], config["data_dir"], "val", config["image_size"],
                               config.get("synthetic_size", 5000))
    images = ImageDataset(source, config["image_size"])
    return torch.stack([images[i][0] for i in range(min(count, len(images)))])


def unnormalize_tokens(predictions, targets):
    """predictions [B, L, D] in per-token normalised units -> the units of targets [B, L, D].

    With normalised targets the model predicts only the pattern inside each token, not its mean or contrast; to
    draw it, MAE's visualisation borrows those two numbers from the true token. (So the picture flatters the model
    a little: the brightness of every masked patch is given away.)
    """
    mean = targets.mean(dim=-1, keepdim=True)
    std = (targets.var(dim=-1, keepdim=True) + 1e-6).sqrt()   # the same epsilon as masked_token_loss
    return predictions * std + mean


def token_mask_to_pixels(mask, grid, image_size):
    """mask [B, L] (1 = masked) on a grid x grid token layout -> pixel mask [B, 1, S, S].

    One token covers S / grid pixels per side: the latent patch times the VAE's downsampling factor.
    """
    cell = image_size // grid
    return mask.reshape(-1, 1, grid, grid).repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)


@torch.no_grad()
def reconstruction_rows(model, projection, images, normalize_targets=True, seed=0, mask_ratio=GRID_MASK_RATIO):
    """images [N, 3, S, S] in [0, 1] -> four rows, each [N, 3, S, S] in [0, 1], on the CPU:

        original | masked input (masked patches grey) | reconstruction | reconstruction, visible patches pasted back

    The mask comes from a fixed generator (the held-out loss's), so the grids of a run compare step to step.
    The paste happens on the latent tokens before decoding: the bottom row is the latent the model completes, as
    the VAE draws it (with --vae none the visible pixels are then exactly the original's).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = images.to(device)
    latents = projection.encode(images)
    generator = step_generator(seed, -1, device=device)
    _, predictions, mask = model(latents, mask_ratio, normalize_targets, generator=generator)
    model.train(was_training)
    targets = model.patchify(latents)
    predictions = unnormalize_tokens(predictions.float(), targets) if normalize_targets else predictions.float()
    masked = mask.unsqueeze(-1)                                           # [B, L, 1]
    pasted = targets * (1 - masked) + predictions * masked
    pixel_mask = token_mask_to_pixels(mask, model.grid, images.shape[-1])  # grey in pixels: clearer than in latents
    masked_input = images * (1 - pixel_mask) + 0.5 * pixel_mask
    rows = [images, masked_input, projection.decode(model.unpatchify(predictions)),
            projection.decode(model.unpatchify(pasted))]
    return [row.float().cpu() for row in rows]


def save_reconstruction_grid(model, projection, images, path, normalize_targets=True, seed=0,
                             mask_ratio=GRID_MASK_RATIO):
    """Write the four rows of `reconstruction_rows` as one PNG: 4 rows of N images, 2 px white padding.

    For N images of S px the PNG is (N*S + 2*(N+1)) wide and (4*S + 10) high.
    """
    from torchvision.utils import save_image
    rows = reconstruction_rows(model, projection, images, normalize_targets, seed, mask_ratio)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"               # never leave half a PNG behind
    save_image(torch.cat(rows), temporary, nrow=len(images), padding=2, pad_value=1.0, format="png")
    os.replace(temporary, path)
    return path


def read_metrics(path):
    """The records of a metrics.jsonl file (one JSON object per logged step), in order."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def plot_curves(metrics_path, path):
    """Two panels from OUT/metrics.jsonl: training loss against step, and the mask ratio against step."""
    from matplotlib.figure import Figure   # no pyplot: no global backend state, safe inside a training script
    records = read_metrics(metrics_path)
    steps = [record["step"] for record in records]
    figure = Figure(figsize=(9, 3.2), layout="constrained")
    loss_axes, ratio_axes = figure.subplots(1, 2)
    loss_axes.plot(steps, [record["loss"] for record in records])
    # The training loss is measured at the current ratio: under a progressive schedule the task gets harder as it
    # falls, so compare runs by the held-out loss at a fixed 0.75, not by this curve.
    loss_axes.set(xlabel="step", ylabel="masked-token loss", title="training loss (at the current mask ratio)")
    ratio_axes.plot(steps, [record["mask_ratio"] for record in records], color="tab:orange")
    ratio_axes.set(xlabel="step", ylabel="mask ratio", title="mask ratio", ylim=(0, 1))
    for axes in (loss_axes, ratio_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return path


def plot_schedules(path, start=0.15, end=0.75, mid=0.40, ramp=2 / 3, constant_ratio=0.75):
    """The four mask-ratio schedules of MaskSchedule over training progress 0..1, on one set of axes."""
    from matplotlib.figure import Figure
    progress = [i / 300 for i in range(301)]
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.subplots()
    for name, style in zip(SCHEDULERS, (":", "-", "--", "-")):
        schedule = MaskSchedule(name, start, end, mid, ramp, constant_ratio)
        axes.plot(progress, [schedule(p) for p in progress], style, label=name, linewidth=2)
    axes.axvline(ramp, color="grey", linewidth=0.8)
    axes.text(ramp + 0.01, 0.9, "end of the ramp", color="grey")
    axes.set(xlabel="training progress  t / T", ylabel="mask ratio", ylim=(0, 1), xlim=(0, 1),
             title="mask-ratio schedules")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=110)
    return path
