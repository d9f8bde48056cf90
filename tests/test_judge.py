"""The offline judge of generated images (util/judge.py): calibrated on real digits, cached, reproducible."""

import os

import pytest
import torch

from util import judge
from util.cli import UserError
from util.datasets import load_image_tensors

FAST = dict(epochs=3)   # a judge of a few seconds (about 97% on digits): enough to tell real from blurred and noise


def digits_config(data_dir):
    return dict(dataset="digits", data_dir=str(data_dir), image_size=32, synthetic_size=5000, seed=0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """One judge for the module (trained by the first test that asks), and the real digits to feed it."""
    train, _ = load_image_tensors("digits", "unused", "train", 32)
    val, val_labels = load_image_tensors("digits", "unused", "val", 32)
    return dict(config=digits_config(tmp_path_factory.mktemp("judge")), train=train, val=val, val_labels=val_labels)


def evaluate(digits, samples):
    return judge.evaluate_generation(samples, digits["config"], "cpu", settings=FAST)


def test_real_images_score_near_the_floor_and_far_below_noise(digits):
    result = evaluate(digits, digits["train"][-500:])   # real, though not the floor's random 500
    assert result["num_images"] == 500 and result["references"]["floor"]["images"] == 500
    assert result["references"]["floor"]["reference_images"] == 360   # the digits' whole validation split
    assert result["judge_val_accuracy"] > 0.9
    assert abs(result["fd_normalised"]) < 0.1
    assert result["floor"] < result["ceiling"] < result["noise_fd"]
    assert result["fd"] < 0.05 * result["noise_fd"]
    assert result["kid_mean"] < 0.1 * result["references"]["ceiling"]["kid_mean"]


def test_blurred_real_images_score_near_the_ceiling(digits):
    # Training images (the ceiling blurs the validation ones), so this is the same degradation on other images.
    result = evaluate(digits, judge.blur(digits["train"][:500], 32))
    assert 0.7 < result["fd_normalised"] < 1.5


def test_real_validation_images_cover_every_class(digits):
    result = evaluate(digits, digits["val"])
    assert sum(result["class_histogram"]["counts"]) == 360
    assert result["classes_present"] == 10
    assert result["max_class_fraction"] < 0.2
    assert result["fd"] < 1e-3   # the validation split against itself


def test_one_repeated_class_is_caught(digits):
    threes = digits["val"][digits["val_labels"] == 3]
    result = evaluate(digits, threes.repeat(10, 1, 1, 1)[:360])   # 360 images: the references of the test above
    assert result["max_class_fraction"] > 0.9 and result["classes_present"] <= 2
    assert result["class_histogram"]["counts"][3] == max(result["class_histogram"]["counts"])
    assert result["fd_normalised"] > 0.5   # real images, but one class: far from the data all the same


def test_the_cached_judge_is_reused(digits):
    first = judge.load_judge(digits["config"], "cpu", settings=FAST)   # trained now, unless a test above did
    second = judge.load_judge(digits["config"], "cpu", settings=FAST)
    assert not second.trained and os.path.exists(judge.judge_file(digits["config"]))
    assert all(torch.equal(a, b) for a, b in zip(first.net.state_dict().values(), second.net.state_dict().values()))
    assert second.record["ceiling"] == first.record["ceiling"]


def test_a_changed_provenance_retrains_and_training_is_deterministic(tmp_path, capfd):
    config = digits_config(tmp_path)
    assert judge.load_judge(config, "cpu", settings=dict(epochs=1)).trained
    changed = judge.load_judge(config, "cpu", settings=dict(epochs=1, seed=1))
    assert changed.trained and "made with other settings (settings:" in capfd.readouterr().err
    assert torch.load(judge.judge_file(config), weights_only=True)["provenance"]["settings"]["seed"] == 1
    # Seeded and deterministic: training again from nothing gives the same weights bit for bit.
    os.remove(judge.judge_file(config))
    again = judge.load_judge(config, "cpu", settings=dict(epochs=1, seed=1))
    assert again.trained
    assert all(torch.equal(a, b) for a, b in zip(changed.net.state_dict().values(), again.net.state_dict().values()))


def test_a_folder_of_pngs_is_judged_like_the_tensors(digits, tmp_path):
    from torchvision.utils import save_image
    images = digits["val"][:40]
    for index, image in enumerate(images):
        save_image(image, tmp_path / f"{index:03d}.png")
    from_folder = judge.evaluate_folder(str(tmp_path), digits["config"], "cpu", settings=FAST)
    from_tensors = evaluate(digits, images)
    assert from_folder["num_images"] == 40 and from_folder["references"]["samples"]["kid_subset_size"] == 40
    assert from_folder["fd"] == pytest.approx(from_tensors["fd"], rel=0.05)   # 8-bit PNGs: nearly the same images
    assert from_folder["class_histogram"] == from_tensors["class_histogram"]


def test_bad_inputs_are_one_line_errors(digits, tmp_path):
    with pytest.raises(UserError, match="no .png images"):
        judge.evaluate_folder(str(tmp_path), digits["config"], "cpu", settings=FAST)
    with pytest.raises(UserError, match=r"samples \[N, 3, 32, 32\]"):
        evaluate(digits, torch.rand(10, 3, 64, 64))
    with pytest.raises(UserError, match="at least 2 images"):
        evaluate(digits, torch.rand(1, 3, 32, 32))
