"""LMD's relatives (lab/): adaLN-Zero, the objectives' losses, MaskDM's masks, DDIM, --init, resume, lab/sample.py."""

import json
import subprocess
import sys

import pytest
import torch

import lmd
import lab
import lab.train   # lab.train.main: train.py's loop given the lab's objectives
from lab import diffusion
from lab import maskdm
from lab import pictures
from lab import sample
from util import checkpoints
from util import cli
from util import datasets
from support import ROOT, tiny_flags
from lab_support import build_model, defaults


def randomise(model, seed=0):
    """Give every zero-initialised layer (modulations, heads) random weights, so outputs depend on the inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


# ----------------------------------------------------------------------------- time conditioning

def test_zero_initialised_adaln_block_is_the_identity_until_its_modulation_learns():
    torch.manual_seed(0)
    block = diffusion.AdaLNBlock(32, 4, condition_dim=16)
    x, c = torch.randn(3, 5, 32), torch.randn(3, 16)
    assert torch.equal(block(x, c), x)                       # every gate is 0: attention and MLP add nothing
    with torch.no_grad():
        block.modulation[1].bias.normal_()
    assert not torch.allclose(block(x, c), x)                # once the map is not zero, the block acts


def test_fresh_diffusion_model_predicts_zero_noise_and_reads_the_time():
    model = build_model(dict(objective="ddpm", model="tiny", patch_size=2), 8, 4)
    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(model.predict_eps(latents, torch.tensor([3, 500])), torch.zeros_like(latents))
    randomise(model)
    early, late = (model.predict_eps(latents, torch.tensor([t, t])) for t in (3, 900))
    assert not torch.allclose(early, late)                   # the same input at another noise level: another answer


# ----------------------------------------------------------------------------- the objectives

@pytest.fixture(scope="module")
def digits_latents():
    """16 real training digits at 16 px, as pixels in [-1, 1] (no VAE): [16, 3, 16, 16]."""
    images = datasets.ImageDataset(datasets.load_image_source("digits", None, "train", 16), 16)
    return torch.stack([images[i][0] for i in range(16)]) * 2 - 1


@pytest.mark.parametrize("objective, ratio", [("lmd", 0.75), ("ddpm", 0.0), ("maskdm", 0.75)])
def test_each_objective_loss_is_finite_and_falls_on_digits(objective, ratio, digits_latents):
    torch.manual_seed(0)
    config = dict(objective=objective, model="tiny", patch_size=4, block_size=2)
    model = build_model(config, 16, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    measure = lambda: model(digits_latents, ratio, False, generator=torch.Generator().manual_seed(1))[0]  # noqa: E731
    with torch.no_grad():
        before = measure().item()
    for step in range(10):
        loss, _, _ = model(digits_latents, ratio, False, generator=torch.Generator().manual_seed(100 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = measure().item()                             # the same times, noise and masks as `before`
    assert torch.isfinite(torch.tensor([before, after])).all()
    assert after < 0.8 * before, (before, after)


def test_min_snr_weights_cap_only_the_nearly_clean_levels():
    t = torch.arange(diffusion.NUM_TIMESTEPS)
    weights = diffusion.min_snr_weights(t, gamma=5.0)
    assert weights[0] < 1e-3                                  # t = 0: SNR ~ 2.5e4, weight 5 / SNR
    assert torch.all(weights[300:] == 1)                      # SNR below 5 (a_t < 5/6) from t ~ 250 on: weight 1
    assert torch.all(weights[1:] >= weights[:-1])             # noisier levels never weigh less
    assert torch.equal(diffusion.min_snr_weights(t, gamma=0), torch.ones(len(t)))   # the plain eps-MSE


def test_ddpm_loss_is_the_plain_eps_mse_at_gamma_0_and_smaller_with_min_snr(digits_latents):
    torch.manual_seed(0)
    model = lab.ddpm.DDPM("tiny", grid_size=16, patch_size=4, channels=3, snr_gamma=0.0)
    torch.nn.init.normal_(model.decoder_head.weight, std=0.02)   # not the zero head of a fresh model
    t, latents = torch.tensor([0, 10, 500, 900]), digits_latents[:4]
    noise = torch.randn_like(latents)
    plain, predictions, _ = model.loss(latents, t, noise)
    assert plain.item() == pytest.approx(((predictions - model.patchify(noise)) ** 2).mean().item(), rel=1e-5)
    model.snr_gamma = 5.0
    weighted, _, _ = model.loss(latents, t, noise)
    assert weighted < plain


def test_ddpm_refuses_a_mask():
    model = build_model(dict(objective="ddpm", model="tiny", patch_size=2), 8, 4)
    with pytest.raises(lmd.ConfigError, match="mask ratio is 0"):
        model(torch.randn(2, 4, 8, 8), 0.5)


# ----------------------------------------------------------------------------- MaskDM

def test_maskdm_block_masks_are_whole_blocks_per_sample():
    keep, mask = maskdm.block_masking(64, 8, 2, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (64, 16) and torch.all(mask.sum(1) == 48)
    grid = mask.reshape(64, 4, 2, 4, 2)                       # [B, block row, in-block row, block col, in-block col]
    assert torch.all(grid.amin(dim=(2, 4)) == grid.amax(dim=(2, 4)))   # each 2x2 block wholly masked or visible
    assert len({tuple(m.tolist()) for m in mask}) > 1          # samples get their own masks
    assert torch.all(mask.gather(1, keep) == 0)
    with pytest.raises(lmd.ConfigError, match="blocks of 3x3"):
        maskdm.block_masking(2, 8, 3, 0.75)


def test_maskdm_loss_ignores_the_masked_tokens_targets_and_inputs():
    torch.manual_seed(0)
    model = randomise(build_model(dict(objective="maskdm", model="tiny", patch_size=2, block_size=2), 8, 4))
    latents, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 400, 900])
    keep, mask = maskdm.block_masking(3, 4, 2, 0.75, torch.Generator().manual_seed(0))
    loss, predictions, _ = model.loss(latents, t, noise, keep, mask)
    hidden = mask.bool().unsqueeze(-1)                          # [B, L, 1]

    def change(tensor, where):
        tokens = model.patchify(tensor)
        return model.unpatchify(torch.where(where, torch.randn_like(tokens), tokens))

    changed_hidden, _, _ = model.loss(change(latents, hidden), t, change(noise, hidden), keep, mask)
    assert torch.allclose(changed_hidden, loss, rtol=1e-6, atol=0)          # what is masked counts for nothing
    assert torch.all(predictions[hidden.expand_as(predictions)] == 0)      # and nothing is predicted there
    changed_visible, _, _ = model.loss(change(latents, ~hidden), t, noise, keep, mask)
    assert not torch.allclose(changed_visible, loss)                      # what is visible does count


# ----------------------------------------------------------------------------- DDIM

def test_ddim_samples_are_deterministic_for_a_seed_with_the_right_shape_and_range():
    torch.manual_seed(0)
    model = randomise(build_model(dict(objective="ddpm", model="tiny", patch_size=4), 16, 3))
    pixels = lmd.LatentProjection()

    def draw(seed):
        return diffusion.sample_images(model, pixels, 3, steps=4, generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(0), draw(0), draw(1)
    assert first.shape == (3, 3, 16, 16) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert model.training                                                  # left in the mode it was in


# ----------------------------------------------------------------------------- train.py, --init, resume

@pytest.fixture(scope="module", autouse=True)
def quick_sample_grids():
    """A diffusion run's grids sample 4 images in 2 DDIM steps here (50 steps of 16 would be most of a test)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pictures, "SAMPLE_GRID_IMAGES", 4)
        patch.setattr(pictures, "SAMPLE_GRID_STEPS", 2)
        yield


def diffusion_flags(data_dir, out, **overrides):
    """A few seconds of train.py: synthetic 32 px pixels, patch 8 (16 tokens), the tiny model."""
    return tiny_flags(data_dir, str(out), **{**dict(vae="none", image_size=32, patch_size=8), **overrides})


def save_fresh_run(path, objective, data_dir):
    """A run directory holding the checkpoint of a fresh model, as train.py writes it (no training: cheap)."""
    config = dict(defaults(objective),
                  **dict(model="tiny", vae="none", image_size=32, patch_size=8, steps=2,
                         dataset="synthetic", data_dir=data_dir, out=str(path)))
    torch.manual_seed(1)
    model = checkpoints.build_model(config, lmd.LatentProjection(), lab.get(objective))
    randomise(model)   # not the init a new run would draw
    checkpoints.save_run(str(path / "checkpoint.pt"), model, torch.optim.AdamW(model.parameters()), 2, config,
                         torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """An LMD run and a MaskDM stage 1 (saved directly), and a ddpm stage 2 trained by train.py --init (2 steps)."""
    root = tmp_path_factory.mktemp("relatives")
    save_fresh_run(root / "lmd", "lmd", data_dir)
    save_fresh_run(root / "maskdm", "maskdm", data_dir)
    lab.train.main(diffusion_flags(data_dir, root / "stage2", steps=2, objective="ddpm", init=root / "maskdm"))
    return root


def test_init_loads_an_lmd_encoder_and_all_of_a_maskdm_run(runs):
    config = json.loads((runs / "stage2" / "config.json").read_text())
    assert config["init_from"]["objective"] == "maskdm" and config["init_from"]["tensors_fresh"] == 0
    model = checkpoints.build_model(config, lmd.LatentProjection(), lab.get(config["objective"]))
    record = checkpoints.load_init(model, str(runs / "lmd"), config, lab.OBJECTIVES)
    source = checkpoints.load_checkpoint(str(runs / "lmd"))["model"]
    own = model.state_dict()
    for name in ("patch_embed.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.3.mlp.2.bias", "norm.weight"):
        assert torch.equal(own[name], source[name]), name   # LMD's encoder, as trained
    assert not torch.equal(own["decoder_blocks.0.attn.qkv.weight"], source["decoder_blocks.0.attn.qkv.weight"])
    assert record["objective"] == "lmd" and {"time_embed", "decoder_blocks", "decoder_head"} <= set(
        record["fresh_parts"])


def test_init_refuses_another_latent_space(runs, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.run_cli(lambda: lab.train.main(diffusion_flags(data_dir, tmp_path / "r", objective="ddpm", vae="tiny",
                                                           image_size=64, patch_size=2, init=runs / "lmd")))
    assert "was trained with --vae none, this run has tiny" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--scheduler", "linear"], "--scheduler does not apply"),
                                            (["--mask-ratio", "0.5"], "--mask-ratio does not apply"),
                                            (["--block-size", "2"], "--block-size does not apply"),
                                            (["--objective", "lmd", "--snr-gamma", "0"], "--snr-gamma does not apply")])
def test_flags_of_another_objective_are_refused_in_one_line(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: lab.train.main(diffusion_flags(str(tmp_path), tmp_path / "r", objective="ddpm") + extra))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_diffusion_resume_is_bit_identical(tmp_path, data_dir):
    """MaskDM draws times, noise and block masks from the step's generator; a sample grid at step 2 (its own
    generator) must leave them as they were."""
    flags = dict(objective="maskdm", steps=4, save_every=100, grid_every=2)
    lab.train.main(diffusion_flags(data_dir, tmp_path / "straight", **flags))
    lab.train.main(diffusion_flags(data_dir, tmp_path / "split", stop_after_step=2, **flags))
    lab.train.main(["--resume", str(tmp_path / "split")])
    straight, split = (checkpoints.load_checkpoint(str(tmp_path / name))["model"] for name in ("straight", "split"))
    assert straight.keys() == split.keys() and all(torch.equal(straight[k], split[k]) for k in straight)
    assert (tmp_path / "split" / "grid_step000002.png").exists()
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["held_out_mask_ratio"] == 0.75 and summary["held_out_eps_loss"] > 0


# ----------------------------------------------------------------------------- lab/sample.py

FAKE_JUDGE = """
import sys, types, torch
fake = types.ModuleType("lab.judge")
def evaluate_generation(samples, config, device):
    return dict(fd=1.0, fd_normalised=0.5, shape=list(samples.shape), low=samples.min().item(),
                high=samples.max().item(), dtype=str(samples.dtype), dataset=config["dataset"])
fake.evaluate_generation = evaluate_generation
import lab
sys.modules["lab.judge"] = lab.judge = fake
from lab import sample
sys.argv = ["lab/sample.py"] + sys.argv[1:]
sample.cli.run_cli(sample.main)
"""


def test_sample_script_writes_a_grid_and_the_judges_verdict(runs, tmp_path):
    """End to end in a subprocess, the judge replaced by a stand-in that reports what it was given."""
    out = tmp_path / "samples"
    result = subprocess.run([sys.executable, "-c", FAKE_JUDGE, "--checkpoint", str(runs / "stage2"), "--out",
                             str(out), "--num-images", "6", "--batch-size", "4", "--sampling-steps", "3"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    generation = json.loads((out / "generation.json").read_text())
    assert generation["shape"] == [6, 3, 32, 32] and generation["dtype"] == "torch.float32"
    assert 0 <= generation["low"] <= generation["high"] <= 1 and generation["dataset"] == "synthetic"
    assert generation["sampling"]["sampling_steps"] == 3 and generation["sampling"]["objective"] == "ddpm"
    assert (out / "samples.png").exists()


def test_sample_script_refuses_an_lmd_run_in_one_line(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: sample.main(["--checkpoint", str(runs / "lmd"), "--out", str(tmp_path)]))
    assert exit_info.value.code == 2 and "cannot generate" in capsys.readouterr().err


def test_the_cores_scripts_refuse_a_relatives_run_in_one_line_that_names_the_labs(runs, capsys):
    """train.py and finetune.py know LMD alone: a ddpm run is refused before anything is read, pointing at
    python -m lab.train and lab.finetune, which take the same flags."""
    import finetune
    import train
    for main in (lambda: train.main(["--resume", str(runs / "stage2")]),
                 lambda: finetune.main(["--checkpoint", str(runs / "stage2"), "--mode", "knn", "--device", "cpu"])):
        with pytest.raises(SystemExit) as exit_info:
            cli.run_cli(main)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert "'ddpm'" in err and "python -m lab.train or python -m lab.finetune" in err


def test_a_relative_on_a_recipe_dataset_keeps_its_own_settings():
    """The recipe of --dataset fashion-mnist fills in the data and the model; ddpm keeps its batch and lr, and its
    run gets a directory of its own."""
    import lab.train
    import train
    flags, _ = train.parse_flags(["--objective", "ddpm", "--dataset", "fashion-mnist"], lab.OBJECTIVES)
    assert (flags["base_lr"], flags["weight_decay"], flags["model"]) == (8e-3, 0.0, "tiny")
    assert flags["out"] == "runs/fashion-mnist-ddpm" and flags["vae"] == train.RECIPE_VAE
