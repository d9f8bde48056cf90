"""The frozen VAE for the scripts: lmd.LatentProjection from a --vae value, errors that say what to do, a fast
offline check, provenance, fingerprint, and encoding a batch in bounded memory."""

import hashlib
import json
import os
import socket
import sys
import warnings

import torch

import lmd
from util.cli import UserError

# diffusers passes this deprecated argument to huggingface_hub on every download; the warning is not the user's.
warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
OFFLINE_WAY_OUT = ("run on real images with no download at all: --dataset digits --vae none (pixels) or --vae DIR "
                   "(a VAE made by tools/train_vae.py); or the smoke test --dataset synthetic --vae tiny")
ENCODE_CHUNK = 32   # images per VAE call by default (--encode-batch-size; see encode_images)


def tiny_vae():
    """A small, seeded, untrained AutoencoderKL in the SD layout (4 channels, downsampling 8): smoke tests."""
    from diffusers import AutoencoderKL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             latent_channels=4, mid_block_add_attention=False)


def vae_class(name_or_path):
    """AutoencoderTiny for TAESD-style checkpoints (by config when local, by name otherwise), else AutoencoderKL."""
    from diffusers import AutoencoderKL, AutoencoderTiny
    if os.path.isfile(config_path := os.path.join(name_or_path, "config.json")):
        with open(config_path) as file:
            return AutoencoderTiny if json.load(file).get("_class_name") == "AutoencoderTiny" else AutoencoderKL
    return AutoencoderTiny if "taesd" in name_or_path.lower() else AutoencoderKL


def load_projection(vae, device="cpu", dtype=torch.float32, local_files_only=False):
    """`none` (pixels: the MAE baseline), `tiny` (untrained, for tests), a save_pretrained directory or a Hub id."""
    if vae == "none":
        return lmd.LatentProjection().to(device)
    if vae == "tiny":
        return lmd.LatentProjection(tiny_vae(), "tiny", trained=False).to(device, dtype)
    model = vae_class(vae).from_pretrained(vae, local_files_only=local_files_only, low_cpu_mem_usage=False)
    return lmd.LatentProjection(model, vae).to(device, dtype)


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


def first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def open_projection(vae, device="cpu", dtype=torch.float32, announce=True):
    """load_projection for a `--vae` value: one-line errors, the local Hub cache first, `.provenance` attached."""
    if vae == "tiny" and announce:
        print("note: --vae tiny is a randomly initialised, UNTRAINED VAE for smoke tests; "
              "its latents carry no meaning.", file=sys.stderr)
    # Loading draws nothing from torch's global generator (diffusers 0.30 to 0.32 initialise every weight at
    # random before reading the file): train.py seeds it first, and a run's random init must not depend on the VAE.
    with torch.random.fork_rng(devices=[]):
        projection = _load(vae, device, dtype)
    projection.name = vae_name(vae)   # what the latent cache is named and checked by
    projection.provenance = vae_provenance(vae)
    return projection


def _load(vae, device, dtype):
    if vae in ("none", "tiny"):
        return load_projection(vae, device, dtype)
    if os.path.isdir(vae):
        try:
            return load_projection(vae, device, dtype)
        except Exception as error:
            raise UserError(f"could not load a VAE from directory {vae!r} ({first_line(error)}); it should hold "
                            "config.json and the weights written by save_pretrained") from None
    if vae.startswith(("/", ".", "~")) or vae.count("/") > 1 or os.path.exists(vae):
        raise UserError(f"--vae {vae!r}: no such directory. Give a Hub id (e.g. {DEFAULT_VAE}), a local "
                        "directory made by save_pretrained or tools/train_vae.py, or 'none' (pixels)")
    return _from_hub(vae, device, dtype)


def vae_name(vae):
    """The name a `--vae` value is recorded and cached under: a Hub id, 'tiny' or 'none' as given; a directory's real
    path (`VAE`, `./VAE` and a link to it are one VAE with one cache, found from any working directory)."""
    if vae in ("none", "tiny") or not os.path.isdir(vae):
        return vae
    return os.path.realpath(vae)


def _from_hub(vae, device, dtype):
    try:  # the local Hub cache first: it needs no network
        return load_projection(vae, device, dtype, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        raise UserError(f"could not download the VAE {vae!r}: the Hugging Face Hub is unreachable (offline?). "
                        f"Pass a local directory with --vae DIR (made by save_pretrained), or {OFFLINE_WAY_OUT}")
    try:
        return load_projection(vae, device, dtype)
    except Exception as error:
        raise UserError(f"could not load the VAE {vae!r} from the Hub ({first_line(error)}); check the id or "
                        "pass a local directory") from None


@torch.no_grad()
def encode_images(projection, images, autocast=None, chunk_size=None):
    """images [B, 3, H, W] in [0, 1], on the device -> latents [B, C, H/f, W/f] fp32: the one encode path (cache,
    --no-cache, held-out loss, bench.py), so their latents agree. `chunk_size` images per VAE call (ENCODE_CHUNK):
    an SD VAE encode of 256 images at 224 px needs tens of GB. `autocast`: devices.autocast_dtype's."""
    if projection.is_pixels:
        return projection.encode(images)
    with torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
        return torch.cat([projection.encode(chunk) for chunk in images.split(chunk_size or ENCODE_CHUNK)])


def encoding_name(projection, autocast):
    """How latents were encoded, for a cache's provenance: 'bf16' (bf16 autocast) or 'fp32' (and pixels: 'fp32')."""
    return "bf16" if autocast is not None and not projection.is_pixels else "fp32"


def vae_provenance(vae):
    """Where a VAE came from: {'vae': ..., 'trained': bool, ...} plus tools/train_vae.py's training.json if any."""
    if vae == "none":
        return dict(vae="none", trained=None)
    if vae == "tiny":
        return dict(vae="tiny", trained=False)
    record = dict(vae=os.path.abspath(vae) if os.path.isdir(vae) else vae, trained=True)
    report = os.path.join(vae, "training.json") if os.path.isdir(vae) else None
    if report and os.path.isfile(report):
        with open(report) as file:
            trained_here = json.load(file)
        record.update(trained_by="tools/train_vae.py", **{k: trained_here.get(k) for k in
                      ("dataset", "data_dir", "image_size", "steps", "seed", "val_psnr_db", "seconds")})
    return record


def fingerprint(projection):
    """A short hash of what makes the latents (so a cache tells VAEs apart): the VAE's config and every tensor of its
    encoder and `quant_conv` (the 1x1 conv after an AutoencoderKL's encoder); not the decoder, which makes none."""
    if projection.vae is None:
        return "pixels"
    # No private keys: diffusers' `_use_default_values` comes from a set, in an order that changes between processes.
    config = {key: value for key, value in projection.vae.config.items() if not key.startswith("_")}
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
    for part in ("encoder", "quant_conv"):   # AutoencoderTiny has no quant_conv; some AutoencoderKLs have None
        module = getattr(projection.vae, part, None)
        for name, tensor in (module.state_dict().items() if module is not None else ()):
            digest.update(f"{part}.{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
