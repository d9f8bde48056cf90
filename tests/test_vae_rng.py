"""Opening the VAE draws nothing from torch's global generator, so a run's random init (drawn after it in train.py)
is the same whatever the VAE: "random init" is exactly the weights that pretraining started from."""

import pytest
import torch

import lmd
from util import vaes


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    """A tiny AutoencoderKL and a tiny AutoencoderTiny, each written by diffusers' save_pretrained."""
    from diffusers import AutoencoderTiny
    root = tmp_path_factory.mktemp("vaes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vaes.tiny_vae().save_pretrained(root / "kl")
        blocks = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                      num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)
        AutoencoderTiny(**blocks).save_pretrained(root / "taesd")
    return dict(kl=str(root / "kl"), taesd=str(root / "taesd"), tiny="tiny", none="none")


@pytest.mark.parametrize("kind", ["kl", "taesd", "tiny", "none"])
def test_opening_the_vae_leaves_the_global_generator_alone(vae_dirs, kind):
    torch.manual_seed(0)   # as train.py does, just before it opens the VAE
    before = torch.get_rng_state()
    projection = vaes.open_projection(vae_dirs[kind], "cpu", announce=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert projection.is_pixels == (kind == "none")
