"""Train a small diffusers AutoencoderKL (SD layout, 4 latent channels, downsampling 4) on a small dataset.

    python tools/train_vae.py --dataset digits --out runs/vae_digits      # 1.5-3 minutes on 2 CPU cores
    python train.py --vae runs/vae_digits ...                              # then use it as the frozen VAE
    python tools/train_vae.py --dataset fashion-mnist --out runs/vae-fashion --threads 1   # 1000 steps, ~4-5 min

Writes VAE_DIR as `save_pretrained` does, `scaling_factor` set to 1 / std of the training latents, plus
training.json (where it came from: dataset, settings, val PSNR, seconds) and reconstructions.png (a val image
per class over its reconstruction). The loss is SD's without its GAN and perceptual terms: L1 + L2 and a small KL."""

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable as `python tools/train_vae.py` from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lmd  # noqa: E402
from util.cli import ArgumentParser, UserError, run_cli  # noqa: E402
from util.datasets import DATASETS, load_image_source, load_image_tensors  # noqa: E402
from util.devices import select_device  # noqa: E402
from util.optim import learning_rate  # noqa: E402
from util.pictures import GRID_MIN_SIDE, default_font, spread_over_classes  # noqa: E402

# On digits, 500 steps of 16 images reach ~42 dB val PSNR (300: ~38, 1000: ~47), ~1.5 minutes on 2 idle cores. On a
# busy shared CPU --threads 1 is much faster (at load 4: 189 s with one thread, 763 s with PyTorch's two).
DEFAULTS = dict(dataset="digits", data_dir="./data", out=None, image_size=32, batch_size=16, lr=1e-3, warmup_steps=50,
                kl_weight=1e-4, seed=0, device="auto", threads=0, grid_images=10, val_images=1000)
# The scaling factor's std is measured on at most this many training images (a seeded subset): all of Fashion-MNIST
# would take 5 minutes on one thread; 4 subsets of 2048 were within 0.3% of 10,000 images' std.
SCALE_IMAGES = 2048
DEFAULT_STEPS = 500
# Fashion-MNIST's textures need more: 250 steps ~20.5 dB, 500 ~22.7, 1000 ~24.4 (clothes recognisable), 2000 ~25.5;
# 1000 steps are 4-9 minutes on one thread of a busy 2-core CPU.
DATASET_STEPS = {"fashion-mnist": 1000}
BLOCK_OUT_CHANNELS = (32, 64, 64)  # 3 blocks: 2 downsamplings, so 32 px images give an 8 x 8 x 4 latent grid


def build_parser():
    parser = ArgumentParser(description="Train a small AutoencoderKL (frozen VAE for LMD) on a dataset.")

    def add(flag, **kwargs):
        default = DEFAULTS[flag[2:].replace("-", "_")]
        if default is not None:
            kwargs["help"] += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
        parser.add_argument(flag, default=default, **kwargs)

    add("--dataset", help="training images, read through util.datasets ('digits': scikit-learn's 8x8 digits)")
    add("--data-dir", help="dataset root, as for train.py (digits need none: scikit-learn ships them)")
    add("--out", required=True, metavar="VAE_DIR", help="directory to write the VAE to (save_pretrained layout); "
                                                        "an existing one must be an earlier VAE, it is overwritten")
    add("--image-size", type=int, help="images are resized to this side; a multiple of 4")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: "
                        + ", ".join(f"{steps} on {name}" for name, steps in DATASET_STEPS.items())
                        + f", {DEFAULT_STEPS} on the others)")
    add("--batch-size", type=int, help="images per step")
    add("--lr", type=float, help="AdamW peak learning rate, after a linear warm-up and before a cosine decay to 0")
    add("--warmup-steps", type=int, help="linear warm-up steps")
    add("--kl-weight", type=float, help="weight of the KL term (per latent element) against L1 + L2 (per pixel)")
    add("--seed", type=int, help="seed for initialisation, batch order and posterior samples")
    add("--device", choices=("auto", "cuda", "mps", "cpu"), help="'auto': cuda, then mps, then cpu")
    add("--threads", type=int, help="CPU threads; 0 = PyTorch's choice (use 1 on a busy shared CPU, where "
                                    "two threads per process can be many times slower)")
    add("--grid-images", type=int, help="validation images in VAE_DIR/reconstructions.png, across the classes")
    add("--val-images", type=int, help="validation PSNR on the first N validation images (all of digits' 360; a "
                                       "round trip costs ~15 ms an image on one CPU thread)")
    return parser


def check_flags(flags):
    """Refuse bad input before loading anything: one line and exit 2 through run_cli. Fills in --steps."""
    if flags["steps"] is None:
        flags["steps"] = DATASET_STEPS.get(flags["dataset"], DEFAULT_STEPS)
    out = flags["out"]
    if os.path.exists(out) and not (os.path.isdir(out) and (not os.listdir(out) or is_vae_dir(out))):
        raise UserError(f"--out {out!r} exists and is not a VAE directory; pick a new directory, so that nothing "
                        "else is overwritten")
    for flag, least in dict(steps=1, batch_size=1, grid_images=1, warmup_steps=0, threads=0, val_images=1).items():
        if flags[flag] < least:
            raise UserError(f"--{flag.replace('_', '-')} must be at least {least} (got {flags[flag]})")
    if flags["image_size"] < 8 or flags["image_size"] % 4:
        raise UserError(f"--image-size {flags['image_size']} must be a multiple of 4, at least 8")


def is_vae_dir(path):
    """Whether `path` holds an AutoencoderKL written by save_pretrained (a train.py run also has config.json)."""
    try:
        with open(os.path.join(path, "config.json")) as file:
            return json.load(file).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError, AttributeError):
        return False


def load_split(dataset, data_dir, split, image_size):
    """-> (images [N, 3, S, S] float32 in [0, 1], labels [N] long) for split 'train' or 'val'."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return load_image_tensors(dataset, data_dir, split, image_size)


def build_vae():
    """A small AutoencoderKL in the SD layout: ~0.9M parameters, 4 latent channels, downsampling 4."""
    from diffusers import AutoencoderKL
    blocks = len(BLOCK_OUT_CHANNELS)
    return AutoencoderKL(block_out_channels=BLOCK_OUT_CHANNELS, layers_per_block=1, norm_num_groups=16,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks,
                         latent_channels=4, mid_block_add_attention=False)  # attention buys nothing on 8 x 8


def train(vae, images, flags, device):
    """Fit vae on images [N, 3, S, S] in [0, 1]: L1 + L2 on a posterior sample's decoding, plus kl_weight * KL."""
    from tqdm import tqdm
    optimizer = torch.optim.AdamW(vae.parameters(), lr=flags["lr"], weight_decay=0.0)  # tiny model, no decay
    generator = torch.Generator().manual_seed(flags["seed"])
    order, position = torch.randperm(len(images), generator=generator), 0
    vae.train()
    for step in (bar := tqdm(range(flags["steps"]), desc="training VAE", unit="step", dynamic_ncols=True)):
        if position + flags["batch_size"] > len(order):  # a new epoch: reshuffle
            order, position = torch.randperm(len(images), generator=generator), 0
        batch = images[order[position:position + flags["batch_size"]]].to(device) * 2 - 1  # as LatentProjection
        position += flags["batch_size"]
        posterior = vae.encode(batch).latent_dist
        # Decoding a sample (not the mode), as SD does, makes the decoder tolerate latents that are slightly off.
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
        reconstruction_loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element, so the weight is size-free
        loss = reconstruction_loss + flags["kl_weight"] * kl
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, flags["steps"], flags["warmup_steps"], flags["lr"])   # cosine to 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}", refresh=False)
    vae.eval()


@torch.no_grad()
def batched(function, images, device, batch_size=256):
    """function applied to images [N, ...] a batch at a time on `device` -> its outputs, concatenated on the CPU."""
    return torch.cat([function(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def scale_sample(images, seed):
    """At most SCALE_IMAGES of images [N, ...], a seeded random subset (all of them when N is small)."""
    if len(images) <= SCALE_IMAGES:
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:SCALE_IMAGES]]


def save_reconstructions(originals, reconstructions, captions, path, title):
    """A labelled PNG: a title line, originals [N, 3, S, S] in the top row ('real'), their reconstructions below
    ('VAE'), each column captioned (its class), images drawn k times larger (k whole, k * S >= GRID_MIN_SIDE)."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid
    label_width, title_height, caption_height = 60, 28, 22
    grid = make_grid(torch.cat([originals, reconstructions]).clamp(0, 1), nrow=len(originals), padding=2,
                     pad_value=1.0)
    side, scale = originals.shape[-1], -(-GRID_MIN_SIDE // originals.shape[-1])
    pixels = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    pixels = pixels.resize((pixels.width * scale, pixels.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (label_width + pixels.width, title_height + pixels.height + caption_height), "white")
    canvas.paste(pixels, (label_width, title_height))
    draw, font, small = ImageDraw.Draw(canvas), default_font(14), default_font(11)
    draw.text((8, 6), title, fill="black", font=font)
    for row, label in enumerate(("real", "VAE")):
        draw.text((8, title_height + scale * (2 + row * (side + 2) + side // 2)), label, fill="black", font=font,
                  anchor="lm")
    for column, caption in enumerate(captions):
        centre = label_width + scale * (2 + column * (side + 2) + side // 2)
        draw.text((centre, title_height + pixels.height + 4), caption, fill="dimgray", font=small, anchor="mt")
    canvas.save(path)


def main(argv=None):
    flags = vars(build_parser().parse_args(argv))
    check_flags(flags)
    device = select_device(flags["device"])
    if flags["threads"]:
        torch.set_num_threads(flags["threads"])
    torch.manual_seed(flags["seed"])
    start = time.time()
    train_images, _ = load_split(flags["dataset"], flags["data_dir"], "train", flags["image_size"])
    val_images, val_labels = load_split(flags["dataset"], flags["data_dir"], "val", flags["image_size"])
    val_images, val_labels = val_images[:flags["val_images"]], val_labels[:flags["val_images"]]
    vae = build_vae().to(device)
    train(vae, train_images, flags, device)
    training_seconds = time.time() - start

    # Scale latents to unit variance, as SD's 0.18215 does, so LMD sees the same range whichever VAE it uses.
    sample = scale_sample(train_images, flags["seed"])
    modes = batched(lambda x: vae.encode(x * 2 - 1).latent_dist.mode(), sample, device)  # [n, 4, S/4, S/4]
    scaling_factor = 1 / modes.std().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    # Validation goes through lmd's own LatentProjection: the round trip LMD will see, scaling factor included.
    projection = lmd.LatentProjection(vae, flags["out"])
    reconstructions = batched(lambda x: projection.decode(projection.encode(x)), val_images, device)
    val_psnr = (10 * torch.log10(1 / F.mse_loss(reconstructions, val_images))).item()   # dB, over the whole set
    seconds = time.time() - start

    vae.save_pretrained(flags["out"])
    shown = spread_over_classes(val_labels.tolist(), min(flags["grid_images"], len(val_images)))
    classes = load_image_source(flags["dataset"], flags["data_dir"], "val", flags["image_size"]).classes
    save_reconstructions(val_images[shown], reconstructions[shown], [classes[val_labels[i]] for i in shown],
                         os.path.join(flags["out"], "reconstructions.png"),
                         f"{flags['dataset']}: VAE of {flags['steps']} steps, val PSNR {val_psnr:.2f} dB")
    # Provenance: later tools read this to say where the VAE came from (directory and training set).
    settings = ("dataset", "image_size", "steps", "seed", "batch_size", "lr", "kl_weight")
    record = dict(**{key: flags[key] for key in settings}, data_dir=os.path.abspath(flags["data_dir"]),
                  seconds=round(seconds, 1), training_seconds=round(training_seconds, 1),
                  val_psnr_db=round(val_psnr, 2), scaling_factor=scaling_factor,
                  parameters=sum(p.numel() for p in vae.parameters()), train_size=len(train_images),
                  val_size=len(val_images), scale_images=len(sample), threads=torch.get_num_threads(), trained=True)
    with open(os.path.join(flags["out"], "training.json"), "w") as file:
        json.dump(record, file, indent=2)
    print(f"VAE trained on {flags['dataset']} ({len(train_images)} images, {flags['steps']} steps, {seconds:.0f} s): "
          f"val PSNR {val_psnr:.2f} dB, scaling_factor {scaling_factor:.4f} -> {flags['out']}")


if __name__ == "__main__":
    run_cli(main)
