"""Probes of a frozen encoder: what pretraining learned, always measured beside floors that mean something.

Features: the encoder's tokens after its final norm, no mask, in one of two READINGS (class token or mean patch
token), once per image and flip; on them kNN (DINO's) and MAE's linear probe (90 epochs: seconds on cached features).
Floors, in the same run: the LMD network of the same size and seed at random init, whatever the objective (an
adaLN-Zero network's own init gives every image one class token), and raw pixels. A (lab) diffusion encoder is read
at model time 0 (clean) and 1 (the lowest noise level of training). Also any classifier's top-1 and throughput."""

import math

import torch
import torch.nn.functional as F

from util import devices, vaes
from util.optim import learning_rate

FLOOR_NETWORK = "lmd"        # every objective's floor: the LMD network of the same size and seed at random init
READINGS = ("cls", "mean")   # the class token (MAE's linear probe); the mean patch token (MAE's global_pool)


def lowest_trained_time(config, objective):
    """The model time of the least noisy input a config's encoder was trained on -> None (LMD: no time), 0 (clean:
    UMD's clean half) or 1 (noise level 0: ddpm and MaskDM, only ever told t + 1 >= 1)."""
    return objective.lowest_time(config)


def probe_features(encoder, latents, reading="cls", time=None):
    """latents [B, C, H, W] -> features [B, width] after the final norm, no mask: 'cls' the class token, 'mean' the
    mean patch token. time [B]: the model time a diffusion encoder is told (None: an LMD encoder, which has none)."""
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}; choose one of {', '.join(READINGS)}")
    tokens = encoder.embed(latents)                                                        # [B, L, width]
    encoded = encoder.encode_tokens(tokens) if time is None else encoder.encode_tokens(tokens, time)
    return encoded[:, 0] if reading == "cls" else encoded[:, 1:].mean(dim=1)


@torch.no_grad()
def encoder_features(classifier, batches, reading="cls", time=None, indices=None, seed=0, probe_inputs=None):
    """batches of (inputs [B, C, h, w], labels [B]) -> classifier.encoder's features [N, width] float32 CPU, labels
    [N]. `time`: read through probe_inputs (time >= 1 needs each batch's `indices`, for the noise); None: as is."""
    classifier.eval()
    features, labels = [], []
    for position, (inputs, label) in enumerate(batches):
        times = None
        if time is not None:
            inputs, times = probe_inputs(inputs, time, None if indices is None else indices[position], seed)
        features.append(probe_features(classifier.encoder, inputs, reading, times).float().cpu())
        labels.append(label.cpu())
    return torch.cat(features), torch.cat(labels)


def gather_split(features, labels, count, dist):
    """This rank's rows (every world_size-th of `count`) -> all, in index order: features [count, ...], labels."""
    if not dist.enabled:
        return features, labels
    size = (count + dist.world_size - 1) // dist.world_size   # equal pieces for all_gather (padded with the last row)
    pieces = [torch.cat([t, t[-1:].expand(size - len(t), *t.shape[1:])]) for t in (features, labels)]
    gathered = [dist.all_gather(piece) for piece in pieces]
    order = torch.arange(size * dist.world_size).reshape(dist.world_size, size).T.reshape(-1)
    return tuple(g[order][:count] for g in gathered)


def split_features(classifier, data, dist, flips, reading="cls", time=None, seed=0, probe_inputs=None):
    """Probe features of a whole split (a latent_cache.Split) at model `time`, each process computing every
    world_size-th image, then gathered: -> features [N, len(flips), width] (one view per flip value), labels [N]."""
    mine = torch.arange(dist.rank, len(data), dist.world_size)
    chunks = mine.split(256)
    views = [encoder_features(classifier, data.batches(chunks, [torch.full((len(c),), flip) for c in chunks]),
                              reading, time, chunks, seed, probe_inputs) for flip in flips]
    return gather_split(torch.stack([v[0] for v in views], dim=1), views[0][1], len(data), dist)


def split_pixels(data, dist, flips):
    """The raw-pixel baseline: the split's images [3, S, S] in [0, 1], flattened -> features [N, len(flips), 3*S*S]
    (a view per flip value), labels [N]; each process loads every world_size-th image, then gathered."""
    mine = torch.arange(dist.rank, len(data), dist.world_size)
    loader = torch.utils.data.DataLoader(data.images, batch_sampler=[c.tolist() for c in mine.split(256)],
                                         num_workers=data.workers, worker_init_fn=devices.ignore_stop_signals)
    images, labels = (torch.cat(parts) for parts in zip(*loader))
    views = torch.stack([(images.flip(-1) if flip else images).flatten(1) for flip in flips], dim=1)
    return gather_split(views.float(), labels, len(data), dist)


@torch.no_grad()
def knn_top1(train_features, train_labels, val_features, val_labels, k=20, temperature=0.07, device=None,
             chunk=1024, train_chunk=65536):
    """Weighted k-nearest-neighbour top-1 (DINO's protocol) -> fraction in [0, 1]: each of val_features [M, D]'s k
    most similar (cosine) of train_features [N, D] vote with weight exp(similarity / temperature). On `device`
    (default: the features'), a [chunk, train_chunk] block at a time, keeping each block's k best: memory stays
    bounded (one [1024, 1.28M] block would be 5 GB); with N <= train_chunk, exactly the unblocked result."""
    device = torch.device(device) if device is not None else train_features.device
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    train = F.normalize(train_features.to(device, torch.float32), dim=1)
    train_labels, k = train_labels.to(device), min(k, len(train_features))
    correct = 0
    for start in range(0, len(val_features), chunk):
        query = F.normalize(val_features[start:start + chunk].to(device, torch.float32), dim=1)
        similarity, index = None, None
        for first in range(0, len(train), train_chunk):
            block_similarity, block_index = (query @ train[first:first + train_chunk].T).topk(
                min(k, len(train) - first), dim=1)                                        # [m, k]
            block_index += first
            if similarity is not None:   # merge with the best of the earlier blocks
                block_similarity, order = torch.cat([similarity, block_similarity], 1).topk(
                    min(k, similarity.shape[1] + block_similarity.shape[1]), dim=1)
                block_index = torch.cat([index, block_index], 1).gather(1, order)
            similarity, index = block_similarity, block_index
        votes = torch.zeros(len(query), num_classes, device=device).scatter_add_(1, train_labels[index],
                                                                                 (similarity / temperature).exp())
        correct += (votes.argmax(dim=1).cpu() == val_labels[start:start + chunk].cpu()).sum().item()
    return correct / len(val_features)


def probe_head(width, num_classes, seed):
    """The linear probe's head, BatchNorm (no affine) + Linear (N(0, 0.01), bias 0), from `seed` alone (forked RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Sequential(torch.nn.BatchNorm1d(width, affine=False, eps=1e-6),
                                   torch.nn.Linear(width, num_classes))
        torch.nn.init.normal_(head[1].weight, std=0.01)
        torch.nn.init.zeros_(head[1].bias)
    return head


def linear_probe(train_features, train_labels, val_features, val_labels, epochs=90, batch_size=256, base_lr=0.5,
                 warmup_epochs=10, seed=0, num_classes=None, device=None, chunk=65536):
    """MAE's linear probe on cached features -> history [dict(epoch, top1)], the top-1 after each epoch.
    train_features [N, F, D]: F views per image (2 with the mirror image), one drawn per epoch; val_features [M, D].
    SGD, momentum 0.9, no weight decay, lr = base_lr * batch_size / 256. Head, order and views come from `seed` alone,
    so every encoder's probe starts from the same head. The features stay where they are (host RAM, not the
    accelerator): each batch, and `chunk` validation rows at a time, moves to `device` (default: the features')."""
    device = torch.device(device) if device is not None else train_features.device
    generator = torch.Generator().manual_seed(seed)
    num_items, num_views, width = train_features.shape
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    train_labels = train_labels.to(train_features.device)
    head = probe_head(width, num_classes, seed).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.0, momentum=0.9)
    batch_size = min(batch_size, num_items)
    steps_per_epoch = num_items // batch_size
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    peak_lr, history = base_lr * batch_size / 256, []
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(num_items, generator=generator).to(train_features.device)
        views = torch.randint(0, num_views, (num_items,), generator=generator).to(train_features.device)
        for position in range(steps_per_epoch):
            step = epoch * steps_per_epoch + position
            optimizer.param_groups[0]["lr"] = learning_rate(step, total, min(warmup, total - 1), peak_lr)
            chosen = order[position * batch_size:(position + 1) * batch_size]
            inputs, targets = train_features[chosen, views[chosen]].to(device), train_labels[chosen].to(device)
            loss = F.cross_entropy(head(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            correct = sum((head(features.to(device)).argmax(dim=1).cpu() == labels.cpu()).sum().item()
                          for features, labels in zip(val_features.split(chunk), val_labels.split(chunk)))
        history.append(dict(epoch=epoch + 1, top1=correct / len(val_features)))
    return history


def summarise(history):
    """top-1 history -> dict(best, final, best_epoch). Reports use `final`: `best` is picked on val."""
    best = max(range(len(history)), key=lambda i: history[i]["top1"])
    return dict(best=history[best]["top1"], final=history[-1]["top1"], best_epoch=history[best]["epoch"])


def probe_plan(config, objective):
    """The encoders a knn or linprobe run measures -> {name: (init 'pretrained' or 'scratch', the objective whose
    network is built (None: the checkpoint's), model time (None: LMD's))}: the pretrained one (diffusion: at time 0
    and 1), 'random_init' (LMD's, every objective's floor), a diffusion one's 'own_init' (adaLN-Zero: chance at cls)."""
    lowest = lowest_trained_time(config, objective)
    if lowest is None:
        return {"pretrained": ("pretrained", None, None), "random_init": ("scratch", FLOOR_NETWORK, None)}
    return {"time0": ("pretrained", None, 0), "time1": ("pretrained", None, 1),
            "random_init": ("scratch", FLOOR_NETWORK, None), "own_init": ("scratch", None, lowest)}


def result_fields(measured, config, objective):
    """{name: (summary, history)} of probe_plan's names and 'raw_pixels' -> the results.json fields: `top1` and
    `history` (the pretrained encoder at its lowest trained time, `probe_time`), then `<name>_top1` and
    `<name>_history` for the rest; `scratch_top1`, the floor's older name, kept for older readers."""
    probe_time = lowest_trained_time(config, objective)
    headline = "pretrained" if probe_time is None else f"time{probe_time}"
    fields = dict(top1=measured[headline][0], history=measured[headline][1], probe_time=probe_time)
    for name, (summary, history) in measured.items():
        if name != "pretrained":
            fields.update({f"{name}_top1": summary, f"{name}_history": history})
    if "random_init_top1" in fields:
        fields["scratch_top1"] = fields["random_init_top1"]
    return fields


def probe(mode, train, val, epochs=90, batch_size=256, base_lr=0.5, warmup_epochs=10, seed=0, device=None):
    """One probe on cached features -> (summary: dict(best, final[, best_epoch]), history: [dict(epoch, top1)]).
    train: (features [N, F, D], labels [N]); val: (features [M, F', D], labels [M]), its first view read, as is
    train's for 'knn' (which trains nothing: an empty history)."""
    (train_features, train_labels), (val_features, val_labels) = train, val
    if mode == "knn":
        top1 = knn_top1(train_features[:, 0], train_labels, val_features[:, 0], val_labels, device=device)
        return dict(best=top1, final=top1), []
    history = linear_probe(train_features, train_labels, val_features[:, 0], val_labels, epochs, batch_size,
                           base_lr, warmup_epochs, seed, device=device)
    return summarise(history), history


def standard_error(top1, count):
    """The binomial standard error of a top-1 measured on `count` images."""
    return math.sqrt(max(top1 * (1 - top1), 1e-12) / count)


@torch.no_grad()
def top1_accuracy(classifier, data, batch_size, dist, autocast):
    """Top-1 accuracy on un-mirrored images, each process taking every world_size-th one -> fraction in [0, 1]."""
    classifier.eval()
    chunks = torch.arange(dist.rank, len(data), dist.world_size).split(batch_size)
    correct = 0
    for inputs, labels in data.batches(chunks, [torch.zeros(len(c), dtype=torch.long) for c in chunks]):
        with torch.autocast(dist.device.type, dtype=autocast, enabled=autocast is not None):
            correct += (classifier(inputs).argmax(dim=-1) == labels).sum().item()
    if dist.enabled:
        correct = dist.all_gather(torch.tensor([correct])).sum().item()
    return correct / len(data)


@torch.no_grad()
def inference_throughput(classifier, projection, images, device, autocast, chunk_size=None):
    """Inference images/second on images [B, 3, S, S]: (VAE encoding counted, as a user pays; latents given)."""
    classifier.eval()
    images = images.to(device)
    encode = lambda: vaes.encode_images(projection, images, autocast, chunk_size)   # noqa: E731
    latents = encode()
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        return (devices.images_per_second(lambda: classifier(encode()), len(images), device),
                devices.images_per_second(lambda: classifier(latents), len(images), device))
