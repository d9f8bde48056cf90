"""
The README's two drawn figures, made from the repository's own code:

    python -m lab.make_figures             # writes docs/pipeline.png and docs/schedules.png

schedules.png plots lmd.MaskSchedule itself (pictures.plot_schedules); pipeline.png draws the data flow of one training
step around a real synthetic image and a real 0.75 mask from lmd.random_masking.
"""

import argparse
import os

import torch

import lmd
from util import cli, datasets, pictures

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def plot_pipeline(path):
    """image -> VAE -> latent patches -> masking -> encoder -> decoder -> loss, as boxes and arrows, and the
    target tokens' arrow from the latent patches to the loss."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    image, _ = datasets.synthetic_image(3, 224)
    grid = 7   # 49 tokens: the paper's 224 px image, 4 x 28 x 28 latent, latent patch 4
    _, mask, _ = lmd.random_masking(torch.zeros(1, grid * grid, 1), 0.75, torch.Generator().manual_seed(0))
    pixel_mask = pictures.token_mask_to_pixels(mask, grid, 224)[0]
    masked = image * (1 - pixel_mask) + 0.5 * pixel_mask

    figure = Figure(figsize=(13, 4.2))
    axes = figure.add_axes([0, 0, 1, 1], xlim=(0, 13), ylim=(0, 4.2))
    axes.axis("off")
    stages = [  # (x centre, title, detail, colour)
        (0.8, "image", "3 x 224 x 224\nin [0, 1]", None),
        (2.6, "frozen VAE\nencoder", "x scaling_factor\n(not trained)", "#d9d9d9"),
        (4.4, "latent patches", "4 x 28 x 28 latent\n-> 49 tokens of\n4 x 4 x 4 values", "#c6dbef"),
        (6.2, "random masking", "keep 1 - r(t)\nr grows 0.15 -> 0.75\nover training", None),
        (8.0, "encoder (ViT)", "visible tokens only\n+ class token", "#fdd0a2"),
        (9.8, "decoder", "mask tokens at the\nhidden positions", "#fdd0a2"),
        (11.8, "loss", "MSE on masked\ntokens only\n(targets: latent tokens)", "#c7e9c0"),
    ]
    for x, title, detail, colour in stages:
        if colour:
            axes.add_patch(FancyBboxPatch((x - 0.75, 1.2), 1.5, 1.4, boxstyle="round,pad=0.05", facecolor=colour,
                                          edgecolor="black"))
            axes.text(x, 2.25, title, ha="center", va="center", fontsize=11, weight="bold")
        else:
            axes.text(x, 3.05, title, ha="center", va="center", fontsize=11, weight="bold")
        axes.text(x, 0.75 if not colour else 1.65, detail, ha="center", va="center", fontsize=8.5)
    for left, right in zip(stages, stages[1:]):
        axes.add_artist(FancyArrowPatch((left[0] + 0.8, 1.9), (right[0] - 0.8, 1.9), arrowstyle="-|>",
                                        mutation_scale=15, color="black"))
    # The target: the latent tokens themselves (normalised per token), compared with the decoder's output at the
    # masked positions only. Drawn over the row, from the top of the latent patches to the top of the loss.
    axes.add_artist(FancyArrowPatch((4.4, 2.7), (11.8, 2.7), connectionstyle="bar,fraction=-0.1", arrowstyle="-|>",
                                    mutation_scale=15, color="#31a354", linewidth=1.5))
    axes.text(8.1, 3.62, "target tokens: all latent tokens, normalised per token by default, raw with "
              "--no-normalize-targets (the loss reads the masked ones)",
              ha="center", va="bottom", fontsize=9, color="#31a354")
    for x, picture in ((0.8, image), (6.2, masked)):   # real pixels: a synthetic image and a real 0.75 mask
        inset = figure.add_axes([(x - 0.55) / 13, 1.35 / 4.2, 1.1 / 13, 1.1 / 4.2])
        inset.imshow(picture.permute(1, 2, 0).numpy())
        inset.set_xticks([])
        inset.set_yticks([])
    axes.text(6.5, 0.15, "one step at ratio r: grey = masked (shown in pixels; the model masks latent tokens). "
              "Only the encoder and decoder train; the VAE decoder is used only to draw reconstructions.",
              ha="center", fontsize=8.5, style="italic")
    figure.savefig(path, dpi=110)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw docs/pipeline.png and docs/schedules.png.")
    parser.add_argument("--out", default=DOCS, help="directory for the figures (default: this docs/ folder)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(plot_pipeline(os.path.join(args.out, "pipeline.png")))
    print(pictures.plot_schedules(os.path.join(args.out, "schedules.png")))


if __name__ == "__main__":
    cli.run_cli(main)
