"""util/probes.py with the lab's diffusion encoders (moved here from tests/test_probes.py): why every floor is the
LMD network (an adaLN-Zero init is at chance), the model time each objective's encoder is read at, the noise of
model time 1 (lab.diffusion.at_time, each image's own), and the results.json fields of a diffusion objective."""

import pytest
import torch

import lab
import lmd
import train
from lab import ddpm
from lab import diffusion
from util import probes
from util.objective import of


def tiny_encoder(objective, seed=0):
    """A random-init tiny encoder on 8 x 8 x 4 latents (16 tokens of 2 x 2 x 4): LMD's, or ddpm's (adaLN-Zero)."""
    torch.manual_seed(seed)
    network = lmd.MaskedLatentViT if objective == "lmd" else ddpm.DDPM
    return lmd.LatentClassifier(network("tiny", 8, 2, 4), 10, linear_probe=True).eval()


def lowest_trained_time(config):
    """probes.lowest_trained_time of a pretraining config, its objective's record found among the lab's (runs from
    before --objective: LMD)."""
    return probes.lowest_trained_time(config, of(config, lab.OBJECTIVES))


@torch.no_grad()
def test_an_adaln_zero_init_gives_every_image_one_class_token_and_the_lmd_floor_does_not():
    """Why the floor is the LMD network: ddpm's own init starts as the identity, its class token is a constant."""
    latents = torch.randn(6, 4, 8, 8)
    own = probes.probe_features(tiny_encoder("ddpm").encoder, latents, "cls", torch.ones(6))
    floor = probes.probe_features(tiny_encoder("lmd").encoder, latents, "cls")
    assert torch.allclose(own, own[:1].expand_as(own), atol=1e-6)                   # at chance under any probe
    assert floor.std(dim=0).mean() > 1e-2
    own_mean = probes.probe_features(tiny_encoder("ddpm").encoder, latents, "mean", torch.ones(6))
    assert own_mean.std(dim=0).mean() > 1e-2     # its mean patch token still varies: the patch embedding


def test_lowest_trained_time():
    assert lowest_trained_time({"objective": "lmd"}) is None and lowest_trained_time({}) is None
    assert lowest_trained_time({"objective": "ddpm"}) == lowest_trained_time({"objective": "maskdm"}) == 1
    assert lowest_trained_time({"objective": "umd", "clean_share": 0.5}) == 0   # its clean half: time 0
    assert lowest_trained_time({"objective": "umd", "clean_share": 0.0}) == 1   # no clean half


@torch.no_grad()
def test_time_1_is_noise_level_0_with_each_images_own_noise():
    latents = torch.randn(4, 4, 8, 8)
    assert diffusion.at_time(latents, None, None, 0) == (latents, None)
    clean, zeros = diffusion.at_time(latents, 0, torch.arange(4), 0)
    assert clean is latents and zeros.tolist() == [0] * 4
    noised, ones = diffusion.at_time(latents, 1, torch.tensor([7, 8, 9, 10]), seed=3)
    alpha = diffusion.noise_schedule().alphas_cumprod[0]
    noise = (noised - alpha.sqrt() * latents) / (1 - alpha).sqrt()
    assert ones.tolist() == [1] * 4 and (1 - alpha).sqrt() == pytest.approx(0.0064, abs=1e-4)
    assert 0.8 < noise.std() < 1.2
    again, _ = diffusion.at_time(latents[2:3], 1, torch.tensor([9]), seed=3)   # image 9 alone, another batch
    assert torch.allclose(again, noised[2:3])
    other, _ = diffusion.at_time(latents, 1, torch.tensor([7, 8, 9, 10]), seed=4)
    assert not torch.allclose(other, noised)
    encoder = tiny_encoder("ddpm").encoder
    for block in encoder.blocks:   # a trained-looking network: the time matters
        torch.nn.init.normal_(block.modulation[1].weight, std=0.2)
    at = {}
    for time in (0, 1):
        inputs, times = diffusion.at_time(latents, time, torch.arange(4), 0)
        at[time] = probes.probe_features(encoder, inputs, "cls", times)
    assert not torch.allclose(at[0], at[1], atol=1e-4)


def test_the_diffusion_records_read_their_encoders_through_at_time():
    """The probes reach at_time through the record's probe_inputs (util/probes.py imports nothing of the lab)."""
    for name in ("ddpm", "maskdm", "umd"):
        assert lab.get(name).probe_inputs is diffusion.at_time, name
    assert train.LMD.probe_inputs is None and lab.get("lmd") is train.LMD


@torch.no_grad()
def test_encoder_features_at_a_time_are_the_probe_inputs_features():
    """probes.encoder_features at model time 1 reads the encoder on at_time's inputs, each image's own noise."""
    classifier, latents = tiny_encoder("ddpm"), torch.randn(4, 4, 8, 8)
    for block in classifier.encoder.blocks:   # a trained-looking network: the time matters
        torch.nn.init.normal_(block.modulation[1].weight, std=0.2)
    labels, indices = torch.arange(4), torch.tensor([3, 5, 7, 9])
    features, read = probes.encoder_features(classifier, [(latents, labels)], "cls", 1, [indices], 2,
                                             probe_inputs=diffusion.at_time)
    inputs, times = diffusion.at_time(latents, 1, indices, 2)
    assert torch.equal(read, labels)
    assert torch.allclose(features, probes.probe_features(classifier.encoder, inputs, "cls", times))
    clean, _ = probes.encoder_features(classifier, [(latents, labels)], "cls", 0, [indices], 2,
                                       probe_inputs=diffusion.at_time)
    assert not torch.allclose(features, clean, atol=1e-4)


def test_result_fields_name_every_probe_and_put_the_lowest_trained_time_first():
    summary = lambda top1: (dict(best=top1, final=top1), [])   # noqa: E731
    plan = probes.probe_plan({"objective": "ddpm"}, lab.get("ddpm"))
    assert plan["random_init"] == ("scratch", "lmd", None) and plan["own_init"] == ("scratch", None, 1)
    measured = {name: summary(0.1 * i) for i, name in enumerate([*plan, "raw_pixels"])}
    fields = probes.result_fields(measured, {"objective": "ddpm"}, lab.get("ddpm"))
    assert fields["top1"] == fields["time1_top1"] and fields["probe_time"] == 1
    assert fields["scratch_top1"] == fields["random_init_top1"] != fields["own_init_top1"]
    assert {"time0_top1", "raw_pixels_top1", "raw_pixels_history"} <= set(fields)
    lmd_fields = probes.result_fields({"pretrained": summary(0.9), "random_init": summary(0.5)}, {}, train.LMD)
    assert lmd_fields["top1"]["final"] == 0.9 and lmd_fields["probe_time"] is None
    assert "own_init_top1" not in lmd_fields and "time0_top1" not in lmd_fields
