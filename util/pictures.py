"""Pictures: reconstruction grids decoded back to pixels through the frozen VAE, training curves, the schedules.
A grid reads the model and draws masks from its own generator: one written mid-training leaves the run as it was."""

import itertools
import json
import os

import torch

import lmd
from util.datasets import ImageDataset, load_image_source
from util.sampling import step_generator


GRID_MASK_RATIO = lmd.MAE_MASK_RATIO   # grids mask as much as the held-out loss does, whatever the schedule
GRID_LABEL_WIDTH, GRID_TITLE_HEIGHT = 200, 44   # pixels of the grid's row-label column and title strip
GRID_MIN_SIDE = 96   # smaller images are drawn at a whole multiple of their size, so the labels stay readable


def spread_over_classes(labels, count):
    """Indices of `count` items across the classes (in order): each class's first item, then each one's second, ..."""
    by_class = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    rounds = itertools.zip_longest(*(by_class[label] for label in sorted(by_class)))
    return list(itertools.islice((i for i in itertools.chain.from_iterable(rounds) if i is not None), count))


def grid_images(config, count=8):
    """`count` un-augmented validation images of a run config, across the classes: [count, 3, S, S] in [0, 1]."""
    source = load_image_source(config["dataset"], config["data_dir"], "val", config["image_size"],
                               config.get("synthetic_size", 5000))
    images = ImageDataset(source, config["image_size"])
    labels = getattr(source, "targets", None)
    picked = spread_over_classes(labels, count) if labels is not None else range(min(count, len(images)))
    return torch.stack([images[i][0] for i in picked])


def unnormalize_tokens(predictions, targets):
    """predictions [B, L, D] in per-token normalised units -> the units of targets [B, L, D]: as MAE's pictures do,
    each token's mean and contrast are borrowed from the true token (which flatters the model a little)."""
    mean = targets.mean(dim=-1, keepdim=True)
    std = (targets.var(dim=-1, keepdim=True) + 1e-6).sqrt()   # the same epsilon as masked_token_loss
    return predictions * std + mean


def token_mask_to_pixels(mask, grid, image_size):
    """mask [B, L] (1 = masked) on a grid x grid token layout -> pixel mask [B, 1, S, S], S / grid pixels a token."""
    cell = image_size // grid
    return mask.reshape(-1, 1, grid, grid).repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)


@torch.no_grad()
def reconstruction_rows(model, projection, images, normalize_targets=True, seed=0, mask_ratio=GRID_MASK_RATIO):
    """images [N, 3, S, S] in [0, 1] -> [(label, row)], each row [N, 3, S, S] in [0, 1] on the CPU: original | masked
    input (grey) | reconstruction | visible latent tokens pasted back | raw prediction (with normalised targets, when
    rows 3 and 4 borrow each token's mean and contrast: unnormalize_tokens). The mask seed is fixed (the held-out
    loss's), so a run's grids compare step to step."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = images.to(device)
    latents = projection.encode(images)
    generator = step_generator(seed, -1, device=device)
    _, raw, mask = model(latents, mask_ratio, normalize_targets, generator=generator)
    model.train(was_training)
    targets = model.patchify(latents)
    predictions = unnormalize_tokens(raw.float(), targets) if normalize_targets else raw.float()
    masked = mask.unsqueeze(-1)                                           # [B, L, 1]
    pasted = targets * (1 - masked) + predictions * masked
    pixel_mask = token_mask_to_pixels(mask, model.grid, images.shape[-1])  # grey in pixels: clearer than in latents
    draw = lambda tokens: projection.decode(model.unpatchify(tokens))   # noqa: E731
    borrowed = "\nmasked tokens' mean and\ncontrast from the original" if normalize_targets else ""
    rows = [("original", images), ("masked input\n(grey: masked)", images * (1 - pixel_mask) + 0.5 * pixel_mask),
            ("reconstruction\n(visible tokens: untrained)" + borrowed, draw(predictions)),
            ("reconstruction +\nvisible patches pasted", draw(pasted))]
    if normalize_targets:   # without normalised targets this row would be the reconstruction again
        rows.append(("raw prediction\n(no borrowed\nmean/contrast)", draw(raw.float())))
    return [(label, row.float().cpu()) for label, row in rows]


def grid_title(projection, config, step):
    """What a grid shows, in one line: pixels or which VAE's latents (and whether that VAE is untrained), the step."""
    if projection.is_pixels:
        what = "pixel MAE (--vae none)"
    else:
        untrained = "" if projection.trained else " (UNTRAINED VAE: its latents mean nothing)"
        what = f"LMD on {projection.name} latents{untrained}"
    return f"{what}, {config['dataset']}: step {step:,} of {config['steps']:,}"


def default_font(size):
    """Pillow's built-in font at `size` px (Pillow >= 10.1); an older Pillow's small bitmap font (smaller labels)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def save_reconstruction_grid(model, projection, images, path, normalize_targets=True, seed=0,
                             mask_ratio=GRID_MASK_RATIO, title=""):
    """Write the rows of `reconstruction_rows` as one PNG: a title strip, a column of row labels, and the rows of N
    images with 2 px white padding, drawn k times larger (k whole, the least with k*S >= GRID_MIN_SIDE)."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid
    labelled = reconstruction_rows(model, projection, images, normalize_targets, seed, mask_ratio)
    grid = make_grid(torch.cat([row for _, row in labelled]), nrow=len(images), padding=2, pad_value=1.0)
    side, scale = images.shape[-1], -(-GRID_MIN_SIDE // images.shape[-1])
    pixels = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    pixels = pixels.resize((pixels.width * scale, pixels.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (GRID_LABEL_WIDTH + pixels.width, GRID_TITLE_HEIGHT + pixels.height), "white")
    canvas.paste(pixels, (GRID_LABEL_WIDTH, GRID_TITLE_HEIGHT))
    draw, font, small = ImageDraw.Draw(canvas), default_font(15), default_font(12)
    draw.text((8, 4), title, fill="black", font=font)
    draw.text((8, 24), f"{len(images)} validation images across the classes; mask ratio {mask_ratio}, the same "
              "mask at every step", fill="dimgray", font=small)
    for row, (label, _) in enumerate(labelled):
        middle = GRID_TITLE_HEIGHT + scale * (2 + row * (side + 2) + side // 2)
        draw.multiline_text((8, middle), label, fill="black", font=small, anchor="lm", spacing=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"               # never leave half a PNG behind
    canvas.save(temporary, format="png")
    os.replace(temporary, path)
    return path


def grid_writer(model, projection, config, objective):
    """The run's grid writer: its record's sample_grid (the lab's generated samples), or GridWriter (LMD's)."""
    if objective.sample_grid:
        return objective.sample_grid(model, projection, config)
    return GridWriter(model, projection, config)


class GridWriter:
    """OUT/grid_{name}.png: 8 fixed validation images masked at 0.75 with the held-out loss's fixed mask seed."""

    def __init__(self, model, projection, config):
        self.model, self.projection, self.config, self.images = model, projection, config, None

    def __call__(self, name, step):
        if self.images is None:
            self.images = grid_images(self.config)
        return save_reconstruction_grid(self.model, self.projection, self.images,
                                        os.path.join(self.config["out"], f"grid_{name}.png"),
                                        self.config["normalize_targets"], self.config["seed"],
                                        title=grid_title(self.projection, self.config, step))


def read_metrics(path):
    """The records of a metrics.jsonl file (one JSON object per logged step), in order."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def plot_curves(metrics_path, path, objective):
    """Two panels against the step from OUT/metrics.jsonl: the training and held-out losses (with summary.json's
    final one when it is this run's last step), and the mask ratio."""
    from matplotlib.figure import Figure   # no pyplot: no global backend state, safe inside a training script
    records = read_metrics(metrics_path)
    steps = [record["step"] for record in records]
    held_out = [(record["step"], record["held_out_loss"]) for record in records if "held_out_loss" in record]
    summary_path = os.path.join(os.path.dirname(metrics_path), "summary.json")
    if os.path.exists(summary_path) and steps:
        with open(summary_path) as file:
            summary = json.load(file)
        final = summary.get(objective.held_out_key)
        if summary.get("step") == steps[-1] and final is not None and (not held_out or held_out[-1][0] != steps[-1]):
            held_out.append((summary["step"], final))
    # The loss is the objective's (masked-token MSE, eps-MSE); its held-out loss is measured at the record's ratio.
    config, config_path = {}, os.path.join(os.path.dirname(metrics_path), "config.json")
    if os.path.exists(config_path):
        with open(config_path) as file:
            config = json.load(file)
    what = objective.loss_name
    held_out_label = f"held-out (validation, at ratio {objective.mask_ratio_held_out(config)})"
    figure = Figure(figsize=(10, 3.6))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.91, wspace=0.22)
    loss_axes, ratio_axes = figure.subplots(1, 2)
    # The training loss is at the current ratio, harder as a progressive schedule rises: compare by the held-out loss.
    loss_axes.plot(steps, [record["loss"] for record in records], label="training (at the current mask ratio)")
    if held_out:
        loss_axes.plot(*zip(*held_out), "o-", color="tab:red", label=held_out_label)
    loss_axes.set(xlabel="step", ylabel=what, title=what)
    loss_axes.legend()
    ratio_axes.plot(steps, [record["mask_ratio"] for record in records], color="tab:orange")
    ratio_axes.set(xlabel="step", ylabel="mask ratio", title="mask ratio", ylim=(0, 1))
    for axes in (loss_axes, ratio_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return path


def plot_schedules(path, ramp_fraction=lmd.MaskSchedule.ramp_fraction, schedules=None):
    """Mask-ratio schedules {label: function of progress 0..1} on one set of axes, the end of the ramp marked;
    default: the four of MaskSchedule, at its defaults and `ramp_fraction`."""
    from matplotlib.figure import Figure
    if schedules is None:
        schedules = {name: lmd.MaskSchedule(name, ramp_fraction=ramp_fraction) for name in lmd.SCHEDULERS}
    progress = [i / 300 for i in range(301)]
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.subplots()
    for (name, schedule), style in zip(schedules.items(), itertools.cycle((":", "-", "--", "-", "-."))):
        axes.plot(progress, [schedule(p) for p in progress], style, label=name, linewidth=2)
    axes.axvline(ramp_fraction, color="grey", linewidth=0.8)
    axes.text(ramp_fraction + 0.01, 0.9, "end of the ramp", color="grey")
    axes.set(xlabel="training progress  t / T", ylabel="mask ratio", ylim=(0, 1), xlim=(0, 1),
             title="mask-ratio schedules")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=110)
    return path
