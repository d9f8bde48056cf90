"""train.py end to end: the files it writes, and a one-line error with exit status 2 for each bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lmd
from util import checkpoints
from util import cli
from util import latent_cache
from util import sampling
from util import vaes
import train
from support import ROOT, tiny_flags


def test_a_run_writes_metrics_config_and_checkpoint(tmp_path, data_dir, capsys):
    """In-process (test_reliability.py runs `python train.py` as a script, under SIGINT)."""
    out = tmp_path / "run"
    train.main(tiny_flags(data_dir, str(out), steps=6))
    assert "UNTRAINED" in capsys.readouterr().err             # the random VAE is announced as such
    config = json.loads((out / "config.json").read_text())
    assert config["scheduler"] == "cosine" and config["patch_size"] == 2 and config["image_size"] == 64
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "mask_ratio", "lr"} <= set(lines[0])
    assert lines[0]["mask_ratio"] == pytest.approx(0.15)      # the cosine schedule starts at 0.15 ...
    assert lines[-1]["mask_ratio"] > lines[0]["mask_ratio"]   # ... and grows
    checkpoint = checkpoints.load_checkpoint(str(out))
    assert checkpoint["step"] == 6 and set(checkpoint) >= {"model", "optimizer", "config", "rng"}
    assert json.loads((out / "summary.json").read_text())["held_out_loss_at_0_75"] > 0
    cache = os.listdir(os.path.join(data_dir, "lmd_latents"))
    assert any(name.startswith("synthetic-train64-tiny-64px") for name in cache)


def test_cache_is_rebuilt_when_made_with_another_vae(tmp_path, data_dir, capsys):
    train.main(tiny_flags(data_dir, str(tmp_path / "a"), steps=1))
    path = latent_cache.cache_file(data_dir, "synthetic", "train", "tiny", 64, 64)
    cache = torch.load(path, weights_only=True)
    cache["provenance"]["vae_fingerprint"] = "another-vae"
    torch.save(cache, path)
    capsys.readouterr()
    train.main(tiny_flags(data_dir, str(tmp_path / "b"), steps=1))
    assert "made with other settings" in capsys.readouterr().err
    assert torch.load(path, weights_only=True)["provenance"]["vae_fingerprint"] != "another-vae"


def test_the_flips_and_the_masks_of_a_step_are_separate_random_streams(tmp_path, data_dir, monkeypatch):
    """On the CPU the flips' and the masks' generators of a step live on one device: seeded alike, a sample's flip
    would be a draw of its own mask noise. No generator that draws flips may share a seed with one that masks."""
    made, masking = [], []
    step_generator, random_masking = sampling.step_generator, lmd.random_masking
    monkeypatch.setattr(sampling, "step_generator", lambda *a, **k: made.append(step_generator(*a, **k)) or made[-1])
    monkeypatch.setattr(lmd, "random_masking", lambda tokens, ratio, generator=None: masking.append(generator)
                        or random_masking(tokens, ratio, generator))
    train.main(tiny_flags(data_dir, str(tmp_path / "run"), steps=3))
    mask_seeds = {generator.initial_seed() for generator in masking}
    flip_seeds = [g.initial_seed() for g in made if not any(g is generator for generator in masking)]
    assert len(flip_seeds) == 3 and len(mask_seeds) >= 3 and mask_seeds.isdisjoint(flip_seeds)


def test_pixel_mae_baseline_runs(tmp_path, data_dir):
    train.main(tiny_flags(data_dir, str(tmp_path / "pixels"), steps=2, vae="none"))
    config = json.loads((tmp_path / "pixels" / "config.json").read_text())
    assert config["patch_size"] == 8 and config["cache"] is False


def test_no_cache_encodes_on_the_fly_with_full_augmentation(tmp_path, data_dir):
    train.main(tiny_flags(data_dir, str(tmp_path / "nocache"), steps=2, cache=None) + ["--no-cache"])
    config = json.loads((tmp_path / "nocache" / "config.json").read_text())
    assert config["cache"] is False and config["augment"] == "full"


BAD_INPUTS = {
    "unknown scheduler": (["--scheduler", "exponential"], "invalid choice"),
    "start ratio zero": (["--mask-start", "0"], "strictly between 0 and 1"),
    "end ratio one": (["--mask-end", "1.0"], "strictly between 0 and 1"),
    "piecewise plateau at one": (["--scheduler", "piecewise", "--mask-plateau", "1.0"], "strictly between 0 and 1"),
    "constant ratio above one": (["--scheduler", "constant", "--mask-ratio", "1.5"], "strictly between"),
    "indivisible image size": (["--image-size", "60"], "not divisible"),
    "batch larger than the dataset": (["--batch-size", "100"], "fewer than one batch"),
    "missing vae directory": (["--vae", "./no/such/vae"], "no such directory"),
    "full augmentation with cache": (["--augment", "full"], "cannot be cached"),
    "zero steps": (["--steps", "0"], "at least 1"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(name, tmp_path, data_dir, capsys):
    extra, message = BAD_INPUTS[name]
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: train.main(tiny_flags(data_dir, str(tmp_path / "run")) + extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_flag_errors_are_one_line_and_come_before_any_encoding(tmp_path, capsys):
    for extra in (["--scheduler", "exponential"], ["--mask-start", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.run_cli(lambda: train.main(tiny_flags(str(tmp_path / "data"), str(tmp_path / "run")) + extra))
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()                  # nothing was downloaded, encoded or cached


def test_missing_or_empty_image_folder(tmp_path, capsys):
    for setup, message in ((lambda: None, "does not exist"), (lambda: (tmp_path / "train" / "cat").mkdir(parents=True),
                                                                 "holds no images")):
        setup()
        with pytest.raises(SystemExit):
            cli.run_cli(lambda: train.main(tiny_flags(str(tmp_path), str(tmp_path / "run"), dataset="imagefolder")))
        assert message in capsys.readouterr().err


def test_offline_default_command_fails_fast_with_a_way_out(tmp_path, monkeypatch, capsys):
    """With no network the default command must say what it could not download and how to run offline. The Hub
    probe answers "unreachable" and the Hub cache is empty (both patched): the test never downloads, whatever the
    network and whatever the machine's Hub cache holds."""
    def empty_hub_cache(vae, device="cpu", dtype=torch.float32, local_files_only=False):
        if local_files_only:
            raise OSError(f"{vae} is not in the local Hub cache")
        raise AssertionError("the VAE would have been downloaded")
    monkeypatch.setattr(vaes, "load_projection", empty_hub_cache)
    monkeypatch.setattr(vaes, "_hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: train.main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                             "--device", "cpu"]))   # past the no-GPU stop (test below)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Hugging Face Hub is unreachable" in err and "--dataset synthetic --vae tiny" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()                 # nothing downloaded: not even CIFAR-10


def test_the_users_command_without_a_gpu_stops_before_any_download_and_names_the_laptop_path(tmp_path):
    """python train.py --scheduler cosine on a machine without a GPU: one line with the encoding's cost here, the
    laptop command and the flag that goes on anyway; exit 2; nothing downloaded, nothing written."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "train.py", "--scheduler", "cosine", "--data-dir", str(tmp_path / "data"),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env=env)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: no GPU here") and "hours" in line
    assert "python train.py --dataset fashion-mnist" in line and "--device cpu" in line
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()   # before any download
    hours = float(line.split("take about ")[1].split(" hours")[0])
    # 50,000 CIFAR images and their mirrors at train.CPU_ENCODE_RATE images/s (128 px)
    assert hours == round(2 * 50_000 / train.CPU_ENCODE_RATE / 3600)


def test_a_recipe_gives_way_to_the_flags_given():
    """--dataset digits alone is the pixel recipe (patch 8); with a VAE, its 8 px patch is not the VAE's: dropped."""
    flags, _ = train.parse_flags(["--dataset", "digits"])
    assert (flags["vae"], flags["patch_size"], flags["steps"], flags["model"]) == ("none", 8, 600, "tiny")
    flags, _ = train.parse_flags(["--dataset", "digits", "--vae", "tiny", "--steps", "5"])
    assert (flags["vae"], flags["patch_size"], flags["steps"], flags["out"]) == ("tiny", None, 5, "runs/digits")
    flags, _ = train.parse_flags(["--dataset", "fashion-mnist"])
    assert (flags["vae"], flags["normalize_targets"], flags["batch_size"]) == (train.RECIPE_VAE, False, 64)
    assert train.parse_flags(["--dataset", "cifar10"])[0]["model"] == train.DEFAULTS["model"]   # no recipe
