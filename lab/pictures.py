"""The lab's pictures: grids of generated samples (a diffusion run's grids, lab/sample.py's samples.png)."""

import os

from util.pictures import GRID_MIN_SIDE, GRID_TITLE_HEIGHT
from util.sampling import step_generator


SAMPLE_GRID_IMAGES, SAMPLE_GRID_STEPS = 16, 50   # a diffusion run's grids: this many DDIM samples, of this many steps


class SampleGridWriter:
    """OUT/grid_{name}.png for a diffusion objective: SAMPLE_GRID_IMAGES DDIM samples (SAMPLE_GRID_STEPS steps,
    eta 0) from the same starting noise at every grid, so the grids of a run show its progress. Their generator is
    their own: resume stays exact."""

    def __init__(self, model, projection, config):
        self.model, self.projection, self.config = model, projection, config
        self.count, self.steps = SAMPLE_GRID_IMAGES, SAMPLE_GRID_STEPS

    def __call__(self, name, step):
        from lab import diffusion
        device = next(self.model.parameters()).device
        generator = step_generator(self.config["seed"], -1, device=device)
        images = diffusion.sample_images(self.model, self.projection, self.count, self.steps, 0.0, generator, device)
        config = self.config
        title = f"{config['objective']} on {space_name(self.projection)}, {config['dataset']}: step {step:,} of " \
                f"{config['steps']:,}"
        return save_sample_grid(images, os.path.join(config["out"], f"grid_{name}.png"), title,
                                f"{self.count} DDIM samples ({self.steps} steps, eta 0), the same starting noise at "
                                "every step")


def save_sample_grid(images, path, title="", subtitle="", columns=8):
    """Write generated images [N, 3, S, S] in [0, 1] as one PNG: a title strip (`title`, `subtitle`), then the
    images in rows of `columns`, drawn k times larger (k whole, the least with k*S >= GRID_MIN_SIDE)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid
    grid = make_grid(images.float().cpu(), nrow=columns, padding=2, pad_value=1.0)
    scale = -(-GRID_MIN_SIDE // images.shape[-1])
    pixels = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    pixels = pixels.resize((pixels.width * scale, pixels.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (max(pixels.width, 640), GRID_TITLE_HEIGHT + pixels.height), "white")
    canvas.paste(pixels, (0, GRID_TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 4), title, fill="black", font=ImageFont.load_default(size=15))
    draw.text((8, 24), subtitle, fill="dimgray", font=ImageFont.load_default(size=12))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"               # never leave half a PNG behind
    canvas.save(temporary, format="png")
    os.replace(temporary, path)
    return path


def space_name(projection):
    """'pixels', or the VAE's name (a local directory by its last part; marked when it is untrained)."""
    if projection.is_pixels:
        return "pixels"
    name = os.path.basename(projection.name.rstrip("/")) if os.path.isdir(projection.name) else projection.name
    return f"{name} latents" + ("" if projection.trained else " (UNTRAINED VAE: its latents mean nothing)")


