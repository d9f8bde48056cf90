"""tools/race.py end to end on tiny settings: pixel MAE, LMD and MAE on latents under one budget of training
seconds, with a small random VAE saved as tools/train_vae.py would (so no VAE training here), and the files it
writes. The budget is enforced: every final point lands within 5% of it."""

import json

import pytest
import torch

import race

BUDGET_MINUTES = 4 / 60   # 4 s of training per method (12 s in all, plus the probes): steps of ~0.01-0.4 s
# Digits at their native 8 px: 4 latent tokens (2 x 2 latents, patch 1) and 4 pixel tokens (--pixel-patch 4), so
# that the probes' forward passes over all 1,797 images cost little; the plumbing and the clock are the same at any
# size.


def small_vae(path):
    """A random AutoencoderKL of downsampling 4 in the SD layout, saved with a training.json like train_vae.py's."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        mid_block_add_attention=False)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(dict(dataset="digits", seconds=12.5, val_psnr_db=0.0)))


@pytest.fixture(scope="module")
def race_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("race")
    small_vae(tmp_path / "vae")
    out, threads = tmp_path / "race", torch.get_num_threads()
    race.main(["--threads", "1",    # one thread: on a busy shared CPU, two threads per process can be many times slower
               "--dataset", "digits", "--vae", str(tmp_path / "vae"), "--minutes", str(BUDGET_MINUTES),
               "--image-size", "8", "--pixel-patch", "4", "--probes", "2", "--batch-size", "16",
               "--linprobe-epochs", "2", "--device", "cpu", "--out", str(out)])
    torch.set_num_threads(threads)
    return out, json.loads((out / "results.json").read_text())


def test_every_final_point_lands_within_5_percent_of_the_budget(race_run):
    _, results = race_run
    budget = BUDGET_MINUTES * 60
    assert results["budget_seconds"] == pytest.approx(budget)
    for name in ("pixel_mae", "lmd", "latent_mae"):
        points = results[name]
        assert len(points) == 2, name
        assert points[0]["train_seconds"] < points[1]["train_seconds"] and points[0]["step"] < points[1]["step"]
        assert abs(points[1]["train_seconds"] - budget) <= 0.05 * budget, (name, points[1]["train_seconds"])
        assert points[1]["images"] == points[1]["step"] * 16
    assert race.off_budget(results) == []


def test_both_clocks_and_the_random_inits(race_run):
    out, results = race_run
    offset = results["vae"]["offset_seconds"]
    assert offset > results["vae"]["encode_seconds"] > 0 and results["vae"]["training_seconds"] == 12.5
    for name in ("pixel_mae", "lmd", "latent_mae"):
        for point in results[name]:
            counted = point["train_seconds"] + (offset if name != "pixel_mae" else 0.0)
            assert point["seconds"] == pytest.approx(counted)
            assert 0 <= point["knn_top1"] <= 1 and 0 <= point["linprobe_top1"] <= 1
    # the cosine schedule ramps up with the training clock; the constant one does not move
    assert results["lmd"][0]["mask_ratio"] < results["lmd"][1]["mask_ratio"] <= 0.75
    assert results["latent_mae"][0]["mask_ratio"] == results["latent_mae"][1]["mask_ratio"] == 0.75
    assert {space: len(records) for space, records in results["random"].items()} == {"pixels": 1, "latents": 1}
    assert results["tokens"] == {"pixels": 4, "latents": 4} and results["patch_size"] == {"pixels": 4, "latents": 1}
    assert results["vae"]["trained_by"] == "tools/train_vae.py" and results["peak_rss_mb"] > 100
    table = (out / "race.md").read_text().splitlines()
    assert "VAE counted" in table[0] and len(table) == 7
    assert table[2].startswith("| pixel_mae |") and table[-1].startswith("| random init (latents")
    assert (out / "race.png").stat().st_size > 10_000


def test_a_step_longer_than_the_budget_is_reported():
    point = dict(seed=0, train_seconds=10.0, seconds=10.0, knn_top1=0.5, linprobe_top1=0.5)
    results = dict(budget_seconds=6.0, pixel_mae=[point], lmd=[dict(point, train_seconds=6.1)])
    assert race.off_budget(results) == [("pixel_mae", 0, 10.0)]


def test_compact_inputs_flip_on_the_fly():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    data = dict(space="pixels", train_inputs=images)
    inputs = race.batch_inputs(data, "train", torch.tensor([2, 0]), torch.tensor([1, 0]), torch.device("cpu"))
    assert inputs.dtype == torch.float32 and inputs.shape == (2, 3, 8, 8)
    assert torch.allclose(inputs[0], (images[2].float() / 255 * 2 - 1).flip(-1))
    assert torch.allclose(inputs[1], images[0].float() / 255 * 2 - 1)
