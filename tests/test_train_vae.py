"""tools/train_vae.py: a few steps on digits write a VAE directory that lmd.load_projection opens with the right
geometry and scaling factor, its provenance and its grid; bad input is one line and exit status 2."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import lmd
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "tools", "train_vae.py")
PROVENANCE_KEYS = {"dataset", "data_dir", "image_size", "steps", "seed", "seconds", "val_psnr_db", "scaling_factor",
                   "parameters", "train_size", "val_size", "trained"}


def run_script(*argv):
    # One thread: on a small shared CPU two threads per process thrash (a step measured 0.3 s alone, 7 s busy).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vae") / "digits")
    # 16 px (latents 4 x 4) keeps the run to seconds: most of it is encoding every image for the scaling factor.
    completed = run_script("--dataset", "digits", "--out", out, "--steps", "3", "--batch-size", "8",
                           "--warmup-steps", "1", "--image-size", "16", "--device", "cpu")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "val PSNR" in completed.stdout.strip().splitlines()[-1]   # the one summary line
    return out


def test_writes_a_vae_that_load_projection_opens(vae_dir):
    with open(os.path.join(vae_dir, "training.json")) as file:
        record = json.load(file)
    assert PROVENANCE_KEYS <= set(record)
    assert record["trained"] is True and record["dataset"] == "digits" and record["steps"] == 3
    assert record["train_size"] + record["val_size"] == 1797 and 0.9e6 < record["parameters"] < 0.95e6
    projection = lmd.load_projection(vae_dir)
    assert projection.downsample == 4 and projection.channels == 4
    assert projection.scaling_factor == pytest.approx(record["scaling_factor"])
    assert projection.scaling_factor != 1.0
    # The VAE is convolutional: trained at 16 px, it maps the 32 px images of LMD's digits runs all the same.
    images = torch.rand(2, 3, 32, 32)
    latents = projection.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    assert projection.decode(latents).shape == (2, 3, 32, 32)
    assert os.path.getsize(os.path.join(vae_dir, "reconstructions.png")) > 0


@pytest.fixture(scope="module")
def tool():
    """tools/train_vae.py as a module (tools/ is not a package), for the fast in-process error checks."""
    spec = importlib.util.spec_from_file_location("train_vae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["--dataset", "no-such-set"], "no-such-set"),
    (["--image-size", "30"], "--image-size 30"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--out", "{run}"], "not a VAE directory"),          # a train.py run directory also has a config.json
    (["--out", "{vae}", "--steps", "0"], "--steps"),      # an earlier VAE may be overwritten: only --steps fails
])
def test_bad_input_is_one_line_and_exit_2(tool, tmp_path, capsys, vae_dir, argv, message):
    """Through run_cli, as `python tools/train_vae.py` runs it, but in-process: a subprocess each costs seconds."""
    run = tmp_path / "run"  # not a VAE directory
    run.mkdir()
    (run / "config.json").write_text('{"model": "tiny"}')
    argv = [arg.format(run=run, vae=vae_dir) for arg in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "vae")]
    with pytest.raises(SystemExit) as exit_info:
        tool.run_cli(lambda: tool.main([*out, "--steps", "2", "--device", "cpu", *argv]))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert message in stderr
    assert not (tmp_path / "vae").exists()
