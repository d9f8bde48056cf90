"""
The paper's claim on a laptop: LMD against pixel MAE, top-1 against wall-clock time, every cost counted.

    python -m lab.race --dataset digits --minutes 6 --pixel-patch 8 --out runs/race     # trains its VAE first
    python -m lab.race --dataset digits --vae runs/vae-digits --minutes 6 --seeds 3 --probes 4 --pixel-patch 8 \
        --threads 1 --out runs/race-digits

Three methods, the same encoder size, the same in-memory images and augmentation, the same wall-clock budget:
    pixel_mae    pixels, constant 0.75, patch --pixel-patch (default: latent patch x VAE factor / 2, as the paper's
                 16 px against 4 latent cells of 8 px)
    lmd          the VAE's latents, cosine schedule, latent patch
    latent_mae   the VAE's latents, constant 0.75 (what the latent space buys, without the curriculum)
The budget is of training seconds, measured as training proceeds (probes excluded): the mask-ratio and lr
schedules are functions of progress = training seconds / budget, a method stops when its budget is spent, and the
probe points sit at fractions of the budget. So the steps follow the real clock (a progressive schedule's early
steps keep more tokens visible and cost more), and every method's final point lands at the budget. The data order
and the masks are functions of (seed, step), as in train.py; only the ratio and lr of a step follow the clock.
Two clocks: `train_seconds` (the method's own training: the paper's setting, where the SD VAE is trained once for
everyone) and `seconds` (the VAE's training and the encoding of the training split counted: a laptop user who
trains a VAE first; the val split is encoded only for the probes, so it is not counted). Both are read at equal
seconds: linear between the probe points that bracket the budget, a run starting from its random init. The methods
run in an order rotated per seed (the load of a shared machine drifts), and each point records its steps and
images per second; a seed more than 2x off its method's median speed is flagged. Each latent method's time to reach
the same seed's pixel MAE final kNN and linear probe is reported as a ratio to pixel MAE's (both clocks). Images stay
in memory as uint8 (flips made on the fly); latents as float32. Writes OUT/results.json, OUT/race.md (the tables)
and OUT/race.png.

At the paper's token ratio (a pixel token a quarter of a latent token's area), the default pixel patch:
    python -m lab.race --dataset fashion-mnist --vae runs/vae-fashion --minutes 4 --seeds 3 --probes 3 \
        --probe-train 5000 --probe-val 2000 --threads 1 --out runs/race-fashion
    # 32 px: pixel MAE on 64 tokens (patch 4), the latents on 16 (8 x 8, patch 2); lab/docs/race.md has its numbers
"""

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import lab
import lmd
from util import cli, datasets, devices, optim, probes, sampling, vaes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: tools/train_vae.py

# The laptop recipe of the README (tiny model, unnormalised targets), the same for the three methods.
DEFAULTS = dict(model="tiny", batch_size=64, base_lr=1.5e-3, weight_decay=0.05, warmup_fraction=0.05, probes=8)
METHODS = {"pixel_mae": ("pixels", "constant"), "lmd": ("latents", "cosine"), "latent_mae": ("latents", "constant")}
LR_RESOLUTION = 100_000   # optim.learning_rate works on integer steps: progress is given to it in these units
TOLERANCE = 0.05          # a final point more than 5% off its budget is reported as such
SPEED_FACTOR = 2.0        # a seed more than 2x faster or slower than its method's median is flagged


def build_parser():
    parser = cli.ArgumentParser(description="LMD against pixel MAE: top-1 against wall-clock time.")
    parser.add_argument("--dataset", default="digits", choices=datasets.DATASETS, help="images (default: digits)")
    parser.add_argument("--data-dir", default="./data", help="dataset root, as for train.py (default: ./data)")
    parser.add_argument("--vae", help="a VAE directory (tools/train_vae.py) or a hub id; without it, one is trained "
                                      "first into OUT/vae and its time is counted")
    parser.add_argument("--minutes", type=float, required=True,
                        help="budget of each method's own training, in wall-clock minutes (probes excluded)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method (default: 1)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods to race (default: all three)")
    parser.add_argument("--image-size", type=int, help="image side (default: the dataset's, 32 for digits)")
    parser.add_argument("--pixel-patch", type=int,
                        help="pixel MAE's patch side (default: latent patch x VAE factor / 2: a pixel token covers a "
                             "quarter of a latent token's area, as in the paper)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="images per step (default: %(default)s)")
    parser.add_argument("--probes", type=int, default=DEFAULTS["probes"],
                        help="probe points along each run, at equal fractions of the budget (default: %(default)s)")
    parser.add_argument("--probe-train", type=int, metavar="N", help="probe with N training images (kNN's bank, "
                        "the linear probe's training set): a fixed random subset, the same for every method and "
                        "seed (default: all; extracting 60,000 features costs minutes per probe point on a CPU)")
    parser.add_argument("--probe-val", type=int, metavar="N", help="score the probes on N validation images, a fixed "
                        "random subset (default: all)")
    parser.add_argument("--linprobe-epochs", type=int, default=90, help="epochs of each linear probe (default: 90)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="(default: auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads; 0 = PyTorch's choice (use 1 on a busy shared CPU) (default: 0)")
    return parser


def vae_directory(args):
    """-> (VAE directory, seconds its training took). Trains one with tools/train_vae.py when --vae is not given."""
    if args.vae:
        report = os.path.join(args.vae, "training.json")
        seconds = json.load(open(report))["seconds"] if os.path.isfile(report) else 0.0
        return args.vae, seconds
    out = os.path.join(args.out, "vae")
    command = [sys.executable, os.path.join(ROOT, "tools", "train_vae.py"), "--dataset", args.dataset,
               "--data-dir", args.data_dir, "--out", out, "--image-size", str(args.image_size), "--device", args.device,
               "--threads", str(args.threads)]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    started = time.time()
    if subprocess.call(command) != 0:
        raise cli.UserError("training the VAE failed; rerun the command above to see why")
    return out, time.time() - started


def as_float(images, device):
    """uint8 images [B, 3, S, S] -> float [B, 3, S, S] in [0, 1] on the device."""
    return images.to(device, non_blocking=True).float().div_(255)


def batch_inputs(data, split, indices, views, device):
    """The model inputs of images `indices` [B] in views `views` [B] (1 = the mirror image) -> [B, C, h, w].

    Pixels are made here from the uint8 images (the flip on the fly), in [-1, 1] as lmd.LatentProjection gives them;
    latents are read from the views encoded once."""
    source = data[f"{split}_inputs"]
    if data["space"] == "latents":
        return source[indices, views].to(device, non_blocking=True)
    images = as_float(source[indices], device)
    flipped = views.to(device).bool().view(-1, 1, 1, 1)
    return lmd.LatentProjection().encode(torch.where(flipped, images.flip(-1), images))


@torch.no_grad()
def encode_views(projection, images, flips, device, batch_size=256):
    """uint8 images [N, 3, S, S] -> latents [N, V, C, h, w] float32 on the CPU: one view per flip (the mirror image
    when flipping), encoded once, through train.py's encode path (vaes.encode_images: the VAE sees a few images
    at a time, so its activations stay small)."""
    views = []
    for flip in range(flips):
        chunks = [vaes.encode_images(projection, as_float(batch, device).flip(-1) if flip else as_float(batch, device))
                  .cpu() for batch in images.split(batch_size)]
        views.append(torch.cat(chunks))
    return torch.stack(views, dim=1)


def probe(model, data, device, epochs=90, seed=0):
    """kNN and linear-probe top-1 of the model's encoder on frozen features, on the training device."""
    classifier = lmd.LatentClassifier(copy.deepcopy(model), len(set(data["train_labels"].tolist())),
                                      linear_probe=True).to(device)
    features, labels = {}, {}
    for split in ("train", "val"):
        indices = data[f"probe_{split}"]   # the probes' fixed subset of the split
        batches = ((batch_inputs(data, split, c, torch.zeros_like(c), device), data[f"{split}_labels"][c])
                   for c in indices.split(256))
        features[split] = probes.encoder_features(classifier, batches)[0]
        labels[split] = data[f"{split}_labels"][indices]
    knn = probes.knn_top1(features["train"], labels["train"], features["val"], labels["val"], device=device)
    history = probes.linear_probe(features["train"].unsqueeze(1), labels["train"], features["val"], labels["val"],
                                  epochs=epochs, warmup_epochs=min(10, epochs // 9), seed=seed, device=device)
    return dict(knn_top1=knn, linprobe_top1=history[-1]["top1"])


def new_model(data, seed, device):
    """The encoder-decoder a run of `seed` starts from (so the random-init probe of a seed is its run's start)."""
    torch.manual_seed(seed)
    return lmd.MaskedLatentViT(DEFAULTS["model"], data["size"], data["patch_size"], data["channels"]).to(device)


def train_step(model, optimizer, data, schedule, step, progress, seed, batch_size, device):
    """One optimiser step of masked autoencoding at progress = training seconds / budget in [0, 1]: train.py's step
    (lab.optimizer_step) on this step's batch, with the learning rate of the same progress."""
    lr = optim.learning_rate(int(progress * LR_RESOLUTION), LR_RESOLUTION,
                             int(DEFAULTS["warmup_fraction"] * LR_RESOLUTION), data["lr"] * batch_size / 256)
    indices = sampling.batch_indices(step, len(data["train_labels"]), batch_size, seed)
    flips = sampling.step_generator(seed, step, stream="flips")   # its own stream, not a bit of the mask noise
    views = torch.randint(0, data["views"], (len(indices),), generator=flips)
    loss, _ = lab.optimizer_step(model, optimizer, batch_inputs(data, "train", indices, views, device), schedule,
                                 min(progress, 1.0), lr, sampling.step_generator(seed, step, device=device))
    return loss


def make_optimizer(model):
    return torch.optim.AdamW(optim.parameter_groups(model, DEFAULTS["weight_decay"]), betas=(0.9, 0.95))


def synchronize(device):
    """Wait for the device's queued work, so the clock stops when a step has run, not when it was queued (as
    lab/bench.py): CUDA and Apple's mps both run asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def run_method(name, data, seed, budget, offset, device, args):
    """Train one method for `budget` seconds of its own training, probing at args.probes equal fractions of it.

    The clock runs only around training steps (synchronised on a GPU). A probe point is due once the training
    seconds reach its fraction; the run stops when the next step would end nearer past the budget than this one
    ends before it, so the final point lands within half a step of the budget."""
    from tqdm import tqdm
    schedule = lmd.MaskSchedule(METHODS[name][1])
    model = new_model(data, seed, device)
    optimizer, points, trained, step, step_seconds = make_optimizer(model), [], 0.0, 0, 0.0
    due = [budget * (i + 1) / args.probes for i in range(args.probes)]
    warm_up = copy.deepcopy(model)   # one untimed step on a copy: first calls' costs (allocator, kernels)
    train_step(warm_up, make_optimizer(warm_up), data, schedule, 0, 0.0, seed, args.batch_size, device)
    del warm_up
    bar = tqdm(total=round(budget), desc=f"{name} seed {seed}", unit="s", dynamic_ncols=True)
    while due:
        started = time.perf_counter()
        loss = train_step(model, optimizer, data, schedule, step, trained / budget, seed, args.batch_size, device)
        synchronize(device)
        step_seconds = time.perf_counter() - started
        trained, step = trained + step_seconds, step + 1
        bar.update(round(trained) - bar.n)
        if trained + step_seconds / 2 < due[0]:
            continue
        while due and trained + step_seconds / 2 >= due[0]:   # one step can pass two points on a tiny budget
            due.pop(0)
        bar.set_postfix(step=step, loss=f"{loss.item():.4f}")
        points.append(dict(seed=seed, step=step, train_seconds=trained, seconds=offset + trained,
                           images=step * args.batch_size, mask_ratio=schedule(min(trained / budget, 1.0)),
                           steps_per_second=step / trained, images_per_second=step * args.batch_size / trained,
                           **probe(model, data, device, args.linprobe_epochs, seed)))
        bar.write(f"{name} seed {seed}: step {step}, {trained:.1f} s of training, kNN top-1 "
                  f"{points[-1]['knn_top1']:.3f}, linear probe top-1 {points[-1]['linprobe_top1']:.3f}")
    bar.close()
    return points


def runs(results, name):
    """A method's points split by seed -> [[point, ...] per seed], in seed order."""
    return [[p for p in results[name] if p["seed"] == s] for s in seeds_of(results, name)]


def method_order(methods, seed):
    """The order the methods run in for `seed`: [name, ...], rotated by one place per seed. On a shared machine the
    steps a budget buys drift with the load, so no method should always run first (or last)."""
    shift = seed % len(methods)
    return list(methods[shift:]) + list(methods[:shift])


def curve(results, name, seed):
    """One seed's run of a method from its start -> [point, ...] in time order: the random init (exactly the model
    the run starts from) at 0 s of training, then the probe points. On the counted clock a latent method starts
    once the VAE is trained and the training split encoded (the offset)."""
    space = METHODS[name][0]
    offset = results["vae"]["offset_seconds"] if space == "latents" else 0.0
    start = next(r for r in results["random"][space] if r["seed"] == seed)
    return [dict(start, step=0, train_seconds=0.0, seconds=offset)] + [p for p in results[name] if p["seed"] == seed]


def between(before, after, known, at, wanted):
    """Two points (dicts) -> `wanted` on the straight line through them where `known` equals `at`
    (before[known] <= at <= after[known]). The one interpolation of the race: values at equal seconds, and the
    seconds at which a value is reached."""
    span = after[known] - before[known]
    weight = (at - before[known]) / span if span else 1.0
    return before[wanted] + weight * (after[wanted] - before[wanted])


def value_at(points, clock, seconds, key):
    """A curve [point, ...] (ascending on `clock`) -> its `key` at `seconds` on `clock`, linear between the two
    points that bracket it, or None: before the curve starts (the VAE still training), or more than 5% past its
    end (a run that stopped early is not read as if it had run on). Up to 5% past its end, the final point: the
    run's budget ended there (within half a step, on its own clock)."""
    if seconds < points[0][clock]:
        return None
    for before, after in zip(points, points[1:]):
        if before[clock] <= seconds <= after[clock]:
            return between(before, after, clock, seconds, key)
    return points[-1][key] if seconds - points[-1][clock] <= TOLERANCE * seconds else None


def time_to_reach(points, clock, key, target):
    """A curve [point, ...] -> the first seconds on `clock` at which its `key` reaches `target`, linear between
    the probe points as value_at reads them; None if it never does (no number is made up)."""
    if points[0][key] >= target:
        return points[0][clock]
    for before, after in zip(points, points[1:]):
        if after[key] >= target:   # before[key] < target <= after[key]
            return between(before, after, key, target, clock)
    return None


def seeds_of(results, name):
    """The seeds a method ran -> [seed, ...], ascending."""
    return sorted({p["seed"] for p in results[name]})


def readings(results, name, clock, key):
    """Each seed's `key` at the budget on `clock`: [value or None, ...] in seed order."""
    return [value_at(curve(results, name, seed), clock, results["budget_seconds"], key)
            for seed in seeds_of(results, name)]


def mean_std(values):
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std().item() if len(values) > 1 else 0.0)


def cell(values, digits=3):
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def reading_cell(results, name, clock, key, suffix=""):
    """A table cell: mean ± std over seeds of `key` at the budget on `clock` (then `suffix`), or why there is none."""
    values, budget = readings(results, name, clock, key), results["budget_seconds"]
    if None not in values:
        return cell(values) + suffix
    if curve(results, name, seeds_of(results, name)[0])[0][clock] > budget:
        return "not started (VAE + encoding take longer)"
    return f"{values.count(None)} of {len(values)} seeds ended more than 5% before the budget"


def speed_outliers(results):
    """The seeds whose steps per second (final point) are more than 2x off their method's median ->
    [(method, seed, steps/s, the method's median)]: the load changed under them, so their steps do not compare."""
    flagged = []
    for name in (n for n in METHODS if results.get(n)):
        speeds = {run[-1]["seed"]: run[-1]["steps_per_second"] for run in runs(results, name)}
        median = statistics.median(speeds.values())
        flagged += [(name, seed, speed, median) for seed, speed in speeds.items()
                    if speed > SPEED_FACTOR * median or speed < median / SPEED_FACTOR]
    return flagged


def speed_cell(results, name):
    """Steps (and images) per second at the final points, mean ± std, with the seeds more than 2x off the median."""
    finals = [run[-1] for run in runs(results, name)]
    text = (f"{cell([p['steps_per_second'] for p in finals], 2)} "
            f"({cell([p['images_per_second'] for p in finals], 0)} images/s)")
    return text + "".join(f"; seed {seed}: {speed:.2f}, more than 2x off the median {median:.2f}"
                          for method, seed, speed, median in speed_outliers(results) if method == name)


def method_row(results, name, targets):
    """One table row: top-1 at the budget on both clocks, seconds to the targets, the final points' seconds and
    speeds."""
    budget = results["budget_seconds"]
    trained = budget - curve(results, name, seeds_of(results, name)[0])[0]["seconds"]   # the VAE's offset less
    counted_cell = reading_cell(results, name, "seconds", "knn_top1", f" (after {trained:.0f} s of training)")
    if not targets:
        when = "n/a (pixel MAE did not beat its random init)" if results.get("pixel_mae") else "n/a (no pixel MAE)"
    else:
        hits = [[time_to_reach(curve(results, name, seed), clock, "knn_top1", targets[seed])
                 for seed in seeds_of(results, name) if seed in targets] for clock in ("train_seconds", "seconds")]
        reached = [[t for t in times if t is not None] for times in hits]
        when = f"{len(reached[0])} of {len(hits[0])} seeds" + ("" if not reached[0] else ": " + " / ".join(
            f"{mean_std(times)[0]:.0f}" for times in reached))
    finals = [run[-1] for run in runs(results, name)]
    return (f"| {name} | {reading_cell(results, name, 'train_seconds', 'knn_top1')} | "
            f"{reading_cell(results, name, 'train_seconds', 'linprobe_top1')} | {counted_cell} | {when} | "
            f"{cell([p['train_seconds'] for p in finals], 1)} | {speed_cell(results, name)} |")


def time_ratios(results):
    """Each latent method's time to reach the same seed's pixel MAE final kNN and linear-probe top-1, over pixel
    MAE's own time to reach it, on both clocks -> {method: {metric: {clock: summary}}}, a summary being
    dict(per_seed=[dict(seed, target, pixel_mae=s, method=s or "not reached", ratio), ...], seeds, seeds_reached,
    mean, std). Below 1 is faster than pixel MAE (the paper's 3x is 0.33); a seed that never gets there is
    "not reached", and the mean and std are over the seeds that do ("not reached" when none does)."""
    if not results.get("pixel_mae"):
        return {}
    ratios = {}
    for name in (n for n in METHODS if n != "pixel_mae" and results.get(n)):
        ratios[name] = {key: {clock: ratio_summary(results, name, key, clock) for clock in ("train_seconds", "seconds")}
                        for key in ("knn_top1", "linprobe_top1")}
    return ratios


def ratio_summary(results, name, key, clock):
    """time_ratios' summary of one method, metric and clock."""
    per_seed = []
    for seed in seeds_of(results, name):
        pixels = curve(results, "pixel_mae", seed)
        target = pixels[-1][key]
        own = time_to_reach(pixels, clock, key, target)
        points = curve(results, name, seed)
        mine = time_to_reach(points, clock, key, target)
        ratio = ("not reached" if mine is None else   # at its random init: no training time to divide, not 0.00
                 "at init: its random init is already there" if points[0][key] >= target else
                 "n/a: pixel MAE's random init is already there" if own <= 0 else mine / own)
        per_seed.append(dict(seed=seed, target=target, pixel_mae=own,
                             method="not reached" if mine is None else mine, ratio=ratio))
    numbers = [s["ratio"] for s in per_seed if isinstance(s["ratio"], float)]
    mean, std = mean_std(numbers) if numbers else ("not reached", "not reached")
    return dict(per_seed=per_seed, seeds=len(per_seed), seeds_reached=len(numbers), mean=mean, std=std)


def ratio_cell(summary):
    """A ratio_summary as a table cell: mean ± std (seeds reaching it), else why there is no number."""
    if summary["seeds_reached"]:
        mean, std, reached, seeds = (summary[k] for k in ("mean", "std", "seeds_reached", "seeds"))
        return f"{mean:.2f} ± {std:.2f} ({reached} of {seeds} seeds)"
    reasons = {s["ratio"] for s in summary["per_seed"]}
    return "not reached" if "not reached" in reasons else reasons.pop()


def ratio_table(ratios):
    """The markdown table of time_ratios: one row per latent method."""
    lines = ["| method | time to pixel MAE's final kNN / pixel MAE's time, own training | the same, VAE counted | "
             "time to its final linear probe / pixel MAE's time, own training | the same, VAE counted |",
             "|---|---|---|---|---|"]
    for name, metrics in ratios.items():
        cells = [ratio_cell(metrics[key][clock]) for key in ("knn_top1", "linprobe_top1")
                 for clock in ("train_seconds", "seconds")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(results):
    """The markdown tables. The first: top-1 at the budget on both clocks (mean ± std over seeds, each read at
    equal seconds), the seeds reaching 95% of the same seed's pixel MAE kNN gain over its random init and when
    (both clocks, mean over the seeds that reach it), the final points' training seconds and speeds, and the random
    inits of the same seeds. The second (with pixel MAE and a latent method): time_ratios."""
    budget, names = results["budget_seconds"], [n for n in METHODS if results.get(n)]
    targets = {}   # seed -> kNN top-1 at 95% of that seed's pixel MAE gain, where pixel MAE gained
    if "pixel_mae" in names:
        for seed in seeds_of(results, "pixel_mae"):
            pixels = curve(results, "pixel_mae", seed)
            start, end = pixels[0]["knn_top1"], pixels[-1]["knn_top1"]
            if end > start:
                targets[seed] = start + 0.95 * (end - start)
    lines = [f"| method | kNN top-1 at {budget:.0f} s of training | linear probe top-1 at {budget:.0f} s | "
             f"kNN top-1 at {budget:.0f} s, VAE counted | 95% of pixel MAE's kNN gain (same seed): seeds reaching "
             f"it, mean s (own / VAE counted) | training s of the final point | steps/s at the final point |",
             "|---|---|---|---|---|---|---|"]
    lines += [method_row(results, name, targets) for name in names]
    for space, records in results["random"].items():
        lines.append(f"| random init ({space}, the same seeds) | {cell([r['knn_top1'] for r in records])} | "
                     f"{cell([r['linprobe_top1'] for r in records])} | | | | |")
    ratios = time_ratios(results)
    return "\n".join(lines) + "\n" + ("" if not ratios else "\n" + ratio_table(ratios))


def off_budget(results):
    """The final points more than 5% off the budget -> [(method, seed, training seconds)]."""
    budget = results["budget_seconds"]
    return [(name, p["seed"], p["train_seconds"]) for name in METHODS if results.get(name)
            for p in (run[-1] for run in runs(results, name)) if abs(p["train_seconds"] - budget) > TOLERANCE * budget]


def plot(results, path):
    """Top-1 against the method's own training seconds, against seconds with the VAE's training and the encoding
    counted, and against images seen; kNN and linear probe; the random inits dashed."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(15, 7), layout="constrained")
    axes = figure.subplots(2, 3)
    colours = dict(pixel_mae="tab:blue", lmd="tab:red", latent_mae="tab:green")
    labels = dict(train_seconds="seconds of the method's own training (VAE amortised)",
                  seconds="seconds, VAE training + encoding counted", images="images seen")
    for row, key in enumerate(("knn_top1", "linprobe_top1")):
        for column, x in enumerate(labels):
            ax = axes[row, column]
            for name in METHODS:
                for number, seed in enumerate(sorted({p["seed"] for p in results.get(name, [])})):
                    mine = [p for p in results[name] if p["seed"] == seed]
                    ax.plot([p[x] for p in mine], [p[key] for p in mine], "o-", color=colours[name], markersize=3,
                            linewidth=1, label=name if number == 0 else None)
            for space, style in (("pixels", "tab:blue"), ("latents", "tab:red")):
                if space in results["random"]:
                    level = mean_std([r[key] for r in results["random"][space]])[0]
                    ax.axhline(level, linestyle="--", color=style, linewidth=1, label=f"random init ({space})")
            if x == "seconds" and results["vae"]["offset_seconds"]:
                ax.axvline(results["vae"]["offset_seconds"], color="grey", linewidth=0.8,
                           label="VAE training + encoding")
            if x != "images":
                ax.axvline(results["budget_seconds"], color="black", linestyle=":", linewidth=0.8, label="budget")
            ax.set(xlabel=labels[x], ylabel=dict(knn_top1="kNN top-1", linprobe_top1="linear probe top-1")[key])
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(f"LMD vs pixel MAE on {results['vae']['dataset']}: {results['budget_seconds']:.0f} s of "
                    f"training each, {results['seeds']} seed(s) ({results['device']})")
    figure.savefig(path, dpi=100)


def load_uint8(dataset, data_dir, split, image_size):
    """A whole split as uint8 images [N, 3, S, S] and labels [N], converted a batch at a time (4x less memory than
    float32: CIFAR-10 at 128 px is 2.5 GB, not 10)."""
    source = datasets.ImageDataset(datasets.load_image_source(dataset, data_dir, split, image_size), image_size)
    images = torch.empty(len(source), 3, image_size, image_size, dtype=torch.uint8)
    labels, start = [], 0
    for batch, label in torch.utils.data.DataLoader(source, batch_size=256):
        images[start:start + len(batch)] = batch.mul(255).round_().to(torch.uint8)
        labels.append(torch.as_tensor(label))
        start += len(batch)
    return images, torch.cat(labels).long()


def prepare(args, device):
    """Images once, in memory (uint8); the VAE (trained here if needed); the latent views encoded once."""
    images = {split: load_uint8(args.dataset, args.data_dir, split, args.image_size) for split in ("train", "val")}
    vae_dir, vae_seconds = vae_directory(args)
    projection = vaes.open_projection(vae_dir, device)
    flips = 1 if args.dataset in datasets.NO_FLIP else 2
    latents, encode_seconds = {}, {}
    for split in images:   # timed apart: only the training split is a cost of training, the val split serves probes
        started = time.time()
        latents[split] = encode_views(projection, images[split][0], flips if split == "train" else 1, device)
        encode_seconds[split] = time.time() - started   # encode_views ends on the CPU: the device's work is done
    latent_patch = datasets.default_latent_patch(args.image_size // projection.downsample)
    common = dict(train_labels=images["train"][1], val_labels=images["val"][1], views=flips, lr=DEFAULTS["base_lr"],
                  probe_train=probe_subset(len(images["train"][1]), args.probe_train),
                  probe_val=probe_subset(len(images["val"][1]), args.probe_val))
    spaces = dict(
        pixels=dict(space="pixels", train_inputs=images["train"][0], val_inputs=images["val"][0], channels=3,
                    size=args.image_size, patch_size=args.pixel_patch or latent_patch * projection.downsample // 2,
                    **common),
        latents=dict(space="latents", train_inputs=latents["train"], val_inputs=latents["val"],
                     channels=projection.channels, size=latents["train"].shape[-1], patch_size=latent_patch, **common))
    vae = dict(projection.provenance, downsample=projection.downsample, training_seconds=vae_seconds,
               encode_seconds=encode_seconds["train"], val_encode_seconds=encode_seconds["val"],
               offset_seconds=vae_seconds + encode_seconds["train"], dataset=args.dataset)
    return spaces, vae


def probe_subset(count, wanted):
    """The indices [n] the probes read of a split of `count` images: all, or `wanted` of them at random (seed 0,
    sorted), the same for every method and seed."""
    if wanted is None or wanted >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(0))[:wanted].sort().values


def peak_rss_mb():
    """This process's peak resident memory in MB (ru_maxrss is in KB on Linux, in bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.image_size = args.image_size or datasets.DEFAULT_IMAGE_SIZE[args.dataset]
    if args.minutes <= 0 or min(args.seeds, args.probes, args.linprobe_epochs, args.batch_size, args.probe_train or 1,
                                args.probe_val or 1) < 1:
        raise cli.UserError("--minutes must be positive, and --seeds, --probes, --linprobe-epochs, --batch-size, "
                            "--probe-train and --probe-val at least 1")
    if args.pixel_patch is not None and (args.pixel_patch < 1 or args.image_size % args.pixel_patch):
        raise cli.UserError(f"--pixel-patch {args.pixel_patch} must divide the image size ({args.image_size})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = devices.select_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    spaces, vae = prepare(args, device)
    budget = args.minutes * 60
    print(f"tokens per image: {tokens(spaces)} (the paper's ratio is 4 pixel tokens to 1 latent token)",
          file=sys.stderr)
    results = race(args, spaces, vae, budget, device)
    results.update(vae=vae, device=str(device), minutes=args.minutes, budget_seconds=budget, seeds=args.seeds,
                   batch_size=args.batch_size, threads=torch.get_num_threads(),
                   probe_images={split: len(spaces["pixels"][f"probe_{split}"]) for split in ("train", "val")},
                   patch_size={space: data["patch_size"] for space, data in spaces.items()}, tokens=tokens(spaces),
                   peak_rss_mb=peak_rss_mb(), command="python -m lab.race " + " ".join(argv or sys.argv[1:]))
    results.update(time_to_pixel_mae=time_ratios(results), speed_outliers=[
        dict(method=name, seed=seed, steps_per_second=speed, median=median)
        for name, seed, speed, median in speed_outliers(results)])
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    table = summarise(results)
    with open(os.path.join(args.out, "race.md"), "w") as file:
        file.write(table)
    plot(results, os.path.join(args.out, "race.png"))
    for line in warnings(results):
        print(line, file=sys.stderr)
    print(table + f"\n{args.out}/race.png, {args.out}/results.json (peak RSS {results['peak_rss_mb']:.0f} MB)",
          file=sys.stderr)


def tokens(spaces):
    """{space: tokens per image}."""
    return {space: (data["size"] // data["patch_size"]) ** 2 for space, data in spaces.items()}


def race(args, spaces, vae, budget, device):
    """Every seed: the random inits probed, then each method trained for the budget, in an order rotated per seed
    -> results {method: [point, ...], "random": {space: [probe, ...]}, "order": [[method, ...] per seed]}."""
    used = {METHODS[name][0] for name in args.methods}
    results = {name: [] for name in args.methods}
    results.update(random={space: [] for space in spaces if space in used}, order=[])
    for seed in range(args.seeds):
        for space in results["random"]:
            results["random"][space].append(dict(seed=seed, **probe(new_model(spaces[space], seed, device),
                                                                    spaces[space], device, args.linprobe_epochs, seed)))
        results["order"].append(method_order(args.methods, seed))
        for name in results["order"][-1]:
            space = METHODS[name][0]
            offset = vae["offset_seconds"] if space == "latents" else 0.0
            results[name] += run_method(name, spaces[space], seed, budget, offset, device, args)
    return results


def warnings(results):
    """The warning lines: final points off the budget, and seeds whose speed is more than 2x off their method's."""
    budget = results["budget_seconds"]
    lines = [f"warning: {name} seed {seed} ended at {seconds:.1f} s of training, more than 5% off the budget "
             f"({budget:.0f} s): a step took too long for this budget" for name, seed, seconds in off_budget(results)]
    return lines + [f"warning: {name} seed {seed} ran {speed:.2f} steps/s, more than 2x off its method's median "
                    f"({median:.2f}): the machine's load changed under it, so its steps in the budget do not compare"
                    for name, seed, speed, median in speed_outliers(results)]


if __name__ == "__main__":
    cli.run_cli(main)
