"""Unit tests of lmd.py: patches, masking, schedulers, loss, the model, the VAE projection, data and checkpoints."""

import copy
import math

import pytest
import torch

import lmd
from util import checkpoints
from util import cli
from util import datasets
from util import optim
from util import sampling
from util import vaes


# ----------------------------------------------------------------------------- patches and masking

@pytest.mark.parametrize("channels", [3, 4])
def test_patchify_round_trip(channels):
    latents = torch.randn(2, channels, 8, 12)
    tokens = lmd.patchify(latents, 4)
    assert tokens.shape == (2, 2 * 3, 4 * 4 * channels)
    assert torch.equal(lmd.unpatchify(tokens, 4, channels, 2, 3), latents)


def test_patchify_token_holds_one_patch():
    latents = torch.arange(2 * 4 * 4, dtype=torch.float).reshape(1, 2, 4, 4)
    tokens = lmd.patchify(latents, 2)
    # token 1 is the top-right 2x2 patch: its values, channel last within each pixel
    expected = latents[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(tokens[0, 1], expected)


def test_random_masking_counts_and_restore():
    tokens = torch.randn(5, 16, 8)
    visible, mask, restore = lmd.random_masking(tokens, 0.75, torch.Generator().manual_seed(0))
    assert visible.shape == (5, 4, 8)
    assert mask.shape == (5, 16) and torch.all(mask.sum(1) == 12)
    # the visible tokens are exactly the unmasked ones, in their shuffled order
    for b in range(5):
        kept = {tuple(t.tolist()) for t in visible[b]}
        assert kept == {tuple(t.tolist()) for t in tokens[b][mask[b] == 0]}
    # restore_indices inverts the shuffle: filling masked slots back and gathering gives the original
    shuffle = torch.argsort(restore, dim=1)
    shuffled = torch.gather(tokens, 1, shuffle.unsqueeze(-1).expand(-1, -1, 8))
    assert torch.equal(shuffled[:, :4], visible)
    assert torch.equal(torch.gather(shuffled, 1, restore.unsqueeze(-1).expand(-1, -1, 8)), tokens)


@pytest.mark.parametrize("ratio, visible", [(0.0, 15), (1.0, 1), (1.3, 1), (-0.2, 15), (0.5, 8)])
def test_masking_clamps_to_one_visible_and_one_masked(ratio, visible):
    assert lmd.num_visible_tokens(16, ratio) == visible
    _, mask, _ = lmd.random_masking(torch.randn(2, 16, 4), ratio)
    assert torch.all(mask.sum(1) == 16 - visible)


def test_masks_differ_per_sample_and_follow_the_generator():
    tokens = torch.randn(4, 64, 2)
    _, mask_a, _ = lmd.random_masking(tokens, 0.5, torch.Generator().manual_seed(1))
    _, mask_b, _ = lmd.random_masking(tokens, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a[0], mask_a[1])


# ----------------------------------------------------------------------------- schedulers

@pytest.mark.parametrize("name", lmd.SCHEDULERS)
def test_scheduler_endpoints_and_monotonic(name):
    schedule = lmd.MaskSchedule(name)
    values = [schedule(i / 300) for i in range(301)]
    expected_start = 0.75 if name == "constant" else 0.15
    assert values[0] == pytest.approx(expected_start)
    assert values[-1] == pytest.approx(0.75)
    assert schedule(2 / 3) == pytest.approx(0.75)               # the ramp ends at 2/3 of training
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert all(0 < v < 1 for v in values)


def test_cosine_worked_values():
    schedule = lmd.MaskSchedule("cosine")
    worked = {0: 0.150, 1 / 6: 0.242, 1 / 4: 0.340, 1 / 3: 0.454, 1 / 2: 0.663, 2 / 3: 0.750}
    for progress, ratio in worked.items():
        assert schedule(progress) == pytest.approx(ratio, abs=1e-3)


def test_piecewise_and_linear_values():
    piecewise, linear = lmd.MaskSchedule("piecewise"), lmd.MaskSchedule("linear")
    assert piecewise(1 / 6) == pytest.approx(0.40)
    assert piecewise(1 / 4) == pytest.approx(0.40)                # the plateau
    assert piecewise(1 / 3) == pytest.approx(0.40)
    assert piecewise(1 / 2) == pytest.approx(0.575)
    assert linear(1 / 3) == pytest.approx(0.45)
    assert max(piecewise(p / 100) for p in range(101)) <= 0.75    # the authors' version climbed past 1.0


def test_scheduler_options_are_configurable():
    schedule = lmd.MaskSchedule("linear", mask_start=0.2, mask_end=0.9, ramp_fraction=0.5)
    assert schedule(0.25) == pytest.approx(0.55) and schedule(0.5) == pytest.approx(0.9)
    assert lmd.MaskSchedule("constant", mask_ratio=0.6)(0.3) == 0.6


@pytest.mark.parametrize("kwargs", [dict(scheduler="exponential"), dict(mask_start=0.0), dict(mask_end=1.0),
                                    dict(mask_plateau=1.0),
                                    dict(mask_ratio=1.5), dict(ramp_fraction=0.0), dict(ramp_fraction=1.5)])
def test_scheduler_rejects_only_what_cannot_work(kwargs):
    with pytest.raises(lmd.ConfigError):
        lmd.MaskSchedule(**kwargs)


def test_a_falling_schedule_is_allowed_and_falls():
    falling = lmd.MaskSchedule("cosine", mask_start=0.9, mask_end=0.5)
    ratios = [falling(p / 20) for p in range(21)]
    assert ratios[0] == pytest.approx(0.9) and ratios[-1] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))
    off_the_path = lmd.MaskSchedule("piecewise", mask_start=0.3, mask_plateau=0.9, mask_end=0.6)
    assert off_the_path(1 / 3) == pytest.approx(0.9)


def test_check_schedule_takes_any_function_into_0_1():
    falling = lambda progress: 0.9 - 0.4 * progress   # noqa: E731
    assert lmd.check_schedule(falling) is falling
    with pytest.raises(lmd.ConfigError, match="at progress 1.00"):
        lmd.check_schedule(lambda progress: 0.5 - 0.5 * progress)   # hides nothing at the end
    with pytest.raises(lmd.ConfigError, match="at progress 0.00"):
        lmd.check_schedule(lambda progress: 1.0)


# ----------------------------------------------------------------------------- loss

def test_loss_is_zero_for_a_perfect_prediction_and_ignores_visible_tokens():
    targets = torch.randn(2, 8, 16)
    mask = torch.zeros(2, 8)
    mask[:, :3] = 1
    assert lmd.masked_token_loss(targets, targets, mask, normalize_targets=False) == 0
    wrong_where_visible = targets.clone()
    wrong_where_visible[:, 3:] += 100
    assert lmd.masked_token_loss(wrong_where_visible, targets, mask, normalize_targets=False) == 0


def test_loss_divides_by_the_number_of_masked_tokens():
    targets = torch.zeros(1, 4, 2)
    predictions = torch.zeros(1, 4, 2)
    predictions[0, 0] = 2.0                                   # squared error 4 on one masked token
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert lmd.masked_token_loss(predictions, targets, mask, normalize_targets=False) == pytest.approx(2.0)


def test_normalised_targets():
    targets = torch.randn(2, 4, 16) * 5 + 3
    normalised = (targets - targets.mean(-1, keepdim=True)) / (targets.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(2, 4)
    assert lmd.masked_token_loss(normalised, targets, mask, normalize_targets=True) < 1e-8
    assert lmd.masked_token_loss(targets, targets, mask, normalize_targets=True) > 1


# ----------------------------------------------------------------------------- model

def test_sincos_position_embedding():
    """MAE's layout: the first half encodes the column, the second the row; each half is [sin | cos] over the
    frequencies 1 / 10000^(i / (dim/4)), i = 0 .. dim/4 - 1."""
    embedding = lmd.sincos_position_embedding(16, 4).double()       # [4 * 4 positions, 16]
    assert embedding.shape == (16, 16)
    row, col = 1, 2
    e = embedding[row * 4 + col]
    frequencies = [1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75]
    expected = ([math.sin(col * f) for f in frequencies] + [math.cos(col * f) for f in frequencies]
                + [math.sin(row * f) for f in frequencies] + [math.cos(row * f) for f in frequencies])
    assert torch.allclose(e, torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert torch.equal(embedding[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4, dtype=torch.float64))
    # sin^2 + cos^2 = 1 per frequency: every position has squared norm dim / 2
    assert torch.allclose(embedding.pow(2).sum(dim=1), torch.full((16,), 8.0, dtype=torch.float64), atol=1e-5)
    # the dot product of two positions depends only on their offset: (0,0).(1,2) == (2,1).(3,3)
    assert embedding[0] @ embedding[1 * 4 + 2] == pytest.approx((embedding[2 * 4 + 1] @ embedding[3 * 4 + 3]).item(),
                                                               abs=1e-5)
    assert len({tuple(row.tolist()) for row in embedding}) == 16   # every position is distinct


def test_model_shapes_and_encoder_sees_only_visible_tokens():
    model = lmd.MaskedLatentViT("tiny", grid_size=8, patch_size=2, channels=4)
    latents = torch.randn(3, 4, 8, 8)
    lengths = []
    model.blocks[0].register_forward_hook(lambda module, inputs, output: lengths.append(inputs[0].shape[1]))
    loss, predictions, mask = model(latents, 0.75)
    assert predictions.shape == (3, 16, 16) and mask.shape == (3, 16)
    assert lengths == [1 + 4]                                   # class token + 4 of 16 tokens
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.patch_embed.weight.grad is not None and model.mask_token.grad is not None


def test_decoder_adds_its_position_embedding():
    model = lmd.MaskedLatentViT("tiny", grid_size=8, patch_size=2, channels=4).eval()
    encoded, _, restore = model.forward_encoder(torch.randn(1, 4, 8, 8), 0.5, torch.Generator().manual_seed(0))
    seen = []
    model.decoder_blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    model.forward_decoder(encoded, restore)
    first_masked = (restore[0] >= encoded.shape[1] - 1).nonzero()[0, 0]   # a masked slot holds mask_token + pos
    expected = model.mask_token[0, 0] + model.decoder_pos_embed[0, 1 + first_masked]
    assert torch.allclose(seen[0][0, 1 + first_masked], expected)


@pytest.mark.parametrize("size", list(lmd.MODEL_SIZES))
def test_each_size_builds_its_encoder_and_decoder(size):
    """Built on the meta device (no memory, no time): widths, depths and heads land where the registry says."""
    with torch.device("meta"):
        model = lmd.MaskedLatentViT(size, grid_size=8, patch_size=2, channels=4)
    for part, blocks, norm in (("encoder", model.blocks, model.norm), ("decoder", model.decoder_blocks,
                                                                       model.decoder_norm)):
        width, depth, heads = lmd.MODEL_SIZES[size][part]
        assert (norm.normalized_shape[0], len(blocks), blocks[0].attn.num_heads) == (width, depth, heads), part
    assert model.decoder_embed.in_features == model.norm.normalized_shape[0]


def test_base_encoder_is_vit_b():
    """The paper's `base`: ViT-B's 12 blocks of width 768 hold 85,054,464 weights (timm's vit_base_patch16_224:
    86,567,656 in all, less its patch embedding, class token, positions, final norm and 1000-class head)."""
    with torch.device("meta"):
        model = lmd.MaskedLatentViT("base", grid_size=28, patch_size=4, channels=4)
    assert sum(p.numel() for p in model.blocks.parameters()) == 85_054_464
    assert model.blocks[0].attn.num_heads == 12


def test_classifier_features_are_the_class_token_for_probes_and_the_mean_patch_token_for_finetuning():
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 8, 8)
    model = lmd.MaskedLatentViT("tiny", grid_size=8, patch_size=2, channels=4).eval()
    encoded = model.encode_tokens(model.embed(latents))                  # [4, 1 + 16, 192], after the final norm
    probe = lmd.LatentClassifier(copy.deepcopy(model), num_classes=10, linear_probe=True).eval()
    finetune = lmd.LatentClassifier(copy.deepcopy(model), num_classes=10).eval()
    assert torch.allclose(probe.features(latents), encoded[:, 0], atol=1e-5)
    assert torch.allclose(finetune.features(latents), encoded[:, 1:].mean(dim=1), atol=1e-5)
    assert probe(latents).shape == finetune(latents).shape == (4, 10)
    assert not any(p.requires_grad for p in probe.encoder.parameters())
    assert all(getattr(probe.encoder, part) is None for part in model.DECODER_PARTS)   # no decoder left


def test_classifier_leaves_the_autoencoder_it_is_given_as_it_was():
    model = lmd.MaskedLatentViT("tiny", grid_size=8, patch_size=2, channels=4)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    classifier = lmd.LatentClassifier(model, num_classes=10, linear_probe=True)
    assert all(hasattr(model, name) for name in ("decoder_embed", "mask_token", "decoder_blocks", "decoder_head"))   # the decoder is still there
    assert all(p.requires_grad for p in model.parameters())                             # and still trainable
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())
    assert not any(name.startswith("decoder") for name, _ in classifier.encoder.named_parameters())
    loss, _, _ = model(torch.randn(2, 4, 8, 8), 0.75)                                   # it still pretrains
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- latent projection

def test_pixel_projection_is_identity_up_to_range():
    projection = vaes.open_projection("none")
    images = torch.rand(2, 3, 16, 16)
    assert projection.channels == 3 and projection.downsample == 1
    assert torch.allclose(projection.decode(projection.encode(images)), images)


def test_tiny_vae_is_announced_as_untrained(capsys):
    projection = vaes.open_projection("tiny")
    assert not projection.trained
    assert "UNTRAINED" in capsys.readouterr().err
    latents = projection.encode(torch.rand(2, 3, 32, 32))
    assert latents.shape == (2, 4, 4, 4)
    assert vaes.fingerprint(projection) == vaes.fingerprint(vaes.open_projection("tiny", announce=False))


def test_vae_fingerprint_ignores_private_config_keys():
    """diffusers builds `_use_default_values` from a set: its order changes between processes, the VAE does not."""
    from diffusers.configuration_utils import FrozenDict
    projection = vaes.open_projection("tiny", announce=False)
    before = vaes.fingerprint(projection)
    config = dict(projection.vae.config)
    projection.vae._internal_dict = FrozenDict({**config, "_use_default_values": ["b", "a"], "_name_or_path": "x"})
    assert vaes.fingerprint(projection) == before
    projection.vae._internal_dict = FrozenDict({**config, "scaling_factor": 0.5})
    assert vaes.fingerprint(projection) != before


def test_vae_fingerprint_covers_the_whole_encoder_and_only_what_makes_latents():
    """A change anywhere in the encoder or quant_conv is another VAE (another latent cache); the decoder is not."""
    projection = vaes.open_projection("tiny", announce=False)
    vae, before = projection.vae, vaes.fingerprint(projection)
    with torch.no_grad():
        vae.decoder.conv_in.weight.add_(1.0)
        assert vaes.fingerprint(projection) == before                        # the decoder changes no latent
        for tensor in (vae.encoder.down_blocks[1].resnets[0].conv1.weight, vae.quant_conv.bias):
            tensor.view(-1)[0] += 1e-3                                        # one number in the middle
            assert vaes.fingerprint(projection) != before
            before = vaes.fingerprint(projection)


def test_autoencoder_kl_saved_locally_loads_by_path(tmp_path):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    projection = vaes.open_projection(str(tmp_path / "vae"))
    images = torch.rand(2, 3, 32, 32)
    latents = projection.encode(images)
    assert latents.shape == (2, 4, 4, 4) and projection.downsample == 8
    raw = vae.encode(images * 2 - 1).latent_dist.mode()
    assert torch.allclose(latents, raw * 0.5, atol=1e-5)       # the VAE's own scaling factor, not 0.18215
    assert projection.decode(latents).shape == (2, 3, 32, 32)


def test_autoencoder_tiny_saved_locally_loads_by_path(tmp_path):
    from diffusers import AutoencoderTiny
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8))
    vae.save_pretrained(tmp_path / "taesd")
    projection = vaes.open_projection(str(tmp_path / "taesd"))
    assert type(projection.vae).__name__ == "AutoencoderTiny"
    assert projection.encode(torch.rand(1, 3, 64, 64)).shape == (1, 4, 8, 8)
    assert projection.scaling_factor == 1.0 and projection.downsample == 8


@pytest.mark.parametrize("bad", ["/nonexistent/vae", "./missing-vae"])
def test_missing_local_vae_is_a_clear_error(bad):
    with pytest.raises(cli.UserError, match="no such directory"):
        vaes.open_projection(bad)


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(cli.UserError, match="--dataset synthetic --vae tiny"):
        vaes.open_projection("someone/not-cached-vae")


# ----------------------------------------------------------------------------- data

def test_geometry_check():
    assert datasets.check_geometry(64, 8, 2) == 8
    with pytest.raises(cli.UserError, match="not divisible"):
        datasets.check_geometry(60, 8, 2)
    with pytest.raises(cli.UserError, match="at least 2x2"):
        datasets.check_geometry(16, 8, 2)


def test_synthetic_images_are_deterministic_and_labelled():
    data = datasets.SyntheticShapes("train", image_size=32, train_size=20)
    image, label = data[3]
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, data[3][0]) and label == 3
    assert sorted(set(data.targets)) == list(range(10))
    val = datasets.SyntheticShapes("val", image_size=32, train_size=20)
    assert len(val) == 4 and not torch.equal(val[0][0], data[0][0])


def test_seeded_augmentation_is_reproducible():
    images = datasets.ImageDataset(datasets.SyntheticShapes("train", 32, 10), 32, augment="full")
    assert torch.equal(images[(1, 123)][0], images[(1, 123)][0])
    assert not all(torch.equal(images[(1, 123)][0], images[(1, seed)][0]) for seed in range(5))


def test_batch_indices_cover_each_epoch_and_split_across_ranks():
    first_epoch = torch.cat([sampling.batch_indices(step, 20, 4, seed=0) for step in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(20))
    assert not torch.equal(sampling.batch_indices(0, 20, 4, 0), sampling.batch_indices(5, 20, 4, 0))   # reshuffled
    ranks = torch.cat([sampling.batch_indices(3, 20, 4, 0, rank, 2) for rank in range(2)])
    assert torch.equal(ranks, sampling.batch_indices(3, 20, 4, 0))


def test_learning_rate_warmup_then_cosine():
    assert optim.learning_rate(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert optim.learning_rate(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert optim.learning_rate(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert optim.learning_rate(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = lmd.MaskedLatentViT("tiny", grid_size=8, patch_size=2, channels=4)
    decay, no_decay = optim.parameter_groups(model, 0.05)
    assert all(p.ndim == 2 for p in decay["params"])
    assert any(p is model.cls_token for p in no_decay["params"])
    assert math.isclose(decay["weight_decay"], 0.05) and no_decay["weight_decay"] == 0


# ----------------------------------------------------------------------------- checkpoints

def test_save_atomic_and_checkpoint_errors(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_atomic(dict(kind=checkpoints.CHECKPOINT_KIND, step=3), str(path))
    assert checkpoints.load_checkpoint(str(tmp_path))["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]        # no temporary file left behind
    with pytest.raises(cli.UserError, match="does not exist"):
        checkpoints.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "half.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(cli.UserError, match="unreadable"):
        checkpoints.load_checkpoint(str(tmp_path / "half.pt"))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(cli.UserError, match="not an LMD"):
        checkpoints.load_checkpoint(str(tmp_path / "foreign.pt"))
