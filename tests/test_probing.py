"""finetune.py on any checkpoint: the linear probe's results and its convergence to logistic regression (its
two-process run under torchrun: test_cluster.py), fine-tuning end to end, the reading's output directory, few labels
(--labels-per-class), and the one-line refusals. The checkpoint is digits pretrained for 2 steps: nothing here needs
a trained encoder (test_finetune.py shows that pretraining helps), so this file runs beside that one."""

import json

import pytest
import torch

import finetune
from util import checkpoints
from util import cli
from util import devices
from util import latent_cache
from util import probes as probe_util
from util import vaes
import train
from test_finetune import PRETRAIN, PROBE, probe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits run of 2 steps (and its data directory) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("probing")
    train.main(PRETRAIN + ["--steps", "2", "--out", str(root / "run"), "--data-dir", str(root / "data")])
    return root / "run"


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


def test_linear_probe_results_and_baseline(run):
    results = probe(run, "linprobe", "--epochs", "5")
    assert results["epochs"] == 5 and len(results["history"]) == len(results["random_init_history"]) == 5
    for key in ("top1", "random_init_top1", "raw_pixels_top1"):
        assert set(results[key]) == {"best", "final", "best_epoch"}
    assert len(results["raw_pixels_history"]) == 5 and results["raw_pixels_top1"]["final"] > 0.8
    assert results["images_per_second_latents_only"] > 0
    assert not (run.parent / "linprobe" / "classifier.pt").exists()    # a probe trains a head, not a classifier


def test_finetune_end_to_end(run):
    """In-process (test_cluster.py's torchrun job runs finetune.py as a script)."""
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


def test_linprobe_refuses_weight_decay_and_label_smoothing(run, capsys):
    """The probe's head trains with neither: a value that would silently do nothing is an error (0 is allowed)."""
    base = ["--checkpoint", str(run), "--device", "cpu", "--mode", "linprobe"]
    err = refused(capsys, base + ["--weight-decay", "0.05", "--label-smoothing", "0.1"])
    assert "no weight decay or label smoothing" in err and "drop --weight-decay and --label-smoothing" in err
    assert "drop --label-smoothing" in refused(capsys, base + ["--weight-decay", "0", "--label-smoothing", "0.1"])


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
