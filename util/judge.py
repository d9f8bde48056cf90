"""The offline judge of generated images: FID and KID on the features of a small classifier of the real data.

No Inception weights can be downloaded here, so FID as published cannot be computed. The same statistics work
with any fixed feature extractor (REFERENCE.md section 9): a small CNN is trained once per dataset and image size
on the real training split, and its penultimate features (128 values) replace Inception's pool features.

    result = judge.evaluate_generation(samples, config, device)   # samples [N, 3, H, W] in [0, 1] -> JSON-able dict

Every number comes with its calibration from the same judge, against the same real validation split:
- floor:   real training images against real validation images (what a perfect generator would score);
- ceiling: the validation images blurred (Gaussian, sigma 2 px at 32 px) against the same images unblurred;
- fd_normalised = (fd - floor) / (ceiling - floor): 0 is real data, 1 is "as far from the data as blurred images";
- noise:   uniform noise against real, a second reference. It is NOT a useful ceiling: almost anything is far
  closer to the data than noise, so scores against it all look good;
- the judge's predicted-class histogram of the samples: all classes present, none dominating.

The judge lives in DATA_DIR/lmd_judges/<dataset>-<size>px.pt with its provenance (dataset, image size, the splits'
provenance, the training settings), its validation accuracy and the reference statistics; it is retrained when
any of them changes. The digits' validation split has only 360 images, so its FD is a few-hundred-image estimate:
compare numbers measured with the same number of samples (the floor is measured with as many as the samples).
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
JUDGE_VERSION = 1        # bumped whenever the judge's architecture, training or statistics change: every cache rebuilds
JUDGE_SIZE = 32          # the judge reads every image resized to 32 x 32 (CIFAR's own size; digits are 8 x 8 inside)
SETTINGS = dict(epochs=20, batch_size=64, lr=3e-3, weight_decay=1e-4, shift=2, width=16, features=128, seed=0)
BLUR_SIGMA_AT_32 = 2.0   # the ceiling's Gaussian blur, in pixels at 32 px; scaled with the image size
KID_SUBSETS, KID_MAX_SUBSET = 100, 1000   # torchmetrics' defaults; the subset shrinks to the smaller set (see kid)
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
    on a shared, busy 2-core CPU); and a fixed thread count makes the cached judge the same bits on any CPU.
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


def judge_file(config):
    """DATA_DIR/lmd_judges/<dataset>[<synthetic size>]-<image size>px.pt."""
    count = config.get("synthetic_size", 5000) if config["dataset"] == "synthetic" else ""
    return os.path.join(config["data_dir"], "lmd_judges", f"{config['dataset']}{count}-{image_size_of(config)}px.pt")


def open_source(config, split):
    """The raw split of `config` (util.datasets.load_image_source): its provenance, without reading the images."""
    return load_image_source(config["dataset"], config["data_dir"], split, image_size_of(config),
                             config.get("synthetic_size", 5000))


def load_split(config, source, blurred=False, indices=None):
    """A whole split (or its images at `indices`), un-augmented, at the judge's size: dict(images [N, 3, 32, 32]
    in [0, 1], labels [N], classes) and, with `blurred`, the blurred copy (blurred at the image size, then
    resized), batch by batch so that a large split at a large size is never held in memory at full size."""
    image_size = image_size_of(config)
    images = ImageDataset(source, image_size)
    if indices is not None:
        images = torch.utils.data.Subset(images, indices.tolist())
    loader = torch.utils.data.DataLoader(images, batch_size=BATCH)
    images, labels, blurs = [], [], []
    for batch, label in loader:
        images.append(to_judge_size(batch))
        labels.append(torch.as_tensor(label))
        if blurred:
            blurs.append(to_judge_size(blur(batch, image_size)))
    return dict(images=torch.cat(images), labels=torch.cat(labels).long(), classes=list(source.classes),
                blurred=torch.cat(blurs) if blurred else None)


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


def judge_provenance(config, train_provenance, val_provenance, settings):
    """What a cached judge must match to be used: the method's version, the data and the training settings."""
    return dict(version=JUDGE_VERSION, dataset=config["dataset"], image_size=image_size_of(config),
                judge_size=JUDGE_SIZE, blur_sigma_at_32=BLUR_SIGMA_AT_32, train=train_provenance, val=val_provenance,
                settings=settings)


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
    """The judge of `config`'s dataset and image size, from its cache, or trained and cached now (with its
    ceiling). settings: overrides of SETTINGS (part of the provenance). -> Judge."""
    device = torch.device(device)
    with one_thread(device):
        return _load_judge(config, device, dict(SETTINGS, **(settings or {})))


def _load_judge(config, device, settings):
    path = judge_file(config)
    train_source, val_source = open_source(config, "train"), open_source(config, "val")
    provenance = judge_provenance(config, train_source.provenance, val_source.provenance, settings)
    cached = open_judge(path, provenance, device)
    if cached is not None:
        record, net = cached
        return Judge(net, record, load_split(config, val_source), path, False, config)
    val, train = load_split(config, val_source, blurred=True), load_split(config, train_source)
    print(f"training the judge of {config['dataset']} at {image_size_of(config)} px on {len(train['images'])} "
          f"images; cached in {path}", file=sys.stderr)
    start = time.perf_counter()
    net, val_accuracy = train_judge(train, val, settings, device)
    record = dict(provenance=provenance, classes=val["classes"], val_accuracy=val_accuracy,
                  train_images=len(train["images"]), val_images=len(val["images"]),
                  train_seconds=round(time.perf_counter() - start, 1), references={})
    judge = Judge(net, record, val, path, True, config)
    record["ceiling"] = compare(judge, val["blurred"])
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
    real = judge.val["images"]
    subset = min(KID_MAX_SUBSET, len(images), len(real))
    if subset < 2:
        raise UserError(f"the judge needs at least 2 images on each side, got {len(images)} samples and "
                        f"{len(real)} validation images; generate more images")
    extractor = FeatureExtractor(judge.net)
    with warnings.catch_warnings():   # KID warns that it keeps every feature: a few hundred 128-value rows here
        warnings.simplefilter("ignore", UserWarning)
        fid = FrechetInceptionDistance(feature=extractor, normalize=True).to(device)
        kid = KernelInceptionDistance(feature=extractor, subsets=KID_SUBSETS, subset_size=subset,
                                      normalize=True).to(device)
    for metric in (fid, kid):
        for chunk in real.split(BATCH):
            metric.update(chunk.to(device), real=True)
        for chunk in images.split(BATCH):
            metric.update(chunk.to(device).float().clamp(0, 1), real=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(judge.record["provenance"]["settings"]["seed"])
        kid_mean, kid_std = kid.compute()
    return dict(fd=round(fid.compute().item(), 4), kid_mean=round(kid_mean.item(), 6), kid_std=round(kid_std.item(), 6),
                images=len(images), reference_images=len(real), kid_subset_size=subset)


def references(judge, count):
    """The floor and the noise reference for `count` samples, cached in the judge's file after the first call.

    floor: `count` real training images (a seeded random subset; all of them when the split has fewer) against
    the validation split: FD is biased by the number of images, so the floor is measured with as many as the
    samples. noise: `count` images of uniform noise in [0, 1] (each pixel and channel) at the image size.
    """
    key = str(count)
    if key not in judge.record["references"]:
        seed = judge.record["provenance"]["settings"]["seed"]
        generator = torch.Generator().manual_seed(seed)
        train = open_source(judge.config, "train")
        chosen = torch.randperm(len(train), generator=generator)[:count]
        floor_images = load_split(judge.config, train, indices=chosen)["images"]
        size = image_size_of(judge.config)
        noise = torch.rand(count, 3, size, size, generator=generator)
        judge.record["references"][key] = dict(floor=compare(judge, floor_images), noise=compare(judge, noise))
        judge.save()
    return judge.record["references"][key]


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


def evaluate_generation(samples, config, device, settings=None):
    """Judge generated images: samples [N, 3, H, W] float in [0, 1] (RGB, as the datasets give them), H = W = the
    config's image size; config: a train.py run config (dataset, data_dir, image_size, synthetic_size).

    -> a JSON-able dict: num_images, fd, kid_mean, kid_std, floor, ceiling, fd_normalised, noise_fd,
    class_histogram, classes_present, max_class_fraction, judge_val_accuracy, and `references` with the floor's,
    ceiling's and noise's full statistics and image counts. Training the judge takes a few tens of seconds on
    digits the first time; later calls read it, and the references for this N, from its cache.
    """
    image_size = image_size_of(config)
    if samples.dim() != 4 or samples.shape[1] != 3 or samples.shape[-2:] != (image_size, image_size):
        raise UserError(f"the judge expects samples [N, 3, {image_size}, {image_size}] (the run's image size), "
                        f"got {list(samples.shape)}")
    samples, device = samples.detach().float().cpu(), torch.device(device)
    with one_thread(device):
        judge = load_judge(config, device, settings)
        measured = compare(judge, samples)
        reference = references(judge, len(samples))
        histogram = class_histogram(judge, samples)
    ceiling = judge.record["ceiling"]
    floor, top = reference["floor"]["fd"], ceiling["fd"]
    return dict(
        num_images=len(samples), dataset=config["dataset"], image_size=image_size,
        fd=measured["fd"], kid_mean=measured["kid_mean"], kid_std=measured["kid_std"],
        floor=floor, ceiling=top, fd_normalised=round((measured["fd"] - floor) / (top - floor), 4),
        noise_fd=reference["noise"]["fd"],
        **histogram,
        judge_val_accuracy=round(judge.record["val_accuracy"], 4),
        references=dict(samples=measured, floor=reference["floor"], ceiling=ceiling, noise=reference["noise"]),
        judge=dict(path=judge.path, val_accuracy=judge.record["val_accuracy"], val_images=judge.record["val_images"],
                   train_images=judge.record["train_images"], train_seconds=judge.record["train_seconds"],
                   features=judge.net.num_features, judge_size=JUDGE_SIZE, version=JUDGE_VERSION),
        notes=("FD and KID on the judge's penultimate features against the real validation split "
               f"({judge.record['val_images']} images); floor: as many real training images as samples (or all); "
               f"ceiling: the validation images blurred (sigma {BLUR_SIGMA_AT_32} px at 32 px); noise: uniform "
               f"noise; a class is present with at least {PRESENT_FRACTION:.0%} of the samples"),
    )


def read_folder(folder, image_size):
    """Every PNG in `folder` (sorted by name), as [N, 3, image_size, image_size] in [0, 1]; other sizes resized."""
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
