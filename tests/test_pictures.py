"""Pictures: reconstruction grids during and after training, curves, --eval-only, the schedules figure, the ablation
table. One 16-step offline run (synthetic data, tiny untrained VAE, tiny model) is shared by the tests below."""

import hashlib
import json
import os

import pytest
import torch
from PIL import Image

import lmd
from util import cli
from util import pictures
from util import vaes
import train

IMAGE_SIZE = 64
# 8 images a row, 5 rows (normalised targets: the raw prediction too), 2 px padding, drawn twice as large (64 px is
# under pictures.GRID_MIN_SIDE), beside a column of row labels and under a title strip
GRID_SIZE = (pictures.GRID_LABEL_WIDTH + 2 * (8 * IMAGE_SIZE + 9 * 2),
             pictures.GRID_TITLE_HEIGHT + 2 * (5 * IMAGE_SIZE + 6 * 2))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    out = str(root / "run")
    train.main(["--dataset", "synthetic", "--synthetic-size", "80", "--vae", "tiny", "--model", "tiny",
                "--steps", "16", "--batch-size", "16", "--grid-every", "8", "--log-every", "2",
                "--eval-images", "16", "--data-dir", str(root / "data"), "--out", out])
    return out


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def drawn(monkeypatch, draw):
    """The matplotlib Figure that draw() saves (savefig still writes the file), to read what is on it."""
    from matplotlib.figure import Figure
    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self) or save(self, *args,
                                                                                                       **kwargs))
    draw()
    return figures[-1]


def sha1(path):
    with open(path, "rb") as file:
        return hashlib.sha1(file.read()).hexdigest()


def test_a_16_step_run_leaves_grids_and_curves(run):
    for name in ("grid_step000008.png", "grid_step000016.png", "grid_final.png"):
        assert png_size(os.path.join(run, name)) == GRID_SIZE, name
    png_size(os.path.join(run, "curves.png"))


def test_the_curves_show_the_logged_losses_and_mask_ratios(run, monkeypatch, tmp_path):
    metrics = os.path.join(run, "metrics.jsonl")
    figure = drawn(monkeypatch, lambda: pictures.plot_curves(metrics, str(tmp_path / "curves.png"), train.LMD))
    records = pictures.read_metrics(metrics)
    loss_axes, ratio_axes = figure.axes
    training, held_out = loss_axes.lines
    assert list(training.get_xdata()) == [r["step"] for r in records] == list(range(2, 17, 2))
    assert list(training.get_ydata()) == [r["loss"] for r in records]
    assert list(held_out.get_xdata()) == [8, 16]
    assert list(held_out.get_ydata()) == [r["held_out_loss"] for r in records if "held_out_loss" in r]
    ratios = list(ratio_axes.lines[0].get_ydata())
    assert ratios == [r["mask_ratio"] for r in records] and ratios == sorted(ratios)   # the cosine schedule rises


def test_the_held_out_loss_is_logged_at_every_grid(run):
    records = pictures.read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in records if "held_out_loss" in r] == [8, 16]
    with open(os.path.join(run, "summary.json")) as file:
        final = json.load(file)["held_out_loss_at_0_75"]
    assert records[-1]["held_out_loss"] == pytest.approx(final, rel=1e-6)   # the same weights, images and masks


def test_eval_only_renders_and_reports_without_touching_the_checkpoint(run, capsys):
    checkpoint = os.path.join(run, "checkpoint.pt")
    before = sha1(checkpoint), sha1(os.path.join(run, "config.json"))
    train.main(["--eval-only", "--resume", run])
    assert (sha1(checkpoint), sha1(os.path.join(run, "config.json"))) == before
    assert png_size(os.path.join(run, "grid_eval.png")) == GRID_SIZE
    with open(os.path.join(run, "eval.json")) as file:
        result = json.load(file)
    with open(os.path.join(run, "summary.json")) as file:
        summary = json.load(file)
    assert result["step"] == 16
    # the same weights, images and mask seed as the end of training: the same held-out loss
    assert result["held_out_loss_at_0_75"] == pytest.approx(summary["held_out_loss_at_0_75"], rel=1e-5)
    assert "held-out masked-token loss" in capsys.readouterr().out


def test_eval_only_without_resume_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: train.main(["--eval-only", "--dataset", "synthetic", "--vae", "none"]))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "--resume" in error and len(error.splitlines()) == 1


def test_pixel_grid_greys_masked_patches_and_pastes_visible_ones_exactly():
    torch.manual_seed(0)
    projection = vaes.open_projection("none")
    model = lmd.MaskedLatentViT("tiny", grid_size=32, patch_size=8, channels=3)
    images = torch.rand(3, 3, 32, 32)
    labelled = pictures.reconstruction_rows(model, projection, images)
    original, masked_input, reconstruction, pasted, raw = [row for _, row in labelled]
    grey = masked_input == 0.5
    visible = ~grey.all(dim=1, keepdim=True).expand_as(images)
    assert 0.70 < 1 - visible.float().mean() < 0.80                       # ratio 0.75 of 16 tokens
    assert torch.equal(original, images)
    assert torch.equal(masked_input[visible], images[visible])
    assert torch.allclose(pasted[visible], images[visible], atol=1e-6)  # pixels: pasting is exact
    assert reconstruction.shape == images.shape and 0 <= reconstruction.min() and reconstruction.max() <= 1
    # the raw row is the prediction without the borrowed per-token mean and contrast: another picture
    assert labelled[4][0].startswith("raw prediction") and raw.shape == images.shape
    assert not torch.allclose(raw, reconstruction)
    # without normalised targets nothing is borrowed: row 3 is the raw prediction, and there is no fifth row
    plain = pictures.reconstruction_rows(model, projection, images, normalize_targets=False)
    assert len(plain) == 4 and "mean" in labelled[2][0] and "mean" not in plain[2][0]


def test_grids_are_drawn_with_an_old_pillow_that_has_no_font_size(tmp_path, monkeypatch):
    """Pillow < 10.1: ImageFont.load_default() takes no size. The grid falls back to the bitmap font."""
    from PIL import ImageFont
    load_default, sizes = ImageFont.load_default, []
    monkeypatch.setattr(ImageFont, "load_default", lambda: sizes.append(None) or load_default())
    model = lmd.MaskedLatentViT("tiny", grid_size=16, patch_size=4, channels=3)
    path = tmp_path / "grid.png"
    pictures.save_reconstruction_grid(model, vaes.open_projection("none"), torch.rand(2, 3, 16, 16), path, title="t")
    assert sizes == [None, None] and Image.open(path).size[0] > pictures.GRID_LABEL_WIDTH


def test_grid_titles_say_what_the_grid_shows():
    config = dict(dataset="digits", steps=600)
    assert pictures.grid_title(vaes.open_projection("none"), config, 300).startswith("pixel MAE (--vae none)")
    tiny = pictures.grid_title(vaes.open_projection("tiny", announce=False), config, 600)
    assert tiny.startswith("LMD on tiny latents") and "UNTRAINED VAE" in tiny and "step 600 of 600" in tiny


def test_grid_images_come_from_across_the_classes(tmp_path):
    """A class-sorted image folder (10 classes; each image one flat grey level that encodes its class): the grid
    takes the first image of each class in turn, not the first 8 images (all of class 0)."""
    for k in range(10):
        folder = tmp_path / "val" / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (20 + 20 * k,) * 3).save(folder / f"{i}.png")
    (tmp_path / "train").mkdir()
    for k in range(10):
        (tmp_path / "train" / f"class{k}").mkdir()
    images = pictures.grid_images(dict(dataset="imagefolder", data_dir=str(tmp_path), image_size=16))
    labels = ((images.mean(dim=(1, 2, 3)) * 255 - 20) / 20).round().long()
    assert labels.tolist() == list(range(8))
    assert pictures.spread_over_classes([0, 0, 0, 1, 1, 2], 5) == [0, 3, 5, 1, 4]
    assert pictures.spread_over_classes([3, 3], 8) == [0, 1]


def test_unnormalize_tokens_undoes_the_per_token_normalisation():
    targets = torch.randn(2, 5, 16) * 3 + 1
    normalised = (targets - targets.mean(-1, keepdim=True)) / (targets.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(pictures.unnormalize_tokens(normalised, targets), targets, atol=1e-4)


def test_token_mask_covers_patch_times_vae_factor_pixels():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])                        # a 2 x 2 token grid
    pixels = pictures.token_mask_to_pixels(mask, grid=2, image_size=32)     # 16 px per token
    assert pixels.shape == (1, 1, 32, 32)
    assert pixels[0, 0, :16, :16].all() and not pixels[0, 0, :16, 16:].any() and pixels[0, 0, 16:, 16:].all()


def test_the_schedules_figure_draws_each_schedule_and_the_end_of_the_ramp(tmp_path, monkeypatch):
    figure = drawn(monkeypatch, lambda: pictures.plot_schedules(str(tmp_path / "schedules.png"), ramp_fraction=0.5))
    png_size(tmp_path / "schedules.png")
    (axes,) = figure.axes
    curves = {line.get_label(): line for line in axes.lines if not line.get_label().startswith("_")}
    assert list(curves) == list(lmd.SCHEDULERS)
    for name, line in curves.items():
        schedule = lmd.MaskSchedule(name, ramp_fraction=0.5)
        assert list(line.get_ydata()) == [schedule(p) for p in line.get_xdata()], name
    linear = dict(zip(curves["linear"].get_xdata(), curves["linear"].get_ydata()))
    assert linear[0.0] == pytest.approx(0.15) and linear[0.5] == pytest.approx(0.75) and linear[1.0] == 0.75
    (ramp_end,) = [line for line in axes.lines if line.get_label().startswith("_")]
    assert list(ramp_end.get_xdata()) == [0.5, 0.5]
