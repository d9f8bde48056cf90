"""tools/race.py end to end on tiny settings: pixel MAE, LMD and MAE on latents under one budget, with a small
random VAE saved as tools/train_vae.py would (so no VAE training here), and the files it writes."""

import json

import torch

import race


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


def test_race_end_to_end(tmp_path):
    small_vae(tmp_path / "vae")
    out = tmp_path / "race"
    race.main(["--dataset", "digits", "--vae", str(tmp_path / "vae"), "--minutes", "0.02", "--probes", "2",
               "--linprobe-epochs", "2", "--device", "cpu", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert {"pixel_mae", "lmd", "latent_mae", "random", "vae"} <= set(results)
    assert set(results["random"]) == {"pixels", "latents"}
    for name in ("pixel_mae", "lmd", "latent_mae"):
        points = results[name]
        assert len(points) == 2 and points[0]["seconds"] < points[1]["seconds"]
        assert {"seed", "seconds", "images", "knn_top1", "linprobe_top1"} <= set(points[0])
    # the latent methods' clock starts after the VAE's training (from its training.json) and the encoding
    assert results["lmd"][0]["seconds"] > results["vae"]["offset_seconds"] >= 12.5
    assert results["pixel_mae"][0]["seconds"] < results["vae"]["offset_seconds"]
    assert results["tokens"] == {"pixels": 64, "latents": 16}     # a pixel token covers a quarter of a latent one
    assert results["vae"]["trained_by"] == "tools/train_vae.py"
    table = (out / "race.md").read_text().splitlines()
    assert table[0].startswith("| method | kNN top-1 | linear probe top-1 |") and len(table) == 7
    assert (out / "race.png").stat().st_size > 10_000
