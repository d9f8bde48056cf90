"""The pieces of a pretraining run around train.py's loop: resuming a run, its directory and metrics file, stop
requests, the batches of each step, the held-out loss and the non-finite check."""

import json
import math
import os
import signal
import sys

import torch

from util import checkpoints, datasets, devices, latent_cache, pictures, sampling, vaes
from util.cli import UserError


def resumed_run(flags, given, overrides):
    """--resume RUN -> (the run's saved config, its checkpoint). Of the flags `given`, those in `overrides` replace
    the saved values; any other that differs from the run's is an error. --stop-after-step is for one session only."""
    resume = flags["resume"]
    checkpoint = checkpoints.load_checkpoint(resume)
    # runs from before --objective and --init existed are LMD runs from scratch
    config = {"objective": "lmd", "init": None, **checkpoint["config"], "stop_after_step": flags["stop_after_step"]}
    for flag in given - {"resume", "out"}:
        if flag in overrides:
            config[flag] = flags[flag]
        elif flags[flag] != config.get(flag):
            raise UserError(f"--{flag.replace('_', '-')} {flags[flag]} differs from the resumed run "
                            f"({config.get(flag)}); drop the flag to continue the same run")
    config["out"] = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
    checkpoint["path"] = resume
    return config, checkpoint


def start_run_directory(config, model, dist, start_step, objective):
    """Write config.json, trim metrics.jsonl back to the checkpoint, and announce the run (rank 0 only)."""
    os.makedirs(config["out"], exist_ok=True)
    if not dist.is_main:
        return
    with open(os.path.join(config["out"], "config.json"), "w") as file:
        json.dump(config, file, indent=2)
    keep_metrics_before(os.path.join(config["out"], "metrics.jsonl"), start_step)
    masking = objective.describe(config)
    print(f"{objective.name.upper()}: {config['model']} model, {model.num_tokens} tokens of {model.patch_size}x"
          f"{model.patch_size}x{model.channels}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{masking}, {dist.world_size} process(es) on {dist.device}, from step {start_step}", file=sys.stderr)


def keep_metrics_before(path, step):
    """On resume, drop metric lines past the checkpoint's step: they will be logged again."""
    if not os.path.exists(path):
        return
    with open(path) as file:
        kept = [line for line in file if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as file:
        file.writelines(kept)


def append_metrics(path, record):
    """One line of OUT/metrics.jsonl: a JSON object for one logged step."""
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


class StopRequest:
    """A context manager: Ctrl-C or SIGTERM asks the loop to save and stop at the end of the step; a second Ctrl-C
    aborts. SIGTERMs never do: under SLURM and torchrun each process gets two, and the second must not lose the save."""

    def __enter__(self):
        self.requested = self.interrupted = False   # interrupted: a Ctrl-C (SIGINT) came
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, signal_number, frame):
        if signal_number == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
        if not self.requested:
            print(f"\n{signal.Signals(signal_number).name}: saving a checkpoint at the end of this step "
                  "(Ctrl-C again aborts without saving)", file=sys.stderr)
        self.requested = True


class TrainingBatches:
    """Latents for each step, from the latent cache or encoded on the fly: a pure function of (seed, step, rank), so
    a resumed run gets the data order, flips and crops the uninterrupted run would have used."""

    def __init__(self, config, projection, dist, start_step):
        self.config, self.projection, self.dist = config, projection, dist
        self.autocast = devices.autocast_dtype(config["precision"], dist.device)
        self.loader = None
        if config["cache"]:   # a complete cache is opened without the images: an image folder is not even listed
            self.cache = latent_cache.dataset_latents(config, "train", projection, dist)
            self.num_items = len(self.cache["labels"])
        else:                 # rank 0 first: it downloads the dataset if needed while the others wait
            source = dist.main_first(lambda: datasets.load_image_source(
                config["dataset"], config["data_dir"], "train", config["image_size"], config["synthetic_size"]))
            self.num_items = len(source)
        if self.num_items < config["batch_size"]:
            raise UserError(f"the training set has {self.num_items} images, fewer than one batch "
                            f"(--batch-size {config['batch_size']}); lower --batch-size")
        if not config["cache"]:
            images = datasets.ImageDataset(source, config["image_size"], config["augment"])
            workers = devices.loader_workers(config["num_workers"])
            self.loader = iter(torch.utils.data.DataLoader(
                images, batch_sampler=seeded_batches(config, self.num_items, dist, start_step), num_workers=workers,
                pin_memory=dist.device.type == "cuda", persistent_workers=workers > 0,
                worker_init_fn=devices.ignore_stop_signals))   # a SIGTERM to the job: the main process saves

    def _indices(self, step):
        return sampling.batch_indices(step, self.num_items, self.config["batch_size"], self.config["seed"],
                                      self.dist.rank, self.dist.world_size)

    def latents(self, step):
        """This rank's latents for `step` [batch / world_size, C, h, w] on the training device."""
        device = self.dist.device
        if self.loader is not None:   # encoded here as the cache is: in chunks, in bf16 where the GPU has it
            images, _ = next(self.loader)
            return vaes.encode_images(self.projection, images.to(device, non_blocking=True), self.autocast,
                                      self.config.get("encode_batch_size"))
        indices = self._indices(step)
        generator = sampling.step_generator(self.config["seed"], step, self.dist.rank, stream="flips")
        flips = torch.randint(0, 2, (len(indices),), generator=generator)   # which of the two cached flips
        flips *= self.config["augment"] == "flip"                            # digit sets: never the mirror image
        batch = self.cache["latents"][indices, flips]
        if device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True).float()


def seeded_batches(config, num_items, dist, start_step):
    """The loader's batches from `start_step` on: [(image index, augmentation seed)] per step, this rank's share.
    Not a method: holding the TrainingBatches would make a reference cycle that keeps the loader's workers alive."""
    seed = config["seed"]
    for step in range(start_step, config["steps"]):
        indices = sampling.batch_indices(step, num_items, config["batch_size"], seed, dist.rank, dist.world_size)
        yield [(int(i), sampling.augmentation_seed(seed, step, int(i))) for i in indices]


class HeldOutLoss:
    """The objective's loss on the first --eval-images validation images, un-augmented, at its held-out ratio (LMD:
    0.75) with a fixed mask seed: what compares runs and steps whatever their schedules. The images are encoded once,
    on the first call; the masks come from their own generator, so the run's random streams are left as they were."""

    def __init__(self, projection, config, device, objective):
        self.projection, self.config, self.device, self.objective = projection, config, device, objective
        self.num_images, self.mask_ratio = config["eval_images"], objective.mask_ratio_held_out(config)
        self.latents = None

    @torch.no_grad()
    def _encode(self):
        config = self.config
        source = datasets.load_image_source(config["dataset"], config["data_dir"], "val", config["image_size"],
                                            config["synthetic_size"])
        images = datasets.ImageDataset(source, config["image_size"])
        count = min(self.num_images, len(images))
        batches = [torch.stack([images[i][0] for i in range(start, min(start + 64, count))])
                   for start in range(0, count, 64)]
        autocast = devices.autocast_dtype(config.get("precision", "auto"), self.device)   # as the training latents
        return [vaes.encode_images(self.projection, batch.to(self.device), autocast,
                                   config.get("encode_batch_size")).cpu() for batch in batches]

    @torch.no_grad()
    def __call__(self, model):
        if self.latents is None:
            self.latents = self._encode()
        generator = sampling.step_generator(self.config["seed"], -1, device=self.device)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for latents in self.latents:
            loss, _, _ = model(latents.to(self.device), self.mask_ratio, self.config["normalize_targets"],
                               generator=generator)
            total, count = total + loss.item() * len(latents), count + len(latents)
        model.train(was_training)
        return total / max(count, 1)

    def words(self):
        """What the held-out loss is, in words."""
        return f"held-out {self.objective.loss_name} at mask ratio {self.mask_ratio}"

    def record(self, loss):
        """{name: value} for summary.json and eval.json, under the objective's name for it."""
        return {self.objective.held_out_key: loss, "held_out_mask_ratio": self.mask_ratio}


def check_finite(losses, done, non_finite_anywhere, last_saved, out):
    """The one-line error if a loss of the steps up to `done` in `losses` is not finite, here or on another rank."""
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is None and not non_finite_anywhere:
        return
    first = done - len(losses) + 1
    if non_finite_anywhere:   # one flag from the all-reduce: the same words on every rank
        what = "non-finite in a process " + (f"at step {done}" if first == done else f"in steps {first}-{done}")
    else:
        what = f"{losses[bad]} at step {first + bad}"
    raise UserError(f"the loss became {what}; the last good checkpoint (step {last_saved}) is kept in {out}; "
                    "lower --lr or use --precision fp32")


def evaluate_saved_run(model, projection, config, dist, step, objective):
    """train.py --eval-only: RUN/grid_eval.png and RUN/eval.json for the checkpoint's weights; nothing else."""
    if not dist.is_main:
        return
    held_out = HeldOutLoss(projection, config, dist.device, objective)
    loss = held_out(model)
    grid = pictures.grid_writer(model, projection, config, objective)("eval", step)
    result = dict(step=step, steps=config["steps"], **held_out.record(loss), eval_images=config["eval_images"],
                  grid=grid)
    with open(os.path.join(config["out"], "eval.json"), "w") as file:
        json.dump(result, file, indent=2)
    print(f"step {step}/{config['steps']}: {held_out.words()} = {loss:.4f}; grid: {grid}")
