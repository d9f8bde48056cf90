"""
LMD pretraining: a masked autoencoder on frozen-VAE latents with a progressive mask ratio.

    python train.py --scheduler cosine                                  # CIFAR-10, SD VAE, one GPU or CPU
    python train.py --dataset synthetic --vae tiny --steps 100          # offline, no download at all
    torchrun --nproc_per_node=8 train.py --dataset imagefolder --data-dir /data/imagenet --model base
    python train.py --resume runs/lmd                                   # continue an interrupted run exactly

Writes OUT/config.json, OUT/metrics.jsonl (one JSON object per logged step) and OUT/checkpoint.pt.
"""

import argparse
import json
import os
import signal
import sys
import time

import torch

import lmd

# ----------------------------------------------------------------------------------------------------------------
# Defaults, in one block. Image and patch size default per dataset (lmd.DATASET_DEFAULTS).
DEFAULTS = dict(
    scheduler="cosine", mask_ratio=0.75, mask_start=0.15, mask_end=0.75, mask_plateau=0.40, ramp_fraction=2 / 3,
    dataset="cifar10", data_dir="./data", synthetic_size=5000, vae=lmd.DEFAULT_VAE, image_size=None, patch_size=None,
    model="small", steps=10_000, batch_size=256, base_lr=1.5e-4, lr=None, weight_decay=0.05, warmup_steps=None,
    normalize_targets=True, cache=True, augment="auto", precision="auto", compile=False,
    device="auto", seed=0, num_workers=None, out="runs/lmd", log_every=10, save_every=500, eval_images=256,
    resume=None,
)
# Flags that may change when a run is resumed; every other flag must match the run's config.json.
RESUME_OVERRIDES = {"device", "num_workers", "log_every", "save_every", "compile", "eval_images", "precision"}


def build_parser():
    # Unset flags stay absent (SUPPRESS) so that resume can tell what was typed from what was defaulted.
    parser = argparse.ArgumentParser(description="LMD pretraining (masked autoencoder on VAE latents).",
                                     argument_default=argparse.SUPPRESS)

    def add(flag, **kwargs):
        default = DEFAULTS[flag[2:].replace("-", "_")]
        if default is not None and "%(default)" not in kwargs.get("help", ""):
            kwargs["help"] += f" (default: {default:.4g})" if isinstance(default, float) else f" (default: {default})"
        parser.add_argument(flag, **kwargs)

    add("--scheduler", choices=lmd.SCHEDULERS, help="mask-ratio schedule; 'constant' is the MAE baseline")
    add("--mask-ratio", type=float, help="the fixed ratio of --scheduler constant")
    add("--mask-start", type=float, help="mask ratio at the start of the progressive schedules")
    add("--mask-end", type=float, help="mask ratio at the end of the ramp, held afterwards")
    add("--mask-plateau", type=float, help="the middle plateau of --scheduler piecewise")
    add("--ramp-fraction", type=float, help="fraction of training over which the ratio ramps up")
    add("--dataset", choices=lmd.DATASETS, help="training data; 'synthetic' needs no download")
    add("--synthetic-size", type=int, help="training images of --dataset synthetic (validation: a fifth of it)")
    add("--data-dir", help="dataset root (CIFAR is downloaded here; imagefolder reads DIR/train and DIR/val); "
                           "the latent cache is written under DIR/lmd_latents")
    add("--vae", help="Hub id or local directory of a diffusers AutoencoderKL/AutoencoderTiny; 'tiny' = small "
                      "untrained VAE for offline tests; 'none' = pixel space (the pixel MAE baseline)")
    add("--image-size", type=int, help="images are resized to this (default: 128 for CIFAR, 224 for imagefolder, "
                                       "64 for synthetic)")
    add("--patch-size", type=int, help="patch side on the latent grid (pixels with --vae none); default 2 for "
                                       "CIFAR/synthetic latents, 4 for imagefolder; 4x that with --vae none")
    add("--model", choices=lmd.MODEL_SIZES, help="model size (base is the paper's ViT-B encoder)")
    add("--steps", type=int, help="total optimizer steps")
    add("--batch-size", type=int, help="global batch size (split across processes under torchrun)")
    add("--base-lr", type=float, help="learning rate per 256 images: lr = base_lr * batch_size / 256")
    add("--lr", type=float, help="absolute peak learning rate (overrides --base-lr)")
    add("--weight-decay", type=float, help="AdamW weight decay (none on biases, norms and tokens)")
    add("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay (default: 5%% of --steps)")
    add("--normalize-targets", action=argparse.BooleanOptionalAction,
        help="predict per-token normalised targets (MAE's norm_pix_loss; the authors used it)")
    add("--cache", action=argparse.BooleanOptionalAction,
        help="encode each image (and its flip) once and train on the cached latents; --no-cache encodes "
             "every step and allows full augmentation")
    add("--augment", choices=("auto", "flip", "full"),
        help="'flip': resize + horizontal flip; 'full': random resized crop + flip (needs --no-cache); "
             "'auto': flip when caching, full otherwise")
    add("--precision", choices=("auto", "fp32", "bf16"), help="'auto': bf16 autocast on CUDA, fp32 elsewhere")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (opt-in)")
    add("--device", choices=("auto", "cuda", "mps", "cpu"), help="'auto': cuda, then mps, then cpu")
    add("--seed", type=int, help="seed for initialisation, data order, masks and augmentation")
    add("--num-workers", type=int, help="image loading processes when not training on cached latents "
                                        "(default: CPU count - 1, at most 8)")
    add("--out", help="run directory for config.json, metrics.jsonl and checkpoints")
    add("--log-every", type=int, help="write a metrics line every N steps")
    add("--save-every", type=int, help="save OUT/checkpoint.pt every N steps (and always at the end)")
    add("--eval-images", type=int, help="held-out images for the final masked-token loss at ratio 0.75")
    add("--resume", metavar="RUN", help="continue the run in this directory (or checkpoint file) exactly")
    return parser


def parse_flags(argv=None):
    """-> (all flags with defaults filled in, the set of flags actually given)."""
    given = vars(build_parser().parse_args(argv))
    return {**DEFAULTS, **given}, set(given)


def resolve_config(flags, given):
    """The run's full config: the flags, the per-dataset defaults, and everything derived from them."""
    config = {k: v for k, v in flags.items() if k != "resume"}
    defaults = lmd.DATASET_DEFAULTS[config["dataset"]]
    config["image_size"] = config["image_size"] or defaults["image_size"]
    config["patch_size"] = config["patch_size"] or lmd.default_patch_size(config["dataset"], config["vae"])
    config["warmup_steps"] = config["warmup_steps"] if config["warmup_steps"] is not None else config["steps"] // 20
    config["lr"] = config["lr"] or config["base_lr"] * config["batch_size"] / 256
    config["cache"] = config["cache"] and config["vae"] != "none"   # pixels need no encoding
    if config["augment"] == "auto":
        config["augment"] = "full" if given and flags.get("cache") is False else "flip"
    if config["augment"] == "full" and config["cache"]:
        raise lmd.UserError("--augment full (random resized crops) cannot be cached; add --no-cache")
    for flag in ("steps", "batch_size", "log_every", "save_every"):
        if config[flag] < 1:
            raise lmd.UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {config[flag]})")
    return config


def resumed_config(flags, given, checkpoint):
    """The saved config, with the few flags that may change on resume; any other changed flag is an error."""
    config = dict(checkpoint["config"])
    for flag in given - {"resume", "out"}:
        if flag in RESUME_OVERRIDES:
            config[flag] = flags[flag]
        elif flags[flag] != config.get(flag):
            raise lmd.UserError(f"--{flag.replace('_', '-')} {flags[flag]} differs from the resumed run "
                                f"({config.get(flag)}); drop the flag to continue the same run")
    return config


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to save and stop at the end of the current step; a second one aborts."""

    def __init__(self):
        self.requested = False
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, self._handle)

    def _handle(self, signal_number, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signal_number).name}: saving a checkpoint at the end of this step "
              "(send it again to abort without saving)", file=sys.stderr)


class TrainingBatches:
    """Latents for each step: indexed from the latent cache, or loaded and encoded on the fly.

    Both are a pure function of (seed, step, rank): the data order, the flips and the crops of a resumed run are
    the ones the uninterrupted run would have used.
    """

    def __init__(self, config, projection, dist, start_step):
        self.config, self.projection, self.dist = config, projection, dist
        self.per_rank = config["batch_size"] // dist.world_size
        source = lmd.load_image_source(config["dataset"], config["data_dir"], "train", config["image_size"],
                                       config["synthetic_size"])
        if len(source) < config["batch_size"]:
            raise lmd.UserError(f"the training set has {len(source)} images, fewer than one batch "
                                f"(--batch-size {config['batch_size']}); lower --batch-size")
        self.num_items = len(source)
        if config["cache"]:
            self.cache = lmd.dataset_latents(config, "train", projection, dist, source)
            self.loader = None
        else:
            images = lmd.ImageDataset(source, config["image_size"], config["augment"])
            workers = config["num_workers"] if config["num_workers"] is not None else min(8, (os.cpu_count() or 2) - 1)
            self.loader = iter(torch.utils.data.DataLoader(
                images, batch_sampler=self._seeded_batches(start_step), num_workers=workers,
                pin_memory=dist.device.type == "cuda", persistent_workers=workers > 0))

    def _indices(self, step):
        return lmd.batch_indices(step, self.num_items, self.config["batch_size"], self.config["seed"],
                                 self.dist.rank, self.dist.world_size)

    def _seeded_batches(self, start_step):
        for step in range(start_step, self.config["steps"]):
            yield [(int(i), lmd.augmentation_seed(self.config["seed"], step, int(i))) for i in self._indices(step)]

    def latents(self, step):
        """This rank's latents for `step` [batch / world_size, C, h, w] on the training device."""
        device = self.dist.device
        if self.loader is not None:
            images, _ = next(self.loader)
            return self.projection.encode(images.to(device, non_blocking=True))
        indices = self._indices(step)
        flips = torch.randint(0, 2, (len(indices),), generator=lmd.step_generator(self.config["seed"], step, self.dist.rank))
        batch = self.cache["latents"][indices, flips]
        if device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True).float()


@torch.no_grad()
def held_out_loss(model, projection, config, device, mask_ratio=0.75, num_images=256):
    """Masked-token loss on the first `num_images` validation images at a fixed ratio and a fixed mask seed."""
    source = lmd.load_image_source(config["dataset"], config["data_dir"], "val", config["image_size"],
                                   config["synthetic_size"])
    images = lmd.ImageDataset(source, config["image_size"])
    subset = torch.utils.data.Subset(images, range(min(num_images, len(images))))
    generator = lmd.step_generator(config["seed"], -1, device=device)
    model.eval()
    total, count = 0.0, 0
    for batch, _ in torch.utils.data.DataLoader(subset, batch_size=64):
        latents = projection.encode(batch.to(device))
        loss, _, _ = model(latents, mask_ratio, config["normalize_targets"], generator=generator)
        total, count = total + loss.item() * len(batch), count + len(batch)
    model.train()
    return total / max(count, 1)


def save_checkpoint(path, model, optimizer, step, config):
    lmd.save_atomic(dict(kind=lmd.CHECKPOINT_KIND, model=model.state_dict(), optimizer=optimizer.state_dict(),
                         step=step, config=config, torch_version=torch.__version__,
                         rng=dict(cpu=torch.get_rng_state(),
                                  cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)),
                    path)


def main(argv=None):
    flags, given = parse_flags(argv)
    resume = flags["resume"]
    checkpoint = lmd.load_checkpoint(resume) if resume else None
    config = resumed_config(flags, given, checkpoint) if checkpoint else resolve_config(flags, given)
    if checkpoint:
        config["out"] = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
    schedule = lmd.MaskSchedule(config["scheduler"], config["mask_start"], config["mask_end"], config["mask_plateau"],
                                config["ramp_fraction"], config["mask_ratio"])
    dist = lmd.Distributed(config["device"])
    if config["batch_size"] % dist.world_size:
        raise lmd.UserError(f"--batch-size {config['batch_size']} must divide evenly over {dist.world_size} processes")
    torch.manual_seed(config["seed"])
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    projection = lmd.load_projection(config["vae"], dist.device, announce=dist.is_main)
    model = lmd.build_model(config, projection).to(dist.device)
    optimizer = torch.optim.AdamW(lmd.parameter_groups(model, config["weight_decay"]), lr=config["lr"],
                                  betas=(0.9, 0.95), fused=dist.device.type == "cuda")
    start_step = 0
    if checkpoint:
        lmd.load_model_state(model, checkpoint["model"], resume)
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        start_step = checkpoint["step"]
    batches = TrainingBatches(config, projection, dist, start_step)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    if config["compile"]:
        train_model = torch.compile(train_model, dynamic=True)  # the visible-token count changes with the ratio
    autocast = lmd.autocast_dtype(config["precision"], dist.device)
    os.makedirs(config["out"], exist_ok=True)
    checkpoint_path = os.path.join(config["out"], "checkpoint.pt")
    metrics_path = os.path.join(config["out"], "metrics.jsonl")
    if dist.is_main:
        with open(os.path.join(config["out"], "config.json"), "w") as file:
            json.dump(config, file, indent=2)
        keep_metrics_before(metrics_path, start_step)
        print(f"LMD: {config['model']} model, {model.num_tokens} tokens of {model.patch_size}x{model.patch_size}x"
              f"{model.channels}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{config['scheduler']} schedule, {dist.world_size} process(es) on {dist.device}", file=sys.stderr)

    from tqdm import tqdm
    stop = StopRequest()
    bar = tqdm(range(start_step, config["steps"]), initial=start_step, total=config["steps"], desc="pretraining",
               disable=not dist.is_main, dynamic_ncols=True)
    last_saved, started = start_step, time.time()
    for step in bar:
        mask_ratio = schedule(step / config["steps"])
        lr = lmd.learning_rate(step, config["steps"], config["warmup_steps"], config["lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        latents = batches.latents(step)
        generator = lmd.step_generator(config["seed"], step, dist.rank, dist.device)
        with torch.autocast(dist.device.type, dtype=autocast, enabled=autocast is not None):
            loss, _, _ = train_model(latents, mask_ratio, config["normalize_targets"], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if not torch.isfinite(torch.tensor(loss_value)):
            raise lmd.UserError(f"the loss became {loss_value} at step {step}; the last good checkpoint (step "
                                f"{last_saved}) is kept in {config['out']}; lower --lr or use --precision fp32")
        done = step + 1
        bar.set_postfix(loss=f"{loss_value:.4f}", mask_ratio=f"{mask_ratio:.3f}", lr=f"{lr:.2e}")
        if dist.is_main and (done % config["log_every"] == 0 or done == config["steps"]):
            elapsed = time.time() - started
            record = dict(step=done, loss=loss_value, mask_ratio=mask_ratio, lr=lr,
                          images_per_second=(done - start_step) * config["batch_size"] / elapsed)
            with open(metrics_path, "a") as file:
                file.write(json.dumps(record) + "\n")
        stopping = dist.any(stop.requested)
        if done % config["save_every"] == 0 or done == config["steps"] or stopping:
            if dist.is_main:
                save_checkpoint(checkpoint_path, model, optimizer, done, config)
            last_saved = done
        if stopping:
            bar.close()
            print(f"stopped at step {done}; continue with: python train.py --resume {config['out']}", file=sys.stderr)
            return
    bar.close()
    if dist.is_main:
        loss = held_out_loss(model, projection, config, dist.device, num_images=config["eval_images"])
        summary = dict(step=config["steps"], held_out_loss_at_0_75=loss, minutes=(time.time() - started) / 60)
        with open(os.path.join(config["out"], "summary.json"), "w") as file:
            json.dump(summary, file, indent=2)
        print(f"done: held-out masked-token loss at ratio 0.75 = {loss:.4f}; checkpoint: {checkpoint_path}",
              file=sys.stderr)
    if dist.enabled:
        torch.distributed.destroy_process_group()


def keep_metrics_before(path, step):
    """On resume, drop metric lines past the checkpoint's step: they will be logged again."""
    if not os.path.exists(path):
        return
    with open(path) as file:
        kept = [line for line in file if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as file:
        file.writelines(kept)


if __name__ == "__main__":
    lmd.run_cli(main)
