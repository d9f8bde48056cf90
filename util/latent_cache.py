"""The latent cache: every image (and its mirror image) encoded by the frozen VAE once, stored on disk."""

import os
import sys

import torch

from util.checkpoints import save_atomic
from util.datasets import ImageDataset, load_image_source
from util.vaes import fingerprint


def cache_file(data_dir, dataset, split, vae, image_size, count):
    """Where the latents of (dataset, split, VAE, image size) live: DATA_DIR/lmd_latents/<name>.pt."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in vae.strip("/"))[-60:]
    return os.path.join(data_dir, "lmd_latents", f"{dataset}-{split}{count}-{slug}-{image_size}px.pt")


def cache_provenance(dataset, split, projection, image_size, source):
    """What a cache must match to be reused: the images (source.provenance: a version and split seed, or a
    folder's file list), the VAE (its weights' fingerprint) and the geometry."""
    return dict(dataset=dataset, split=split, vae=projection.name, vae_fingerprint=fingerprint(projection),
                image_size=image_size, scaling_factor=projection.scaling_factor, dtype="float16", count=len(source),
                data=source.provenance)


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
    provenance = cache_provenance(config["dataset"], split, projection, config["image_size"], source)
    build = lambda: encode_dataset(ImageDataset(source, config["image_size"]), projection, dist.device,  # noqa: E731
                                   description=f"encoding {config['dataset']} {split} latents")
    if dist.is_main:
        load_or_build_cache(path, provenance, build)
    dist.barrier()
    return load_or_build_cache(path, provenance, build)


def _provenance_difference(cache, provenance):
    old = cache.get("provenance") or {}
    return ", ".join(f"{k}: {old.get(k)!r} != {v!r}" for k, v in provenance.items() if old.get(k) != v)
