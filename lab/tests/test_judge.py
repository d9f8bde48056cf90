"""The offline judge of generated images (lab/judge.py): calibrated on real digits, cached, reproducible."""

import os

import pytest
import torch

from lab import judge
from util.cli import UserError
from util.datasets import load_image_tensors

# A judge of a few seconds (about 97% on digits): enough to tell real from blurred and noise. KID over 10 subsets
# instead of 100: the same statistic, a noisier mean, a tenth of the kernel sums.
FAST = dict(epochs=3, kid_subsets=10)


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
    assert result["references"]["ceiling"]["images"] == 500            # the floor's 500, blurred
    assert result["judge_val_accuracy"] > 0.9
    assert abs(result["fd_normalised"]) < 0.1
    assert result["floor"] < result["ceiling"] < result["noise_fd"]
    assert result["fd"] < 0.05 * result["noise_fd"]
    assert result["kid_mean"] < 0.1 * result["references"]["ceiling"]["kid_mean"]


def test_blurred_real_images_score_near_the_ceiling(digits):
    # Other training images than the ceiling's random 500: the same degradation on other images.
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


def test_the_ceiling_is_the_floors_training_images_blurred(digits):
    trained = judge.load_judge(digits["config"], "cpu", settings=FAST)
    images = judge.reference_images(trained, 500)
    chosen = judge.floor_indices(trained, 500)
    assert torch.equal(images["floor"], digits["train"][chosen])   # at 32 px the judge reads them as they are
    assert torch.allclose(images["ceiling"], judge.blur(digits["train"][chosen], 32), atol=1e-6)
    assert images["noise"].shape == (500, 3, 32, 32)


def test_without_blur_the_ceiling_is_the_floor(digits, monkeypatch):
    """Floor and ceiling differ by the blur alone: with none, the ceiling is the floor, bias and all (the old
    ceiling, the validation images against themselves, gave about 0 here against a floor near 9)."""
    trained = judge.load_judge(digits["config"], "cpu", settings=FAST)
    monkeypatch.setattr(judge, "blur", lambda images, image_size: images)
    measured = judge.measure_references(trained, 500)   # not the cached references: those keep the blur
    assert measured["ceiling"]["fd"] == measured["floor"]["fd"] > 1
    assert measured["ceiling"]["images"] == measured["floor"]["images"] == 500


class IdentityVAE(torch.nn.Module):
    """A 'VAE' that gives its images back (through [-1, 1], as LatentProjection does): a perfect round trip."""
    is_pixels, name = False, "identity"

    def encode(self, images):
        return images * 2 - 1

    def decode(self, latents):
        return (latents + 1) / 2


def test_the_vae_roundtrip_is_reported_for_latent_runs_only(digits):
    samples = digits["train"][-500:]
    perfect = judge.evaluate_generation(samples, digits["config"], "cpu", settings=FAST, projection=IdentityVAE())
    assert perfect["vae_roundtrip_fd"] == pytest.approx(perfect["floor"], rel=1e-3)   # the floor's own images
    assert perfect["vae_roundtrip_fd_normalised"] == pytest.approx(0, abs=1e-3)
    assert perfect["references"]["vae_roundtrip"]["images"] == 500
    # The untrained tiny VAE, opened from the run's config as sample.py's runs have it: its images are ruined.
    tiny = judge.evaluate_generation(samples, dict(digits["config"], vae="tiny"), "cpu", settings=FAST)
    assert tiny["references"]["vae_roundtrip"]["vae"] == "tiny" and tiny["vae_roundtrip_fd_normalised"] > 1
    assert tiny["fd"] == perfect["fd"] and tiny["ceiling"] == perfect["ceiling"]   # nothing else changes
    pixels = judge.evaluate_generation(samples, dict(digits["config"], vae="none"), "cpu", settings=FAST)
    assert "vae_roundtrip_fd" not in pixels and "vae_roundtrip" not in pixels["references"]


def test_the_cached_judge_is_reused(digits):
    first = judge.load_judge(digits["config"], "cpu", settings=FAST)   # trained now, unless a test above did
    second = judge.load_judge(digits["config"], "cpu", settings=FAST)
    assert not second.trained and os.path.exists(judge.judge_file(digits["config"], "cpu"))
    assert all(torch.equal(a, b) for a, b in zip(first.net.state_dict().values(), second.net.state_dict().values()))
    evaluate(digits, digits["val"][:50])   # measures and caches the references for 50 images
    third = judge.load_judge(digits["config"], "cpu", settings=FAST)
    assert not third.trained and third.record["references"]["50"]["ceiling"]["images"] == 50


def test_a_changed_provenance_retrains_and_training_is_deterministic(tmp_path, capfd):
    config = digits_config(tmp_path)
    assert judge.load_judge(config, "cpu", settings=dict(epochs=1, kid_subsets=2)).trained
    changed = judge.load_judge(config, "cpu", settings=dict(epochs=1, seed=1, kid_subsets=2))
    assert changed.trained and "made with other settings (settings:" in capfd.readouterr().err
    assert torch.load(judge.judge_file(config, "cpu"), weights_only=True)["provenance"]["settings"]["seed"] == 1
    # Seeded and deterministic: training again from nothing gives the same weights bit for bit.
    os.remove(judge.judge_file(config, "cpu"))
    again = judge.load_judge(config, "cpu", settings=dict(epochs=1, seed=1, kid_subsets=2))
    assert again.trained
    assert all(torch.equal(a, b) for a, b in zip(changed.net.state_dict().values(), again.net.state_dict().values()))


def test_the_cache_key_holds_the_device_and_the_library_versions(tmp_path, monkeypatch, capfd):
    import torchmetrics
    config = digits_config(tmp_path)
    path = judge.judge_file(config, "cpu")
    assert os.path.basename(path) == f"digits-32px-cpu-torch{torch.__version__}-torchmetrics{torchmetrics.__version__}.pt"
    assert judge.judge_file(config, "cuda") != path
    quick = dict(epochs=1, kid_subsets=2)
    result = judge.evaluate_generation(torch.rand(2, 3, 32, 32), config, "cpu", settings=quick)
    provenance = torch.load(path, weights_only=True)["provenance"]
    versions = dict(device="cpu", torch=torch.__version__, torchmetrics=torchmetrics.__version__)
    assert {key: provenance[key] for key in versions} == versions
    assert {key: result["judge"][key] for key in versions} == versions   # and in generation.json
    # Another torchmetrics: another file, and a judge of its own.
    monkeypatch.setattr(torchmetrics, "__version__", "0.0.1")
    assert judge.judge_file(config, "cpu") != path and judge.load_judge(config, "cpu", settings=quick).trained
    assert "made with other settings" not in capfd.readouterr().err   # a new file, not a retrained one


def test_sample_py_records_the_batch_size(tmp_path, monkeypatch):
    """With eta > 0 the batch size changes the samples (the noise of every step is drawn batch by batch)."""
    import json
    import lab
    import lmd
    from lab import sample
    from lab_support import defaults
    from util import checkpoints
    config = dict(defaults("ddpm"), model="tiny",
                  vae="none", image_size=32, patch_size=8, steps=1, dataset="digits", data_dir=str(tmp_path))
    torch.manual_seed(0)
    model = checkpoints.build_model(config, lmd.LatentProjection(), lab.get("ddpm"))
    checkpoints.save_run(str(tmp_path / "run" / "checkpoint.pt"), model, torch.optim.AdamW(model.parameters()), 1,
                         config, torch.device("cpu"))
    judged = []
    monkeypatch.setattr(judge, "evaluate_generation", lambda samples, *args, **kwargs: judged.append(samples) or {})
    for batch in (2, 4):
        sample.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / f"b{batch}"), "--num-images",
                     "4", "--batch-size", str(batch), "--sampling-steps", "2", "--eta", "1", "--device", "cpu"])
        record = json.loads((tmp_path / f"b{batch}" / "generation.json").read_text())["sampling"]
        assert record["batch_size"] == batch and record["eta"] == 1
    assert not torch.equal(judged[0], judged[1])


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
    with pytest.raises(UserError, match=r"samples in \[0, 1\]"):
        evaluate(digits, digits["val"][:10] * 2 - 1)
    with pytest.raises(UserError, match="at least 2 images"):
        evaluate(digits, torch.rand(1, 3, 32, 32))
