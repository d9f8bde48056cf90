"""The offline judge of generated images: FID and KID on the features of a small classifier of the real data.

No Inception weights can be downloaded here, so FID as published cannot be computed. The same statistics work
with any fixed feature extractor (REFERENCE.md section 9): a small CNN is trained once per dataset and image size
on the real training split, and its penultimate features (128 values) replace Inception's pool features.

    result = judge.evaluate_generation(samples, config, device)   # samples [N, 3, H, W] in [0, 1] -> JSON-able dict

Every number comes with its calibration from the same judge, against the same real validation split, each
reference made of N images as the samples are (FD's bias depends on N; see references):
- floor:   N real training images (what a perfect generator would score);
- ceiling: the floor's N training images blurred (Gaussian, sigma 2 px at 32 px): floor and ceiling differ by
  the blur alone, so their gap is the blur's distance with the same N-dependent bias on both sides;
- fd_normalised = (fd - floor) / (ceiling - floor): 0 is real data, 1 is "as far from the data as blurred images";
- vae_roundtrip (latent runs only): the floor's N training images encoded and decoded by the run's VAE, the best
  a generator of its latents can reach;
- noise:   uniform noise against real, a second reference. It is NOT a useful ceiling: almost anything is far
  closer to the data than noise, so scores against it all look good;
- the judge's predicted-class histogram of the samples: all classes present, none dominating.

The judge lives in DATA_DIR/lmd_judges/<dataset>-<size>px-<device>-torch<v>-torchmetrics<v>.pt with its provenance
(dataset, image size, the splits' provenance, the training settings, the device and the library versions), its
validation accuracy and the reference statistics; it is retrained when any of them changes. The digits'
validation split has only 360 images, so its FD is a few-hundred-image estimate: compare numbers measured with
the same number of samples. lab/docs/generation.md has the measured references on digits.
"""

import contextlib
import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.checkpoints import save_atomic
from util.cli import UserError
from util.datasets import DEFAULT_IMAGE_SIZE, ImageDataset, load_image_source

# ----------------------------------------------------------------------------------------------------------------
JUDGE_VERSION = 3        # bumped whenever the judge's architecture, training or statistics change: every cache rebuilds
JUDGE_SIZE = 32          # the judge reads every image resized to 32 x 32 (CIFAR's own size; digits are 8 x 8 inside)
# The judge's training and its statistics (KID's subset count: torchmetrics' default); all part of its provenance.
SETTINGS = dict(epochs=20, batch_size=64, lr=3e-3, weight_decay=1e-4, shift=2, width=16, features=128, seed=0,
                kid_subsets=100)
# Per dataset, where SETTINGS do not fit: Fashion-MNIST's 60,000 training images give 40x the digits' steps per
# epoch; 10 epochs reach 92.1% (4: 90.6%) in 3.5 minutes on one busy CPU thread (lab/docs/generation.md). MNIST is
# as large and easier (not measured here: no MNIST files on this machine).
DATASET_SETTINGS = {"fashion-mnist": dict(epochs=10), "mnist": dict(epochs=10)}
BLUR_SIGMA_AT_32 = 2.0   # the ceiling's Gaussian blur, in pixels at 32 px; scaled with the image size
KID_MAX_SUBSET = 1000    # torchmetrics' default subset size; it shrinks to the smaller set (see compare)
PRESENT_FRACTION = 0.01  # a class is "present" among the samples when the judge gives it at least 1% of them
BATCH = 256              # images per judge call when extracting features
CPU_THREADS = 1          # see one_thread


class JudgeNet(nn.Module):
    """A small CNN: images [B, 3, S, S] in [0, 1] -> logits [B, classes]; features() -> [B, features].

    Three stride-2 convolutions (32 -> 16 -> 8 -> 4 px) and a hidden layer: the hidden layer's activations are the
    penultimate features that the Frechet distance and KID compare. Strided convolutions rather than pooling:
    on a small busy CPU they cost half as much, and digits reach 99% either way.
    """

    def __init__(self, num_classes, width=16, features=128):
        super().__init__()

        def down(i, o):
            return [nn.Conv2d(i, o, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        grid = JUDGE_SIZE // 8
        self.body = nn.Sequential(*down(3, width), *down(width, 2 * width), *down(2 * width, 4 * width),
                                  nn.Flatten(), nn.Linear(4 * width * grid * grid, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)
        self.num_features = features   # read by torchmetrics instead of running a dummy image through

    def features(self, images):
        """images [B, 3, H, W] in [0, 1], any H = W -> penultimate features [B, features]."""
        return self.body(to_judge_size(images) - 0.5)

    def forward(self, images):
        return self.head(self.features(images))


class FeatureExtractor(nn.Module):
    """The judge's features in the shape torchmetrics asks of a custom extractor: frozen, batched, no gradients."""

    def __init__(self, net):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.num_features = net.num_features

    @torch.no_grad()
    def forward(self, images):
        return torch.cat([self.net.features(chunk) for chunk in images.split(BATCH)])


def to_judge_size(images):
    """[B, 3, H, W] -> [B, 3, 32, 32], antialiased when shrinking (a 128 px CIFAR image is its 32 px original)."""
    if images.shape[-2:] == (JUDGE_SIZE, JUDGE_SIZE):
        return images
    return F.interpolate(images, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", antialias=True, align_corners=False)


def blur(images, image_size):
    """The ceiling's degradation: a Gaussian blur of sigma 2 px at 32 px, scaled with the image size."""
    from torchvision.transforms.functional import gaussian_blur
    sigma = BLUR_SIGMA_AT_32 * image_size / 32
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(images, [kernel, kernel], [sigma, sigma])


@contextlib.contextmanager
def one_thread(device):
    """On the CPU the judge trains and measures on CPU_THREADS thread(s), then restores the caller's setting.

    Why: its batches are small (64 images of 32 px), so a second thread gains little on an idle machine, while on
    a busy one threads that wait on each other made training 10x slower (340 s against 21 s for digits, measured
    on a shared, busy 2-core CPU); and with a fixed thread count the cached judge is the same bits whatever thread
    setting the caller runs with.
    """
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------
# The real images, the judge's training and its cache.

def image_size_of(config):
    return config.get("image_size") or DEFAULT_IMAGE_SIZE[config["dataset"]]


def runtime(device):
    """What else sets a judge's bits and numbers: the device (a GPU by its name: kernels differ between models) and
    the versions of torch (training) and torchmetrics (the statistics). Part of the provenance."""
    import torchmetrics
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    # str(): torch's version is a TorchVersion, which torch.load(weights_only=True) refuses to read back.
    return dict(device=name, torch=str(torch.__version__), torchmetrics=str(torchmetrics.__version__))


def judge_file(config, device):
    """DATA_DIR/lmd_judges/<dataset>[<synthetic size>]-<image size>px-<device type>-torch<v>-torchmetrics<v>.pt:
    one file per device type and library versions, so two environments sharing a data directory (a CPU and a GPU
    machine, two venvs) each keep their judge instead of retraining over each other's."""
    count = config.get("synthetic_size", 5000) if config["dataset"] == "synthetic" else ""
    versions = runtime(torch.device("cpu"))   # the versions alone: no GPU query for a file name
    name = (f"{config['dataset']}{count}-{image_size_of(config)}px-{torch.device(device).type}"
            f"-torch{versions['torch']}-torchmetrics{versions['torchmetrics']}.pt")
    return os.path.join(config["data_dir"], "lmd_judges", name)


def open_source(config, split):
    """The raw split of `config` (util.datasets.load_image_source): its provenance, without reading the images."""
    return load_image_source(config["dataset"], config["data_dir"], split, image_size_of(config),
                             config.get("synthetic_size", 5000))


def load_split(config, source, indices=None, view=None):
    """A whole split (or its images at `indices`), un-augmented, at the judge's size: dict(images [N, 3, 32, 32]
    in [0, 1], labels [N], classes). `view` (images [B, 3, S, S] at the image size -> the same shape) degrades
    each batch at the image size before it is resized (the blur, the VAE round trip), batch by batch so that a
    large split at a large size is never held in memory at full size."""
    images = ImageDataset(source, image_size_of(config))
    if indices is not None:
        images = torch.utils.data.Subset(images, indices.tolist())
    loader = torch.utils.data.DataLoader(images, batch_size=BATCH)
    images, labels = [], []
    for batch, label in loader:
        images.append(to_judge_size(view(batch) if view is not None else batch))
        labels.append(torch.as_tensor(label))
    return dict(images=torch.cat(images), labels=torch.cat(labels).long(), classes=list(source.classes))


def shift(images, pixels, generator):
    """Random translation of each image by up to `pixels` (sub-pixel, zero fill): the judge's only augmentation."""
    count = len(images)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = (torch.rand(count, 2, generator=generator) * 2 - 1) * pixels * 2 / images.shape[-1]
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def train_judge(train, val, settings, device):
    """Train a JudgeNet on train['images'] -> (net in eval mode, validation accuracy). Seeded and deterministic:
    the initial weights, the batch order and the shifts all come from settings['seed']."""
    from tqdm import tqdm
    generator = torch.Generator().manual_seed(settings["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        net = JudgeNet(len(train["classes"]), settings["width"], settings["features"]).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    batch_size = min(settings["batch_size"], len(train["images"]))
    steps_per_epoch = len(train["images"]) // batch_size
    total = settings["epochs"] * steps_per_epoch
    # One cycle (warm-up, then annealing): a few epochs go a long way with it.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings["lr"], total_steps=total)
    net.train()
    progress = tqdm(total=total, desc="training the judge", unit="step", dynamic_ncols=True)
    for _ in range(settings["epochs"]):
        order = torch.randperm(len(train["images"]), generator=generator)
        for position in range(steps_per_epoch):
            chosen = order[position * batch_size:(position + 1) * batch_size]
            images = shift(train["images"][chosen], settings["shift"], generator).to(device)
            loss = F.cross_entropy(net(images), train["labels"][chosen].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    progress.close()
    net.eval()
    return net, accuracy(net, val["images"], val["labels"], device)


@torch.no_grad()
def accuracy(net, images, labels, device):
    predictions = torch.cat([net(chunk.to(device)).argmax(dim=1).cpu() for chunk in images.split(BATCH)])
    return (predictions == labels).float().mean().item()


class Judge:
    """A trained judge with its record: net (JudgeNet, eval), record (what the cache file holds: provenance,
    val_accuracy, references, ...), val (the validation split, load_split), path, trained (True when trained by
    this call rather than read from the cache)."""

    def __init__(self, net, record, val, path, trained, config):
        self.net, self.record, self.val, self.path, self.trained = net, record, val, path, trained
        self.config = config

    def save(self):
        save_atomic(dict(self.record, state_dict=self.net.state_dict()), self.path)


def judge_provenance(config, train_provenance, val_provenance, settings, device):
    """What a cached judge must match to be used: the method's version, the data, the training settings, the
    device and the library versions (runtime)."""
    return dict(version=JUDGE_VERSION, dataset=config["dataset"], image_size=image_size_of(config),
                judge_size=JUDGE_SIZE, blur_sigma_at_32=BLUR_SIGMA_AT_32, train=train_provenance, val=val_provenance,
                settings=settings, **runtime(device))


def open_judge(path, provenance, device):
    """The cached record and net at `path` if its provenance is `provenance`, else None (saying why)."""
    if not os.path.exists(path):
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        saved = record["provenance"]
        different = ", ".join(f"{k}: {saved.get(k)!r} != {v!r}" for k, v in provenance.items() if saved.get(k) != v)
        if not different:
            net = JudgeNet(len(record["classes"]), provenance["settings"]["width"], provenance["settings"]["features"])
            net.load_state_dict(record.pop("state_dict"))
            return record, net.to(device).eval()
    except Exception:   # a truncated file, or one from an older layout
        different = ""
    why = f"was made with other settings ({different})" if different else "is unreadable"
    print(f"judge {path} {why}; retraining it", file=sys.stderr)
    return None


def load_judge(config, device, settings=None):
    """The judge of `config`'s dataset and image size, from its cache, or trained and cached now.
    settings: overrides of SETTINGS and of the dataset's DATASET_SETTINGS (part of the provenance). -> Judge."""
    device = torch.device(device)
    settings = {**SETTINGS, **DATASET_SETTINGS.get(config["dataset"], {}), **(settings or {})}
    with one_thread(device):
        return _load_judge(config, device, settings)


def _load_judge(config, device, settings):
    path = judge_file(config, device)
    train_source, val_source = open_source(config, "train"), open_source(config, "val")
    provenance = judge_provenance(config, train_source.provenance, val_source.provenance, settings, device)
    cached = open_judge(path, provenance, device)
    if cached is not None:
        record, net = cached
        return Judge(net, record, load_split(config, val_source), path, False, config)
    val, train = load_split(config, val_source), load_split(config, train_source)
    print(f"training the judge of {config['dataset']} at {image_size_of(config)} px on {len(train['images'])} "
          f"images; cached in {path}", file=sys.stderr)
    start = time.perf_counter()
    net, val_accuracy = train_judge(train, val, settings, device)
    record = dict(provenance=provenance, classes=val["classes"], val_accuracy=val_accuracy,
                  train_images=len(train["images"]), val_images=len(val["images"]),
                  train_seconds=round(time.perf_counter() - start, 1), trained_on=str(device), references={})
    judge = Judge(net, record, val, path, True, config)
    judge.save()
    return judge


# ----------------------------------------------------------------------------------------------------------------
# The statistics.

def compare(judge, images):
    """FD and KID of `images` [N, 3, H, W] in [0, 1] against the real validation split, on the judge's features.

    torchmetrics computes both, with the judge as the custom feature extractor; it fits with two settings:
    - the inputs stay float in [0, 1] (`normalize=True`: a custom extractor gets them unchanged, no uint8 step);
    - KID's subset size defaults to 1000, more than the digits' 360 validation images, and torchmetrics refuses
      a subset larger than either set: the subset is min(1000, N, validation images). With 360 validation images
      every subset holds all of them, so kid_std measures only the resampling of the samples.
    KID draws its subsets from torch's global generator: it runs under a fixed seed, so the same images give the
    same numbers. -> dict(fd, kid_mean, kid_std, images, reference_images, kid_subset_size).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    device = next(judge.net.parameters()).device
    settings = judge.record["provenance"]["settings"]
    real = judge.val["images"]
    subset = min(KID_MAX_SUBSET, len(images), len(real))
    if subset < 2:
        raise UserError(f"the judge needs at least 2 images on each side, got {len(images)} samples and "
                        f"{len(real)} validation images; generate more images")
    extractor = FeatureExtractor(judge.net)
    with warnings.catch_warnings():   # KID warns that it keeps every feature: a few hundred 128-value rows here
        warnings.simplefilter("ignore", UserWarning)
        fid = FrechetInceptionDistance(feature=extractor, normalize=True).to(device)
        kid = KernelInceptionDistance(feature=extractor, subsets=settings["kid_subsets"], subset_size=subset,
                                      normalize=True).to(device)
    for metric in (fid, kid):
        for chunk in real.split(BATCH):
            metric.update(chunk.to(device), real=True)
        for chunk in images.split(BATCH):
            metric.update(chunk.to(device).float().clamp(0, 1), real=False)
    with torch.random.fork_rng(devices=[]):   # torchmetrics draws the subsets on the CPU
        torch.manual_seed(settings["seed"])
        kid_mean, kid_std = kid.compute()
    return dict(fd=round(fid.compute().item(), 4), kid_mean=round(kid_mean.item(), 6), kid_std=round(kid_std.item(), 6),
                images=len(images), reference_images=len(real), kid_subset_size=subset)


def floor_indices(judge, count):
    """Which `count` training images the references are made of: a seeded random subset (all when fewer). -> [n]"""
    train = open_source(judge.config, "train")
    generator = torch.Generator().manual_seed(judge.record["provenance"]["settings"]["seed"])
    return torch.randperm(len(train), generator=generator)[:count]


def reference_images(judge, count):
    """The references' images for `count` samples, each [n, 3, 32, 32] in [0, 1]:
    - floor: `count` real training images (floor_indices; all of them when the split has fewer);
    - ceiling: the same training images, blurred at the image size (BLUR_SIGMA_AT_32, scaled);
    - noise: `count` images of uniform noise in [0, 1] (each pixel and channel) at the image size.

    The ceiling is the floor's own images blurred, not the validation images blurred against themselves: the
    floor and the samples carry FD's bias for N images against the validation set, and the old ceiling carried
    another (the same images on both sides), so its gap to the floor mixed the blur with a difference of biases.
    Now the two differ by the blur alone (on digits at N = 500 the old gap was 2% wider; lab/docs/generation.md).
    """
    config, size = judge.config, image_size_of(judge.config)
    train, indices = open_source(config, "train"), floor_indices(judge, count)
    # The noise from a stream of its own: it does not depend on the training split's size.
    generator = torch.Generator().manual_seed(judge.record["provenance"]["settings"]["seed"] + 1)
    return dict(floor=load_split(config, train, indices)["images"],
                ceiling=load_split(config, train, indices, view=lambda images: blur(images, size))["images"],
                noise=torch.rand(count, 3, size, size, generator=generator))


def measure_references(judge, count):
    """compare() of each of reference_images(judge, count) -> dict(floor=..., ceiling=..., noise=...)."""
    return {name: compare(judge, images) for name, images in reference_images(judge, count).items()}


def references(judge, count):
    """measure_references for `count` samples, cached in the judge's file after the first call."""
    key = str(count)
    if key not in judge.record["references"]:
        judge.record["references"][key] = measure_references(judge, count)
        judge.save()
    return judge.record["references"][key]


def roundtrip_images(judge, count, projection, device):
    """The floor's training images encoded and decoded by `projection` (a run's VAE, fp32), [n, 3, 32, 32]:
    what the VAE alone keeps of real images, so the best FD a generator of its latents can reach."""
    from util.vaes import ENCODE_CHUNK, encode_images

    @torch.no_grad()
    def roundtrip(images):   # [B, 3, S, S] -> [B, 3, S, S]; a chunk at a time, as the latent cache encodes
        chunks = images.to(device).split(ENCODE_CHUNK)
        return torch.cat([projection.decode(encode_images(projection, chunk)).float().cpu() for chunk in chunks])

    train = open_source(judge.config, "train")
    return load_split(judge.config, train, floor_indices(judge, count), view=roundtrip)["images"]


def open_run_vae(config, device, projection):
    """The run's VAE for the round-trip reference: `projection` when the caller has it, else opened from
    config['vae']; None for a pixel run (config without 'vae' counts as pixels)."""
    if projection is None and config.get("vae", "none") != "none":
        from util.vaes import open_projection
        projection = open_projection(config["vae"], device, announce=False)
    return None if projection is None or projection.is_pixels else projection


@torch.no_grad()
def class_histogram(judge, images):
    """The judge's predicted classes of `images` -> dict(classes, counts, fractions), classes_present (classes
    given at least PRESENT_FRACTION of the images) and max_class_fraction."""
    device = next(judge.net.parameters()).device
    predictions = torch.cat([judge.net(chunk.to(device).float().clamp(0, 1)).argmax(dim=1).cpu()
                             for chunk in images.split(BATCH)])
    counts = torch.bincount(predictions, minlength=len(judge.record["classes"]))
    fractions = counts.float() / len(images)
    return dict(class_histogram=dict(classes=judge.record["classes"], counts=counts.tolist(),
                                     fractions=[round(f, 4) for f in fractions.tolist()]),
                classes_present=int((fractions >= PRESENT_FRACTION).sum()),
                max_class_fraction=round(fractions.max().item(), 4))


def evaluate_generation(samples, config, device, settings=None, projection=None):
    """Judge generated images: samples [N, 3, H, W] float in [0, 1] (RGB, as the datasets give them), H = W = the
    config's image size; config: a train.py run config (dataset, data_dir, image_size, synthetic_size, vae);
    projection: the run's VAE when the caller has it open (else opened from config['vae'] for a latent run).

    -> a JSON-able dict: num_images, fd, kid_mean, kid_std, floor, ceiling, fd_normalised, noise_fd, for a
    latent run vae_roundtrip_fd and vae_roundtrip_fd_normalised, class_histogram, classes_present,
    max_class_fraction, judge_val_accuracy, and `references` with every reference's full statistics and image
    counts. Training the judge takes a few tens of seconds on digits the first time; later calls read it, and the
    references for this N, from its cache (the round trip is measured on every call: it depends on the VAE).
    """
    image_size = image_size_of(config)
    if samples.dim() != 4 or samples.shape[1] != 3 or samples.shape[-2:] != (image_size, image_size):
        raise UserError(f"the judge expects samples [N, 3, {image_size}, {image_size}] (the run's image size), "
                        f"got {list(samples.shape)}")
    samples, device = samples.detach().float().cpu(), torch.device(device)
    if samples.numel() and samples.min() < -0.5:   # values a little outside [0, 1] are clamped; [-1, 1] is a bug
        raise UserError(f"the judge expects samples in [0, 1], got values down to {samples.min():.2f}; map "
                        "[-1, 1] images to [0, 1] with (x + 1) / 2 first")
    judge = load_judge(config, device, settings)
    vae = open_run_vae(config, device, projection)
    # The VAE outside one_thread: a large VAE on the CPU wants every thread (the judge itself keeps to one).
    roundtrip = roundtrip_images(judge, len(samples), vae, device) if vae is not None else None
    with one_thread(device):
        measured = compare(judge, samples)
        reference = dict(references(judge, len(samples)))
        if roundtrip is not None:
            reference["vae_roundtrip"] = dict(compare(judge, roundtrip), vae=vae.name)
        histogram = class_histogram(judge, samples)
    return verdict(judge, config, measured, reference, histogram)


def normalised(fd, reference):
    """(fd - floor) / (ceiling - floor), 4 decimals."""
    floor, top = reference["floor"]["fd"], reference["ceiling"]["fd"]
    return round((fd - floor) / (top - floor), 4)


def verdict(judge, config, measured, reference, histogram):
    """evaluate_generation's dict from its measurements (see there)."""
    roundtrip = reference.get("vae_roundtrip")
    return dict(
        num_images=measured["images"], dataset=config["dataset"], image_size=image_size_of(config),
        fd=measured["fd"], kid_mean=measured["kid_mean"], kid_std=measured["kid_std"],
        floor=reference["floor"]["fd"], ceiling=reference["ceiling"]["fd"],
        fd_normalised=normalised(measured["fd"], reference), noise_fd=reference["noise"]["fd"],
        **(dict(vae_roundtrip_fd=roundtrip["fd"], vae_roundtrip_fd_normalised=normalised(roundtrip["fd"], reference))
           if roundtrip else {}),
        **histogram,
        judge_val_accuracy=round(judge.record["val_accuracy"], 4),
        references=dict(samples=measured, **reference),
        judge=dict(path=judge.path, val_accuracy=judge.record["val_accuracy"], val_images=judge.record["val_images"],
                   train_images=judge.record["train_images"], train_seconds=judge.record["train_seconds"],
                   features=judge.net.num_features, judge_size=JUDGE_SIZE, version=JUDGE_VERSION,
                   **{key: judge.record["provenance"][key] for key in ("device", "torch", "torchmetrics")}),
        notes=("FD and KID on the judge's penultimate features against the real validation split "
               f"({judge.record['val_images']} images); floor: as many real training images as samples (or all); "
               f"ceiling: the same training images blurred (sigma {BLUR_SIGMA_AT_32} px at 32 px); vae_roundtrip "
               "(latent runs): the same training images encoded and decoded by the run's VAE; noise: uniform "
               f"noise; a class is present with at least {PRESENT_FRACTION:.0%} of the samples"),
    )


def read_folder(folder, image_size):
    """Every PNG in `folder` (sorted by name), as [N, 3, image_size, image_size] in [0, 1]; other sizes resized.
    The folder must hold the samples only, one per file: a grid picture there would be judged as a sample."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor
    if not os.path.isdir(folder):
        raise UserError(f"image folder {folder!r} does not exist; give a folder of generated PNG images")
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(".png"))
    if not names:
        raise UserError(f"image folder {folder!r} holds no .png images; write one sample per PNG file there")
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            tensor = to_tensor(image.convert("RGB")).unsqueeze(0)
        if tensor.shape[-2:] != (image_size, image_size):
            tensor = F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", antialias=True,
                                   align_corners=False)
        images.append(tensor)
    return torch.cat(images).clamp(0, 1)


def evaluate_folder(folder, config, device, settings=None):
    """evaluate_generation of a folder of generated PNG images (one image per file)."""
    return evaluate_generation(read_folder(folder, image_size_of(config)), config, device, settings)
