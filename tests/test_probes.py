"""util/probes.py: the linear probe's head is a function of its seed alone; the kNN blocks and the chunked
validation of the linear probe give exactly the unchunked results."""

import torch

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
