"""Images for pretraining and classification: CIFAR, MNIST, digits, image folders and a procedural smoke-test set."""

import functools
import hashlib
import math
import os

import torch
import torch.nn.functional as F

from util.cli import UserError


DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "digits", "imagefolder", "synthetic")
# 32 px sets are upsampled to 128 px so that a KL-f8 VAE gives a 16 x 16 latent grid; the small grey sets stay at 32.
DEFAULT_IMAGE_SIZE = {"cifar10": 128, "cifar100": 128, "mnist": 32, "fashion-mnist": 32, "digits": 32,
                      "imagefolder": 224, "synthetic": 64}
# No flip augmentation: a mirrored digit is not a digit. Fashion-MNIST's flips measured a tie (kNN +1.8/+0.1 points,
# linear probe -0.6/-0.7, each within one standard error; lab/docs/ablation.md), so it stays here.
NO_FLIP = ("mnist", "fashion-mnist", "digits")
SYNTHETIC_CLASSES = ("disk", "square", "triangle", "ring", "plus", "cross", "diamond", "frame", "bar", "two-dots")
# Bumped whenever a generated or package-shipped set changes, so that a latent cache made from the old one is rebuilt.
SOURCE_VERSIONS = {"synthetic": 2, "digits": 2, "mnist": 1, "fashion-mnist": 1}
DIGITS_SPLIT_SEED, DIGITS_VAL_FRACTION = 0, 0.2
PAPER_VAE_FACTOR = 8   # the SD VAE's downsampling: what the pixel patch of --vae none is sized against
AUGMENTATIONS = ("none", "flip", "crop", "full")


def default_latent_patch(grid):
    """The largest patch (4, 2 or 1) that leaves at least a 4 x 4 token grid: 28 x 28 latents (224 px) -> 4."""
    return next((p for p in (4, 2) if grid % p == 0 and grid // p >= 4), 1)


def default_patch_size(image_size, downsample):
    """The patch side without --patch-size: on latents default_latent_patch of the grid; in pixels (downsample 1)
    an SD VAE's latent patch times 8 / 2, so a pixel token covers a quarter of a latent token's area, as in the paper
    (16 px against 4 latent cells of 8 px). 224 px: 4 on latents, 16 in pixels; 32 px: 4 in pixels."""
    if downsample > 1:
        return default_latent_patch(image_size // downsample)
    return max(1, default_latent_patch(max(image_size // PAPER_VAE_FACTOR, 1)) * PAPER_VAE_FACTOR // 2)


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
    """One procedural image [3, S, S] in [0, 1] and its label, fully determined by (seed, index): a coloured shape
    (the label, 10 classes) on a striped, noisy background; colour, position, size and texture are nuisances."""
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


class Digits(torch.utils.data.Dataset):
    """scikit-learn's 1,797 handwritten digits (8 x 8) as [3, S, S] in [0, 1]: the offline real set; a fixed split."""

    def __init__(self, split="train", image_size=32):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1)   # [1797, 1, 8, 8]
        labels = torch.tensor(digits.target)
        train, val = train_test_split(range(len(labels)), test_size=DIGITS_VAL_FRACTION,
                                      random_state=DIGITS_SPLIT_SEED, stratify=labels.numpy())
        keep = torch.tensor(train if split == "train" else val)
        upsampled = F.interpolate(images[keep], size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = upsampled.clamp(0, 1).expand(-1, 3, -1, -1)
        self.targets = labels[keep].tolist()
        self.classes = [str(digit) for digit in range(10)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


# Where a system package puts the four gzipped idx files: Debian ships dataset-fashion-mnist, no MNIST package (the
# MNIST folder is the same convention, for files copied there by hand).
SYSTEM_FOLDERS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
SYSTEM_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
RAW_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}   # torchvision's DATA_DIR/<name>/raw
IDX_PREFIX = {"train": "train", "val": "t10k"}
IDX_IMAGES, IDX_LABELS = (2051, 3), (2049, 1)   # idx magic (0x08 = unsigned bytes, then the number of sizes), sizes


def idx_files(folder, split):
    """The (images, labels) idx paths of `split` in `folder`, gzipped or not, or None if either is missing."""
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        name = os.path.join(folder, f"{IDX_PREFIX[split]}-{kind}-ubyte")
        found.append(next((path for path in (name, name + ".gz") if os.path.isfile(path)), None))
    return tuple(found) if all(found) else None


def read_idx_bytes(path):
    """The decompressed bytes of an idx file: gzip is recognised by its first two bytes, not by the file name."""
    import gzip
    import zlib
    with open(path, "rb") as file:
        data = file.read()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:   # BadGzipFile is an OSError; a truncated one ends early
        raise UserError(f"{path} is not a readable gzip file ({error}); download or copy it again") from None


def parse_idx(data, path, kind):
    """idx bytes -> uint8 tensor of the sizes in the header: [N, rows, cols] for IDX_IMAGES, [N] for IDX_LABELS.
    Header: big-endian int32 magic, one int32 per size. A wrong magic or length is an error, never a misread tensor."""
    magic, dims = kind
    head = 4 * (1 + dims)
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else "none"
    if len(data) < head or found != magic:
        what = f"magic {found}, expected {magic}" if found != magic else f"{len(data)} bytes, a header is {head}"
        raise UserError(f"{path} is not an idx file of {'images' if dims == 3 else 'labels'} ({what}); download "
                        "or copy it again")
    sizes = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if len(data) - head != math.prod(sizes):
        raise UserError(f"{path} is truncated or corrupt: its header promises {' x '.join(map(str, sizes))} = "
                        f"{math.prod(sizes):,} bytes, it holds {len(data) - head:,}; download or copy it again")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=head).view(*sizes)   # one copy, writable


@functools.lru_cache(maxsize=4)
def _read_split(images_path, labels_path, stamp):
    """(images [N, rows, cols] uint8, labels [N] uint8, SHA-256 of both decompressed files). `stamp` (sizes and
    modification times) only keys the cache: a run opens each split several times (training, judge, grids)."""
    images_bytes, labels_bytes = read_idx_bytes(images_path), read_idx_bytes(labels_path)
    images = parse_idx(images_bytes, images_path, IDX_IMAGES)
    labels = parse_idx(labels_bytes, labels_path, IDX_LABELS)
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images):,} images but {labels_path} {len(labels):,} labels; "
                        "the two files must come from the same split")
    if len(labels) and labels.max() > 9:
        raise UserError(f"{labels_path} has label {labels.max().item()}; MNIST and Fashion-MNIST have 10 classes")
    # The digest is of the content (decompressed), so a re-gzipped copy reuses a latent cache and other images never do.
    return images, labels, hashlib.sha256(images_bytes + labels_bytes).hexdigest()


class IdxImages(torch.utils.data.Dataset):
    """MNIST-style idx files as images [3, S+4, S+4] in [0, 1]: 28 px grey padded by 2 px of black to 32 px (as
    torchvision's Pad(2) did), made RGB; `.classes` are torchvision's names, `.targets` a list of ints."""

    def __init__(self, images_path, labels_path, classes):
        stamp = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (images_path, labels_path))
        self.images, labels, self.sha256 = _read_split(images_path, labels_path, stamp)
        self.targets, self.classes = labels.tolist(), list(classes)
        self.root = os.path.dirname(images_path)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = F.pad(self.images[index].float().div(255), (2, 2, 2, 2))
        return image.expand(3, -1, -1).clone(), self.targets[index]   # a copy: transforms may write in place


def load_mnist(dataset, data_dir, split):
    """MNIST or Fashion-MNIST as an IdxImages, from the first place with the split's two idx files: DATA_DIR itself,
    SYSTEM_FOLDERS, DATA_DIR/FashionMNIST/raw (or MNIST/raw) whatever their MD5, last torchvision's download there.
    Read here, not by torchvision, whose MD5 check refuses Debian's re-gzipped copies of the same content."""
    import torchvision
    cls = torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.FashionMNIST
    raw = os.path.join(data_dir, RAW_FOLDERS[dataset], "raw")
    for folder in (data_dir, SYSTEM_FOLDERS[dataset], raw):
        if (found := idx_files(folder, split)) is not None:
            return IdxImages(*found, cls.classes)
    try:
        cls(data_dir, train=(split == "train"), download=True)   # leaves the files in `raw`, gunzipped
    except Exception as error:
        raise not_found_error(dataset, data_dir, split, raw, error) from None
    if (found := idx_files(raw, split)) is None:
        raise not_found_error(dataset, data_dir, split, raw, FileNotFoundError(f"nothing in {raw} after download"))
    return IdxImages(*found, cls.classes)


def not_found_error(dataset, data_dir, split, raw, error):
    """The one-line error when no place has the files: the three places looked in, and the offline ways out."""
    from util.vaes import OFFLINE_WAY_OUT, first_line
    system = SYSTEM_FOLDERS[dataset]
    package = (f"apt-get install {SYSTEM_PACKAGES[dataset]}" if dataset in SYSTEM_PACKAGES
               else "no Debian package ships it: copy the files there")
    return UserError(f"could not find {dataset}'s {IDX_PREFIX[split]}-images-idx3-ubyte[.gz] and "
                     f"{IDX_PREFIX[split]}-labels-idx1-ubyte[.gz] in (1) {system} ({package}), nor (2) {raw} (any "
                     f"MD5) or {data_dir} itself, and (3) could not download {dataset} ({first_line(error)}). "
                     f"Offline? Do (1) or (2), or {OFFLINE_WAY_OUT}")


def download_error(dataset, data_dir, error, folder):
    """The one-line error of a failed download: what failed, where the files would go, and the offline way out."""
    from util.vaes import OFFLINE_WAY_OUT, first_line
    return UserError(f"could not download {dataset} into {data_dir!r} ({first_line(error)}). Offline? Put the files "
                     f"in {os.path.join(data_dir, folder)}, or {OFFLINE_WAY_OUT}")


def image_transform(image_size, augment):
    """augment: 'none' (resize), 'flip' (+ horizontal flip), 'crop' (random resized crop, MAE's scale 0.2-1), 'full'."""
    from torchvision import transforms
    steps = [to_tensor, transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True)
             if augment in ("crop", "full") else transforms.Resize((image_size, image_size), antialias=True)]
    if augment in ("flip", "full"):
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps)


def to_tensor(image):
    """A PIL image -> [3, H, W] float in [0, 1]; a tensor (synthetic, digits) as it is: 8-bit round trips are slow."""
    from torchvision.transforms.functional import to_tensor as pil_to_tensor
    return image if isinstance(image, torch.Tensor) else pil_to_tensor(image)


def default_augment(dataset, cached):
    """MAE's augmentation where possible: crops need images (not cached latents); flips need sets not in NO_FLIP."""
    if dataset in NO_FLIP:
        return "none" if cached else "crop"
    return "flip" if cached else "full"


class ImageDataset(torch.utils.data.Dataset):
    """Images [3, S, S] in [0, 1] with labels, from any source. Indexing with (index, seed) augments under that seed:
    a run's batches depend on its seed and step alone (not on the loader workers), so a resume is exact."""

    def __init__(self, source, image_size, augment="none"):
        self.source, self.image_size = source, image_size
        self.transform = image_transform(image_size, augment)
        self.classes = source.classes

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.source[index]
        if not isinstance(image, torch.Tensor) and image.mode != "RGB":   # CIFAR is RGB already; MNIST is grey
            image = image.convert("RGB")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                # The CPU generator alone: torch.manual_seed would also reseed every GPU (unrestored by this fork)
                # and, with CUDA not initialised, format a stack trace each time (about 1 ms an image).
                torch.default_generator.manual_seed(seed)
            return self.transform(image), label


def load_image_source(dataset, data_dir, split, image_size, synthetic_size=5000):
    """The raw dataset for `split` ('train' or 'val'): items are (PIL image or tensor, label), with `.classes` and
    `.provenance` (what a latent cache must match to be reused: source_provenance)."""
    import torchvision
    if dataset == "synthetic":
        source = SyntheticShapes(split, image_size, synthetic_size)
    elif dataset == "digits":
        source = Digits(split, image_size)
    elif dataset in ("mnist", "fashion-mnist"):
        source = load_mnist(dataset, data_dir, split)
    elif dataset in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        try:
            source = cls(data_dir, train=(split == "train"), download=True)
        except Exception as error:  # urllib and checksum errors: one line, and the way out
            raise download_error(dataset, data_dir, error, cls.base_folder) from None
    elif dataset == "imagefolder":
        source = load_image_folder(os.path.join(data_dir, split))
        if split != "train":
            check_same_classes(os.path.join(data_dir, "train"), source)
    else:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    source.provenance = source_provenance(dataset, source, synthetic_size)
    return source


def source_provenance(dataset, source, synthetic_size):
    """What identifies a source's images: a version (and split seed or size) for generated and shipped sets, the idx
    files' digest for MNIST and Fashion-MNIST, an image folder's file list (names, sizes, times) fingerprinted."""
    if dataset in SOURCE_VERSIONS:
        record = dict(version=SOURCE_VERSIONS[dataset], count=len(source))
        if dataset == "digits":
            record.update(split_seed=DIGITS_SPLIT_SEED, val_fraction=DIGITS_VAL_FRACTION)
        if dataset == "synthetic":
            record.update(seed=source.seed, synthetic_size=synthetic_size)
        if dataset in ("mnist", "fashion-mnist"):
            record.update(sha256=source.sha256[:16])   # the files' content: other files never reuse a cache
        return record
    if dataset == "imagefolder":
        digest = hashlib.sha1()
        for path, label in source.samples:
            info = os.stat(path)
            digest.update(f"{os.path.relpath(path, source.root)}|{info.st_size}|{info.st_mtime_ns}|{label}\n".encode())
        return dict(files=len(source.samples), file_list_sha1=digest.hexdigest()[:16])
    return dict(count=len(source))   # CIFAR: torchvision checks the files' checksums itself


def load_image_tensors(dataset, data_dir, split, image_size):
    """A whole (small) split in memory, un-augmented: images [N, 3, S, S] float in [0, 1], labels [N] long."""
    images = ImageDataset(load_image_source(dataset, data_dir, split, image_size), image_size)
    batches = list(torch.utils.data.DataLoader(images, batch_size=256))
    return torch.cat([b[0] for b in batches]), torch.cat([torch.as_tensor(b[1]) for b in batches]).long()


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
    """Open one image file as RGB; an unreadable one stops the run (silently training on fewer would be worse)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.convert("RGB")   # grayscale, palette, RGBA and CMYK all become RGB
    except OSError as error:
        raise UserError(f"cannot read image {path} ({error}); delete or replace the file") from None


def check_same_classes(train_folder, val):
    """Validation classes must be train's, in order, or labels would silently differ (train's images go unscanned)."""
    from torchvision.datasets.folder import find_classes
    require_folder(train_folder)
    train_classes = find_classes(train_folder)[0]
    if train_classes != val.classes:
        only_train = sorted(set(train_classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train_classes))
        raise UserError(f"the val split's classes differ from train's (only in train: {only_train[:5]}, only in "
                        f"val: {only_val[:5]}); give both splits the same class folders")
