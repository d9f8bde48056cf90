"""
The paper's claim on a laptop: LMD against pixel MAE, top-1 against wall-clock time, every cost counted.

    python tools/race.py --dataset digits --minutes 2 --out runs/race            # trains its VAE first (~2 min)
    python tools/race.py --dataset digits --vae runs/race/vae --minutes 2 --seeds 3 --out runs/race3

Three methods, the same encoder size, the same in-memory images and augmentation, the same wall-clock budget:
    pixel_mae    --vae none, constant 0.75, pixel patch = latent patch x VAE factor / 2 (the paper's 16 px vs 4)
    lmd          the VAE's latents, cosine schedule, latent patch
    latent_mae   the VAE's latents, constant 0.75 (what the latent space buys, without the curriculum)
The mask-ratio and lr schedules are functions of step / steps, so each method's step count is set from a short
calibration to fill the budget. The latent methods' clock starts at the VAE's training time plus the encoding of
the dataset. Probing (kNN and the converged linear probe, util/probes.py) is not counted. Writes OUT/results.json,
OUT/race.md (the table) and OUT/race.png.
"""

import copy
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable as `python tools/race.py` from anywhere

import torch  # noqa: E402

import lmd  # noqa: E402
from util import cli, datasets, devices, optim, probes, sampling, vaes  # noqa: E402

# The laptop recipe of the README (tiny model, unnormalised targets), the same for the three methods.
DEFAULTS = dict(model="tiny", batch_size=64, base_lr=1.5e-3, weight_decay=0.05, warmup_fraction=0.05, probes=8,
                calibration_steps=6)
METHODS = {"pixel_mae": ("pixels", "constant"), "lmd": ("latents", "cosine"), "latent_mae": ("latents", "constant")}


def build_parser():
    parser = cli.ArgumentParser(description="LMD against pixel MAE: top-1 against wall-clock time.")
    parser.add_argument("--dataset", default="digits", choices=datasets.DATASETS, help="images (default: digits)")
    parser.add_argument("--data-dir", default="./data", help="dataset root, as for train.py (default: ./data)")
    parser.add_argument("--vae", help="a VAE directory (tools/train_vae.py); without it, one is trained first "
                                      "into OUT/vae and its time is counted")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget of each method's training")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method (default: 1)")
    parser.add_argument("--image-size", type=int, help="image side (default: the dataset's, 32 for digits)")
    parser.add_argument("--probes", type=int, default=DEFAULTS["probes"],
                        help="probe points along each run (default: %(default)s)")
    parser.add_argument("--linprobe-epochs", type=int, default=90, help="epochs of each linear probe (default: 90)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="(default: auto)")
    return parser


def vae_directory(args):
    """-> (VAE directory, seconds its training took). Trains one with tools/train_vae.py when --vae is not given."""
    if args.vae:
        report = os.path.join(args.vae, "training.json")
        seconds = json.load(open(report))["seconds"] if os.path.isfile(report) else 0.0
        return args.vae, seconds
    out = os.path.join(args.out, "vae")
    command = [sys.executable, os.path.join(ROOT, "tools", "train_vae.py"), "--dataset", args.dataset,
               "--data-dir", args.data_dir, "--out", out, "--image-size", str(args.image_size), "--device", args.device]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    started = time.time()
    if subprocess.call(command) != 0:
        raise cli.UserError("training the VAE failed; rerun the command above to see why")
    return out, time.time() - started


@torch.no_grad()
def encode_views(projection, images, flips, device, batch_size=256):
    """images [N, 3, S, S] in [0, 1] -> inputs [N, V, C, h, w]: one view per flip (the mirror image when flipping)."""
    views = []
    for flip in range(flips):
        chunks = [projection.encode((batch.flip(-1) if flip else batch).to(device)).cpu()
                  for batch in images.split(batch_size)]
        views.append(torch.cat(chunks))
    return torch.stack(views, dim=1)


def probe(model, data, device, epochs=90):
    """kNN and linear-probe top-1 of the model's encoder on frozen features."""
    classifier = lmd.LatentClassifier(copy.deepcopy(model), len(set(data["train_labels"].tolist())),
                                      linear_probe=True).to(device)
    features = {}
    for split in ("train", "val"):
        inputs = data[f"{split}_inputs"][:, 0]
        batches = ((x.to(device), y) for x, y in zip(inputs.split(256), data[f"{split}_labels"].split(256)))
        features[split] = probes.encoder_features(classifier, batches)[0]
    knn = probes.knn_top1(features["train"], data["train_labels"], features["val"], data["val_labels"])
    history = probes.linear_probe(features["train"].unsqueeze(1), data["train_labels"], features["val"],
                                  data["val_labels"], epochs=epochs, warmup_epochs=min(10, epochs // 9))
    return dict(knn_top1=knn, linprobe_top1=history[-1]["top1"])


def new_model(data, seed, device):
    torch.manual_seed(seed)
    channels, size = data["train_inputs"].shape[2], data["train_inputs"].shape[-1]
    return lmd.MaskedLatentViT(DEFAULTS["model"], size, data["patch_size"], channels).to(device)


def train_step(model, optimizer, data, schedule, step, steps, seed, device):
    """One optimiser step of masked autoencoding at the schedule's ratio; the data order is sampling's."""
    lr = optim.learning_rate(step, steps, int(DEFAULTS["warmup_fraction"] * steps), data["lr"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    indices = sampling.batch_indices(step, len(data["train_inputs"]), DEFAULTS["batch_size"], seed)
    generator = sampling.step_generator(seed, step, stream="flips")
    views = torch.randint(0, data["train_inputs"].shape[1], (len(indices),), generator=generator)
    loss, _, _ = model(data["train_inputs"][indices, views].to(device), schedule(step / steps), False,
                       generator=sampling.step_generator(seed, step, device=device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def make_optimizer(model):
    return torch.optim.AdamW(optim.parameter_groups(model, DEFAULTS["weight_decay"]), betas=(0.9, 0.95))


def calibrate(data, schedule, seconds, seed, device, minimum_steps):
    """Steps that fill `seconds`: time a few steps at ratios spread over the schedule (a progressive schedule keeps
    more tokens visible early, so its early steps cost more), on a throw-away model."""
    model, n = new_model(data, seed, device), DEFAULTS["calibration_steps"]
    optimizer = make_optimizer(model)
    train_step(model, optimizer, data, schedule, 0, n, seed, device)   # warm-up: allocator, kernels
    started = time.perf_counter()
    for step in range(n):
        train_step(model, optimizer, data, schedule, step, n, seed, device)
    synchronize(device)
    return max(minimum_steps, int(seconds / ((time.perf_counter() - started) / n)))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_method(name, data, seed, seconds, offset, device, args):
    """Train one method for `seconds` of wall-clock, probing at args.probes evenly spaced steps."""
    from tqdm import tqdm
    schedule = lmd.MaskSchedule(METHODS[name][1])
    steps = calibrate(data, schedule, seconds, seed, device, args.probes)
    model = new_model(data, seed, device)
    optimizer, points, clock = make_optimizer(model), [], 0.0
    probe_at = {round(steps * (i + 1) / args.probes) for i in range(args.probes)}
    started = time.perf_counter()
    for step in tqdm(range(steps), desc=f"{name} seed {seed}", dynamic_ncols=True):
        train_step(model, optimizer, data, schedule, step, steps, seed, device)
        if step + 1 in probe_at:
            synchronize(device)
            clock += time.perf_counter() - started
            points.append(dict(seed=seed, step=step + 1, seconds=offset + clock,
                               images=(step + 1) * DEFAULTS["batch_size"],
                               **probe(model, data, device, args.linprobe_epochs)))
            started = time.perf_counter()
    return points


def summarise(results):
    """The markdown table: final top-1 (mean +- std over seeds) and time to 95% of pixel MAE's kNN gain."""
    def final(name, key):
        values = torch.tensor([[p for p in results[name] if p["seed"] == s][-1][key] for s in seeds])
        return values.mean().item(), (values.std().item() if len(values) > 1 else 0.0)

    seeds = sorted({p["seed"] for p in results["pixel_mae"]})
    random_pixels = results["random"]["pixels"]["knn_top1"]
    target = random_pixels + 0.95 * (final("pixel_mae", "knn_top1")[0] - random_pixels)
    lines = ["| method | kNN top-1 | linear probe top-1 | seconds to 95% of pixel MAE's kNN gain |",
             "|---|---|---|---|"]
    for name in METHODS:
        reached = []
        for s in seeds:
            hits = [p["seconds"] for p in results[name] if p["seed"] == s and p["knn_top1"] >= target]
            reached.append(hits[0] if hits else None)
        when = ("not reached" if None in reached else f"{sum(reached) / len(reached):.0f}") if target > random_pixels \
            else "n/a (pixel MAE gained nothing)"
        knn, lin = final(name, "knn_top1"), final(name, "linprobe_top1")
        lines.append(f"| {name} | {knn[0]:.3f} ± {knn[1]:.3f} | {lin[0]:.3f} ± {lin[1]:.3f} | {when} |")
    for space, record in results["random"].items():
        lines.append(f"| random init ({space}) | {record['knn_top1']:.3f} | {record['linprobe_top1']:.3f} | |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Top-1 against wall-clock seconds and against images seen, kNN and linear probe, random init dashed."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(11, 7), layout="constrained")
    axes = figure.subplots(2, 2)
    colours = dict(pixel_mae="tab:blue", lmd="tab:red", latent_mae="tab:green")
    for row, key in enumerate(("knn_top1", "linprobe_top1")):
        for column, x in enumerate(("seconds", "images")):
            ax = axes[row, column]
            for name, points in results.items():
                if name not in METHODS:
                    continue
                for seed in sorted({p["seed"] for p in points}):
                    mine = [p for p in points if p["seed"] == seed]
                    ax.plot([p[x] for p in mine], [p[key] for p in mine], "o-", color=colours[name], markersize=3,
                            label=name if seed == mine[0]["seed"] and seed == points[0]["seed"] else None)
            for space, style in (("pixels", "tab:blue"), ("latents", "tab:red")):
                ax.axhline(results["random"][space][key], linestyle="--", color=style, linewidth=1,
                           label=f"random init ({space})")
            if x == "seconds" and results["vae"]["offset_seconds"]:
                ax.axvline(results["vae"]["offset_seconds"], color="grey", linewidth=0.8,
                           label="VAE training + encoding")
            ax.set(xlabel="wall-clock seconds (VAE and encoding counted)" if x == "seconds" else "images seen",
                   ylabel=key.replace("_top1", " top-1").replace("linprobe", "linear probe"))
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(f"LMD vs pixel MAE on {results['vae']['dataset']} ({results['device']})")
    figure.savefig(path, dpi=110)


def prepare(args, device):
    """Images once, in memory; the VAE (trained here if needed); the pixel and latent inputs of both methods."""
    images = {split: datasets.load_image_tensors(args.dataset, args.data_dir, split, args.image_size)
              for split in ("train", "val")}
    vae_dir, vae_seconds = vae_directory(args)
    projection = vaes.open_projection(vae_dir, device)
    flips = 1 if args.dataset in datasets.NO_FLIP else 2
    started = time.time()
    latents = {split: encode_views(projection, images[split][0], flips if split == "train" else 1, device)
               for split in images}
    encode_seconds = time.time() - started
    pixels = {split: encode_views(lmd.LatentProjection(), images[split][0], flips if split == "train" else 1, device)
              for split in images}
    latent_patch = datasets.default_latent_patch(args.image_size // projection.downsample)
    labels = dict(train_labels=images["train"][1], val_labels=images["val"][1])
    lr = DEFAULTS["base_lr"] * DEFAULTS["batch_size"] / 256
    spaces = dict(
        pixels=dict(train_inputs=pixels["train"], val_inputs=pixels["val"], lr=lr, **labels,
                    patch_size=latent_patch * projection.downsample // 2),
        latents=dict(train_inputs=latents["train"], val_inputs=latents["val"], lr=lr, **labels,
                     patch_size=latent_patch))
    vae = dict(projection.provenance, downsample=projection.downsample, training_seconds=vae_seconds,
               encode_seconds=encode_seconds, offset_seconds=vae_seconds + encode_seconds, dataset=args.dataset)
    return spaces, vae


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.image_size = args.image_size or datasets.DEFAULT_IMAGE_SIZE[args.dataset]
    if args.minutes <= 0 or args.seeds < 1 or args.probes < 1 or args.linprobe_epochs < 1:
        raise cli.UserError("--minutes must be positive, and --seeds, --probes and --linprobe-epochs at least 1")
    device = devices.select_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    spaces, vae = prepare(args, device)
    results = {name: [] for name in METHODS}
    results["random"] = {space: probe(new_model(data, 0, device), data, device, args.linprobe_epochs)
                         for space, data in spaces.items()}
    for seed in range(args.seeds):
        for name, (space, _) in METHODS.items():
            offset = vae["offset_seconds"] if space == "latents" else 0.0
            results[name] += run_method(name, spaces[space], seed, args.minutes * 60, offset, device, args)
    results.update(vae=vae, device=str(device), minutes=args.minutes, seeds=args.seeds,
                   patch_size={space: data["patch_size"] for space, data in spaces.items()},
                   tokens={space: (data["train_inputs"].shape[-1] // data["patch_size"]) ** 2
                           for space, data in spaces.items()})
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    table = summarise(results)
    with open(os.path.join(args.out, "race.md"), "w") as file:
        file.write(table)
    plot(results, os.path.join(args.out, "race.png"))
    print(table + f"\n{args.out}/race.png, {args.out}/results.json", file=sys.stderr)


if __name__ == "__main__":
    cli.run_cli(main)
