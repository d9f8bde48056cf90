"""
LMD's whole family on one dataset, side by side: the same encoder, the same data, the same probes, the same judge.

    python -m lab.family --vae runs/VAE --steps 1500 --seeds 3 --out runs/family --docs runs/family/docs
    python -m lab.family --vae runs/VAE --seconds 300 --seeds 3 --out runs/family-300s
    python -m lab.family --vae none --patch-size 8 --steps 1500 --out runs/family-pixels --docs docs/pixels

The rows (--rows picks some), each trained by train.py with the same step budget (two-stage rows split it in half):
    mae         --objective lmd --scheduler constant (0.75): the masked autoencoder, no curriculum, no noise
    lmd         --objective lmd --scheduler cosine: LMD's curriculum
    maskdm      --objective maskdm (stage 1: block masks, eps on the visible tokens), then ddpm --init (stage 2)
    umd         --objective umd: a clean half (MAE) and a noised half (eps and x0 heads), one model
    ddpm        --objective ddpm: plain diffusion from scratch
    lmd_ddpm    LMD (cosine), then ddpm --init: can LMD's encoder prime a diffusion model?
    umd_ft      (not run by default) UMD, then its generation fine-tuning: --mask-ratio 0 --clean-share 0.05

Each final model is probed by finetune.py (kNN and the linear probe, one --features reading for every row, each
beside the same floors: the LMD network of the same size and seed at random init, and the raw pixels; a diffusion
row is read at the least noisy model time it trained on, and its own init is shown where it differs; a floor depends
only on its network, seed and the data, so each is measured once a seed, OUT/floors-seedN.json) and, if it can
generate, sampled by sample.py (DDIM) and judged by lab/judge.py (fd_normalised: 0 is the real data, 1 the blurred
data; the classes present among the samples). Training seconds are train.py's own clock of its training loop
(metrics.jsonl), every stage summed.

Two budgets. --steps: every row the same optimizer steps. --seconds: every row the same seconds of its own training,
turned into steps by each stage's seconds per step, timed side by side in one process at the start (on a shared
machine the training clock measures the neighbours too; equal steps of timed cost do not). A finished stage whose
settings match is kept, so one budget's runs can be reused by another --out.

Writes OUT/<row>/seed<N>/ (the runs, probes and samples; a finished one is skipped when the tool runs again),
OUT/results.json, and DOCS/family.md (the table, the command that made it, the machine), DOCS/family.png (kNN
top-1 against fd_normalised) and DOCS/family_<row>.png (a sample grid per generative row, seed 0).
"""

import json
import os
import platform
import shutil
import statistics
import sys
import time

import torch

import lab
import train
from lab import finetune
from lab import sample
from util import cli, datasets, devices, probes

# (objective, extra train.py flags) per stage. The LMD stages use the README's laptop recipe; the diffusion stages
# train.py's own defaults for their objective (batch 64, base lr 8e-3, no weight decay, min-SNR-5).
LMD_RECIPE = dict(base_lr=1.5e-3, normalize_targets=False)
ROWS = {
    "mae": [("lmd", dict(LMD_RECIPE, scheduler="constant"))],
    "lmd": [("lmd", dict(LMD_RECIPE, scheduler="cosine"))],
    "maskdm": [("maskdm", {}), ("ddpm", {})],
    "umd": [("umd", {})],
    "ddpm": [("ddpm", {})],
    "lmd_ddpm": [("lmd", dict(LMD_RECIPE, scheduler="cosine")), ("ddpm", {})],
    "umd_ft": [("umd", {}), ("umd", dict(mask_ratio=0.0, clean_share=0.05))],
}
LABELS = dict(mae="MAE (constant 0.75)", lmd="LMD (cosine)", maskdm="MaskDM (stage 1, then stage 2)", umd="UMD",
              ddpm="ddpm from scratch", lmd_ddpm="LMD, then ddpm fine-tuning",
              umd_ft="UMD, then generation fine-tuning (mask 0, r = 0.05)")
DEFAULT_ROWS = ("mae", "lmd", "maskdm", "umd", "ddpm", "lmd_ddpm")
DEFAULTS = dict(dataset="digits", data_dir="./data", vae=None, image_size=None, synthetic_size=None, patch_size=None,
                model="tiny", batch_size=64, steps=1500, seconds=None, seeds=3, first_seed=0,
                rows=",".join(DEFAULT_ROWS), features="cls", linprobe_epochs=90, num_images=500, sampling_steps=50,
                num_workers=0, device="cpu", out="runs/family", docs=None)


def add_run_flags(parser):
    """The flags every row's runs share (the data, the latent space, the network): family.py's and curve.py's."""
    parser.add_argument("--vae", required=True, help="a VAE directory (tools/train_vae.py), or 'none' for pixels")
    parser.add_argument("--dataset", choices=datasets.DATASETS, help="(default: %(default)s)")
    parser.add_argument("--data-dir", help="dataset root, as for train.py (default: %(default)s)")
    parser.add_argument("--image-size", type=int, help="as train.py's (default: the dataset's)")
    parser.add_argument("--synthetic-size", type=int, help="as train.py's, for --dataset synthetic")
    parser.add_argument("--patch-size", type=int, help="as train.py's (default: train.py's for the image size)")
    parser.add_argument("--model", help="model size of every row (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, help="batch size of every stage (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, help="loader processes of every run and probe: the runs read "
                                                        "the latent cache, which needs none (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), help="(default: %(default)s)")
    parser.add_argument("--out", help="runs directory (default: %(default)s)")


def build_parser():
    parser = cli.ArgumentParser(description="MAE, LMD, MaskDM, UMD and diffusion side by side: probes and judge.")
    add_run_flags(parser)
    parser.add_argument("--steps", type=int, help="optimizer steps of every row, split in half by the two-stage "
                                                  "rows (default: %(default)s)")
    parser.add_argument("--seconds", type=float,
                        help="a wall-clock budget instead of --steps: every row trains for this many seconds, split "
                             "in half by the two-stage rows; each stage's steps are the seconds over its seconds per "
                             "step, timed side by side at the start (OUT/step_costs.json, kept for later calls)")
    parser.add_argument("--seeds", type=int, help="seeds 0 .. N-1 per row (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, help="seeds first_seed .. first_seed + N-1: seeds can run in "
                                                       "parallel calls, then one call over all reads them all "
                                                       "(default: %(default)s)")
    parser.add_argument("--rows", help=f"comma-separated, of {', '.join(ROWS)} (default: %(default)s)")
    parser.add_argument("--features", choices=probes.READINGS,
                        help="what every probe reads, as finetune.py's --features: 'cls' the class token, 'mean' "
                             "the mean patch token; runs probed with the other are probed again (default: "
                             "%(default)s)")
    parser.add_argument("--linprobe-epochs", type=int, help="epochs of each linear probe (default: %(default)s)")
    parser.add_argument("--num-images", type=int, help="samples judged per generative run (default: %(default)s)")
    parser.add_argument("--sampling-steps", type=int, help="DDIM steps, eta 0, for every row (default: %(default)s)")
    parser.add_argument("--docs", help="where family.md and its figures go (default: OUT)")
    parser.set_defaults(**DEFAULTS)
    return parser


def train_argv(args, objective, extra, steps, seed, out, init=None):
    """train.py's flags for one stage."""
    flags = dict(objective=objective, dataset=args.dataset, data_dir=args.data_dir, vae=args.vae,
                 image_size=args.image_size, synthetic_size=args.synthetic_size, patch_size=args.patch_size,
                 model=args.model, batch_size=args.batch_size, steps=steps, seed=seed, out=out, init=init,
                 grid_every=0, log_every=max(1, steps // 20), save_every=steps, eval_images=64,
                 num_workers=args.num_workers, device=args.device, **extra)
    argv = []
    for key, value in flags.items():
        if value is None:
            continue
        name = "--" + key.replace("_", "-")
        argv += [name] if value is True else [name.replace("--", "--no-", 1)] if value is False else [name, str(value)]
    return argv


def training_seconds(run, start_step=0):
    """The training loop's seconds since `start_step`, from train.py's last metrics line (images per second since
    the session started: a resumed session counts from the step it resumed at)."""
    with open(os.path.join(run, "metrics.jsonl")) as file:
        last = [json.loads(line) for line in file if line.strip()][-1]
    with open(os.path.join(run, "config.json")) as file:
        batch = json.load(file)["batch_size"]
    return (last["step"] - start_step) * batch / last["images_per_second"]


# finetune.py's results.json fields -> a record's, after the probe's name: knn_top1, knn_random_init, ...
PROBE_FIELDS = dict(top1="top1", random_init="random_init_top1", own_init="own_init_top1",
                    raw_pixels="raw_pixels_top1", time0="time0_top1", time1="time1_top1")


def read_json(path):
    """A JSON file's object, or {} if there is none yet (the file closed either way)."""
    if not os.path.exists(path):
        return {}
    with open(path) as file:
        return json.load(file)


def stage_key(objective, extra):
    """A stage's name in OUT/step_costs.json: its objective and extra flags."""
    return " ".join([objective, *(f"{key}={value}" for key, value in sorted(extra.items()))])


def seconds_per_step(args, stages, rounds=5, points=4):
    """Seconds per optimizer step of every distinct stage [(objective, extra flags)], timed side by side in this
    process: interleaved rounds (the first a warm-up) of one step at each of `points` training progresses on random
    latents of the run's shape, the median per progress, averaged (an LMD step's cost follows its mask ratio) ->
    {stage key: seconds}. Kept in OUT/step_costs.json: every seed, in any later call, gets the same steps."""
    path = os.path.join(args.out, "step_costs.json")
    costs = read_json(path)
    missing = {stage_key(*stage): stage for stage in stages if stage_key(*stage) not in costs}
    built, times = {}, {key: [[] for _ in range(points)] for key in missing}
    for key, (objective, extra) in missing.items():
        config, _ = train.load_config(train_argv(args, objective, extra, 1000, 0, os.path.join(args.out, "timing")),
                                      lab.OBJECTIVES)
        dist = devices.Distributed(config["device"])
        projection, model, optimizer = train.build_run(config, None, dist, lab.OBJECTIVES)
        size = config["image_size"] // projection.downsample
        latents = torch.randn(config["batch_size"], projection.channels, size, size, device=dist.device)
        built[key] = (model, optimizer, lab.get(config['objective']).schedule(config), latents)
    for round_ in range(rounds + 1 if missing else 0):
        for key, (model, optimizer, schedule, latents) in built.items():
            for index in range(points):
                generator = torch.Generator(latents.device).manual_seed(round_)
                started = time.perf_counter()
                loss, _ = lab.optimizer_step(model, optimizer, latents, schedule, (index + 0.5) / points, 1e-4,
                                             generator)
                loss.item()   # the step has finished on any device
                if round_:
                    times[key][index].append(time.perf_counter() - started)
    if missing:
        costs.update({key: statistics.mean(map(statistics.median, times[key])) for key in missing})
        with open(path, "w") as file:
            json.dump(costs, file, indent=2)
    return costs


def stage_steps(args, row, costs=None):
    """The steps of each of the row's stages: --steps split in half (the last stage takes the rest), or, with
    --seconds, each stage's share of the seconds over its seconds per step (`costs`, seconds_per_step's)."""
    stages = ROWS[row]
    if args.seconds:
        return [max(1, round(args.seconds / len(stages) / costs[stage_key(*stage)])) for stage in stages]
    share = args.steps // len(stages)
    return [share] * (len(stages) - 1) + [args.steps - (len(stages) - 1) * share]


def finished(run, argv):
    """Whether `run` is a finished train.py run of these flags (those a resume may change aside): a stage that an
    earlier call trained, or a run of the same recipe copied in, is not trained again."""
    if not os.path.exists(os.path.join(run, "summary.json")):
        return False
    with open(os.path.join(run, "config.json")) as file:
        saved = json.load(file)
    config, paths = train.load_config(argv, lab.OBJECTIVES)[0], ("vae", "data_dir", "init")
    same_path = lambda a, b: (a is None) == (b is None) and (a is None or os.path.realpath(a) == os.path.realpath(b))
    differ = [key for key, value in config.items() if key not in (*train.RESUME_OVERRIDES, "out", *paths)
              and value is not None and saved.get(key) != value]
    differ += [key for key in paths if not same_path(config[key], saved.get(key))]
    if differ:
        raise cli.UserError(f"{run} is a finished run with other settings ({', '.join(differ)}); delete it or give "
                            "another --out")
    return True


def probe(args, run, mode, floors):
    """finetune.py --mode knn | linprobe --features F on the run -> the record's fields of that probe: its top-1,
    the floors (the LMD network's random init, the raw pixels), a diffusion run's own init and both model times.
    `floors`: the values of this seed's floors measured so far ({name: top-1}); a floor depends only on its network,
    seed, reading and the data, so each is measured once a seed and read from there by the other rows."""
    out = os.path.join(run, mode + "-mean" * (args.features == "mean"))
    with open(os.path.join(run, "config.json")) as file:
        config = json.load(file)
    own = f"own_init {config['objective']} time {probes.lowest_trained_time(config, lab.get(config['objective']))}"
    names = {f"{mode} {args.features} {key}": field for key, field in
             (("random_init", "random_init"), ("raw_pixels", "raw_pixels"), (own, "own_init"))}
    argv = ["--checkpoint", run, "--mode", mode, "--features", args.features, "--num-workers", str(args.num_workers),
            "--device", args.device, "--out", out]
    argv += ["--skip-baselines", *known] if (known := [field for name, field in names.items() if name in floors]) else []
    if mode == "linprobe":
        argv += ["--epochs", str(args.linprobe_epochs), "--warmup-epochs", str(min(10, args.linprobe_epochs // 9))]
    finetune.main(argv)
    with open(os.path.join(out, "results.json")) as file:
        results = json.load(file)
    for name, field in names.items():
        if f"{field}_top1" in results:
            floors[name] = results[f"{field}_top1"]["final"]
        elif name in floors:
            results[f"{field}_top1"] = dict(final=floors[name])
    fields = {f"{mode}_{name}": results[key]["final"] for name, key in PROBE_FIELDS.items() if key in results}
    return dict(fields, features=results["features"], probe_time=results["probe_time"])


def probe_all(args, record, floors):
    """Both probes of a record's final run, written into the record (a record of another reading, or from before
    the floors, loses its probe fields first)."""
    for key in [key for key in record if key.startswith(("knn_", "linprobe_"))]:
        del record[key]
    for mode in ("knn", "linprobe"):
        record.update(probe(args, record["run"], mode, floors))
    return record


def run_row(args, row, seed, costs=None):
    """Train, probe and (if generative) sample one row at one seed -> its record (also OUT/row/seedN/record.json).
    The seed's floors are kept in OUT/floors-seedN.json."""
    directory = os.path.join(args.out, row, f"seed{seed}")
    record_path, floors_path = os.path.join(directory, "record.json"), os.path.join(args.out, f"floors-seed{seed}.json")
    floors, record = read_json(floors_path), read_json(record_path)
    steps = stage_steps(args, row, costs)
    if record:   # finished by an earlier call: the table is rebuilt from it
        if record.get("stage_steps", steps) != steps:
            raise cli.UserError(f"{directory} was trained with another budget ({record['stage_steps']} steps); give "
                                "another --out")
        if record.get("features") != args.features:   # probed with the other reading, or before the floors
            with open(record_path, "w") as file:
                json.dump(probe_all(args, record, floors), file, indent=2)
    else:
        record = train_row(args, row, seed, steps, costs, directory)
        probe_all(args, record, floors)
        sample_row(args, record, seed, directory)
        with open(record_path, "w") as file:
            json.dump(record, file, indent=2)
    with open(floors_path, "w") as file:
        json.dump(floors, file, indent=2)
    return record


def train_row(args, row, seed, steps, costs, directory):
    """Every stage of the row, each stage from the last one's weights (a finished stage is kept) -> the record."""
    seconds, previous = 0.0, None
    for index, ((objective, extra), count) in enumerate(zip(ROWS[row], steps)):
        run = os.path.join(directory, f"stage{index + 1}-{objective}")
        argv = train_argv(args, objective, extra, count, seed, run, init=previous)
        if not finished(run, argv):
            print(f"== {row} seed {seed}: stage {index + 1}/{len(steps)}, {objective}, {count} steps", file=sys.stderr)
            train.main(argv, lab.OBJECTIVES)
        if not os.path.exists(os.path.join(run, "summary.json")):   # train.py saves and returns when signalled
            raise cli.UserError(f"{run} stopped before its last step; run the same command again to redo it")
        seconds += training_seconds(run)
        previous = run
    budget = dict(budget_seconds=round(sum(count * costs[stage_key(*stage)] for stage, count in zip(ROWS[row], steps)),
                                       1)) if costs else {}
    return dict(row=row, seed=seed, run=previous, objective=ROWS[row][-1][0], steps=sum(steps), stage_steps=steps,
                training_seconds=round(seconds, 1), **budget)


def sample_row(args, record, seed, directory):
    """A generative row's final model sampled by sample.py and judged: the judge's fields, written into the record."""
    if not lab.get(record["objective"]).sampler:
        return
    samples = os.path.join(directory, "samples")
    result = sample.main(["--checkpoint", record["run"], "--out", samples, "--num-images", str(args.num_images),
                          "--sampling-steps", str(args.sampling_steps), "--eta", "0", "--seed", str(seed),
                          "--device", args.device])
    record.update(fd_normalised=result["fd_normalised"], fd=result["fd"], floor=result["floor"],
                  ceiling=result["ceiling"], classes_present=result["classes_present"],
                  max_class_fraction=result["max_class_fraction"], num_images=result["num_images"],
                  num_classes=len(result["class_histogram"]["classes"]),
                  judge_val_accuracy=result["judge_val_accuracy"], grid=os.path.join(samples, "samples.png"),
                  **{key: result[key] for key in ("vae_roundtrip_fd_normalised",) if key in result})


def spread(values, digits=3):
    """'mean ± std' over seeds (the std of one seed is not shown)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


NOTES = "<!-- family.py writes what is above this line again; what follows is kept -->"
READ_AT = {None: "no time (LMD)", 0: "model time 0, clean", 1: "model time 1, noise level 0"}


def per_seed(records, key):
    """A floor's values, one per seed (every row of a seed measures the same floor) -> [value]."""
    return list({r["seed"]: r[key] for r in records if key in r}.values())


def table(records):
    """The markdown tables: a line per row, mean ± std over its seeds, one reading for every row; the raw pixels;
    the diffusion rows at both model times."""
    features = records[0]["features"] if records else "cls"
    own = "its own init (chance for adaLN-Zero)" if features == "cls" else "its own init (adaLN-Zero)"
    lines = [f"| row | seeds | read at | kNN top-1 | random init | {own} | linear probe top-1 | random init | {own} | "
             "fd_normalised | classes present (max share) | steps (per stage) | training seconds |", "|---" * 13 + "|"]
    times = ["| row | kNN, model time 0 (clean) | kNN, model time 1 (noise level 0) | linear probe, time 0 | "
             "linear probe, time 1 |", "|---" * 5 + "|"]
    for row in ROWS:
        mine = [r for r in records if r["row"] == row]
        if not mine:
            continue
        column = lambda key: [r[key] for r in mine if key in r]   # noqa: E731
        generative = "fd_normalised" in mine[0]
        coverage = (f"{min(column('classes_present'))}-{max(column('classes_present'))} of "
                    f"{mine[0]['num_classes']} ({max(column('max_class_fraction')):.0%})") if generative else "–"
        lines.append(f"| {LABELS[row]} | {len(mine)} | {READ_AT[mine[0]['probe_time']]} | "
                     + " | ".join(spread(column(f"{probe}_{name}")) for probe in ("knn", "linprobe")
                                  for name in ("top1", "random_init", "own_init")) + " | "
                     f"{spread(column('fd_normalised'), 2) if generative else 'cannot generate'} | {coverage} | "
                     f"{' + '.join(map(str, mine[0].get('stage_steps', [mine[0]['steps']])))} | "
                     f"{spread(column('training_seconds'), 0)} |")
        if "knn_time0" in mine[0]:
            times.append(f"| {LABELS[row]} | " + " | ".join(spread(column(f"{probe}_time{time}")) for probe in
                                                           ("knn", "linprobe") for time in (0, 1)) + " |")
    pixel = lambda probe: spread(sorted(set(per_seed(records, f"{probe}_raw_pixels"))))   # noqa: E731
    pixels = (f"Raw pixels (no encoder; the same images and splits): kNN {pixel('knn')}, linear probe "
              f"{pixel('linprobe')}.\n")
    text = (f"Every probe reads the {'class token' if features == 'cls' else 'mean patch token'} after the final "
            f"norm (`--features {features}`).\n\n" + "\n".join(lines) + "\n\n" + pixels)
    return text + ("\n" + "\n".join(times) + "\n" if len(times) > 2 else "")


def row_means(records):
    """{row: (mean fd_normalised or None, std, mean kNN top-1, std)} over each row's seeds."""
    result = {}
    for row in ROWS:
        mine = [r for r in records if r["row"] == row]
        if mine:
            stats = [(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else (None, 0.0) for v in
                     ([r["fd_normalised"] for r in mine if "fd_normalised" in r], [r["knn_top1"] for r in mine])]
            result[row] = (*stats[0], *stats[1])
    return result


def pareto_front(records):
    """The generative rows that no other generative row beats on both means (lower fd_normalised, higher kNN)."""
    points = {row: (fd, knn) for row, (fd, _, knn, _) in row_means(records).items() if fd is not None}
    return [row for row, (fd, knn) in points.items() if not any(
        (f <= fd and k >= knn) and (f, k) != (fd, knn) for f, k in points.values())]


def plot(records, path):
    """kNN top-1 against fd_normalised, a point per generative row (mean, seeds' std as error bars), the Pareto
    front joined; the rows that cannot generate and the floors as levels."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.subplots()
    means, front = row_means(records), pareto_front(records)
    for index, (row, (fd, fd_std, knn, knn_std)) in enumerate(means.items()):
        if fd is None:   # cannot generate: its kNN as a level
            axes.axhline(knn, color=f"C{index}", linewidth=1, label=f"{LABELS[row]} (cannot generate)")
        else:
            axes.errorbar(fd, knn, xerr=fd_std, yerr=knn_std, fmt="o", color=f"C{index}", capsize=3,
                          label=LABELS[row] + (" (Pareto front)" if row in front else ""))
    if len(front) > 1:
        axes.plot(*zip(*sorted((means[row][0], means[row][2]) for row in front)), color="black", linewidth=0.8)
    floors = (("knn_random_init", "--", "random init of the LMD network (every row's random-init baseline)"),
              ("knn_raw_pixels", ":", "raw pixels"))
    for key, style, label in floors:   # one value per seed, the same for every row: never an objective's own init
        if per_seed(records, key):
            axes.axhline(statistics.mean(per_seed(records, key)), color="grey", linestyle=style, linewidth=1,
                         label=label)
    reading = records[0]["features"] if records else "cls"
    axes.set(xlabel="fd_normalised (lower is better: 0 real, 1 blurred)",
             ylabel=f"kNN top-1, --features {reading} (higher is better)",
             title="one model for both jobs? (up and to the left is better)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.savefig(path, dpi=110)


def budget_words(args):
    """The budget in words, for family.md."""
    if not args.seconds:
        return f"{args.steps} optimizer steps"
    with open(os.path.join(args.out, "step_costs.json")) as file:
        costs = ", ".join(f"{key} {seconds * 1000:.0f} ms" for key, seconds in json.load(file).items())
    return (f"{args.seconds:g} seconds of training (each stage's steps: its share over its seconds per step, timed "
            f"side by side in one process: {costs}; OUT/step_costs.json) in steps")


def write_docs(args, argv, records, machine):
    """DOCS/family.md, DOCS/family.png and a sample grid per generative row (its seed 0)."""
    os.makedirs(args.docs, exist_ok=True)
    space = "pixels" if args.vae == "none" else f"the latents of the VAE {args.vae}"
    grids = []
    for row in ROWS:
        first = next((r for r in records if r["row"] == row and r.get("grid")), None)
        if first and os.path.exists(first["grid"]):
            name = f"family_{row}.png"
            shutil.copyfile(first["grid"], os.path.join(args.docs, name))
            grids.append(f"**{LABELS[row]}** (seed {first['seed']}):\n\n![{LABELS[row]} samples]({name})\n")
    plot(records, os.path.join(args.docs, "family.png"))
    generative = next((r for r in records if "fd_normalised" in r), None)
    roundtrip = [r["vae_roundtrip_fd_normalised"] for r in records if "vae_roundtrip_fd_normalised" in r]
    judge_line = (f"Generation: {generative['num_images']} samples per run from DDIM, the diffusion sampler "
                  f"({args.sampling_steps} steps, eta 0), judged by lab/judge.py (its classifier "
                  f"{generative['judge_val_accuracy']:.1%} accurate on the validation split); fd_normalised = "
                  f"(FD - real-image floor) / (blur ceiling - real-image floor), floor {generative['floor']:.2f}, "
                  f"ceiling {generative['ceiling']:.2f}"
                  + (f"; the VAE's own round trip of real images, the best a latent generator can reach: "
                     f"{roundtrip[0]:.3f}" if roundtrip else "")
                  + ". Classes present: those given at least 1% of the samples." if generative else "")
    front = ", ".join(LABELS[row] for row in pareto_front(records)) or "none"
    text = [
        f"# The family on {args.dataset}, side by side\n",
        "The relatives are described in [relatives.md](relatives.md).\n",
        f"Made by `{' '.join(['python -m lab.family', *argv])}` ({machine}).\n",
        f"Every row: the {args.model} model on {space}, {budget_words(args)} of {args.batch_size} images "
        "(two-stage rows: half and half), seeds as counted. Probes of the final model (lab.finetune): kNN (20-NN, "
        f"DINO) and the linear probe ({args.linprobe_epochs} epochs, MAE's recipe), on the validation split, each "
        "beside the same baselines for every row: the random-init baseline, the LMD network of the same size and "
        "seed at random init (an "
        "adaLN-Zero network's own init starts as the identity, shown apart where it differs), and the raw pixels. "
        "A diffusion encoder is read at the least noisy model time it trained on (column 'read at'; both times "
        "below the table). Mean ± std over seeds. Training seconds: the training loops only (train.py's clock), "
        "every stage summed.\n",
        "fd_normalised, the generation column: the samples' FD (the Frechet distance between the samples' and the "
        "real validation images' features in lab/judge.py's classifier, [generation.md](generation.md)) on a scale "
        "where 0 is the real-image floor and 1 the blur ceiling; lower is better.\n",
        table(records),
        judge_line + "\n",
        "![kNN top-1 against fd_normalised](family.png)\n",
        "On the Pareto front of the generative rows (no other row better on both kNN and fd_normalised, by the "
        f"means): {front}.\n",
        *grids,
    ]
    path = os.path.join(args.docs, "family.md")
    notes = open(path).read().partition(NOTES)[2] if os.path.exists(path) else ""
    with open(path, "w") as file:   # what follows the NOTES line, written by a person, is kept
        file.write("\n".join(text) + (f"\n{NOTES}{notes}" if notes else ""))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.docs = args.docs or args.out
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown or not rows:
        raise cli.UserError(f"unknown row(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}")
    if args.steps < 2 or args.seeds < 1 or args.linprobe_epochs < 1 or args.num_images < 2 or (args.seconds or 1) <= 0:
        raise cli.UserError("--steps must be at least 2, --num-images at least 2, --seeds and --linprobe-epochs "
                            "at least 1, --seconds above 0")
    os.makedirs(args.out, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.time()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    assembled = all(os.path.exists(os.path.join(args.out, row, f"seed{seed}", "record.json")) for seed in seeds
                    for row in rows)
    costs = seconds_per_step(args, [stage for row in rows for stage in ROWS[row]]) if args.seconds else None
    records = [run_row(args, row, seed, costs) for seed in seeds for row in rows]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{args.device}; " + ("every run was trained by earlier calls: this one assembled their records" if
                                     assembled else f"load average {load:.1f} at the start and "
                                     f"{os.getloadavg()[0]:.1f} at the end, {(time.time() - started) / 60:.0f} "
                                     "minutes in all"))
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump(dict(records=records, argv=argv, machine=machine), file, indent=2)
    write_docs(args, argv, records, machine)
    print(table(records) + f"\n{os.path.join(args.docs, 'family.md')}", file=sys.stderr)
    return records


if __name__ == "__main__":
    cli.run_cli(main)
