"""UMD (lab/umd.py): which half sees what, which tokens each loss term reads, the probes' features, and UMD
through train.py's and finetune.py's loops (python -m lab.train, lab.finetune) and lab/sample.py on tiny settings."""

import json

import pytest
import torch

import finetune
import lmd
import lab
import lab.finetune   # lab.finetune.main and lab.train.main: the core's scripts given the lab's objectives
import lab.train
from lab import diffusion
from lab import pictures
from lab import sample
from util import checkpoints
from util import cli
from support import tiny_flags
from lab_support import build_model, defaults

CONFIG = dict(objective="umd", model="tiny", patch_size=2, clean_share=0.5, clean_mask_ratio=0.75)


def randomised_umd(seed=0, **overrides):
    """A UMD on an 8 x 8 x 4 latent (16 tokens) whose zero-initialised layers (modulations, heads) are random too,
    so that every output depends on the inputs and the time."""
    torch.manual_seed(seed)
    model = build_model(dict(CONFIG, **overrides), 8, 4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def record_calls(model):
    """Wrap model.embed and model.encode_tokens: -> a list that gets dict(inputs=..., time=..., tokens=...) per
    forward pass of the encoder."""
    calls, embed, encode = [], model.embed, model.encode_tokens

    def recording_embed(inputs):
        calls.append(dict(inputs=inputs.detach().clone()))
        return embed(inputs)

    def recording_encode(tokens, time=None):
        calls[-1].update(time=None if time is None else time.clone(), tokens=tokens.shape[1])
        return encode(tokens, time)

    model.embed, model.encode_tokens = recording_embed, recording_encode
    return calls


# ----------------------------------------------------------------------------- the two halves

def test_clean_half_gets_time_0_and_no_noise_and_noised_half_gets_t_plus_1():
    model = randomised_umd()
    calls = record_calls(model)
    latents = torch.randn(8, 4, 8, 8)
    model(latents, 0.375, generator=torch.Generator().manual_seed(3))
    clean, noised = calls
    assert torch.equal(clean["inputs"], latents[:4])                       # the clean half, exactly: no noise
    assert torch.equal(clean["time"], torch.zeros(4, dtype=clean["time"].dtype))   # model time 0
    assert clean["tokens"] == 4                                            # 16 tokens at 0.75: 4 seen
    # the noised half: the times and noise are the generator's first draws, then x_t, told t + 1
    t, noise = diffusion.draw_times_and_noise(latents[4:], torch.Generator().manual_seed(3))
    assert torch.equal(noised["time"], t + 1) and noised["time"].min() >= 1
    assert torch.allclose(noised["inputs"], diffusion.add_noise(latents[4:], noise, t))
    assert not torch.allclose(noised["inputs"], latents[4:])
    assert noised["tokens"] == 10                                          # 16 tokens at 0.375: 10 seen


def test_the_clean_share_and_ratios_are_flags_and_mask_0_sees_every_token():
    model = randomised_umd(clean_share=0.25, clean_mask_ratio=0.5)
    calls = record_calls(model)
    terms, _, mask = model.losses(torch.randn(2, 4, 8, 8), torch.randn(6, 4, 8, 8), torch.tensor([0, 5, 9, 99, 500,
                                  999]), torch.randn(6, 4, 8, 8), 0.0, torch.Generator().manual_seed(0))
    assert [call["tokens"] for call in calls] == [8, 16]          # clean at 0.5: 8 of 16; noised at 0: all of them
    assert set(terms) == {"clean", "eps"} and mask[2:].sum() == 0   # no mask, no x0 term
    assert torch.allclose(model.total_loss(terms), 0.75 * terms["eps"] + 0.25 * terms["clean"])
    model = randomised_umd(clean_share=0.25)
    calls = record_calls(model)
    model(torch.randn(8, 4, 8, 8), 0.375)
    assert [len(call["inputs"]) for call in calls] == [2, 6]                # round(0.25 * 8) clean
    with pytest.raises(lmd.ConfigError, match="clean share"):
        randomised_umd(clean_share=1.5)


def test_the_loss_is_drawn_from_the_generator_alone():
    """Resume is exact only if the times, the noise and both halves' masks come from the step's generator."""
    model, latents = randomised_umd(), torch.randn(8, 4, 8, 8)
    first = model(latents, 0.375, generator=torch.Generator().manual_seed(7))[0]
    torch.manual_seed(12345)                                          # the global generator plays no part
    again = model(latents, 0.375, generator=torch.Generator().manual_seed(7))[0]
    other = model(latents, 0.375, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(first, again) and not torch.equal(first, other)


# ----------------------------------------------------------------------------- each term reads its own tokens

def test_each_loss_term_reads_only_its_own_tokens():
    model = randomised_umd()
    clean, noised, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([100, 300, 600, 850])

    def terms(clean, noised, noise):
        return model.losses(clean, noised, t, noise, 0.375, torch.Generator().manual_seed(0))

    base, _, mask = terms(clean, noised, noise)                    # the same generator: the same masks every call
    clean_hidden, noised_hidden = (mask[:4].bool().unsqueeze(-1), mask[4:].bool().unsqueeze(-1))   # [B, L, 1]

    def changed(tensor, where, by):
        tokens = model.patchify(tensor)
        return model.unpatchify(torch.where(where, tokens + by, tokens))

    def same(a, b):
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    # the noise of the hidden tokens of the noised half: not seen, and not a target of anything
    result = terms(clean, noised, changed(noise, noised_hidden, 1.0))[0]
    assert all(same(result[name], base[name]) for name in ("clean", "eps", "x0"))
    # the noise of the visible tokens: the eps term's own targets (and inputs) -> eps changes
    assert not same(terms(clean, noised, changed(noise, ~noised_hidden, 1.0))[0]["eps"], base["eps"])
    # x0 of the visible tokens changed and their noise with it so that x_t stays the same: the x0 targets change
    # only where x0 is not scored -> x0 unchanged; eps's targets change -> eps changes
    alpha_bar = diffusion.noise_schedule().alphas_cumprod[t].view(-1, 1, 1, 1)
    delta = torch.where(noised_hidden, 0.0, 0.5 * torch.ones_like(model.patchify(noised)))
    delta = model.unpatchify(delta)
    result = terms(clean, noised + delta, noise - delta * (alpha_bar / (1 - alpha_bar)).sqrt())[0]
    assert same(result["x0"], base["x0"]) and same(result["clean"], base["clean"])
    assert not same(result["eps"], base["eps"])
    # x0 of the hidden tokens of the noised half: the x0 term's own targets -> x0 changes, eps does not
    result = terms(clean, changed(noised, noised_hidden, 1.0), noise)[0]
    assert not same(result["x0"], base["x0"]) and same(result["eps"], base["eps"])
    # the clean half's hidden tokens: unseen, the clean term's own targets -> only the clean term changes
    result = terms(changed(clean, clean_hidden, 1.0), noised, noise)[0]
    assert not same(result["clean"], base["clean"])
    assert same(result["eps"], base["eps"]) and same(result["x0"], base["x0"])


# ----------------------------------------------------------------------------- the probes and the sampler

def test_probes_read_time_0_unmasked_features():
    model = randomised_umd()
    latents = torch.randn(3, 4, 8, 8)
    encoder = model.encode_tokens   # before LatentClassifier removes the decoder
    tokens = model.embed(latents)
    at = {time: encoder(tokens, torch.full((3,), time))[:, 0] for time in (0, 1, 500)}
    classifier = lmd.LatentClassifier(model, 10, linear_probe=True)
    calls = record_calls(classifier.encoder)
    features = classifier.features(latents)
    assert calls[0]["tokens"] == 16 and torch.equal(calls[0]["inputs"], latents)   # every token, no noise
    assert torch.allclose(features, at[0], atol=1e-6)                            # at model time 0
    assert not torch.allclose(features, at[1], atol=1e-4) and not torch.allclose(features, at[500], atol=1e-4)


def test_sampling_uses_the_eps_head():
    model = randomised_umd()
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    time = diffusion.model_time(t)
    predictions = model.forward_decoder(model.forward_encoder(noisy, time), time)
    eps = model.predict_eps(noisy, t)
    assert torch.allclose(eps, model.unpatchify(model.head(predictions, "eps")))
    assert not torch.allclose(eps, model.unpatchify(model.head(predictions, "x0")))


# ----------------------------------------------------------------------------- through the scripts

def flags(data_dir, out, **overrides):
    """A few seconds of train.py: synthetic 32 px pixels, patch 8 (16 tokens), the tiny model."""
    return tiny_flags(data_dir, str(out), **{**dict(vae="none", image_size=32, patch_size=8, steps=2), **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """A UMD run and its generation fine-tuning (--init, mask 0, r = 0.05), 2 steps each, and a ddpm run saved
    directly (a fresh model: no training). Their grids sample 4 images in 2 DDIM steps (50 of 16 would dominate)."""
    root = tmp_path_factory.mktemp("umd")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pictures, "SAMPLE_GRID_IMAGES", 4)
        patch.setattr(pictures, "SAMPLE_GRID_STEPS", 2)
        lab.train.main(flags(data_dir, root / "umd", objective="umd"))
        lab.train.main(flags(data_dir, root / "umd_ft", objective="umd", init=root / "umd", mask_ratio=0.0,
                         clean_share=0.05))
    config = dict(defaults("ddpm"), model="tiny", vae="none",
                  image_size=32, patch_size=8, steps=2, dataset="synthetic", synthetic_size=64, data_dir=data_dir,
                  out=str(root / "ddpm"))
    torch.manual_seed(1)
    model = checkpoints.build_model(config, lmd.LatentProjection(), lab.get("ddpm"))
    with torch.no_grad():   # not the init a new run draws (nor zeros where DiT starts at zero)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    checkpoints.save_run(str(root / "ddpm" / "checkpoint.pt"), model, torch.optim.AdamW(model.parameters()), 2,
                         config, torch.device("cpu"))
    return root


def test_generation_fine_tuning_starts_from_every_weight_of_the_umd_run(runs):
    config = json.loads((runs / "umd_ft" / "config.json").read_text())
    assert config["init_from"]["objective"] == "umd" and config["init_from"]["tensors_fresh"] == 0
    assert (config["mask_ratio"], config["clean_share"], config["clean_mask_ratio"]) == (0.0, 0.05, 0.75)
    summary = json.loads((runs / "umd_ft" / "summary.json").read_text())
    assert summary["held_out_mask_ratio"] == 0.0 and summary["held_out_eps_loss"] > 0


@pytest.mark.parametrize("run", ["umd", "ddpm"])
def test_finetune_knn_works_on_a_umd_and_a_ddpm_checkpoint(runs, run):
    if run == "umd":   # a ddpm checkpoint's kNN: test_ddpm_floor.py
        lab.finetune.main(["--checkpoint", str(runs / run), "--mode", "knn", "--num-workers", "0", "--device", "cpu"])
        results = json.loads((runs / run / "knn" / "results.json").read_text())
        assert 0 <= results["top1"]["final"] <= 1 and 0 <= results["scratch_top1"]["final"] <= 1
    checkpoint = checkpoints.load_checkpoint(str(runs / run))
    config = dict(checkpoint["config"], checkpoint=str(runs / run / "checkpoint.pt"))
    classifier = finetune.build_classifier(config, checkpoint, lmd.LatentProjection(), 10, "pretrained", True,
                                           lab.OBJECTIVES)
    assert type(classifier.encoder).__name__ == {"umd": "UMD", "ddpm": "DDPM"}[run]
    assert torch.equal(classifier.encoder.blocks[0].modulation[1].weight,
                       checkpoint["model"]["blocks.0.modulation.1.weight"])   # the trained weights, time included


def test_sample_script_samples_a_umd_run(runs, tmp_path):
    sample.main(["--checkpoint", str(runs / "umd_ft"), "--out", str(tmp_path), "--num-images", "4",
                 "--sampling-steps", "2", "--no-judge", "--device", "cpu"])
    assert (tmp_path / "samples.png").stat().st_size > 1000


@pytest.mark.parametrize("run, given, expected", [("umd", [], (125, 1.0)), ("ddpm", [], (50, 0.0)),
                                                  ("umd", ["--sampling-steps", "3", "--eta", "0"], (3, 0.0))])
def test_sample_script_uses_the_objectives_sampler_unless_told(runs, tmp_path, monkeypatch, run, given, expected):
    samplers = []

    def recording_sampler(model, projection, count, steps, eta, generator, device):
        samplers.append((steps, eta))
        return torch.zeros(count, 3, 32, 32)
    monkeypatch.setattr(diffusion, "sample_images", recording_sampler)
    sample.main(["--checkpoint", str(runs / run), "--out", str(tmp_path), "--num-images", "2", "--no-judge",
                 "--device", "cpu", *given])
    assert samplers == [expected]
    with pytest.raises(cli.UserError, match="sampling-steps must be at least 1"):
        sample.main(["--checkpoint", str(runs / run), "--out", str(tmp_path), "--sampling-steps", "0"])
