"""A ddpm checkpoint's probes (python -m lab.finetune): its floor is the LMD network of the same size and seed, the
very floor of an LMD run, above the chance-level class token of its own adaLN-Zero init (moved here from
tests/test_finetune.py). Only the LMD run's settings and its floor matter here, not what it learned: the LMD run is
2 steps of tests/test_finetune.py's digits pretraining, not 600, probed with 20 labelled digits per class (the
floors read the same subset) against all 360 validation digits."""

import json

import pytest
import torch

import finetune
import lab
import lab.finetune   # lab.finetune.main: finetune.py given the lab's objectives
import lmd
import train
from util import checkpoints
from util import probes as probe_util

# tests/test_finetune.py's pretraining (real digits in pixel space at 32 px, 8 px patches: 16 tokens), 2 steps of it
PRETRAIN = ["--dataset", "digits", "--vae", "none", "--model", "tiny", "--patch-size", "8", "--scheduler", "cosine",
            "--steps", "2", "--batch-size", "32", "--base-lr", "1.5e-3", "--no-normalize-targets",
            "--eval-images", "64", "--grid-every", "0", "--num-workers", "0", "--device", "cpu"]
PROBE = ["--num-workers", "0", "--device", "cpu", "--no-raw-pixels", "--labels-per-class", "20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short LMD run directory on the digits."""
    root = tmp_path_factory.mktemp("floor")
    train.main(PRETRAIN + ["--out", str(root / "run"), "--data-dir", str(root / "data")])
    return root / "run"


def probe(main, run, out):
    main(["--checkpoint", str(run), "--mode", "knn", "--out", str(out), *PROBE])
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def knn(run):
    """The LMD run's kNN, by the core's finetune.py."""
    return probe(finetune.main, run, run.parent / "knn")


@pytest.fixture(scope="module")
def ddpm_knn(run, knn):
    """kNN of a ddpm checkpoint at its own init, saved directly (no training), of the LMD run's seed and size."""
    config = dict(checkpoints.load_checkpoint(str(run))["config"], objective="ddpm", out=str(run.parent / "ddpm"),
                  **lab.get("ddpm").run_defaults())
    torch.manual_seed(config["seed"])
    model = checkpoints.build_model(config, lmd.LatentProjection(), lab.get("ddpm"))
    checkpoints.save_run(str(run.parent / "ddpm" / "checkpoint.pt"), model, torch.optim.AdamW(model.parameters()),
                         config["steps"], config, torch.device("cpu"))
    return probe(lab.finetune.main, run.parent / "ddpm", run.parent / "ddpm-knn")


def test_a_ddpm_checkpoints_floor_is_the_lmd_network_not_its_chance_level_init(knn, ddpm_knn):
    """adaLN-Zero starts as the identity: every digit gets one class token, kNN at chance. The floor is the LMD
    network of the same size and seed, the very floor of the LMD run."""
    own, floor = ddpm_knn["own_init_top1"]["final"], ddpm_knn["random_init_top1"]["final"]
    assert own < 0.15 and floor > own + 2 * probe_util.standard_error(floor, 360)
    assert ddpm_knn["random_init_top1"] == knn["random_init_top1"]
    # read at model time 0 (never trained) and 1 (noise level 0, trained): the table's is the lowest trained
    assert ddpm_knn["probe_time"] == 1 and ddpm_knn["top1"] == ddpm_knn["time1_top1"] and "time0_top1" in ddpm_knn
    assert "raw_pixels_top1" not in ddpm_knn                             # --no-raw-pixels
