"""The datasets: real digits offline, MNIST from local raw files, the patch defaults, the augmentation actually
applied, and latent caches that follow their content (and whose labels line up with their images)."""

import os
import struct

import pytest
import torch
from PIL import Image

import lmd
import train
from util import checkpoints, cli, datasets, latent_cache, devices, pretraining, vaes


def test_digits_are_real_stratified_and_fixed():
    train_split, val_split = datasets.Digits("train", 32), datasets.Digits("val", 32)
    assert len(train_split) + len(val_split) == 1797 and len(val_split) == 360
    counts = torch.bincount(torch.tensor(val_split.targets), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37                    # a fifth of each class
    image, label = val_split[0]
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(image[0], image[1])                              # grey, made RGB
    assert torch.equal(datasets.Digits("val", 32)[5][0], val_split[5][0])   # the same split every time
    from sklearn.datasets import load_digits
    raw = torch.tensor(load_digits().images[:1] / 16, dtype=torch.float32).unsqueeze(1)   # sklearn's first image
    upsampled = torch.nn.functional.interpolate(raw, size=32, mode="bilinear", align_corners=False)[0, 0]
    everything = torch.cat([train_split.images[:, 0], val_split.images[:, 0]])
    assert (everything - upsampled).abs().amax(dim=(1, 2)).min() < 1e-6                # it is in one of the splits


def test_digit_sets_are_never_flipped():
    assert datasets.default_augment("digits", cached=True) == "none"
    assert datasets.default_augment("mnist", cached=False) == "crop"
    assert datasets.default_augment("cifar10", cached=True) == "flip"
    assert datasets.default_augment("imagefolder", cached=False) == "full"


def write_idx(path, array, gzipped=False):
    """An idx file as the MNIST sites ship it: magic (0x08 = unsigned bytes, number of sizes), sizes, the bytes."""
    import gzip
    header = struct.pack(">I", (0x08 << 8) | array.dim()) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(data) if gzipped else data)


def write_split_files(folder, split="t10k", count=4, first_label=0, gzipped=False):
    """Tiny idx files for one split: image i is black with an 8 x 8 square of grey 40 + 20 * label."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = (torch.arange(count) + first_label) % 10
    images = torch.zeros(count, 28, 28)
    images[:, 10:18, 10:18] = labels.view(-1, 1, 1) * 20 + 40        # brightness says the label
    suffix = ".gz" if gzipped else ""
    write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gzipped)
    write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gzipped)
    return labels


@pytest.fixture
def no_system_folder(tmp_path, monkeypatch):
    """Hide the Debian package's folder (installed on some machines) behind an empty path of the test's own."""
    folders = {name: str(tmp_path / "system" / name) for name in datasets.SYSTEM_FOLDERS}
    monkeypatch.setattr(datasets, "SYSTEM_FOLDERS", folders)
    return folders


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_loads_from_local_raw_files_without_network(tmp_path, no_system_folder, dataset, folder, gzipped):
    raw = tmp_path / folder / "raw"
    write_split_files(raw, "train", 6, gzipped=gzipped)
    write_split_files(raw, "t10k", 4, gzipped=gzipped)
    source = datasets.load_image_source(dataset, str(tmp_path), "val", 32)
    images = datasets.ImageDataset(source, 32)
    image, label = images[3]
    assert len(images) == 4 and image.shape == (3, 32, 32) and label == 3 and source.targets == [0, 1, 2, 3]
    assert image[:, :2].abs().sum() == 0                                   # padded by 2 px of black
    assert image[:, 12:20, 12:20].eq((3 * 20 + 40) / 255).all() and image[:, 11].sum() == 0   # the square, exactly
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])      # grey, made RGB
    names = torchvision_classes(dataset)
    assert source.classes == names and len(datasets.load_image_source(dataset, str(tmp_path), "train", 32)) == 6


def torchvision_classes(dataset):
    import torchvision
    return list((torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.FashionMNIST).classes)


def test_mnist_lookup_order_data_dir_then_system_folder_then_raw_folder(tmp_path, no_system_folder):
    """DATA_DIR itself (a folder of the four files, as --data-dir /usr/share/datasets/fashion-mnist), then the
    package's folder, then DATA_DIR/FashionMNIST/raw: each holds other labels, so the labels say which was read."""
    data, system = tmp_path / "data", tmp_path / "system" / "fashion-mnist"
    write_split_files(data / "FashionMNIST" / "raw", first_label=3)
    write_split_files(system, first_label=2, gzipped=True)
    write_split_files(data, first_label=1, gzipped=True)
    first_labels = []
    for remove in (data / "t10k-images-idx3-ubyte.gz", system / "t10k-labels-idx1-ubyte.gz", None):
        source = datasets.load_image_source("fashion-mnist", str(data), "val", 32)
        first_labels.append(source.targets[0])
        if remove:
            remove.unlink()          # one missing file of a pair: that folder no longer counts
    assert first_labels == [1, 2, 3]


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"),
                                             ("cifar10", "cifar-10-batches-py")])
def test_offline_download_error_names_the_folder_and_the_offline_sets(tmp_path, monkeypatch, no_system_folder,
                                                                      dataset, folder):
    import torchvision.datasets.utils as utils

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(utils, "urlopen", offline, raising=False)
    monkeypatch.setattr(utils, "download_url", offline)
    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    import torchvision.datasets.mnist as mnist
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(cli.UserError) as error:
        datasets.load_image_source(dataset, str(tmp_path), "train", 32)
    message = str(error.value)
    assert os.path.join(str(tmp_path), folder) in message and "\n" not in message
    assert "--dataset digits --vae none" in message and "--dataset synthetic --vae tiny" in message
    if dataset != "cifar10":   # all three places: the package's folder, the raw folder, the download
        assert no_system_folder[dataset] in message and "network is unreachable" in message
        assert os.path.join(str(tmp_path), folder, "raw") in message and "train-images-idx3-ubyte" in message
        assert ("apt-get install dataset-fashion-mnist" in message) == (dataset == "fashion-mnist")


def write_bytes_as(path, data, gzipped):
    import gzip
    path.write_bytes(gzip.compress(data) if gzipped else data)


@pytest.mark.parametrize("damage, message", [
    (lambda images: b"\x00\x00\x08\x01" + images[4:], "magic 2049, expected 2051"),    # a labels file's magic
    (lambda images: images[:-5], "truncated or corrupt"),
    (lambda images: images + b"\x00", "truncated or corrupt"),
    (lambda images: images[:10], "10 bytes, a header is 16"),
    (lambda images: b"", "magic none"),
    (lambda images: images[:-28 * 28], "holds 3 images but"),                            # a consistent file of 3
])
@pytest.mark.parametrize("gzipped", [False, True])
def test_a_corrupt_idx_file_is_a_one_line_error(tmp_path, no_system_folder, damage, message, gzipped):
    raw = tmp_path / "MNIST" / "raw"
    write_split_files(raw)
    images = (raw / "t10k-images-idx3-ubyte").read_bytes()
    if message.startswith("holds"):             # the header says 3 images, the labels file 4
        images = images[:4] + struct.pack(">I", 3) + images[8:]
    (raw / "t10k-images-idx3-ubyte").unlink()
    write_bytes_as(raw / ("t10k-images-idx3-ubyte" + (".gz" if gzipped else "")), damage(images), gzipped)
    with pytest.raises(cli.UserError, match=message) as error:
        datasets.load_image_source("mnist", str(tmp_path), "val", 32)
    assert "\n" not in str(error.value) and "t10k-images-idx3-ubyte" in str(error.value)


def test_a_truncated_gzip_file_is_a_one_line_error(tmp_path, no_system_folder):
    raw = tmp_path / "MNIST" / "raw"
    write_split_files(raw, gzipped=True)
    packed = raw / "t10k-images-idx3-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:-20])
    with pytest.raises(cli.UserError, match="not a readable gzip file"):
        datasets.load_image_source("mnist", str(tmp_path), "val", 32)


def test_mnist_provenance_follows_the_content_not_the_gzip(tmp_path, no_system_folder):
    """The latent cache's key: the same images gzipped or not are one set; one changed pixel is another."""
    def provenance(folder):
        return datasets.load_image_source("fashion-mnist", str(folder), "val", 32).provenance
    write_split_files(tmp_path / "plain" / "FashionMNIST" / "raw")
    write_split_files(tmp_path / "packed" / "FashionMNIST" / "raw", gzipped=True)
    changed = tmp_path / "changed" / "FashionMNIST" / "raw"
    write_split_files(changed)
    images = bytearray((changed / "t10k-images-idx3-ubyte").read_bytes())
    images[-1] = 255                                                  # one pixel of the last image
    (changed / "t10k-images-idx3-ubyte").write_bytes(bytes(images))
    plain = provenance(tmp_path / "plain")
    assert plain == provenance(tmp_path / "packed") and plain != provenance(tmp_path / "changed")
    assert plain["count"] == 4 and len(plain["sha256"]) == 16
    expected = latent_cache.cache_provenance("fashion-mnist", "val", vaes.load_projection("none"), 32,
                                             datasets.load_image_source("fashion-mnist", str(tmp_path / "changed"),
                                                                        "val", 32))
    assert expected["data"]["sha256"] != plain["sha256"]             # what a cache is checked against


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist absent")
def test_the_debian_package_is_read_with_the_default_data_dir(tmp_path):
    """The real package (apt-get install dataset-fashion-mnist), whose gzip files torchvision's MD5 check refuses."""
    source = datasets.load_image_source("fashion-mnist", str(tmp_path / "data"), "val", 32)
    assert len(source) == 10_000 and source.root == "/usr/share/datasets/fashion-mnist"
    assert torch.bincount(torch.tensor(source.targets)).tolist() == [1000] * 10
    assert source.classes[0] == "T-shirt/top" and source.classes[9] == "Ankle boot"
    image, _ = datasets.ImageDataset(source, 32)[0]
    assert image.shape == (3, 32, 32) and image.max() > 0.9 and image[:, :2].sum() == 0


@pytest.mark.parametrize("image_size, downsample, patch, tokens", [
    (224, 8, 4, 49), (224, 1, 16, 196),      # the paper: ViT-B/4 on 28 x 28 latents against ViT-B/16 on pixels
    (128, 8, 4, 16), (128, 1, 16, 64),       # CIFAR upsampled for the SD VAE
    (32, 4, 2, 16), (32, 1, 4, 64),          # digits with a VAE of factor 4, and in pixels
    (32, 8, 1, 16), (64, 8, 2, 16)])
def test_default_patch_sizes_follow_image_size_and_vae_factor(image_size, downsample, patch, tokens):
    assert datasets.default_patch_size(image_size, downsample) == patch
    assert (image_size // downsample // patch) ** 2 == tokens >= 16


def test_pixel_runs_get_random_resized_crops(tmp_path, monkeypatch):
    """The transform the training loader really applies, not the config string: pixels are never cached, so a
    pixel run gets MAE's random resized crops (and digits no flip)."""
    built = []
    original = datasets.ImageDataset.__init__

    def record(self, source, image_size, augment="none"):
        original(self, source, image_size, augment)
        built.append(self.transform)
    monkeypatch.setattr(datasets.ImageDataset, "__init__", record)
    train.main(["--dataset", "digits", "--vae", "none", "--model", "tiny", "--steps", "1", "--batch-size", "16",
                "--eval-images", "16", "--grid-every", "0", "--num-workers", "0", "--device", "cpu",
                "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    names = [[type(step).__name__ for step in transform.transforms] for transform in built]
    assert ["function", "RandomResizedCrop"] in names                         # the training loader's
    assert not any("RandomHorizontalFlip" in steps for steps in names)


def class_coded_folder(root, classes=3, per_class=4, size=16):
    """An image folder whose every image is one flat grey level that encodes its class: k -> 40 + 60 k."""
    for split in ("train", "val"):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (40 + 60 * k,) * 3).save(folder / f"{i}.png")


def test_cached_labels_line_up_with_their_images(tmp_path):
    """Read each cached item's label back from its own pixels (the pixel projection caches [-1, 1] images)."""
    class_coded_folder(tmp_path)
    config = dict(dataset="imagefolder", data_dir=str(tmp_path), image_size=16, vae="none", synthetic_size=0)
    cache = latent_cache.dataset_latents(config, "train", vaes.load_projection("none"), devices.Distributed("cpu"))
    grey = (cache["latents"][:, 0].float().mean(dim=(1, 2, 3)) + 1) / 2 * 255          # [N], per cached item
    assert torch.equal(((grey - 40) / 60).round().long(), cache["labels"])
    assert torch.equal(cache["latents"][:, 1], cache["latents"][:, 0].flip(-1))          # and its mirror image


def test_a_changed_image_folder_rebuilds_its_cache(tmp_path, capsys):
    class_coded_folder(tmp_path)
    config = dict(dataset="imagefolder", data_dir=str(tmp_path), image_size=16, vae="none", synthetic_size=0)
    dist, projection = devices.Distributed("cpu"), vaes.load_projection("none")
    latent_cache.dataset_latents(config, "train", projection, dist)
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "train" / "class0" / "0.png")   # same name, new image
    capsys.readouterr()
    cache = latent_cache.dataset_latents(config, "train", projection, dist)
    assert "made with other settings" in capsys.readouterr().err
    assert cache["latents"][0, 0].float().mean() > 0.99                                    # the new white image


def test_a_vae_directory_has_one_cache_found_from_any_directory(tmp_path, monkeypatch, capsys):
    """`--vae VAE`, `./VAE`, its absolute path and a link to it are one VAE with one latent cache, and the run's
    config names the VAE and the data by absolute paths, so that finetune.py run from another directory reuses both."""
    import finetune
    vaes.tiny_vae().save_pretrained(tmp_path / "VAE")
    (tmp_path / "link").symlink_to(tmp_path / "VAE")
    monkeypatch.chdir(tmp_path)
    config = dict(dataset="synthetic", data_dir="data", image_size=32, synthetic_size=20, num_workers=0)
    for typed in ("VAE", "./VAE/", str(tmp_path / "VAE"), "link"):
        projection = vaes.open_projection(typed, announce=False)
        latent_cache.dataset_latents(dict(config, vae=typed), "train", projection, devices.Distributed("cpu"))
    assert len(os.listdir(tmp_path / "data" / "lmd_latents")) == 2          # one cache: an index and its parts
    assert capsys.readouterr().err.count("train latents:   0%") == 1           # built once, then reused
    train.main(["--dataset", "synthetic", "--synthetic-size", "20", "--image-size", "32", "--vae", "./VAE",
                "--data-dir", "data", "--model", "tiny", "--steps", "1", "--batch-size", "8", "--eval-images", "8",
                "--grid-every", "0", "--num-workers", "0", "--device", "cpu", "--out", "run"])
    assert checkpoints.load_checkpoint("run")["config"]["vae"] == os.path.realpath(tmp_path / "VAE")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    finetune.main(["--checkpoint", str(tmp_path / "run"), "--mode", "knn", "--num-workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err   # the train cache is the one made above; only the val split is new
    assert "train latents" not in err and len(os.listdir(tmp_path / "data" / "lmd_latents")) == 4


def test_the_cache_and_on_the_fly_encoding_give_the_same_latents(tmp_path, monkeypatch):
    """One encode path: the cache build and train.py --no-cache encode alike, in chunks of --encode-batch-size and
    under bf16 autocast where the GPU has it (faked here on the CPU), so a cached run sees the latents of --no-cache."""
    monkeypatch.setattr(devices, "autocast_dtype", lambda precision, device: torch.bfloat16)
    projection, calls = vaes.open_projection("tiny", announce=False), []
    encode = projection.encode
    projection.encode = lambda images: calls.append(len(images)) or encode(images)
    config = dict(dataset="synthetic", data_dir=str(tmp_path), vae="tiny", image_size=32, synthetic_size=4,
                  num_workers=0, encode_batch_size=1, precision="auto", cache=False, augment="none", batch_size=4, seed=0, steps=1)
    dist = devices.Distributed("cpu")
    cache = latent_cache.dataset_latents(config, "train", projection, dist)
    assert cache["provenance"]["encoding"] == "bf16" and calls == [1] * 8       # 4 images and their mirror images
    batches = pretraining.TrainingBatches(config, projection, dist, start_step=0)   # --no-cache: encoded per step
    on_the_fly = batches.latents(0)
    assert torch.equal(on_the_fly.half(), cache["latents"][batches._indices(0), 0])   # bit for bit, once in fp16
    images = datasets.ImageDataset(datasets.SyntheticShapes("train", 32, 4), 32)
    in_fp32 = encode(torch.stack([images[i][0] for i in range(4)]))
    assert not torch.equal(in_fp32.half(), cache["latents"][:, 0])           # fp32 encoding: other latents


def test_generated_and_shipped_sets_record_version_and_split():
    assert datasets.load_image_source("digits", "", "train", 32).provenance == dict(
        version=datasets.SOURCE_VERSIONS["digits"], count=1437, split_seed=0, val_fraction=0.2)
    synthetic = datasets.load_image_source("synthetic", "", "val", 32, synthetic_size=50).provenance
    assert synthetic["synthetic_size"] == 50 and synthetic["version"] == datasets.SOURCE_VERSIONS["synthetic"]
