"""Images for pretraining and classification: CIFAR, MNIST, digits, image folders and a procedural smoke-test set."""

import math
import os

import torch

from util.cli import UserError


DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")

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
