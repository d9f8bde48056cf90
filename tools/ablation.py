"""
Scheduler ablation: pretrain with constant, linear, piecewise and cosine masking (same seed, data and steps), then
linear-probe each encoder, and write OUT/ablation.md (a markdown table) and OUT/ablation.json.

    python tools/ablation.py --out runs/ablation-synthetic --linprobe-epochs 5 -- \\
        --dataset synthetic --vae none --model tiny --steps 300 --batch-size 64     # offline, minutes on a laptop
    python tools/ablation.py --out runs/ablation-cifar10 --linprobe-epochs 20 -- --dataset cifar10 --steps 10000

Everything after `--` goes to train.py unchanged, the same for the four runs (--scheduler and --out are set here).
Each run lives in OUT/<scheduler>/ with its grids and curves; its linear probe in OUT/<scheduler>/linprobe/.
"""

import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere
import lmd  # noqa: E402
from util import cli  # noqa: E402
from util import pictures  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: train.py, finetune.py


def build_parser():
    parser = cli.ArgumentParser(description="Train the four mask-ratio schedulers side by side and tabulate them.",
                                     allow_abbrev=False)  # so that train.py's flags pass through untouched
    parser.add_argument("--out", default="runs/ablation", help="directory for the four runs and the table "
                                                               "(default: %(default)s)")
    parser.add_argument("--schedulers", default=",".join(lmd.SCHEDULERS),
                        help="comma-separated schedulers to compare (default: %(default)s)")
    parser.add_argument("--linprobe-epochs", type=int, default=10,
                        help="epochs of finetune.py --mode linprobe per run; 0 skips the probe (default: %(default)s)")
    parser.add_argument("--finetune-args", default="", help="extra finetune.py flags, one quoted string "
                                                            "(e.g. \"--batch-size 256\")")
    parser.add_argument("--reuse", action="store_true", help="skip the pretraining of a scheduler whose run "
                                                             "directory already holds a finished run (summary.json)")
    return parser


def run(command):
    """Run a script with this Python; a failure stops the ablation with the command to rerun by hand."""
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    if subprocess.call([sys.executable] + command) != 0:
        raise cli.UserError(f"this step of the ablation failed: python {shlex.join(command)}")


def pretrain(scheduler, train_args, run_dir, reuse):
    """Train one scheduler. -> dict(held_out_loss, minutes, steps_per_second) from train.py's own output."""
    if not (reuse and os.path.exists(os.path.join(run_dir, "summary.json"))):
        run([os.path.join(HERE, "train.py"), *train_args, "--scheduler", scheduler, "--out", run_dir])
    with open(os.path.join(run_dir, "summary.json")) as file:
        summary = json.load(file)
    with open(os.path.join(run_dir, "config.json")) as file:
        config = json.load(file)
    last = pictures.read_metrics(os.path.join(run_dir, "metrics.jsonl"))[-1]
    # summary.json times the training loop and the final evaluation, not start-up or the one-off latent cache
    # (which only the first run builds), so the four rows compare like with like.
    minutes = summary.get("minutes", summary.get("minutes_this_session"))
    return dict(scheduler=scheduler, run=run_dir, steps=config["steps"], batch_size=config["batch_size"],
                held_out_loss=summary["held_out_loss_at_0_75"], minutes=minutes,
                steps_per_second=last["images_per_second"] / config["batch_size"])


def linear_probe(run_dir, epochs, finetune_args):
    """finetune.py --mode linprobe on one run. -> top-1 (final epoch, best epoch) as fractions."""
    out = os.path.join(run_dir, "linprobe")
    run([os.path.join(HERE, "finetune.py"), "--checkpoint", run_dir, "--mode", "linprobe", "--epochs", str(epochs),
         "--out", out, *finetune_args])
    with open(os.path.join(out, "results.json")) as file:
        top1 = json.load(file)["top1"]
    return top1["final"], top1["best"]


def markdown_table(results):
    """One row per scheduler: held-out loss at 0.75, linear-probe top-1 (final epoch), wall time, steps/s."""
    lines = ["| scheduler | held-out loss @0.75 | linear-probe top-1 | wall time | steps/s |",
             "|---|---|---|---|---|"]
    for r in results:
        top1 = "n/a" if r.get("top1") is None else f"{100 * r['top1']:.1f}%"
        lines.append(f"| {r['scheduler']} | {r['held_out_loss']:.4f} | {top1} | {r['minutes']:.1f} min "
                     f"| {r['steps_per_second']:.2f} |")
    return "\n".join(lines) + "\n"


def report(results, argv, seconds):
    """The table with what it takes to reproduce it: the command, the machine, the torch version."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return (f"# Scheduler ablation\n\n{markdown_table(results)}\n"
            f"Held-out loss: masked-token MSE on validation images at mask ratio 0.75 with a fixed mask seed "
            f"(lower is better). Linear-probe top-1: last epoch of `finetune.py --mode linprobe`. Wall time: "
            f"train.py's training loop and final evaluation (summary.json); steps/s: optimizer steps per second "
            f"over the loop (metrics.jsonl).\n\n"
            f"Command: `python tools/ablation.py {shlex.join(argv)}`  \n"
            f"Machine: {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}; "
            f"the whole ablation took {seconds / 60:.1f} min.\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, train_args = build_parser().parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    for name in schedulers:
        lmd.MaskSchedule(name)  # an unknown name is a UserError before anything runs
    if any(a.split("=")[0] in ("--scheduler", "--resume") for a in train_args):
        raise cli.UserError("ablation.py sets --scheduler itself, and --resume does not apply; drop the flag")
    if args.linprobe_epochs and not os.path.exists(os.path.join(HERE, "finetune.py")):
        raise cli.UserError("finetune.py is missing, so there is no linear probe; pass --linprobe-epochs 0")
    started = time.time()
    results = []
    for scheduler in schedulers:
        result = pretrain(scheduler, train_args, os.path.join(args.out, scheduler), args.reuse)
        result["top1"], result["top1_best"] = (linear_probe(result["run"], args.linprobe_epochs,
                                                            shlex.split(args.finetune_args))
                                               if args.linprobe_epochs else (None, None))
        results.append(result)
    os.makedirs(args.out, exist_ok=True)
    text = report(results, argv, time.time() - started)
    with open(os.path.join(args.out, "ablation.md"), "w") as file:
        file.write(text)
    with open(os.path.join(args.out, "ablation.json"), "w") as file:
        json.dump(dict(command=["python", "tools/ablation.py", *argv], results=results, torch_version=torch.__version__,
                       minutes=(time.time() - started) / 60), file, indent=2)
    print(text)


if __name__ == "__main__":
    cli.run_cli(main)
