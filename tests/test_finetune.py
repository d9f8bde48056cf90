"""finetune.py: a short pretraining on real digits, then the probes (kNN and the cached-feature linear probe,
each beside the baselines: the same seed's random init of the LMD network, the raw pixels), fine-tuning end to end
and under torchrun, few labels (--labels-per-class), and the clear errors for checkpoints that do not fit. One test
fails if pretraining stops helping."""

import contextlib
import io
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
from util import devices
from util import vaes
from util import latent_cache
from util import optim
from util import probes as probe_util
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pretraining the tests share: scikit-learn's real digits in pixel space (--vae none) at 32 px, 8 px patches
# (16 tokens), the cosine schedule. Under kNN its encoder must beat the same seed's random init (test_pretraining_helps).
PRETRAIN = ["--dataset", "digits", "--vae", "none", "--model", "tiny", "--patch-size", "8", "--scheduler", "cosine",
            "--steps", "600", "--batch-size", "32", "--base-lr", "1.5e-3", "--no-normalize-targets",
            "--eval-images", "64", "--grid-every", "0", "--num-workers", "0", "--device", "cpu"]
PROBE = ["--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pretrained run directory (and its data directory) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("finetune")
    train.main(PRETRAIN + ["--out", str(root / "run"), "--data-dir", str(root / "data")])
    return root / "run"


def probe(run, mode, *extra):
    out = run.parent / mode
    finetune.main(["--checkpoint", str(run), "--mode", mode, "--out", str(out), *PROBE, *extra])
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def knn_and_stderr(run):
    """One kNN probe for the module, given training flags it must ignore with a note (a probe costs seconds)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        results = probe(run, "knn", "--epochs", "7", "--lr", "0.3")
    return results, stderr.getvalue()


@pytest.fixture(scope="module")
def knn(knn_and_stderr):
    return knn_and_stderr[0]


@pytest.fixture(scope="module")
def linprobe(run):
    """A 5-epoch linear probe, shared by the results test and the torchrun test's single-process reference."""
    return probe(run, "linprobe", "--epochs", "5")


def test_pretraining_helps(knn):
    """On real digits, the pretrained encoder beats its own random init under kNN by at least 2 standard errors.

    Checked for seeds 0-4: kNN lead 0.058-0.133, all above 2 standard errors (0.047-0.050); the test fixes seed 0.
    """
    pretrained, scratch = knn["top1"]["final"], knn["scratch_top1"]["final"]
    margin = 2 * probe_util.standard_error(scratch, knn["val_images"])
    assert pretrained > scratch + margin, f"kNN: pretrained {pretrained:.3f}, random init {scratch:.3f}"


def test_knn_results_carry_the_floors(run, knn):
    assert knn["mode"] == "knn" and knn["val_images"] == 360 and knn["checkpoint"] == str(run / "checkpoint.pt")
    assert knn["features"] == "cls" and knn["probe_time"] is None and "own_init_top1" not in knn   # an LMD run
    for key in ("top1", "random_init_top1", "raw_pixels_top1"):
        assert set(knn[key]) == {"best", "final"} and knn[key]["best"] == knn[key]["final"]
    assert knn["random_init_top1"]["final"] > 0.5      # random features are strong on digits: hence the floor
    assert knn["scratch_top1"] == knn["random_init_top1"]                # the floor's older name
    assert knn["raw_pixels_top1"]["final"] == 347 / 360  # raw-pixel kNN on the digits, 32 px (the notebook's 0.964)


def test_knn_votes_by_weighted_similarity():
    train_features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_labels = torch.tensor([0, 0, 1])
    val_features, val_labels = torch.tensor([[0.2, 1.0], [1.0, 0.05]]), torch.tensor([1, 0])
    assert probe_util.knn_top1(train_features, train_labels, val_features, val_labels, k=3) == 1.0
    # with k = 3 and a flat temperature, two weak votes for 0 outvote one strong vote for 1
    assert probe_util.knn_top1(train_features, train_labels, val_features[:1], val_labels[:1], k=3,
                               temperature=100.0) == 0.0


def test_linear_probe_converges_to_the_logistic_regression_reference(run):
    """The cached-feature linear probe (MAE's recipe, 90 epochs) lands within 2 points of L-BFGS logistic
    regression on the same frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    config = finetune.resolve_config({"checkpoint": str(run), "mode": "linprobe", **dict(num_workers=0)}, str(run),
                                     checkpoints.load_checkpoint(str(run))["config"])
    dist, projection = devices.Distributed("cpu"), vaes.load_projection("none")
    checkpoint = checkpoints.load_checkpoint(str(run))
    classifier = finetune.build_classifier(config, checkpoint, projection, 10, "pretrained", True, train.OBJECTIVES)
    (train_x, train_y), (val_x, val_y) = (
        probe_util.split_features(classifier, latent_cache.Split(config, split, projection, dist), dist, (0,))
        for split in ("train", "val"))
    history = probe_util.linear_probe(train_x, train_y, val_x[:, 0], val_y)
    scaler = StandardScaler().fit(train_x[:, 0].numpy())
    reference = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x[:, 0].numpy()), train_y.numpy())
    reference_top1 = reference.score(scaler.transform(val_x[:, 0].numpy()), val_y.numpy())
    assert abs(history[-1]["top1"] - reference_top1) <= 0.02, (history[-1]["top1"], reference_top1)


def test_linear_probe_results_and_baseline(run, linprobe):
    results = linprobe
    assert results["epochs"] == 5 and len(results["history"]) == len(results["random_init_history"]) == 5
    for key in ("top1", "random_init_top1", "raw_pixels_top1"):
        assert set(results[key]) == {"best", "final", "best_epoch"}
    assert len(results["raw_pixels_history"]) == 5 and results["raw_pixels_top1"]["final"] > 0.8
    assert results["images_per_second_latents_only"] > 0
    assert not (run.parent / "linprobe" / "classifier.pt").exists()    # a probe trains a head, not a classifier


def test_finetune_end_to_end(run):
    """In-process (the torchrun test below runs finetune.py as a script)."""
    out = run.parent / "finetune-pretrained"
    finetune.main(["--checkpoint", str(run / "checkpoint.pt"), "--mode", "finetune", "--epochs", "1", "--batch-size",
                   "64", "--num-workers", "0", "--device", "cpu", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "finetune" and results["init"] == "pretrained" and results["epochs"] == 1
    assert set(results["top1"]) == {"best", "final", "best_epoch"} and "scratch_top1" not in results
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
    (train_cache,) = (data / "lmd_latents").glob("synthetic-train*.pt")
    written = train_cache.stat().st_mtime_ns
    finetune.main(["--checkpoint", str(run), "--epochs", "1", "--batch-size", "32", "--device", "cpu"])
    assert train_cache.stat().st_mtime_ns == written                   # pretraining's cache reused, not rebuilt
    assert len(list((data / "lmd_latents").glob("synthetic-val*.pt"))) == 1
    results = json.loads((run / "linprobe" / "results.json").read_text())   # the default --out
    assert results["vae"] == "tiny" and results["val_images"] == 25
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


def test_missing_truncated_and_foreign_checkpoints_are_refused(run, tmp_path, capsys):
    assert "does not exist" in refused(capsys, ["--checkpoint", str(tmp_path / "nowhere")])
    data = (run / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert "unreadable" in refused(capsys, ["--checkpoint", str(tmp_path / "truncated.pt")])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert "not an LMD pretraining checkpoint" in refused(capsys, ["--checkpoint", str(tmp_path / "foreign.pt")])
    classifier = run.parent / "finetune-pretrained" / "classifier.pt"   # nor is a classifier
    assert "not an LMD pretraining checkpoint" in refused(capsys, ["--checkpoint", str(classifier)])


def test_mismatched_dataset_vae_and_size_are_refused(run, capsys):
    base = ["--checkpoint", str(run), "--device", "cpu"]
    err = refused(capsys, base + ["--dataset", "cifar10"])
    assert "pretrained on digits" in err and "--allow-other-dataset" in err
    assert "pretrained with none" in refused(capsys, base + ["--vae", "tiny"])
    assert "pretrained with tiny" in refused(capsys, base + ["--model", "small"])
    assert "pretrained with 32" in refused(capsys, base + ["--image-size", "64"])
    assert "already measures the random-init" in refused(capsys, base + ["--mode", "knn", "--init", "scratch"])
    assert "belong to knn and linprobe" in refused(capsys, base + ["--mode", "finetune", "--features", "mean"])


def test_the_mean_reading_has_its_own_output_directory(run):
    pretrained = checkpoints.load_checkpoint(str(run))["config"]
    config = finetune.resolve_config(dict(checkpoint=str(run), mode="knn", features="mean"), str(run), pretrained)
    assert config["out"] == str(run / "knn-mean") and config["features"] == "mean"


def test_knn_ignores_training_flags_with_a_note(knn_and_stderr):
    results, stderr = knn_and_stderr
    assert "ignoring --epochs, --lr" in stderr and results["epochs"] == 0


def test_linprobe_refuses_weight_decay_and_label_smoothing(run, capsys):
    """The probe's head trains with neither: a value that would silently do nothing is an error (0 is allowed)."""
    base = ["--checkpoint", str(run), "--device", "cpu", "--mode", "linprobe"]
    err = refused(capsys, base + ["--weight-decay", "0.05", "--label-smoothing", "0.1"])
    assert "no weight decay or label smoothing" in err and "drop --weight-decay and --label-smoothing" in err
    assert "drop --label-smoothing" in refused(capsys, base + ["--weight-decay", "0", "--label-smoothing", "0.1"])


def test_torchrun_two_cpu_processes_linear_probe(run, linprobe):
    """finetune.py under torchrun (gloo): the processes split the feature extraction, gather it, and get exactly
    the single-process probe."""
    out = run.parent / "linprobe-ddp"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "finetune.py"), "--checkpoint", str(run), "--out", str(out), "--mode", "linprobe",
         "--epochs", "5", *PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    single = linprobe
    top1 = lambda history: [epoch["top1"] for epoch in history]  # noqa: E731
    assert results["world_size"] == 2 and top1(results["history"]) == pytest.approx(top1(single["history"]), abs=0.01)
    assert top1(results["raw_pixels_history"]) == pytest.approx(top1(single["raw_pixels_history"]), abs=0.01)


def test_labels_per_class_is_a_fixed_class_balanced_subset_read_by_every_baseline(run):
    """--labels-per-class 3: 30 digits, 3 of each class, fixed by --subset-seed; the raw-pixel baseline reads the
    very images the encoders were probed on (its kNN recomputed here on that subset agrees)."""
    config = finetune.resolve_config({"checkpoint": str(run), "mode": "knn", "num_workers": 0}, str(run),
                                     checkpoints.load_checkpoint(str(run))["config"])
    dist, projection = devices.Distributed("cpu"), vaes.load_projection("none")
    split = latent_cache.Split(config, "train", projection, dist)
    subsets = [finetune.LabelSubset(split, 3, seed).indices for seed in (0, 0, 1)]
    labels = torch.as_tensor(split.images.source.targets)
    assert torch.equal(subsets[0], subsets[1]) and not torch.equal(subsets[0], subsets[2])
    assert torch.bincount(labels[subsets[0]]).tolist() == [3] * 10
    out = run.parent / "knn-3-labels"
    finetune.main(["--checkpoint", str(run), "--mode", "knn", "--labels-per-class", "3", "--out", str(out), *PROBE])
    results = json.loads((out / "results.json").read_text())
    assert (results["train_images"], results["labels_per_class"], results["subset_seed"]) == (30, 3, 0)
    assert {"top1", "random_init_top1", "raw_pixels_top1"} <= set(results)
    val = latent_cache.Split(config, "val", projection, dist)
    pixels = lambda data, ids: torch.stack([data.images[int(i)][0].flatten() for i in ids])   # noqa: E731
    expected = probe_util.knn_top1(pixels(split, subsets[0]), labels[subsets[0]], pixels(val, range(len(val))),
                                   torch.as_tensor(val.images.source.targets))
    assert results["raw_pixels_top1"]["final"] == expected


def test_a_subset_larger_than_a_class_or_smaller_than_a_batch_is_one_line(run, capsys):
    base = ["--checkpoint", str(run), "--num-workers", "0", "--device", "cpu"]
    assert "more than class" in refused(capsys, base + ["--mode", "knn", "--labels-per-class", "1000"])
    assert "at least 1" in refused(capsys, base + ["--mode", "knn", "--labels-per-class", "0"])
    err = refused(capsys, base + ["--mode", "linprobe", "--labels-per-class", "2", "--batch-size", "64"])
    assert "fewer than one batch" in err and "20 images" in err
