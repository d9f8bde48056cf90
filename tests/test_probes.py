"""util/probes.py: the linear probe's head is a function of its seed alone; the kNN blocks and the chunked
validation of the linear probe give exactly the unchunked results; the two readings, the floors (the LMD network's
random init, the raw pixels) of an LMD run. (A diffusion encoder's model times: lab/tests.)"""

import pytest
import torch

import lmd
import train
from util import devices
from util import probes


def features(seed, count=300, width=16, views=1):
    """Features that carry their class (10 classes) in a few directions, plus noise -> features, labels."""
    centres = torch.randn(10, width, generator=torch.Generator().manual_seed(0))   # the same for every split
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    noise = torch.randn(count, views, width, generator=generator)
    return centres[labels].unsqueeze(1) + 1.5 * noise, labels


def test_probe_head_depends_on_its_seed_alone():
    torch.manual_seed(1)
    first = probes.probe_head(16, 10, seed=3)
    torch.manual_seed(2)
    torch.rand(1000)                      # whatever ran before: other models, other probes
    second = probes.probe_head(16, 10, seed=3)
    other = probes.probe_head(16, 10, seed=4)
    assert torch.equal(first[1].weight, second[1].weight) and not torch.equal(first[1].weight, other[1].weight)
    assert 0.005 < first[1].weight.std().item() < 0.02 and first[1].bias.abs().max().item() == 0.0
    # the global RNG is left as it was: drawing the head consumed none of it
    torch.manual_seed(5)
    probes.probe_head(16, 10, seed=3)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_linear_probe_is_a_function_of_its_seed():
    (train, train_labels), (val, val_labels) = features(0, views=2), features(1)
    histories = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        histories.append(probes.linear_probe(train, train_labels, val[:, 0], val_labels, epochs=2,
                                             warmup_epochs=1, batch_size=64, seed=7))
    assert histories[0] == histories[1]
    # validation in chunks of 7 rows gives exactly the one-chunk result
    chunked = probes.linear_probe(train, train_labels, val[:, 0], val_labels, epochs=2, warmup_epochs=1,
                                  batch_size=64, seed=7, chunk=7, device="cpu")
    assert chunked == histories[0] and 0.5 < chunked[-1]["top1"] <= 1.0


def test_knn_in_blocks_equals_the_unblocked_knn():
    (train, train_labels), (val, val_labels) = features(2), features(3, count=120)
    train, val = train[:, 0], val[:, 0]
    whole = probes.knn_top1(train, train_labels, val, val_labels)
    assert 0.4 < whole < 1.0
    for chunk, train_chunk in ((1024, 64), (17, 25), (5, 300)):
        assert probes.knn_top1(train, train_labels, val, val_labels, chunk=chunk, train_chunk=train_chunk,
                               device="cpu") == whole


def tiny_encoder(seed=0):
    """A random-init tiny LMD encoder on 8 x 8 x 4 latents (16 tokens of 2 x 2 x 4)."""
    torch.manual_seed(seed)
    return lmd.LatentClassifier(lmd.MaskedLatentViT("tiny", 8, 2, 4), 10, linear_probe=True).eval()


@torch.no_grad()
def test_both_readings_have_the_encoders_width_and_differ():
    encoder, latents = tiny_encoder().encoder, torch.randn(5, 4, 8, 8)
    cls, mean = (probes.probe_features(encoder, latents, reading) for reading in probes.READINGS)
    width = encoder.norm.normalized_shape[0]
    assert cls.shape == mean.shape == (5, width) and not torch.allclose(cls, mean, atol=1e-3)
    encoded = encoder.encode_tokens(encoder.embed(latents))
    assert torch.equal(cls, encoded[:, 0]) and torch.allclose(mean, encoded[:, 1:].mean(dim=1))
    with pytest.raises(ValueError, match="unknown reading"):
        probes.probe_features(encoder, latents, "pooled")


class Images(torch.utils.data.Dataset):
    """A split_pixels input: images [N, 3, S, S] in [0, 1] and labels [N], as latent_cache.Split.images gives."""

    def __init__(self, images, labels):
        self.images, self.labels, self.workers = self, labels, 0
        self.data = images

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.data[index], self.labels[index]


def test_raw_pixels_are_the_flattened_images_and_probe_separable_data_perfectly():
    """Class 0 has ink on the left half, class 1 on the right: raw-pixel kNN and linear probe both get 1.0."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    images = 0.3 * torch.rand(40, 3, 4, 4, generator=generator)
    images[labels == 0, :, :, :2] += 0.7
    images[labels == 1, :, :, 2:] += 0.7
    dist = devices.Distributed("cpu")
    (train, train_labels), (val, val_labels) = (probes.split_pixels(Images(images[part], labels[part]), dist, (0, 1))
                                                for part in (slice(0, 30), slice(30, 40)))
    assert train.shape == (30, 2, 48) and torch.equal(train_labels, labels[:30])
    assert torch.equal(train[:, 0], images[:30].flatten(1))
    assert torch.equal(train[:, 1], images[:30].flip(-1).flatten(1))   # the mirror view
    knn, _ = probes.probe("knn", (train, train_labels), (val, val_labels))
    linear, history = probes.probe("linprobe", (train[:, :1], train_labels), (val, val_labels), epochs=30,
                                   batch_size=10, warmup_epochs=3)
    assert knn == dict(best=1.0, final=1.0) and linear["final"] == 1.0 and len(history) == 30


def test_an_lmd_run_is_probed_as_it_is_beside_the_random_init_lmd_network():
    plan = probes.probe_plan({"objective": "lmd"}, train.LMD)
    assert plan == {"pretrained": ("pretrained", None, None), "random_init": ("scratch", "lmd", None)}
    summary = lambda top1: (dict(best=top1, final=top1), [])   # noqa: E731
    fields = probes.result_fields({"pretrained": summary(0.9), "random_init": summary(0.5)}, {}, train.LMD)
    assert fields["top1"]["final"] == 0.9 and fields["random_init_top1"]["final"] == 0.5
    assert fields["probe_time"] is None
    assert fields["scratch_top1"] == fields["random_init_top1"]   # the older name, for older readers
