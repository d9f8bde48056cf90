"""finetune.py: a short pretraining on the synthetic set, then linear probes (pretrained against scratch),
fine-tuning end to end as a subprocess, and the clear errors for checkpoints that do not fit."""

import json
import os
import subprocess
import sys

import pytest
import torch

import finetune
import lmd
from util import checkpoints
from util import cli
from util import optim
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pretraining the tests share: pixel space (--vae none) at 32 px, patch 8 (16 tokens), so that it takes seconds.
# (--vae tiny is an untrained VAE whose latents hide the shapes: a linear probe on them stays at chance.)
PRETRAIN = ["--dataset", "synthetic", "--vae", "none", "--model", "tiny", "--image-size", "32", "--synthetic-size",
            "320", "--steps", "30", "--batch-size", "64", "--lr", "1e-3", "--eval-images", "64", "--grid-every", "0",
            "--device", "cpu"]
LINPROBE = ["--mode", "linprobe", "--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--warmup-epochs", "0.5",
            "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pretrained run directory (and its data directory) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("finetune")
    train.main(PRETRAIN + ["--out", str(root / "run"), "--data-dir", str(root / "data")])
    return root / "run"


def linprobe(run, init):
    out = run.parent / f"linprobe-{init}"
    finetune.main(["--checkpoint", str(run), "--init", init, "--out", str(out)] + LINPROBE)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def probes(run):
    """results.json of the linear probe from the pretrained encoder and from scratch, at the same settings."""
    return {init: linprobe(run, init)[1] for init in ("pretrained", "scratch")}


def test_linear_probe_results(run, probes):
    for init, results in probes.items():
        assert results["mode"] == "linprobe" and results["init"] == init and results["epochs"] == 2
        assert 0 <= results["top1"]["final"] <= results["top1"]["best"] <= 1
        assert len(results["history"]) == 2 and results["checkpoint"] == str(run / "checkpoint.pt")
        assert results["images_per_second_with_vae"] > 0 and results["images_per_second_latents_only"] > 0
    assert probes["pretrained"]["config"]["model"] == "tiny" and probes["pretrained"]["config"]["image_size"] == 32


@pytest.mark.xfail(strict=False, reason="on the synthetic set, a pretraining that fits the test budget (or even a few "
                   "hundred CPU steps) gives features a linear probe reads no better than a random encoder's; "
                   "see docs_drafts/finetune.md")
def test_pretrained_linear_probe_beats_scratch_and_chance(probes):
    best, scratch_best = probes["pretrained"]["top1"]["best"], probes["scratch"]["top1"]["best"]
    assert best > 0.1 + 0.15, f"pretrained linear probe {best:.3f} is not well above chance (0.1)"
    assert best > scratch_best + 0.05, f"pretrained {best:.3f} does not beat scratch {scratch_best:.3f}"


def test_linear_probe_leaves_the_encoder_bit_identical(run, probes):
    out = run.parent / "linprobe-pretrained"
    classifier = checkpoints.load_checkpoint(str(out / "classifier.pt"), kind=finetune.CLASSIFIER_KIND)
    pretrained = checkpoints.load_checkpoint(str(run))["model"]
    encoder = {k[len("encoder."):]: v for k, v in classifier["model"].items() if k.startswith("encoder.")}
    assert encoder and not any(k.startswith("decoder") for k in encoder)   # the decoder is dropped
    for name, weight in encoder.items():
        assert torch.equal(weight, pretrained[name]), f"{name} changed during the linear probe"
    assert {"head.0.running_mean", "head.1.weight"} <= set(classifier["model"])   # BatchNorm without affine
    assert "head.0.weight" not in classifier["model"]


def test_finetune_end_to_end_subprocess(run):
    out = run.parent / "finetune-pretrained"
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "finetune.py"), "--checkpoint", str(run / "checkpoint.pt"), "--mode",
         "finetune", "--epochs", "1", "--batch-size", "64", "--num-workers", "0", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "finetune" and results["init"] == "pretrained" and results["epochs"] == 1
    assert 0 <= results["top1"]["best"] <= 1 and results["top1"]["best"] >= results["top1"]["final"]
    assert results["config"]["label_smoothing"] == 0.1 and results["config"]["layer_decay"] == 0.65
    classifier = checkpoints.load_checkpoint(str(out / "classifier.pt"), kind=finetune.CLASSIFIER_KIND)
    pretrained = checkpoints.load_checkpoint(str(run))["model"]
    assert not torch.equal(classifier["model"]["encoder.blocks.0.attn.qkv.weight"],
                           pretrained["blocks.0.attn.qkv.weight"])   # fine-tuning moves the encoder


def test_linear_probe_on_cached_vae_latents(tmp_path):
    """The latent path: the classifier trains on the cache that pretraining wrote (--vae tiny, 32 px: 2x2 tokens)."""
    data, run = tmp_path / "data", tmp_path / "run"
    train.main(["--dataset", "synthetic", "--vae", "tiny", "--model", "tiny", "--image-size", "32", "--synthetic-size",
                "128", "--steps", "3", "--batch-size", "32", "--eval-images", "32", "--grid-every", "0",
                "--device", "cpu", "--data-dir", str(data), "--out", str(run)])
    (train_cache,) = (data / "lmd_latents").glob("synthetic-train*")
    written = train_cache.stat().st_mtime_ns
    finetune.main(["--checkpoint", str(run), "--epochs", "1", "--batch-size", "32", "--device", "cpu"])
    assert train_cache.stat().st_mtime_ns == written                   # pretraining's cache reused, not rebuilt
    assert len(list((data / "lmd_latents").glob("synthetic-val*"))) == 1
    results = json.loads((run / "linprobe-pretrained" / "results.json").read_text())   # the default --out
    assert results["vae"] == "tiny" and 0 <= results["top1"]["best"] <= 1
    assert results["images_per_second_latents_only"] > results["images_per_second_with_vae"] > 0


def test_layer_decay_groups_scale_the_learning_rate_by_depth():
    classifier = lmd.LatentClassifier(lmd.MaskedLatentViT("tiny", 8, 2, 4), num_classes=10)
    scales = {id(p): group["lr_scale"] for group in optim.layer_decay_groups(classifier, 0.05, 0.5)
              for p in group["params"]}
    depth = len(classifier.encoder.blocks)
    assert scales[id(classifier.head[1].weight)] == 1.0
    assert scales[id(classifier.encoder.blocks[depth - 1].mlp[0].weight)] == 0.5
    assert scales[id(classifier.encoder.patch_embed.weight)] == 0.5 ** (depth + 1)
    assert len(scales) == sum(1 for _ in classifier.parameters())
    probe = lmd.LatentClassifier(lmd.MaskedLatentViT("tiny", 8, 2, 4), num_classes=10, linear_probe=True).train()
    assert not probe.encoder.training and probe.head.training     # the frozen encoder stays in eval mode
    trained = [p for group in optim.layer_decay_groups(probe, 0.0, 1.0) for p in group["params"]]
    assert len(trained) == 2 and trained[0] is probe.head[1].weight   # only the linear head trains


def refused(capsys, argv):
    """Run finetune.py's CLI in-process -> its one-line error message (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: finetune.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_missing_truncated_and_foreign_checkpoints_are_refused(run, probes, tmp_path, capsys):
    assert "does not exist" in refused(capsys, ["--checkpoint", str(tmp_path / "nowhere")])
    data = (run / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert "unreadable" in refused(capsys, ["--checkpoint", str(tmp_path / "truncated.pt")])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert "not an LMD pretraining checkpoint" in refused(capsys, ["--checkpoint", str(tmp_path / "foreign.pt")])
    classifier = run.parent / "linprobe-pretrained" / "classifier.pt"   # nor is a classifier
    assert "not an LMD pretraining checkpoint" in refused(capsys, ["--checkpoint", str(classifier)])


def test_mismatched_dataset_vae_and_size_are_refused(run, capsys):
    base = ["--checkpoint", str(run), "--device", "cpu"]
    err = refused(capsys, base + ["--dataset", "cifar10"])
    assert "pretrained on synthetic" in err and "--allow-other-dataset" in err
    assert "pretrained with none" in refused(capsys, base + ["--vae", "tiny"])
    assert "pretrained with tiny" in refused(capsys, base + ["--model", "small"])
    assert "pretrained with 32" in refused(capsys, base + ["--image-size", "64"])


def test_torchrun_two_cpu_processes_linear_probe(run):
    """finetune.py under torchrun (gloo): each process takes its share of every batch and of the evaluation."""
    out = run.parent / "linprobe-ddp"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "finetune.py"), "--checkpoint", str(run), "--out", str(out), *LINPROBE[:2],
         "--epochs", "1", "--batch-size", "64", "--num-workers", "0", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and 0 <= results["top1"]["best"] <= 1
