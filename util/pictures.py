"""Pictures: reconstruction grids decoded back to pixels through the frozen VAE, training curves, the schedules.

Rendering only reads the model and draws its masks from its own generator, so a grid written in the middle of
training changes neither the weights nor any random stream of the run (resume stays exact)."""

import json
import os

import torch

import lmd
from util.datasets import ImageDataset, load_image_source
from util.sampling import step_generator


GRID_MASK_RATIO = 0.75   # grids mask as much as the held-out loss does, whatever the schedule is at

def grid_images(config, count=8):
    """The first `count` validation images of a run config, un-augmented: [count, 3, S, S] in [0, 1]."""
    source = load_image_source(config["dataset"], config["data_dir"], "val", config["image_size"],
                               config.get("synthetic_size", 5000))
    images = ImageDataset(source, config["image_size"])
    return torch.stack([images[i][0] for i in range(min(count, len(images)))])


def unnormalize_tokens(predictions, targets):
    """predictions [B, L, D] in per-token normalised units -> the units of targets [B, L, D].

    With normalised targets the model predicts only the pattern inside each token, not its mean or contrast; to
    draw it, MAE's visualisation borrows those two numbers from the true token. (So the picture flatters the model
    a little: the brightness of every masked patch is given away.)
    """
    mean = targets.mean(dim=-1, keepdim=True)
    std = (targets.var(dim=-1, keepdim=True) + 1e-6).sqrt()   # the same epsilon as masked_token_loss
    return predictions * std + mean


def token_mask_to_pixels(mask, grid, image_size):
    """mask [B, L] (1 = masked) on a grid x grid token layout -> pixel mask [B, 1, S, S].

    One token covers S / grid pixels per side: the latent patch times the VAE's downsampling factor.
    """
    cell = image_size // grid
    return mask.reshape(-1, 1, grid, grid).repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)


@torch.no_grad()
def reconstruction_rows(model, projection, images, normalize_targets=True, seed=0, mask_ratio=GRID_MASK_RATIO):
    """images [N, 3, S, S] in [0, 1] -> four rows, each [N, 3, S, S] in [0, 1], on the CPU:

        original | masked input (masked patches grey) | reconstruction | reconstruction, visible patches pasted back

    The mask comes from a fixed generator (the held-out loss's), so the grids of a run compare step to step.
    The paste happens on the latent tokens before decoding: the bottom row is the latent the model completes, as
    the VAE draws it (with --vae none the visible pixels are then exactly the original's).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = images.to(device)
    latents = projection.encode(images)
    generator = step_generator(seed, -1, device=device)
    _, predictions, mask = model(latents, mask_ratio, normalize_targets, generator=generator)
    model.train(was_training)
    targets = model.patchify(latents)
    predictions = unnormalize_tokens(predictions.float(), targets) if normalize_targets else predictions.float()
    masked = mask.unsqueeze(-1)                                           # [B, L, 1]
    pasted = targets * (1 - masked) + predictions * masked
    pixel_mask = token_mask_to_pixels(mask, model.grid, images.shape[-1])  # grey in pixels: clearer than in latents
    masked_input = images * (1 - pixel_mask) + 0.5 * pixel_mask
    rows = [images, masked_input, projection.decode(model.unpatchify(predictions)),
            projection.decode(model.unpatchify(pasted))]
    return [row.float().cpu() for row in rows]


def save_reconstruction_grid(model, projection, images, path, normalize_targets=True, seed=0,
                             mask_ratio=GRID_MASK_RATIO):
    """Write the four rows of `reconstruction_rows` as one PNG: 4 rows of N images, 2 px white padding.

    For N images of S px the PNG is (N*S + 2*(N+1)) wide and (4*S + 10) high.
    """
    from torchvision.utils import save_image
    rows = reconstruction_rows(model, projection, images, normalize_targets, seed, mask_ratio)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"               # never leave half a PNG behind
    save_image(torch.cat(rows), temporary, nrow=len(images), padding=2, pad_value=1.0, format="png")
    os.replace(temporary, path)
    return path


def read_metrics(path):
    """The records of a metrics.jsonl file (one JSON object per logged step), in order."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def plot_curves(metrics_path, path):
    """Two panels from OUT/metrics.jsonl: training loss against step, and the mask ratio against step."""
    from matplotlib.figure import Figure   # no pyplot: no global backend state, safe inside a training script
    records = read_metrics(metrics_path)
    steps = [record["step"] for record in records]
    figure = Figure(figsize=(9, 3.2), layout="constrained")
    loss_axes, ratio_axes = figure.subplots(1, 2)
    loss_axes.plot(steps, [record["loss"] for record in records])
    # The training loss is measured at the current ratio: under a progressive schedule the task gets harder as it
    # falls, so compare runs by the held-out loss at a fixed 0.75, not by this curve.
    loss_axes.set(xlabel="step", ylabel="masked-token loss", title="training loss (at the current mask ratio)")
    ratio_axes.plot(steps, [record["mask_ratio"] for record in records], color="tab:orange")
    ratio_axes.set(xlabel="step", ylabel="mask ratio", title="mask ratio", ylim=(0, 1))
    for axes in (loss_axes, ratio_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return path


def plot_schedules(path, start=0.15, end=0.75, mid=0.40, ramp=2 / 3, constant_ratio=0.75):
    """The four mask-ratio schedules of MaskSchedule over training progress 0..1, on one set of axes."""
    from matplotlib.figure import Figure
    progress = [i / 300 for i in range(301)]
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.subplots()
    for name, style in zip(lmd.SCHEDULERS, (":", "-", "--", "-")):
        schedule = lmd.MaskSchedule(name, start, end, mid, ramp, constant_ratio)
        axes.plot(progress, [schedule(p) for p in progress], style, label=name, linewidth=2)
    axes.axvline(ramp, color="grey", linewidth=0.8)
    axes.text(ramp + 0.01, 0.9, "end of the ramp", color="grey")
    axes.set(xlabel="training progress  t / T", ylabel="mask ratio", ylim=(0, 1), xlim=(0, 1),
             title="mask-ratio schedules")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=110)
    return path
