"""tools/train_vae.py: a few steps on digits write a VAE directory that vaes.load_projection opens with the right
geometry and scaling factor, its provenance and its grid; Fashion-MNIST from idx files; bad input is one line and
exit status 2."""

import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from util import vaes
from support import ROOT

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
    projection = vaes.load_projection(vae_dir)
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
    (["--val-images", "0"], "--val-images must be at least 1"),
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


def write_fashion_split(raw, split, count):
    """Gzipped idx files of `count` 28 x 28 images whose grey level and label are both i % 10."""
    raw.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(count) % 10
    images = (labels * 25).view(-1, 1, 1).expand(-1, 28, 28)
    for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
        header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
        data = header + array.to(torch.uint8).contiguous().numpy().tobytes()
        (raw / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(data))


def test_fashion_mnist_from_idx_files_with_a_labelled_grid(tool, tmp_path, monkeypatch):
    """In-process, so the Debian folder can be hidden: the tool reads DATA_DIR/FashionMNIST/raw, caps the
    validation round trip at --val-images and writes one column per class, captioned."""
    from PIL import Image
    from util import datasets
    monkeypatch.setattr(datasets, "SYSTEM_FOLDERS", {"fashion-mnist": str(tmp_path / "none"), "mnist": ""})
    write_fashion_split(tmp_path / "data" / "FashionMNIST" / "raw", "train", 24)
    write_fashion_split(tmp_path / "data" / "FashionMNIST" / "raw", "t10k", 30)
    out = tmp_path / "vae"
    tool.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--out", str(out),
               "--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--image-size", "16", "--val-images", "20",
               "--device", "cpu"])
    record = json.loads((out / "training.json").read_text())
    assert record["dataset"] == "fashion-mnist" and record["train_size"] == 24 and record["val_size"] == 20
    assert record["scale_images"] == 24 and record["training_seconds"] <= record["seconds"]
    with Image.open(out / "reconstructions.png") as picture:     # 10 columns of 16 px drawn 6x, with 2 px padding
        assert picture.width == 60 + 6 * (10 * 18 + 2)


def test_the_scaling_factor_reads_a_seeded_subset_of_a_large_set(tool):
    images = torch.arange(5000).view(-1, 1).float()
    sample = tool.scale_sample(images, seed=0)
    assert len(sample) == tool.SCALE_IMAGES and len(sample.unique()) == tool.SCALE_IMAGES
    assert torch.equal(sample, tool.scale_sample(images, seed=0)) and torch.equal(tool.scale_sample(images[:10], 0),
                                                                                 images[:10])


@pytest.mark.parametrize("argv, steps", [(["--dataset", "fashion-mnist"], 1000), (["--dataset", "digits"], 500),
                                         (["--dataset", "fashion-mnist", "--steps", "7"], 7)])
def test_steps_default_per_dataset(tool, tmp_path, argv, steps):
    flags = vars(tool.build_parser().parse_args(["--out", str(tmp_path / "vae"), *argv]))
    tool.check_flags(flags)
    assert flags["steps"] == steps
