"""
Scheduler ablation: pretrain with constant, linear, piecewise and cosine masking (same data, steps and seeds),
probe each encoder with kNN and the linear probe beside its own random init, and write OUT/ablation.md (a markdown
table, mean +- std over seeds) and OUT/ablation.json.

    python -m lab.ablation --out runs/ablation-digits --seeds 1,2,3 -- --dataset digits --vae none \
        --model tiny --patch-size 8 --steps 600 --batch-size 64 --base-lr 1.5e-3 --no-normalize-targets
    python -m lab.ablation --out runs/ablation-cifar10 -- --dataset cifar10 --steps 10000

Everything after `--` goes to train.py unchanged, the same for every run (--scheduler, --seed and --out are set
here). Each run lives in OUT/<scheduler>-seed<S>/ with its grids and curves, its probes in knn/ and linprobe/.
"""

import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

import lmd
from util import cli
from util import pictures

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: train.py, finetune.py


def build_parser():
    parser = cli.ArgumentParser(description="Train the four mask-ratio schedulers side by side and tabulate them.",
                                allow_abbrev=False)  # so that train.py's flags pass through untouched
    parser.add_argument("--out", default="runs/ablation", help="directory for the runs and the table "
                                                               "(default: %(default)s)")
    parser.add_argument("--schedulers", default=",".join(lmd.SCHEDULERS),
                        help="comma-separated schedulers to compare (default: %(default)s)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one run per scheduler and seed "
                                                     "(default: %(default)s)")
    parser.add_argument("--probes", default="knn,linprobe",
                        help="comma-separated probes per run, from knn and linprobe; 'none' skips them "
                             "(default: %(default)s)")
    parser.add_argument("--linprobe-epochs", type=int, default=90,
                        help="epochs of finetune.py --mode linprobe per run (default: %(default)s)")
    parser.add_argument("--finetune-args", default="", help="extra finetune.py flags, one quoted string")
    parser.add_argument("--reuse", action="store_true", help="skip the pretraining of a run whose directory "
                        "already holds a finished run (summary.json), and a probe whose results.json is there")
    return parser


def run(command):
    """Run a script with this Python; a failure stops the ablation with the command to rerun by hand."""
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    if subprocess.call([sys.executable] + command) != 0:
        raise cli.UserError(f"this step of the ablation failed: python {shlex.join(command)}")


def pretrain(scheduler, seed, train_args, run_dir, reuse):
    """Train one scheduler. -> dict(held_out_loss, minutes, steps_per_second) from train.py's own output."""
    if not (reuse and os.path.exists(os.path.join(run_dir, "summary.json"))):
        run([os.path.join(HERE, "train.py"), *train_args, "--scheduler", scheduler, "--seed", str(seed),
             "--out", run_dir])
    with open(os.path.join(run_dir, "summary.json")) as file:
        summary = json.load(file)
    with open(os.path.join(run_dir, "config.json")) as file:
        config = json.load(file)
    last = pictures.read_metrics(os.path.join(run_dir, "metrics.jsonl"))[-1]
    # summary.json times the training loop and the final evaluation, not start-up or the one-off latent cache
    # (which only the first run builds), so the rows compare like with like.
    minutes = summary.get("minutes", summary.get("minutes_this_session"))
    return dict(scheduler=scheduler, seed=seed, run=run_dir, steps=config["steps"], batch_size=config["batch_size"],
                held_out_loss=summary["held_out_loss_at_0_75"], minutes=minutes,
                steps_per_second=last["images_per_second"] / config["batch_size"])


def probe(run_dir, mode, epochs, finetune_args, reuse=False):
    """finetune.py --mode knn or linprobe on one run -> (final top-1, the random init's final top-1)."""
    out = os.path.join(run_dir, mode)
    extra = ["--epochs", str(epochs)] if mode == "linprobe" else []
    if not (reuse and os.path.exists(os.path.join(out, "results.json"))):
        run([os.path.join(HERE, "finetune.py"), "--checkpoint", run_dir, "--mode", mode, "--out", out, *extra,
             *finetune_args])
    with open(os.path.join(out, "results.json")) as file:
        results = json.load(file)
    return results["top1"]["final"], results["scratch_top1"]["final"]


COLUMNS = (("held_out_loss", "held-out loss @0.75", "{:.4f}"), ("knn", "kNN top-1", "{:.3f}"),
           ("knn_scratch", "kNN, random init", "{:.3f}"), ("linprobe", "linear probe top-1", "{:.3f}"),
           ("linprobe_scratch", "linear probe, random init", "{:.3f}"), ("minutes", "wall time (min)", "{:.2f}"),
           ("steps_per_second", "steps/s", "{:.2f}"))


def mean_std(values, template):
    """'mean ± std' over seeds (just the value for one seed; 'n/a' when not measured)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return template.format(mean)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{template.format(mean)} ± {template.format(std)}"


def markdown_table(results):
    """One row per scheduler, mean ± std over its seeds: held-out loss, both probes and their random-init
    baselines (final epoch), wall time and steps/s."""
    lines = ["| scheduler | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for scheduler in dict.fromkeys(r["scheduler"] for r in results):
        mine = [r for r in results if r["scheduler"] == scheduler]
        cells = [mean_std([r.get(key) for r in mine], template) for key, _, template in COLUMNS]
        lines.append(f"| {scheduler} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(results, argv, seconds):
    """The table with what it takes to reproduce it: the command, the machine, the torch version."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return (f"# Scheduler ablation\n\n{markdown_table(results)}\n"
            f"Held-out loss: masked-token MSE on validation images at mask ratio 0.75 with a fixed mask seed "
            f"(lower is better). kNN and linear-probe top-1: `finetune.py --mode knn` and `--mode linprobe` (final "
            f"epoch), each beside the same seed's random-init encoder. Wall time: "
            f"train.py's training loop and final evaluation (summary.json); steps/s: optimizer steps per second "
            f"over the loop (metrics.jsonl).\n\n"
            f"Command: `python -m lab.ablation {shlex.join(argv)}`  \n"
            f"Machine: {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}; "
            f"the whole ablation took {seconds / 60:.1f} min.\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, train_args = build_parser().parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    for name in schedulers:
        lmd.MaskSchedule(name)  # an unknown name is a UserError before anything runs
    if any(a.split("=")[0] in ("--scheduler", "--seed", "--resume") for a in train_args):
        raise cli.UserError("ablation.py sets --scheduler and --seed itself, and --resume does not apply; drop "
                            "the flag")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    probes = [p.strip() for p in args.probes.split(",") if p.strip() not in ("", "none")]
    if set(probes) - {"knn", "linprobe"}:
        raise cli.UserError(f"--probes takes knn, linprobe or none, not {args.probes!r}")
    started = time.time()
    results = []
    for scheduler in schedulers:
        for seed in seeds:
            result = pretrain(scheduler, seed, train_args, os.path.join(args.out, f"{scheduler}-seed{seed}"),
                              args.reuse)
            for mode in probes:
                result[mode], result[mode + "_scratch"] = probe(result["run"], mode, args.linprobe_epochs,
                                                                shlex.split(args.finetune_args), args.reuse)
            results.append(result)
    os.makedirs(args.out, exist_ok=True)
    text = report(results, argv, time.time() - started)
    with open(os.path.join(args.out, "ablation.md"), "w") as file:
        file.write(text)
    with open(os.path.join(args.out, "ablation.json"), "w") as file:
        json.dump(dict(command=["python", "-m", "lab.ablation", *argv], results=results,
                       torch_version=torch.__version__, minutes=(time.time() - started) / 60), file, indent=2)
    print(text)


if __name__ == "__main__":
    cli.run_cli(main)
