"""LMD pretraining: a masked autoencoder on frozen-VAE latents with a progressive mask ratio; or one of its diffusion
relatives (relatives/): --objective ddpm (plain diffusion), maskdm (MaskDM's masked pretraining) or umd (UMD).

    python train.py --scheduler cosine                                  # CIFAR-10, SD VAE, one GPU or CPU
    python train.py --objective ddpm --dataset digits --vae VAE --model tiny --steps 3000 --out R   # then sample.py
    python train.py --dataset synthetic --vae tiny --steps 100          # offline, no download at all
    torchrun --nproc_per_node=8 train.py --dataset imagefolder --data-dir /data/imagenet --model base
    python train.py --resume runs/lmd                                   # continue an interrupted run exactly

Writes OUT/config.json, OUT/metrics.jsonl (a JSON object per logged step), OUT/checkpoint.pt, OUT/grid_*.png
(LMD: reconstructions; diffusion: samples), OUT/curves.png and, at the end, OUT/summary.json.
"""

import argparse
import json
import os
import sys
import time

import torch

import lmd
import relatives
from util import checkpoints
from util import cli
from util import datasets
from util import devices
from util import optim
from util import pictures
from util import pretraining
from util import sampling
from util import vaes

# ----------------------------------------------------------------------------------------------------------------
# Defaults, in one block. Image and patch size default per dataset (datasets.DEFAULT_IMAGE_SIZE, default_patch_size).
DEFAULTS = dict(
    objective="lmd", init=None,
    dataset="cifar10", data_dir="./data", synthetic_size=5000, vae=vaes.DEFAULT_VAE, image_size=None, patch_size=None,
    model="small", steps=10_000, batch_size=256, base_lr=1.5e-4, lr=None, weight_decay=0.05, warmup_steps=None,
    cache=True, augment="auto", precision="auto", compile=False,
    device="auto", seed=0, num_workers=None, out="runs/lmd", log_every=10, save_every=500, eval_images=256,
    resume=None, stop_after_step=None, grid_every=500, eval_only=False, encode_batch_size=vaes.ENCODE_CHUNK,
)   # the objectives' own flags (--scheduler, --mask-ratio, ...) and their defaults are in their records (relatives/)
# Flags that may change when a run is resumed; every other flag must match the run's config.json.
RESUME_OVERRIDES = {"device", "num_workers", "log_every", "save_every", "compile", "eval_images", "precision",
                    "stop_after_step", "grid_every", "eval_only", "encode_batch_size"}


def show(value):
    return f"{value:.4g}" if isinstance(value, float) else f"{value}"


def defaults(objective="lmd"):
    """Every flag's default for a run of `objective`: the shared ones (DEFAULTS), each objective's own flags at
    their first declaration, then this objective's own values (relatives/: its record's flags and defaults)."""
    declared = {key: owners[0][1].default for key, owners in relatives.own_flags().items()}
    return {**DEFAULTS, **declared, **relatives.get(objective).run_defaults(), "objective": objective}


def own_flag_help(owners):
    """The help of an objective's own flag, from its records: what it does for each objective that reads it."""
    helps = [own.help for _, own in owners]
    if len(set(helps)) == 1:
        text = f"{', '.join(name for name, _ in owners)}: {helps[0]}"
    else:
        text = "; ".join(f"{name}: {own.help}" for name, own in owners)
    first = owners[0][1].default
    others = "".join(f"; {name}: {show(own.default)}" for name, own in owners[1:] if own.default != first)
    return f"{text} (default: {show(first)}{others})"


def build_parser():
    # Unset flags stay absent (SUPPRESS) so that resume can tell what was typed from what was defaulted.
    parser = cli.ArgumentParser(description="LMD pretraining (masked autoencoder on VAE latents).",
                                argument_default=argparse.SUPPRESS)

    def add(flag, **kwargs):
        key = flag[2:].replace("-", "_")
        if DEFAULTS[key] is not None and "%(default)" not in kwargs.get("help", ""):
            others = "".join(f"; {o.name}: {show(o.defaults[key])}" for o in relatives.REGISTRY.values()
                             if key in o.defaults)
            kwargs["help"] += f" (default: {show(DEFAULTS[key])}{others})"
        parser.add_argument(flag, **kwargs)

    add("--objective", choices=relatives.names(), help="; ".join(f"'{objective.name}': {objective.summary}"
                                                              for objective in relatives.REGISTRY.values()))
    add("--init", metavar="RUN", help="start from the weights of an earlier run (LMD: its encoder; ddpm or "
                                      "MaskDM: every weight that fits), e.g. --objective ddpm --init MASKDM_RUN")
    for key, owners in relatives.own_flags().items():   # each objective's own flags, from its record
        parser.add_argument("--" + key.replace("_", "-"), help=own_flag_help(owners), **owners[0][1].argparse)
    add("--dataset", choices=datasets.DATASETS, help="training data; 'synthetic' needs no download")
    add("--synthetic-size", type=int, help="training images of --dataset synthetic (validation: a fifth of it)")
    add("--data-dir", help="dataset root (CIFAR is downloaded here; imagefolder reads DIR/train and DIR/val); "
                           "the latent cache is written under DIR/lmd_latents")
    add("--vae", help="Hub id or local directory of a diffusers AutoencoderKL/AutoencoderTiny; 'tiny' = small "
                      "untrained VAE for offline tests; 'none' = pixel space (the pixel MAE baseline)")
    add("--image-size", type=int, help="images are resized to this (default: 128 for CIFAR, 32 for MNIST and "
                                       "digits, 224 for imagefolder, 64 for synthetic)")
    add("--patch-size", type=int, help="patch side on the latent grid (pixels with --vae none); default: the "
        "largest of 4, 2, 1 leaving at least 4x4 tokens, and in pixels that times 8/2 (224 px: 4 latent, 16 px)")
    add("--model", choices=lmd.MODEL_SIZES, help="model size (base is the paper's ViT-B encoder)")
    add("--steps", type=int, help="total optimizer steps")
    add("--batch-size", type=int, help="global batch size (split across processes under torchrun)")
    add("--base-lr", type=float, help="learning rate per 256 images: lr = base_lr * batch_size / 256")
    add("--lr", type=float, help="absolute peak learning rate (overrides --base-lr)")
    add("--weight-decay", type=float, help="AdamW weight decay (none on biases, norms and tokens)")
    add("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay (default: 5%% of --steps)")
    add("--cache", action=argparse.BooleanOptionalAction,
        help="encode each image (and its flip) once and train on the cached latents; --no-cache encodes "
             "every step and allows full augmentation")
    add("--augment", choices=("auto", *datasets.AUGMENTATIONS),
        help="'flip': resize + horizontal flip; 'crop': random resized crop; 'full': crop + flip (crops need "
             "--no-cache or --vae none); 'auto': the crops where possible, the flip except for digit sets")
    add("--precision", choices=("auto", "fp32", "bf16"), help="'auto': bf16 autocast on GPUs with native bf16, "
                                                              "fp32 elsewhere")
    add("--encode-batch-size", type=int, metavar="N", help="images per call of the frozen VAE, when building the "
        "latent cache and with --no-cache (lower it if encoding runs out of memory)")
    add("--compile", action=argparse.BooleanOptionalAction,
        help="torch.compile the transformer blocks (opt-in; the first steps are slow while it compiles)")
    add("--device", choices=("auto", "cuda", "mps", "cpu"), help="'auto': cuda, then mps, then cpu")
    add("--seed", type=int, help="seed for initialisation, data order, masks and augmentation")
    add("--num-workers", type=int, help="image loading processes when not training on cached latents "
                                        "(default: the cores / processes per node - 1, at most 8)")
    add("--out", help="run directory for config.json, metrics.jsonl and checkpoints")
    add("--log-every", type=int, help="write a metrics line every N steps (and at every grid); under torchrun the "
                                      "processes also agree on a stop request then (one host sync)")
    add("--save-every", type=int, help="save OUT/checkpoint.pt every N steps (and always at the end)")
    add("--eval-images", type=int, help="validation images for the held-out masked-token loss at ratio 0.75 "
                                        "(at every grid and at the end)")
    add("--resume", metavar="RUN", help="continue the run in this directory (or checkpoint file) exactly")
    add("--grid-every", type=int, metavar="N", help="write OUT/grid_stepNNNNNN.png (8 fixed validation images "
        "reconstructed, or samples) and the held-out loss every N steps, OUT/grid_final.png at the end; 0: none")
    add("--eval-only", action="store_true", help="with --resume RUN: write RUN/grid_eval.png and RUN/eval.json "
        "(the held-out loss) and exit; trains nothing, leaves the checkpoint untouched")
    add("--stop-after-step", type=int, metavar="STEP", help="save and stop after this step, as if interrupted "
        "(to split a long run into jobs that fit a time limit); continue with --resume")
    return parser


def parse_flags(argv=None):
    """-> (all flags, the objective's own defaults over LMD's; the set of flags given). Local data and VAE paths are
    made absolute, so that the run's config (and finetune.py) finds them, and one latent cache, from anywhere."""
    given = vars(build_parser().parse_args(argv))
    flags = {**defaults(given.get("objective", DEFAULTS["objective"])), **given}
    flags.update(data_dir=os.path.abspath(flags["data_dir"]), vae=vaes.vae_name(flags["vae"]))
    return flags, set(given)


def resolve_config(flags, given):
    """The run's full config: the flags, the per-dataset defaults, and everything derived from them."""
    config = {k: v for k, v in flags.items() if k != "resume"}
    objective = config["objective"]
    for flag in sorted(given & relatives.flags_not_read(objective)):
        raise cli.UserError(f"--{flag.replace('_', '-')} does not apply to --objective {objective}; drop it")
    config["image_size"] = config["image_size"] or datasets.DEFAULT_IMAGE_SIZE[config["dataset"]]
    config["warmup_steps"] = config["warmup_steps"] if config["warmup_steps"] is not None else config["steps"] // 20
    config["lr"] = config["lr"] or config["base_lr"] * config["batch_size"] / 256
    config["cache"] = config["cache"] and config["vae"] != "none"   # pixels need no encoding
    if config["augment"] == "auto":   # decided from the effective cache setting (pixels are never cached)
        config["augment"] = datasets.default_augment(config["dataset"], config["cache"])
    if config["augment"] in ("crop", "full") and config["cache"]:
        raise cli.UserError(f"--augment {config['augment']} (random resized crops) cannot be cached; add --no-cache")
    for flag in ("steps", "batch_size", "log_every", "save_every", "encode_batch_size"):
        if config[flag] < 1:
            raise cli.UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {config[flag]})")
    return config


def load_config(argv):
    """-> (the run's config, the checkpoint to resume from or None)."""
    flags, given = parse_flags(argv)
    if flags["resume"]:
        return pretraining.resumed_run(flags, given, RESUME_OVERRIDES)
    return resolve_config(flags, given), None


def build_run(config, checkpoint, dist):
    """The projection, model and optimizer of a run, restored from `checkpoint` when resuming."""
    torch.manual_seed(config["seed"])
    projection = vaes.open_projection(config["vae"], dist.device, announce=dist.is_main)
    config["patch_size"] = config["patch_size"] or datasets.default_patch_size(config["image_size"],
                                                                               projection.downsample)
    config["vae_provenance"] = checkpoint["config"].get("vae_provenance") if checkpoint else projection.provenance
    model = checkpoints.build_model(config, projection)
    if config["init"] and not checkpoint:   # a resumed run has its weights already
        init = config["init_from"] = checkpoints.load_init(model, config["init"], config)
        if dist.is_main:
            print(f"--init: {init['tensors_loaded']} tensors from {config['init']} ({init['objective']}, step "
                  f"{init['step']}); fresh: {', '.join(init['fresh_parts']) or 'nothing'}", file=sys.stderr)
    model = model.to(dist.device)
    optimizer = torch.optim.AdamW(optim.parameter_groups(model, config["weight_decay"]), lr=config["lr"],
                                  betas=(0.9, 0.95), fused=dist.device.type in ("cuda", "cpu"))
    if checkpoint:
        checkpoints.load_model_state(model, checkpoint["model"], checkpoint["path"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        checkpoints.restore_rng_state(checkpoint["rng"], dist.device)   # on any number of GPUs
    return projection, model, optimizer


def train_steps(config, schedule, model, train_model, optimizer, batches, dist, start_step, stop, held_out,
                save_grid):
    """The training loop. -> the step it ended at (config["steps"] unless stopped early). The losses reach the host
    only at logged, saved and grid steps, in one transfer, and each batch is prepared before the host waits for the
    last step. Under torchrun one all-reduce at those steps tells every rank whether any was signalled or saw a
    non-finite loss, so all stop, or fail, at the same step (a stop waits at most --log-every - 1 steps)."""
    from tqdm import tqdm
    autocast = devices.autocast_dtype(config["precision"], dist.device)
    checkpoint_path, metrics_path = (os.path.join(config["out"], name) for name in ("checkpoint.pt", "metrics.jsonl"))
    last_step = min(config["steps"], config["stop_after_step"] or config["steps"])
    bar = tqdm(range(start_step, last_step), initial=start_step, total=config["steps"], desc=config["objective"],
               disable=not dist.is_main, dynamic_ncols=True)
    last_saved, started, unread = start_step, time.time(), []   # unread: this rank's losses not yet on the host
    latents = batches.latents(start_step) if start_step < last_step else None
    for step in bar:
        lr = optim.learning_rate(step, config["steps"], config["warmup_steps"], config["lr"])
        generator = sampling.step_generator(config["seed"], step, dist.rank, dist.device, stream="masks")
        loss, mask_ratio = pretraining.training_step(train_model, optimizer, latents, schedule, step / config["steps"],
                                                     lr, generator, config["normalize_targets"], autocast)
        done = step + 1
        unread.append(loss)
        if done < last_step:   # the next batch is gathered on the CPU while the GPU still computes this step
            latents = batches.latents(done)
        scheduled = done == last_step or any(every and done % every == 0 for every in
                                             (config["log_every"], config["save_every"], config.get("grid_every")))
        interrupted, non_finite_anywhere = stop.requested and not dist.enabled, False   # one process: at every step
        if dist.enabled and scheduled:
            non_finite = (~torch.isfinite(torch.stack(unread))).any()   # any step since the last check
            interrupted, non_finite_anywhere = dist.any_each(stop.requested, non_finite)
        if not (scheduled or interrupted):
            continue
        logged = done % config["log_every"] == 0 or done == last_step
        saving = done % config["save_every"] == 0 or done == last_step or interrupted
        gridding = dist.is_main and config.get("grid_every") and done % config["grid_every"] == 0
        losses, unread = torch.stack(unread).tolist(), []
        # never save weights that a non-finite loss has touched
        pretraining.check_finite(losses, done, non_finite_anywhere, last_saved, config["out"])
        bar.set_postfix(loss=f"{losses[-1]:.4f}", mask_ratio=f"{mask_ratio:.3f}", lr=f"{lr:.2e}")
        if dist.is_main and (logged or gridding):
            record = dict(step=done, loss=losses[-1], mask_ratio=mask_ratio, lr=lr,
                          images_per_second=(done - start_step) * config["batch_size"] / (time.time() - started))
            if gridding:   # the held-out loss at 0.75 beside the training loss (own masks: resume stays exact)
                record["held_out_loss"] = held_out(model)
            pretraining.append_metrics(metrics_path, record)
        if gridding:
            save_grid(f"step{done:06d}", done)
        if saving:
            if dist.is_main:
                checkpoints.save_run(checkpoint_path, model, optimizer, done, config, dist.device)
            last_saved = done
        if interrupted:
            break
    bar.close()
    return last_saved


def main(argv=None):
    config, checkpoint = load_config(argv)
    schedule = relatives.of(config).schedule(config)   # first thing: bad ratios fail before any data is encoded
    eval_only = config.pop("eval_only", False)   # a one-off action, never part of a run's saved config
    if eval_only and not checkpoint:
        raise cli.UserError("--eval-only evaluates a saved run: add --resume RUN (a run directory or checkpoint)")
    dist = devices.Distributed(config["device"])
    if config["batch_size"] % dist.world_size:
        raise cli.UserError(f"--batch-size {config['batch_size']} must divide evenly over {dist.world_size} processes")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dist.device.type == "cuda"   # TF32
    projection, model, optimizer = build_run(config, checkpoint, dist)
    start_step = checkpoint["step"] if checkpoint else 0
    if eval_only:
        return pretraining.evaluate_saved_run(model, projection, config, dist, start_step)
    batches = pretraining.TrainingBatches(config, projection, dist, start_step)
    if config["compile"]:
        devices.compile_transformer_blocks(model)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    pretraining.start_run_directory(config, model, dist, start_step)
    held_out = pretraining.held_out_loss(projection, config, dist.device)
    save_grid = pictures.grid_writer(model, projection, config)
    started = time.time()
    with pretraining.StopRequest() as stop:
        step = train_steps(config, schedule, model, train_model, optimizer, batches, dist, start_step, stop,
                           held_out, save_grid)
    if step < config["steps"] and dist.is_main:
        print(f"stopped after step {step}; continue with: python train.py --resume {config['out']}", file=sys.stderr)
    elif step == config["steps"] and dist.is_main:
        loss = held_out(model)
        summary = dict(step=step, **held_out.record(loss), minutes_this_session=(time.time() - started) / 60)
        with open(os.path.join(config["out"], "summary.json"), "w") as file:
            json.dump(summary, file, indent=2)
        print(f"done: {held_out.words()} = {loss:.4f}; "
              f"checkpoint: {os.path.join(config['out'], 'checkpoint.pt')}", file=sys.stderr)
        save_grid("final", step)
    if dist.is_main:  # the curves of every run, finished or stopped
        pictures.plot_curves(os.path.join(config["out"], "metrics.jsonl"), os.path.join(config["out"], "curves.png"))
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli.run_cli(main)
