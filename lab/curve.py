"""
Sample quality against training seconds: does a two-stage row (MaskDM's masked pretraining, or LMD's encoder, then
ordinary diffusion) reach ddpm's final quality in less time than ddpm from scratch?

Each row (lab/family.py's generative rows) is trained by train.py with the same step budget (two-stage rows: half
and half). Its last stage stops at --points evenly spaced steps (--stop-after-step, then --resume: the same run as
an uninterrupted one), and at each the model is sampled by sample.py (DDIM, eta 0) and judged by lab/judge.py. A
point has two clocks, every stage summed, sampling not counted: train.py's clock of its training loops, and its
steps times each stage's seconds per step timed side by side in one process (family.seconds_per_step, kept in
OUT/step_costs.json), which the neighbours on a shared machine do not move. The plot uses the second.

    python -m lab.curve --dataset fashion-mnist --vae runs/vae-fashion --rows ddpm,lmd_ddpm --steps 3000 \\
        --points 4 --seeds 2 --out runs/curve-fashion --docs docs
    # MaskDM where its saving can show: 8 x 8 latent tokens (patch 1), 90% of 2 x 2 blocks masked in stage 1
    python -m lab.curve --dataset fashion-mnist --vae runs/vae-fashion --patch-size 1 --rows ddpm,maskdm \\
        --maskdm-mask-ratio 0.9 --steps 4000 --seeds 2 --out runs/curve-maskdm-8x8

Writes OUT/<row>/seed<N>/ (the runs and each point's samples; finished points are kept when it runs again),
OUT/results.json, DOCS/curve.md (the table, each row's time to reach ddpm's final fd_normalised as a share of
ddpm's time, the seconds per step of every stage) and DOCS/curve.png.
"""

import json
import os
import platform
import shutil
import statistics
import sys

import torch

import lab
import train
from lab import family
from lab import sample
from util import cli

GENERATIVE_ROWS = ("ddpm", "maskdm", "lmd_ddpm", "umd", "umd_ft")
DEFAULTS = dict(family.DEFAULTS, rows="ddpm,maskdm,lmd_ddpm", steps=3000, points=4, seeds=2, maskdm_mask_ratio=None,
                maskdm_block_size=None, out="runs/curve")


def build_parser():
    parser = cli.ArgumentParser(description="fd_normalised against training seconds, ddpm from scratch against the "
                                            "two-stage rows.")
    family.add_run_flags(parser)
    parser.add_argument("--rows", help=f"comma-separated, of {', '.join(GENERATIVE_ROWS)} (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="optimizer steps of every row, split in half by the two-stage "
                                                  "rows (default: %(default)s)")
    parser.add_argument("--points", type=int, help="judged points per curve, evenly spaced over the last stage "
                                                   "(default: %(default)s)")
    parser.add_argument("--seeds", type=int, help="seeds first_seed .. first_seed + N-1 (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, help="the first seed (default: %(default)s)")
    parser.add_argument("--maskdm-mask-ratio", type=float, help="MaskDM stage 1's --mask-ratio (default: train.py's)")
    parser.add_argument("--maskdm-block-size", type=int, help="MaskDM stage 1's --block-size (default: train.py's)")
    parser.add_argument("--num-images", type=int, help="samples judged per point (default: %(default)s)")
    parser.add_argument("--sampling-steps", type=int, help="DDIM steps, eta 0 (default: %(default)s)")
    parser.add_argument("--docs", help="where curve.md and curve.png go (default: OUT)")
    parser.set_defaults(**DEFAULTS)
    return parser


def judge_point(args, run, step, seed, directory):
    """sample.py on the run as it is at `step` -> the judge's fields."""
    out = os.path.join(directory, f"samples-step{step:06d}")
    result = sample.main(["--checkpoint", run, "--out", out, "--num-images", str(args.num_images), "--sampling-steps",
                          str(args.sampling_steps), "--eta", "0", "--seed", str(seed), "--device", args.device])
    return {key: result[key] for key in ("fd_normalised", "fd", "floor", "ceiling", "classes_present")}


def stages_of(args, row):
    """The row's stages [(objective, extra flags, steps)], MaskDM's stage 1 with the --maskdm-* settings."""
    stages = family.ROWS[row]
    result = []
    for index, ((objective, extra), steps) in enumerate(zip(stages, family.stage_steps(args, row))):
        if row == "maskdm" and index == 0:   # MaskDM's masked stage
            extra = dict(extra, **{key: value for key, value in (("mask_ratio", args.maskdm_mask_ratio),
                                                                 ("block_size", args.maskdm_block_size)) if value})
        result.append((objective, extra, steps))
    return result


def run_curve(args, row, seed):
    """Train one row at one seed, judging its last stage at --points steps -> its record (also record.json). An
    unfinished curve (no record.json) starts again from nothing."""
    directory = os.path.join(args.out, row, f"seed{seed}")
    path = os.path.join(directory, "record.json")
    if os.path.exists(path):
        with open(path) as file:
            return json.load(file)
    shutil.rmtree(directory, ignore_errors=True)
    record, seconds, previous = dict(row=row, seed=seed, points=[], seconds_per_step=[]), 0.0, None
    stages = stages_of(args, row)
    for index, (objective, extra, steps) in enumerate(stages):
        run, last = os.path.join(directory, f"stage{index + 1}-{objective}"), index == len(stages) - 1
        done, stage_seconds = 0, 0.0
        for stop in [steps * (k + 1) // args.points for k in range(args.points)] if last else [steps]:
            print(f"== {row} seed {seed}: stage {index + 1}/{len(stages)} {objective}, to step {stop} of {steps}",
                  file=sys.stderr)
            argv = ["--resume", run] if done else family.train_argv(args, objective, extra, steps, seed, run,
                                                                   init=previous)
            train.main(argv + ["--stop-after-step", str(stop)], lab.OBJECTIVES)
            stage_seconds, done = stage_seconds + family.training_seconds(run, done), stop
            if last:
                record["points"].append(dict(step=stop, seconds=seconds + stage_seconds,
                                             **judge_point(args, run, stop, seed, directory)))
        record["seconds_per_step"].append(stage_seconds / steps)
        seconds, previous = seconds + stage_seconds, run
    with open(path, "w") as file:
        json.dump(record, file, indent=2)
    return record


def time_to_reach(points, target):
    """The training seconds at which a curve first reaches fd_normalised <= target, linear between its points ->
    (seconds, bound): bound '<=' when its first point is already there, None when it never gets there."""
    if points[0]["fd_normalised"] <= target:
        return points[0]["seconds"], "<="
    for before, after in zip(points, points[1:]):
        if after["fd_normalised"] <= target:
            share = (before["fd_normalised"] - target) / (before["fd_normalised"] - after["fd_normalised"])
            return before["seconds"] + share * (after["seconds"] - before["seconds"]), ""
    return None, None


def fd_at(points, seconds):
    """A curve's fd_normalised at `seconds` (its points' 'seconds'), linear between points; None outside them."""
    for before, after in zip(points, points[1:]):
        if before["seconds"] <= seconds <= after["seconds"]:
            share = (seconds - before["seconds"]) / (after["seconds"] - before["seconds"])
            return before["fd_normalised"] + share * (after["fd_normalised"] - before["fd_normalised"])
    return None


def beside_ddpm(records, clock):
    """(record, the same seed's ddpm record) for every non-ddpm record with one, their points' 'seconds' read from
    `clock`: 'seconds' (train.py's clock) or 'timed_seconds' (steps times timed step costs)."""
    on_clock = lambda record: dict(record, points=[dict(p, seconds=p[clock]) for p in record["points"]])  # noqa: E731
    for record in records:
        ddpm = next((r for r in records if r["row"] == "ddpm" and r["seed"] == record["seed"]), None)
        if ddpm is not None and record["row"] != "ddpm":
            yield on_clock(record), on_clock(ddpm)


def equal_seconds(records, clock="timed_seconds"):
    """{row: [(its final fd_normalised, the same seed's ddpm at the row's final time by `clock`, or None), ...]}."""
    result = {}
    for record, ddpm in beside_ddpm(records, clock):
        final = record["points"][-1]
        result.setdefault(record["row"], []).append((final["fd_normalised"], fd_at(ddpm["points"], final["seconds"])))
    return result


def ratios(records, clock="seconds"):
    """{row: [(time to reach the same seed's ddpm final fd_normalised / ddpm's time, bound), ...]}, each time read
    from the points' `clock`."""
    result = {}
    for record, ddpm in beside_ddpm(records, clock):
        seconds, bound = time_to_reach(record["points"], ddpm["points"][-1]["fd_normalised"])
        result.setdefault(record["row"], []).append(
            (None, None) if seconds is None else (seconds / ddpm["points"][-1]["seconds"], bound))
    return result


def add_timed_seconds(record, stages, costs):
    """Each point's `timed_seconds`: the steps of every stage so far times that stage's seconds per step, timed side
    by side (family.seconds_per_step): a clock that a busy machine's neighbours do not move."""
    before = 0.0
    for objective, extra, steps in stages[:-1]:
        before += steps * costs[family.stage_key(objective, extra)]
    last = costs[family.stage_key(*stages[-1][:2])]
    for point in record["points"]:
        point["timed_seconds"] = before + point["step"] * last


def table(records, costs):
    """The markdown: per row and point, seconds and fd_normalised (mean ± std over seeds); seconds per step of each
    stage; each row's time to ddpm's final quality as a share of ddpm's."""
    lines = ["| row | point | step of the last stage | training seconds (clock) | (timed step costs) | fd_normalised | "
             "classes present |", "|---" * 7 + "|"]
    for row in GENERATIVE_ROWS:
        mine = [r for r in records if r["row"] == row]
        for index in range(len(mine[0]["points"]) if mine else 0):
            column = lambda key: [r["points"][index][key] for r in mine]   # noqa: E731
            lines.append(f"| {family.LABELS[row]} | {index + 1} | {mine[0]['points'][index]['step']} | "
                         f"{family.spread(column('seconds'), 0)} | {family.spread(column('timed_seconds'), 0)} | "
                         f"{family.spread(column('fd_normalised'), 3)} | "
                         f"{min(column('classes_present'))}-{max(column('classes_present'))} |")
    costs_lines = [f"- {family.LABELS[row]}: " + ", then ".join(
        f"stage {i + 1} {family.spread([r['seconds_per_step'][i] for r in records if r['row'] == row], 3)} s/step"
        for i in range(len(next(r for r in records if r["row"] == row)["seconds_per_step"])))
        for row in GENERATIVE_ROWS if any(r["row"] == row for r in records)]
    reach = []
    for clock, words in (("timed_seconds", "by timed step costs"), ("seconds", "by train.py's clock")):
        for row, values in ratios(records, clock).items():
            cells = ["never" if share is None else f"{bound}{share:.2f}" for share, bound in values]
            measured = [share for share, _ in values if share is not None]
            summary = f" (mean {statistics.mean(measured):.2f})" if len(measured) == len(values) > 1 else ""
            reach.append(f"- {family.LABELS[row]}, {words}: {', '.join(cells)} of ddpm's time, per seed{summary}")
    for row, pairs in equal_seconds(records).items():
        cells = [f"{own:.3f} against {'(before its first point)' if ddpm is None else f'{ddpm:.3f}'}" for own, ddpm
                 in pairs]
        reach.append(f"- {family.LABELS[row]} at its end, and ddpm at the same time (timed step costs, linear "
                     f"between its points): {', '.join(cells)}, per seed")
    timed = ", ".join(f"{key} {seconds * 1000:.0f} ms" for key, seconds in costs.items())
    return ("\n".join(lines) + "\n\nSeconds per step, by train.py's clock:\n\n" + "\n".join(costs_lines) +
            f"\n\nTimed side by side in one process (family.seconds_per_step): {timed}.\n\n"
            + ("Time to reach the same seed's ddpm final fd_normalised, as a share of ddpm's training time "
               "(linear between points; '<=': already there at the first point):\n\n" + "\n".join(reach) + "\n"
               if reach else ""))


def plot(records, path):
    """fd_normalised against training seconds: a line per row and seed."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(6.5, 4.2), layout="constrained")
    axes = figure.subplots()
    for index, row in enumerate(GENERATIVE_ROWS):
        for number, record in enumerate(r for r in records if r["row"] == row):
            axes.plot([p["timed_seconds"] for p in record["points"]], [p["fd_normalised"] for p in record["points"]],
                      "o-", color=f"C{index}", alpha=0.8, label=family.LABELS[row] if number == 0 else None)
    axes.set(xlabel="training seconds: steps x timed step costs (every stage; sampling not counted)",
             ylabel="fd_normalised (0 real, 1 blurred; lower is better)", title="sample quality against training time")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.docs = args.docs or args.out
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    if not rows or any(row not in GENERATIVE_ROWS for row in rows):
        raise cli.UserError(f"--rows takes some of {', '.join(GENERATIVE_ROWS)}, not {args.rows!r}")
    if args.points < 1 or args.steps < 2 * args.points or args.seeds < 1 or args.num_images < 2:
        raise cli.UserError("--points and --seeds must be at least 1, --steps at least twice --points, "
                            "--num-images at least 2")
    os.makedirs(args.out, exist_ok=True)
    records = [run_curve(args, row, seed) for seed in range(args.first_seed, args.first_seed + args.seeds)
               for row in rows]
    costs = family.seconds_per_step(args, [stage[:2] for row in rows for stage in stages_of(args, row)])
    for record in records:
        add_timed_seconds(record, stages_of(args, record["row"]), costs)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{args.device}")
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump(dict(records=records, argv=argv, machine=machine), file, indent=2)
    os.makedirs(args.docs, exist_ok=True)
    plot(records, os.path.join(args.docs, "curve.png"))
    text = table(records, costs)
    with open(os.path.join(args.docs, "curve.md"), "w") as file:
        file.write(f"# Sample quality against training seconds\n\nMade by `python -m lab.curve {' '.join(argv)}` "
                   f"({machine}). {args.num_images} DDIM samples ({args.sampling_steps} steps, eta 0) per point, "
                   f"judged by lab/judge.py.\n\n{text}\n![fd_normalised against training seconds](curve.png)\n")
    print(text, file=sys.stderr)
    return records


if __name__ == "__main__":
    cli.run_cli(main)
