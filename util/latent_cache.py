"""The latent cache: every image (and its mirror image) encoded once by the frozen VAE, kept in DATA_DIR/lmd_latents/
as an index NAME.pt (provenance, shape, class names; written last, atomically: a cache is used only once its index
exists) and raw, preallocated files in NAME.parts/:

    latents.f16   latents [N, 2, C, h, w] float16 (chunk k at byte k x CHUNK x an image's bytes), memory-mapped
    labels.i64    labels [N] int64
    done.u8       one byte per chunk of CHUNK images: 1 once its latents and labels are on disk
    build.pt      the settings these files are being built with

Each torchrun process encodes its share of the chunks (chunk k on rank k % world_size) and writes them in place,
holding one chunk in memory. A killed build keeps its finished chunks: the same command, with any number of
processes, encodes only the rest. Rank 0 checks a complete cache against the images; the others open it without."""

import math
import os
import pathlib
import shutil
import sys

import torch

from util.checkpoints import save_atomic
from util.datasets import ImageDataset, SyntheticShapes, load_image_source
from util import devices
from util.devices import ignore_stop_signals, loader_workers
from util.vaes import encode_images, encoding_name, fingerprint, vae_name

CHUNK = 1024         # images per chunk: the unit of work, of resuming, and of what a process holds in memory
ENCODE_BATCH = 32    # images per VAE call while building, unless the config says (--encode-batch-size)


def cache_file(data_dir, dataset, split, vae, image_size, count=None):
    """The index of (dataset, split, VAE, image size): DATA_DIR/lmd_latents/<name>.pt. `count` is in the name only
    where it is a setting (the synthetic set's size): elsewhere naming it would mean counting the images."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in vae_name(vae).strip("/"))[-60:]
    return os.path.join(data_dir, "lmd_latents", f"{dataset}-{split}{count or ''}-{slug}-{image_size}px.pt")


def cache_provenance(dataset, split, projection, image_size, source=None, autocast=None):
    """What a cache must match: the VAE's fingerprint, the geometry, the precision (`autocast`) and, given the images
    (`source`), their count and provenance; without them a complete cache is taken as it is."""
    record = dict(dataset=dataset, split=split, vae=vae_name(projection.name), vae_fingerprint=fingerprint(projection),
                  image_size=image_size, scaling_factor=projection.scaling_factor, dtype="float16",
                  encoding=encoding_name(projection, autocast))
    if source is not None:
        record.update(count=len(source), data=getattr(source, "provenance", None))
    return record


def open_cache(path, expected, announce=True):
    """The complete cache at `path` if its provenance has every entry of `expected`, else None (saying why):
    dict(latents [N, 2, C, h, w] fp16, labels [N] int64, provenance, classes), memory-mapped."""
    if not os.path.exists(path):
        return None
    try:
        index = torch.load(path, map_location="cpu", weights_only=True)
        saved = index["provenance"]
        different = ", ".join(f"{k}: {saved.get(k)!r} != {v!r}" for k, v in expected.items() if saved.get(k) != v)
        cache = None if different else _open_parts(_parts(path), index)
    except Exception:   # a truncated index, missing or short parts, or a cache in an older layout
        cache, different = None, ""
    if cache is None and announce:
        why = f"was made with other settings ({different})" if different else "is unreadable"
        print(f"latent cache {path} {why}; rebuilding it", file=sys.stderr)
    return cache


def build_cache(path, provenance, images, projection, dist, workers=0, description="encoding latents",
                autocast=None, encode_batch_size=None):
    """Encode `images` (an ImageDataset) into the cache at `path`: all ranks call it; a killed build is resumed."""
    parts, count = _parts(path), len(images)
    grid = images.image_size // projection.downsample
    shape = (count, 2, projection.channels, grid, grid)
    if dist.is_main:
        if os.path.exists(path):
            os.remove(path)   # a stale index: the cache is incomplete until this build ends
        _start_or_resume(parts, dict(provenance=provenance, shape=shape, chunk=CHUNK))
    dist.barrier()
    done = pathlib.Path(parts, "done.u8").read_bytes()
    mine = [chunk for chunk in range(dist.rank, len(done), dist.world_size) if not done[chunk]]
    image_bytes = math.prod(shape[1:]) * 2
    encode = lambda batch: encode_images(projection, batch, autocast, encode_batch_size)  # noqa: E731
    for chunk, latents, labels in _encode_chunks(images, mine, encode, encode_batch_size or ENCODE_BATCH, dist,
                                                 workers, description):
        if latents.shape[1:] != shape[1:]:
            raise RuntimeError(f"the VAE gave latents of shape {list(latents.shape[1:])}, not {list(shape[1:])}")
        _write_at(os.path.join(parts, "latents.f16"), chunk * CHUNK * image_bytes, latents)
        _write_at(os.path.join(parts, "labels.i64"), chunk * CHUNK * 8, labels.long())
        _write_at(os.path.join(parts, "done.u8"), chunk, torch.ones(1, dtype=torch.uint8))   # last: now it counts
    dist.barrier()   # every rank's chunks are on disk
    if dist.is_main:
        missing = pathlib.Path(parts, "done.u8").read_bytes().count(0)
        if missing:
            raise RuntimeError(f"{missing} chunks of {parts} were not written; run again to finish the build")
        save_atomic(dict(provenance=provenance, shape=shape, classes=list(images.classes)), path)
    dist.barrier()


def dataset_latents(config, split, projection, dist, source=None):
    """The cached latents of one split for a run config, built first (as --no-cache encodes) if none matches: as
    open_cache. Rank 0 checks the cache against the images; the others take its word and open it without them (a
    folder of a million files is listed once, not once per rank), unless they build."""
    path = cache_file(config["data_dir"], config["dataset"], split, config["vae"], config["image_size"],
                      _named_count(config, split))
    autocast = devices.autocast_dtype(config.get("precision", "auto"), dist.device)

    def load():
        return source if source is not None else load_image_source(
            config["dataset"], config["data_dir"], split, config["image_size"], config.get("synthetic_size", 5000))

    def check():   # rank 0 against the images, which it loads (or downloads) first; the others need none
        images = load() if dist.is_main else source
        provenance = cache_provenance(config["dataset"], split, projection, config["image_size"], images, autocast)
        return images, open_cache(path, provenance, announce=dist.is_main)
    images, cache = dist.main_first(check)
    if not dist.any(cache is None):
        return cache
    images = images if images is not None else load()   # to build, every rank needs them
    provenance = cache_provenance(config["dataset"], split, projection, config["image_size"], images, autocast)
    build_cache(path, provenance, ImageDataset(images, config["image_size"]), projection, dist,
                loader_workers(config.get("num_workers")), f"encoding {config['dataset']} {split} latents",
                autocast, config.get("encode_batch_size"))
    return open_cache(path, provenance, announce=dist.is_main)


def _named_count(config, split):
    """The synthetic set's size, which names its cache (it is a setting); None for every other dataset."""
    if config["dataset"] != "synthetic":
        return None
    return len(SyntheticShapes(split, config["image_size"], config.get("synthetic_size", 5000)))


def _parts(path):
    return os.path.splitext(path)[0] + ".parts"


def _open_parts(parts, index):
    shape = tuple(index["shape"])
    return dict(latents=_mapped(os.path.join(parts, "latents.f16"), shape, torch.float16),
                labels=_mapped(os.path.join(parts, "labels.i64"), shape[:1], torch.int64),
                provenance=index["provenance"], classes=index.get("classes"))


def _mapped(path, shape, dtype):
    """A read-only view of a raw file as a tensor of `shape`: memory-mapped (copy-on-write), nothing read yet."""
    return torch.from_file(path, shared=False, size=math.prod(shape), dtype=dtype).view(shape)


def _start_or_resume(parts, record):
    """Rank 0: keep an unfinished build's files if its settings match, else preallocate empty ones for every rank."""
    record_path = os.path.join(parts, "build.pt")
    try:
        if torch.load(record_path, weights_only=True) == record:
            done = pathlib.Path(parts, "done.u8").read_bytes()
            print(f"resuming the unfinished latent cache build in {parts}: {sum(done)} of {len(done)} chunks "
                  "were done", file=sys.stderr)
            return
    except Exception:   # no build there, or an unreadable record: start afresh
        pass
    shutil.rmtree(parts, ignore_errors=True)
    os.makedirs(parts)
    count, image_elements = record["shape"][0], math.prod(record["shape"][1:])
    for name, size in (("latents.f16", count * image_elements * 2), ("labels.i64", count * 8),
                       ("done.u8", math.ceil(count / CHUNK))):
        with open(os.path.join(parts, name), "wb") as file:
            file.truncate(size)   # a sparse file of zeros: no disk is written until the chunks are
    save_atomic(record, record_path)   # last: these files belong to this build


@torch.no_grad()
def _encode_chunks(images, chunks, encode, batch_size, dist, workers, description):
    """For each chunk in `chunks`: (chunk, latents [n, 2, C, h, w] fp16 CPU, labels [n]), encoded by `encode`.
    Both flips are kept: the VAE is not flip-equivariant, and caching one random flip would freeze the augmentation."""
    from tqdm import tqdm
    ranges = {chunk: range(chunk * CHUNK, min((chunk + 1) * CHUNK, len(images))) for chunk in chunks}
    batches = [(chunk, list(indices[start:start + batch_size]))
               for chunk, indices in ranges.items() for start in range(0, len(indices), batch_size)]
    if not batches:
        return
    loader = torch.utils.data.DataLoader(images, batch_sampler=[indices for _, indices in batches],
                                         num_workers=workers, pin_memory=dist.device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals)
    latents, labels = [], []
    for (chunk, indices), (batch, label) in tqdm(zip(batches, loader), total=len(batches), desc=description,
                                                 unit="batch", disable=not dist.is_main, dynamic_ncols=True):
        batch = batch.to(dist.device, non_blocking=True)
        latents.append(torch.stack([encode(batch), encode(batch.flip(-1))], dim=1).half().cpu())
        labels.append(torch.as_tensor(label))
        if indices[-1] == ranges[chunk][-1]:   # the chunk's last batch
            yield chunk, torch.cat(latents), torch.cat(labels)
            latents, labels = [], []


def _write_at(path, offset, tensor):
    """Write the bytes of `tensor` at byte `offset` of the file `path`, and return once they are on disk."""
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(tensor.contiguous().numpy().tobytes())
        file.flush()
        os.fsync(file.fileno())


class Split:
    """One split as classifier inputs [B, C, h, w] and labels [B] on the device, for indices and flips: the cached
    VAE latents (only rank 0 opens the images, to check the cache), or (--vae none) images loaded on the fly."""

    def __init__(self, config, split, projection, dist):
        self.config, self.split, self.projection, self.device = config, split, projection, dist.device
        self.latents, self._images = None, None
        if projection.is_pixels:
            self._images = ImageDataset(dist.main_first(self._source), config["image_size"])
            self.classes, self.count = self._images.classes, len(self._images)
        else:   # encoded once; the cache holds every image and its mirror image
            cache = dataset_latents(config, split, projection, dist)
            self.latents, self.labels, self.classes = cache["latents"], cache["labels"], cache["classes"]
            self.count = len(self.labels)
        self.workers = loader_workers(config["num_workers"])

    def _source(self):
        c = self.config
        return load_image_source(c["dataset"], c["data_dir"], self.split, c["image_size"], c["synthetic_size"])

    @property
    def images(self):
        """The un-augmented images [3, S, S] (for pictures and throughput), opened on first use."""
        if self._images is None:
            self._images = ImageDataset(self._source(), self.config["image_size"])
        return self._images

    def __len__(self):
        return self.count

    def batches(self, index_batches, flip_batches):
        """For each (indices [B], flips [B], 1 = mirrored) -> (inputs [B, C, h, w] float, labels [B])."""
        if self.latents is not None:
            for indices, flips in zip(index_batches, flip_batches):
                yield self.latents[indices, flips].to(self.device).float(), self.labels[indices].to(self.device)
            return
        loader = torch.utils.data.DataLoader(self.images, batch_sampler=[i.tolist() for i in index_batches],
                                             num_workers=self.workers, worker_init_fn=ignore_stop_signals)
        for (images, labels), flips in zip(loader, flip_batches):
            images = images.to(self.device)
            images = torch.where(flips.to(self.device).bool().view(-1, 1, 1, 1), images.flip(-1), images)
            yield self.projection.encode(images), labels.to(self.device)
