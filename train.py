"""LMD pretraining: a masked autoencoder on frozen-VAE latents with a progressive mask ratio (lmd.py is the method).

    python train.py --dataset fashion-mnist        # the laptop path: the dataset's recipe (RECIPES), VAE included
    python train.py --scheduler cosine             # CIFAR-10, the SD VAE, a GPU
    python train.py --resume runs/lmd              # continue an interrupted run exactly
    torchrun --nproc_per_node=8 train.py --dataset imagefolder --data-dir /data/imagenet --model base

Writes OUT/config.json, OUT/metrics.jsonl (a JSON object per logged step), OUT/checkpoint.pt, OUT/grid_*.png
(reconstructions of masked validation images), OUT/curves.png and, at the end, OUT/summary.json. The lab's relatives
(ddpm, MaskDM, UMD) train through this same loop: python -m lab.train --objective ddpm (main's `objectives`).
"""

import argparse
import json
import os
import sys
import time

import torch

import lmd
from util import checkpoints
from util import cli
from util import datasets
from util import devices
from util import optim
from util import pictures
from util import pretraining
from util import sampling
from util import vaes
from util.objective import Objective, flag, of

# ----------------------------------------------------------------------------------------------------------------
# Defaults, in one block. Image and patch size default per dataset (datasets.DEFAULT_IMAGE_SIZE, default_patch_size).
DEFAULTS = dict(
    objective="lmd", init=None,
    dataset="cifar10", data_dir="./data", synthetic_size=5000, vae=vaes.DEFAULT_VAE, image_size=None, patch_size=None,
    model="small", steps=10_000, batch_size=256, base_lr=1.5e-4, lr=None, weight_decay=0.05, warmup_steps=None,
    cache=True, augment="auto", precision="auto", compile=False,
    device="auto", seed=0, num_workers=None, out="runs/lmd", log_every=10, save_every=500, eval_images=256,
    resume=None, stop_after_step=None, grid_every=500, eval_only=False, encode_batch_size=vaes.ENCODE_CHUNK,
)   # LMD's own flags (--scheduler, --mask-start, ...) are its record's, below; their defaults are lmd.MaskSchedule's
# Flags that may change when a run is resumed; every other flag must match the run's config.json.
RESUME_OVERRIDES = {"device", "num_workers", "log_every", "save_every", "compile", "eval_images", "precision",
                    "stop_after_step", "grid_every", "eval_only", "encode_batch_size"}

# The laptop path: `--dataset NAME` alone runs NAME's recipe (flags given explicitly win). vae=RECIPE_VAE trains the
# dataset's small VAE (tools/train_vae.py, RECIPE_VAE_STEPS steps) into DATA_DIR/vaes/NAME on first use and reuses it.
# Measured (3 seeds, kNN and linear probe beside the random init and the raw pixels): docs/probes.md.
RECIPE_VAE, RECIPE_VAE_STEPS = "recipe", 500
LAPTOP = dict(model="tiny", scheduler="cosine", steps=2000, batch_size=64, base_lr=1.5e-3, normalize_targets=False)
RECIPES = {
    "fashion-mnist": dict(LAPTOP, vae=RECIPE_VAE, out="runs/fashion-mnist"),
    "mnist": dict(LAPTOP, vae=RECIPE_VAE, out="runs/mnist"),
    "digits": dict(LAPTOP, vae="none", patch_size=8, steps=600, out="runs/digits"),   # pixels: a smoke test
}

# Encoding cost on a CPU, for the warning before a long CPU run: the SD VAE's encoder (its layout, random weights)
# encoded 1.6 images/s at 128 px with 2 threads on a 2-core Xeon (docs/engineering.md); cost grows with the pixels.
CPU_ENCODE_RATE, CPU_ENCODE_SIZE = 1.6, 128
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000}


# ----------------------------------------------------------------------------------------------------------------
# LMD's record: its own flags, its network and its schedule. The lab's relatives have records of the same form.
def lmd_network(config, grid, channels):
    """The masked latent ViT of lmd.py."""
    return lmd.MaskedLatentViT(config["model"], grid, config["patch_size"], channels)


def mask_schedule(config):
    """lmd.MaskSchedule from the run's flags: each field is the flag of the same name."""
    return lmd.MaskSchedule(*(config[key] for key in SCHEDULE_FIELDS))


SCHEDULE_FIELDS = tuple(lmd.MaskSchedule.__dataclass_fields__)   # scheduler, mask_start, ..., mask_ratio
LMD = Objective(
    name="lmd", summary="the masked autoencoder with a mask-ratio curriculum", build=lmd_network,
    schedule=mask_schedule, describe=lambda config: f"{config['scheduler']} schedule", decoder_transfers=False,
    held_out_ratio=lambda config: lmd.MAE_MASK_RATIO, held_out_key="held_out_loss_at_0_75",
    flags=dict(
        scheduler=flag(lmd.MaskSchedule.scheduler, "mask-ratio schedule; 'constant' is the MAE baseline",
                       choices=lmd.SCHEDULERS),
        mask_ratio=flag(lmd.MaskSchedule.mask_ratio, "the fixed ratio of --scheduler constant", type=float),
        mask_start=flag(lmd.MaskSchedule.mask_start, "mask ratio at the start of the progressive schedules",
                        type=float),
        mask_end=flag(lmd.MaskSchedule.mask_end, "mask ratio at the end of the ramp, held afterwards", type=float),
        mask_plateau=flag(lmd.MaskSchedule.mask_plateau, "the middle plateau of --scheduler piecewise", type=float),
        ramp_fraction=flag(lmd.MaskSchedule.ramp_fraction, "fraction of training over which the ratio ramps",
                           type=float),
        normalize_targets=flag(True, "predict per-token normalised targets (MAE's norm_pix_loss; the authors used "
                                     "it)", action=argparse.BooleanOptionalAction),
    ),
)
OBJECTIVES = {"lmd": LMD}   # the core's; the lab passes its own, LMD's among them


# ----------------------------------------------------------------------------------------------------------------
# Flags -> the run's config
def show(value):
    return f"{value:.4g}" if isinstance(value, float) else f"{value}"


def own_flags(objectives):
    """{config key: [(objective name, Flag), ...]}: every objective's own flags, in the order given."""
    flags = {}
    for objective in objectives.values():
        for key, own in objective.flags.items():
            flags.setdefault(key, []).append((objective.name, own))
    return flags


def own_flag_help(owners):
    """The help of an objective's own flag, from its records: what it does for each objective that reads it."""
    helps = [own.help for _, own in owners]
    text = f"{', '.join(name for name, _ in owners)}: {helps[0]}" if len(set(helps)) == 1 else \
        "; ".join(f"{name}: {own.help}" for name, own in owners)
    first = owners[0][1].default
    others = "".join(f"; {name}: {show(own.default)}" for name, own in owners[1:] if own.default != first)
    return f"{text} (default: {show(first)}{others})"


def recipe_table():
    """The recipes, one line each, for --help."""
    return "dataset recipes (--dataset NAME alone; explicit flags win):\n" + "\n".join(
        f"  {name:14s} " + " ".join(f"--{key.replace('_', '-')} {show(value)}" if not isinstance(value, bool) else
                                    f"--{'' if value else 'no-'}{key.replace('_', '-')}"
                                    for key, value in recipe.items()) for name, recipe in RECIPES.items()) + \
        f"\n  (--vae {RECIPE_VAE}: a {RECIPE_VAE_STEPS}-step VAE trained into DATA_DIR/vaes/NAME on first use)"


def build_parser(objectives=OBJECTIVES):
    # Unset flags stay absent (SUPPRESS) so that resume can tell what was typed from what was defaulted.
    parser = cli.ArgumentParser(description="LMD pretraining (masked autoencoder on VAE latents).",
                                argument_default=argparse.SUPPRESS, epilog=recipe_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(flag, **kwargs):
        key = flag[2:].replace("-", "_")
        if DEFAULTS[key] is not None and "%(default)" not in kwargs.get("help", ""):
            others = "".join(f"; {o.name}: {show(o.defaults[key])}" for o in objectives.values() if key in o.defaults)
            kwargs["help"] += f" (default: {show(DEFAULTS[key])}{others})"
        parser.add_argument(flag, **kwargs)

    add("--objective", choices=tuple(objectives), help="; ".join(f"'{o.name}': {o.summary}"
                                                                 for o in objectives.values()))
    add("--init", metavar="RUN", help="start from the weights of an earlier run (from an LMD run: its encoder)")
    for key, owners in own_flags(objectives).items():   # LMD's own flags (and the lab's objectives')
        parser.add_argument("--" + key.replace("_", "-"), help=own_flag_help(owners), **owners[0][1].argparse)
    add("--dataset", choices=datasets.DATASETS, help="training data; 'synthetic' needs no download; a dataset with "
                                                     "a recipe (below) gets its recipe's flags")
    add("--synthetic-size", type=int, help="training images of --dataset synthetic (validation: a fifth of it)")
    add("--data-dir", help="dataset root (CIFAR is downloaded here; imagefolder reads DIR/train and DIR/val); "
                           "the latent cache is written under DIR/lmd_latents, the recipes' VAEs under DIR/vaes")
    add("--vae", help="Hub id or local directory of a diffusers AutoencoderKL/AutoencoderTiny; 'tiny' = small "
                      f"untrained VAE for offline tests; 'none' = pixel space (the pixel MAE baseline); "
                      f"'{RECIPE_VAE}' = the dataset's own small VAE, trained on first use")
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
    add("--device", choices=("auto", "cuda", "mps", "cpu"), help="'auto': cuda, then mps, then cpu (a long encoding "
                                                                "on a CPU asks for an explicit --device cpu)")
    add("--seed", type=int, help="seed for initialisation, data order, masks and augmentation")
    add("--num-workers", type=int, help="image loading processes when not training on cached latents "
                                        "(default: the cores / processes per node - 1, at most 8)")
    add("--out", help="run directory for config.json, metrics.jsonl and checkpoints (a recipe's: runs/DATASET)")
    add("--log-every", type=int, help="write a metrics line every N steps (and at every grid); under torchrun the "
                                      "processes also agree on a stop request then (one host sync)")
    add("--save-every", type=int, help="save OUT/checkpoint.pt every N steps (and always at the end)")
    add("--eval-images", type=int, help="validation images for the held-out loss: the objective's loss at a fixed "
                                        "ratio (LMD: the masked-token loss at 0.75), at every grid and at the end")
    add("--resume", metavar="RUN", help="continue the run in this directory (or checkpoint file) exactly")
    add("--grid-every", type=int, metavar="N", help="write OUT/grid_stepNNNNNN.png (8 fixed validation images "
        "reconstructed, or samples) and the held-out loss every N steps, OUT/grid_final.png at the end; 0: none")
    add("--eval-only", action="store_true", help="with --resume RUN: write RUN/grid_eval.png and RUN/eval.json "
        "(the held-out loss) and exit; trains nothing, leaves the checkpoint untouched")
    add("--stop-after-step", type=int, metavar="STEP", help="save and stop after this step, as if interrupted "
        "(to split a long run into jobs that fit a time limit); continue with --resume")
    return parser


def parse_flags(argv=None, objectives=OBJECTIVES):
    """-> (all flags: DEFAULTS, every objective's own flags, the dataset's recipe, the objective's settings, the flags
    given; the set of flags given). Local data and VAE paths are made absolute, so that the run's config (and
    finetune.py) finds them, and one latent cache, from anywhere."""
    given = vars(build_parser(objectives).parse_args(argv))
    objective = of({"objective": given.get("objective", DEFAULTS["objective"])}, objectives)
    declared = {key: owners[0][1].default for key, owners in own_flags(objectives).items()}
    recipe = dict(RECIPES.get(given.get("dataset"), {}))
    if given.get("vae", recipe.get("vae")) != recipe.get("vae"):   # the recipe's patch fits its own space (digits:
        recipe.pop("patch_size", None)                              # 8 px of pixels), not another VAE's latent grid
    if recipe and objective is not LMD:   # a relative's run of a recipe gets a directory of its own
        recipe["out"] = f"{recipe['out']}-{objective.name}"
    # the recipe beats the objective's own defaults (LMD's normalised targets), not its settings (ddpm's batch, lr)
    flags = {**DEFAULTS, **declared, **objective.own_defaults(), **recipe, **objective.defaults, **given,
             "objective": objective.name}
    flags.update(data_dir=os.path.abspath(flags["data_dir"]), vae=vaes.vae_name(flags["vae"]))
    return flags, set(given)


def resolve_config(flags, given, objectives=OBJECTIVES):
    """The run's full config: the flags, the per-dataset defaults, and everything derived from them."""
    config = {k: v for k, v in flags.items() if k != "resume"}
    read = set(of(config, objectives).flags)
    for flag_name in sorted(given & (set(own_flags(objectives)) - read)):
        raise cli.UserError(f"--{flag_name.replace('_', '-')} does not apply to --objective {config['objective']}; "
                            "drop it")
    config["image_size"] = config["image_size"] or datasets.DEFAULT_IMAGE_SIZE[config["dataset"]]
    config["warmup_steps"] = config["warmup_steps"] if config["warmup_steps"] is not None else config["steps"] // 20
    config["lr"] = config["lr"] or config["base_lr"] * config["batch_size"] / 256
    config["cache"] = config["cache"] and config["vae"] != "none"   # pixels need no encoding
    if config["augment"] == "auto":   # decided from the effective cache setting (pixels are never cached)
        config["augment"] = datasets.default_augment(config["dataset"], config["cache"])
    if config["augment"] in ("crop", "full") and config["cache"]:
        raise cli.UserError(f"--augment {config['augment']} (random resized crops) cannot be cached; add --no-cache")
    for flag_name in ("steps", "batch_size", "log_every", "save_every", "encode_batch_size"):
        if config[flag_name] < 1:
            raise cli.UserError(f"--{flag_name.replace('_', '-')} must be at least 1 (got {config[flag_name]})")
    return config


def load_config(argv, objectives=OBJECTIVES):
    """-> (the run's config, the checkpoint to resume from or None)."""
    flags, given = parse_flags(argv, objectives)
    if flags["resume"]:
        return pretraining.resumed_run(flags, given, RESUME_OVERRIDES)
    return resolve_config(flags, given, objectives), None


def check_cpu_cost(config):
    """On a machine without a GPU (--device auto), a pretrained Hub VAE encodes for hours before training starts:
    say what it would cost here, and ask for an explicit --device cpu, before anything is downloaded."""
    hub_vae = config["vae"] not in ("none", "tiny", RECIPE_VAE) and not os.path.isdir(config["vae"])
    if config["device"] != "auto" or not hub_vae or not config["cache"] or devices.select_device("auto").type != "cpu":
        return
    rate = CPU_ENCODE_RATE * (CPU_ENCODE_SIZE / config["image_size"]) ** 2
    images = TRAIN_IMAGES.get(config["dataset"], 10_000) * 2   # every image and its mirror, once, into the cache
    cost = f"{images / rate / 3600:.0f} hours" + ("" if config["dataset"] in TRAIN_IMAGES else " per 10,000 images")
    raise cli.UserError(f"no GPU here: encoding {config['dataset']} through {config['vae']} at {config['image_size']}"
                        f" px would take about {cost} on this CPU before training starts ({rate:.1f} images/s "
                        "measured on a 2-core CPU). On a laptop run: python train.py --dataset fashion-mnist. "
                        "To run this on the CPU anyway, add --device cpu")


def recipe_vae(config):
    """--vae recipe -> the dataset's own VAE directory, DATA_DIR/vaes/DATASET, trained there on first use."""
    from tools import train_vae
    path = os.path.join(config["data_dir"], "vaes", config["dataset"])
    if not train_vae.is_vae_dir(path):
        print(f"the {config['dataset']} recipe's VAE is not trained yet: training it into {path} "
              f"({RECIPE_VAE_STEPS} steps, once; later runs reuse it)", file=sys.stderr)
        train_vae.main(["--dataset", config["dataset"], "--data-dir", config["data_dir"], "--out", path,
                        "--image-size", str(config["image_size"]), "--steps", str(RECIPE_VAE_STEPS)])
    return vaes.vae_name(path)


def build_run(config, checkpoint, dist, objectives=OBJECTIVES):
    """The projection, model and optimizer of a run, restored from `checkpoint` when resuming."""
    torch.manual_seed(config["seed"])
    projection = vaes.open_projection(config["vae"], dist.device, announce=dist.is_main)
    config["patch_size"] = config["patch_size"] or datasets.default_patch_size(config["image_size"],
                                                                               projection.downsample)
    config["vae_provenance"] = checkpoint["config"].get("vae_provenance") if checkpoint else projection.provenance
    model = checkpoints.build_model(config, projection, of(config, objectives))
    if config["init"] and not checkpoint:   # a resumed run has its weights already
        init = config["init_from"] = checkpoints.load_init(model, config["init"], config, objectives)
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


# ----------------------------------------------------------------------------------------------------------------
# The training loop, the training step inline
def train_loop(config, schedule, model, train_model, optimizer, batches, dist, start_step, stop, held_out, save_grid):
    """Steps start_step .. the end (or a stop) -> the step it ended at (config["steps"] unless stopped early). The
    losses reach the host only at logged, saved and grid steps, in one transfer, and each batch is prepared before
    the host waits for the last step. Under torchrun one all-reduce at those steps tells every rank whether any was
    signalled or saw a non-finite loss, so all stop, or fail, at the same step (a stop waits at most --log-every - 1
    steps)."""
    from tqdm import tqdm
    autocast = devices.autocast_dtype(config["precision"], dist.device)
    checkpoint_path, metrics_path = (os.path.join(config["out"], name) for name in ("checkpoint.pt", "metrics.jsonl"))
    last_step = min(config["steps"], config["stop_after_step"] or config["steps"])
    bar = tqdm(range(start_step, last_step), initial=start_step, total=config["steps"], desc=config["objective"],
               disable=not dist.is_main, dynamic_ncols=True)
    last_saved, started, unread = start_step, time.time(), []   # unread: this rank's losses not yet on the host
    latents = batches.latents(start_step) if start_step < last_step else None
    for step in bar:
        # ---- one training step: the step's mask ratio, forward, loss, backward, optimiser step ----
        mask_ratio = schedule(step / config["steps"])   # the curriculum: how much of each latent to hide now
        lr = optim.learning_rate(step, config["steps"], config["warmup_steps"], config["lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = sampling.step_generator(config["seed"], step, dist.rank, dist.device, stream="masks")
        with torch.autocast(dist.device.type, dtype=autocast, enabled=autocast is not None):
            # LMD: mask, encode the visible tokens, decode every token, MSE on the masked ones (lmd.py, section 4)
            loss, _, _ = train_model(latents, mask_ratio, config["normalize_targets"], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # ---- the rest is bookkeeping: the next batch, logging, grids, checkpoints, stop requests ----
        done = step + 1
        unread.append(loss.detach())
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
            if gridding:   # the held-out loss beside the training loss (own masks: resume stays exact)
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


def main(argv=None, objectives=OBJECTIVES):
    """Train (or resume) a run of one of `objectives` ({name: Objective}; the lab passes its relatives too)."""
    config, checkpoint = load_config(argv, objectives)
    objective = of(config, objectives)
    schedule = objective.schedule(config)   # first thing: bad ratios fail before any data is encoded
    eval_only = config.pop("eval_only", False)   # a one-off action, never part of a run's saved config
    if eval_only and not checkpoint:
        raise cli.UserError("--eval-only evaluates a saved run: add --resume RUN (a run directory or checkpoint)")
    check_cpu_cost(config)
    dist = devices.Distributed(config["device"])
    if config["batch_size"] % dist.world_size:
        raise cli.UserError(f"--batch-size {config['batch_size']} must divide evenly over {dist.world_size} processes")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dist.device.type == "cuda"   # TF32
    if config["vae"] == RECIPE_VAE:   # rank 0 trains it, the others wait and open it
        config["vae"] = dist.main_first(lambda: recipe_vae(config))
    projection, model, optimizer = build_run(config, checkpoint, dist, objectives)
    start_step = checkpoint["step"] if checkpoint else 0
    if eval_only:
        return pretraining.evaluate_saved_run(model, projection, config, dist, start_step, objective)
    batches = pretraining.TrainingBatches(config, projection, dist, start_step)
    if config["compile"]:
        devices.compile_transformer_blocks(model)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    pretraining.start_run_directory(config, model, dist, start_step, objective)
    held_out = pretraining.HeldOutLoss(projection, config, dist.device, objective)
    save_grid = pictures.grid_writer(model, projection, config, objective)
    started = time.time()
    with pretraining.StopRequest() as stop:
        step = train_loop(config, schedule, model, train_model, optimizer, batches, dist, start_step, stop, held_out,
                          save_grid)
    if step < config["steps"] and dist.is_main:
        script = "train.py" if objective is LMD else "-m lab.train"
        print(f"stopped after step {step}; continue with: python {script} --resume {config['out']}", file=sys.stderr)
    elif step == config["steps"] and dist.is_main:
        loss = held_out(model)
        summary = dict(step=step, **held_out.record(loss), minutes_this_session=(time.time() - started) / 60)
        with open(os.path.join(config["out"], "summary.json"), "w") as file:
            json.dump(summary, file, indent=2)
        print(f"done: {held_out.words()} = {loss:.4f}; checkpoint: {os.path.join(config['out'], 'checkpoint.pt')}\n"
              f"probe it: python {'finetune.py' if objective is LMD else '-m lab.finetune'} --checkpoint "
              f"{config['out']} --mode knn   (or --mode linprobe, --mode finetune)", file=sys.stderr)
        save_grid("final", step)
    if dist.is_main:  # the curves of every run, finished or stopped
        pictures.plot_curves(os.path.join(config["out"], "metrics.jsonl"), os.path.join(config["out"], "curves.png"),
                             objective)
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli.run_cli(main)
