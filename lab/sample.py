"""
Generate images from a diffusion run (python -m lab.train --objective ddpm, maskdm or umd) with DDIM, and judge
them offline.

    python -m lab.sample --checkpoint runs/ddpm --out runs/ddpm/samples   # 500 images, 50 DDIM steps (UMD: 125, eta 1)
    python -m lab.sample --checkpoint runs/ddpm --out S --num-images 100 --sampling-steps 25 --seed 1

Samples are decoded through the run's frozen VAE (pixels need none). Writes OUT/samples.png (the first 64, with a
title saying what they are) and OUT/generation.json: lab.judge's verdict (Frechet distance and KID on a small
classifier's features against the real validation split, with its floor, blur ceiling, fd_normalised, the VAE
round trip of a latent run, noise reference and predicted-class histogram) plus how the samples were made
(`sampling`: the sampler, steps, eta, seed and the batch size, which changes the samples when eta > 0).
"""

import argparse
import json
import os
import sys
import time

import torch

from lab import OBJECTIVES
from lab import diffusion
from lab import pictures
from util import checkpoints
from util import cli
from util import devices
from util import vaes
from util.objective import of

# ----------------------------------------------------------------------------------------------------------------
# Defaults, in one block. The sampler's (DDIM steps and eta) are the run's objective's: its record's `sampler`.
DEFAULTS = dict(checkpoint=None, out=None, num_images=500, sampling_steps=None, eta=None, seed=0, batch_size=250,
                grid_images=64, device="auto", judge=True)
SAMPLER_HELP = "; ".join(f"{o.name}: {o.sampler['sampling_steps']} steps, eta {o.sampler['eta']:g}"
                         for o in OBJECTIVES.values() if o.sampler)


def build_parser():
    parser = cli.ArgumentParser(description="DDIM samples of a diffusion run, judged offline (lab/judge.py).")
    parser.add_argument("--checkpoint", required=True, metavar="RUN", help="a train.py run directory (or its "
                        "checkpoint.pt) of a diffusion objective")
    parser.add_argument("--out", required=True, metavar="DIR", help="where samples.png and generation.json go")
    parser.add_argument("--num-images", type=int, help="images to generate and judge (default: %(default)s)")
    parser.add_argument("--sampling-steps", type=int, help=f"DDIM steps (default: the objective's; {SAMPLER_HELP})")
    parser.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 DDPM-like noise at each step "
                                                  "(default: the objective's, as for --sampling-steps)")
    parser.add_argument("--seed", type=int, help="seed of the starting noise (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, help="images sampled at once (default: %(default)s)")
    parser.add_argument("--grid-images", type=int, help="images in OUT/samples.png (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), help="'auto': cuda, then mps, then cpu")
    parser.add_argument("--judge", action=argparse.BooleanOptionalAction, help="judge the samples with lab/judge.py "
                        "and write generation.json; --no-judge writes the grid only (default: %(default)s)")
    parser.set_defaults(**DEFAULTS)
    return parser


def load_run(path, device):
    """A diffusion run's (config, step, model in eval mode, projection); an LMD run is refused in one line."""
    checkpoint = checkpoints.load_checkpoint(path)
    config = checkpoint["config"]
    objective = of(config, OBJECTIVES)
    if objective.sampler is None:
        raise cli.UserError(f"{path!r} is an {objective.name} run, which cannot generate; train a diffusion model, "
                            f"e.g. python -m lab.train --objective ddpm --init {path} ...")
    projection = vaes.open_projection(config["vae"], device)
    model = checkpoints.build_model(config, projection, objective)
    checkpoints.load_model_state(model, checkpoint["model"], path)
    return config, checkpoint["step"], model.to(device).eval(), projection


def generate(model, projection, flags, device):
    """flags' num_images DDIM samples [N, 3, S, S] in [0, 1] on the CPU, in batches, from one seeded generator."""
    from tqdm import tqdm
    generator = torch.Generator(device=device).manual_seed(flags.seed)
    samples = []
    with tqdm(total=flags.num_images, desc="sampling", unit="image", dynamic_ncols=True) as bar:
        for start in range(0, flags.num_images, flags.batch_size):
            count = min(flags.batch_size, flags.num_images - start)
            samples.append(diffusion.sample_images(model, projection, count, flags.sampling_steps, flags.eta,
                                                   generator, device).float().cpu())
            bar.update(count)
    return torch.cat(samples)


def main(argv=None):
    flags = build_parser().parse_args(argv)
    for flag in ("num_images", "sampling_steps", "batch_size", "grid_images"):
        if getattr(flags, flag) is not None and getattr(flags, flag) < 1:
            raise cli.UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(flags, flag)})")
    device = devices.select_device(flags.device)
    config, step, model, projection = load_run(flags.checkpoint, device)
    for flag, value in of(config, OBJECTIVES).sampler.items():
        if getattr(flags, flag) is None:   # not given: the run's objective's sampler
            setattr(flags, flag, value)
    started = time.time()
    samples = generate(model, projection, flags, device)
    seconds = time.time() - started
    sampling = dict(checkpoint=flags.checkpoint, objective=config["objective"], step=step, sampler="DDIM",
                    sampling_steps=flags.sampling_steps, eta=flags.eta, seed=flags.seed, num_images=flags.num_images,
                    batch_size=flags.batch_size,   # with eta > 0 each step's noise is drawn batch by batch
                    sampling_seconds=round(seconds, 1), device=str(device))
    source = config.get("init_from")   # a second stage names its first: "ddpm (--init: a maskdm run)"
    stages = f"{config['objective']} (--init: a {source['objective']} run)" if source else config["objective"]
    title = f"{stages} on {pictures.space_name(projection)}, {config['dataset']}, step {step:,}"
    subtitle = (f"{min(flags.grid_images, len(samples))} of {len(samples)} DDIM samples ({flags.sampling_steps} "
                f"steps, eta {flags.eta}, seed {flags.seed}); not picked")
    grid = pictures.save_sample_grid(samples[:flags.grid_images], os.path.join(flags.out, "samples.png"), title,
                                     subtitle)
    print(f"{len(samples)} samples in {seconds:.0f} s; grid: {grid}", file=sys.stderr)
    if not flags.judge:
        return None
    try:
        from lab import judge
    except ImportError as error:
        raise cli.UserError(f"the offline judge could not be loaded ({error}); the grid is written: {grid}; "
                            "rerun with --no-judge to skip judging") from None
    result = dict(judge.evaluate_generation(samples, config, device), sampling=sampling)
    path = os.path.join(flags.out, "generation.json")
    with open(path, "w") as file:
        json.dump(result, file, indent=2)
    summary = {key: result[key] for key in ("fd", "floor", "ceiling", "fd_normalised", "classes_present",
                                            "max_class_fraction") if key in result}
    print(f"generation: {json.dumps(summary)}; {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    cli.run_cli(main)
