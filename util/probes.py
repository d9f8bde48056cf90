"""Probes of a frozen encoder: what pretraining learned, always measured beside floors that mean something.

Every probe reads the encoder's tokens after its final norm, every token seen (no mask), in one of two READINGS:
the class token (MAE's linear probe) or the mean of the patch tokens (MAE's global_pool). A table uses one reading
for every row. The encoder is frozen, so its features are computed once per image (and per flip) and the probes
work on those:
- kNN (DINO): L2-normalised features, cosine similarity to every training feature, the k = 20 nearest vote with
  weights exp(similarity / 0.07). No training; deterministic.
- linear probe (MAE): BatchNorm without affine parameters + a linear layer, SGD with momentum, warm-up then cosine,
  90 epochs. On cached features an epoch is a few matrix products, so the probe converges in seconds.
The floors (finetune.py measures them in the same run): the LMD network of the same size and seed at random init,
whatever the checkpoint's objective (an adaLN-Zero network starts as the identity: its own init gives every image
the same class token, a floor at chance), and the raw pixels, flattened (split_pixels). A diffusion encoder (the
lab's) is read at a model time, through its record's probe_inputs: 0, clean, and 1, the lowest noise level of
training.
And what finetune.py measures of any classifier: its top-1 accuracy, its inference throughput.
"""

import math

import torch
import torch.nn.functional as F

from util import devices
from util import vaes
from util.optim import learning_rate

FLOOR_NETWORK = "lmd"        # every objective's floor: the LMD network of the same size and seed at random init
READINGS = ("cls", "mean")   # the class token (MAE's linear probe); the mean patch token (MAE's global_pool)


def lowest_trained_time(config, objective):
    """The model time of the least noisy input a pretraining config's encoder was trained on (its record's
    lowest_time) -> None (LMD: no time), 0 (clean: UMD's clean half, when it has one) or 1 (noise level 0: ddpm and
    MaskDM, which are only ever told t + 1 >= 1)."""
    return objective.lowest_time(config)


def probe_features(encoder, latents, reading="cls", time=None):
    """latents [B, C, H, W] -> features [B, width] from the encoder's tokens after its final norm, every token seen:
    'cls' the class token, 'mean' the mean of the patch tokens. time [B]: the model time a diffusion encoder is
    told (None: an LMD encoder, which has none)."""
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}; choose one of {', '.join(READINGS)}")
    tokens = encoder.embed(latents)                                                        # [B, L, width]
    encoded = encoder.encode_tokens(tokens) if time is None else encoder.encode_tokens(tokens, time)
    return encoded[:, 0] if reading == "cls" else encoded[:, 1:].mean(dim=1)


@torch.no_grad()
def encoder_features(classifier, batches, reading="cls", time=None, indices=None, seed=0, probe_inputs=None):
    """Probe features of every batch: batches yields (inputs [B, C, h, w], labels [B]) -> features [N, width] on
    the CPU (float32), labels [N]. The encoder is classifier.encoder (an lmd.LatentClassifier's), read at model
    `time` through its objective's probe_inputs (a diffusion encoder's; time >= 1 needs each batch's image indices,
    for the noise). time None: the latents as they are (an LMD encoder has no time input)."""
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
    """This process's rows (every world_size-th image of `count`, from its rank) -> all of them, in index order:
    features [count, ...], labels [count]."""
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
    """The raw-pixel baseline's features: the split's images [3, S, S] in [0, 1] at the run's image size (the
    images its latents encode), flattened -> features [N, len(flips), 3 * S * S] (a view per flip value), labels
    [N]; each process loads every world_size-th image, then gathered."""
    mine = torch.arange(dist.rank, len(data), dist.world_size)
    loader = torch.utils.data.DataLoader(data.images, batch_sampler=[c.tolist() for c in mine.split(256)],
                                         num_workers=data.workers, worker_init_fn=devices.ignore_stop_signals)
    images, labels = (torch.cat(parts) for parts in zip(*loader))
    views = torch.stack([(images.flip(-1) if flip else images).flatten(1) for flip in flips], dim=1)
    return gather_split(views.float(), labels, len(data), dist)


@torch.no_grad()
def knn_top1(train_features, train_labels, val_features, val_labels, k=20, temperature=0.07, device=None,
             chunk=1024, train_chunk=65536):
    """Weighted k-nearest-neighbour top-1 (DINO's protocol) -> fraction in [0, 1].

    train_features [N, D], val_features [M, D] (on any device); each validation image's k most similar training
    images (cosine similarity) vote for their class with weight exp(similarity / temperature). Computed on `device`
    (default: where the features are): the normalised training features move there once (N x D floats), the
    similarities [chunk, train_chunk] are made a block at a time and only each block's k best are kept, so memory
    stays bounded (on ImageNet one [1024, 1.28M] block would be 5 GB). With N <= train_chunk there is one block,
    and on the CPU the result is exactly the unblocked computation's.
    """
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
    """The linear probe's head: BatchNorm without affine parameters + a linear layer (weights N(0, 0.01), bias 0),
    a function of `seed` alone: drawn inside a forked RNG, whatever the caller did with the global one."""
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

    train_features [N, F, D]: F views per image (F = 2 with the mirror image, 1 without); each epoch draws one
    view per image, which is the flip augmentation. val_features [M, D]. SGD with momentum 0.9, no weight decay,
    lr = base_lr * batch_size / 256. The head's initialisation, the data order and the views all come from `seed`
    alone (not from the global RNG), so the probes of a pretrained and of a random-init encoder start from the same
    head. Computed on `device` (default: where the features are): the features stay where they are and each batch
    (and `chunk` validation rows at a time) moves there, so host RAM holds them, not the accelerator.
    """
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
    """The encoders a knn or linprobe run measures, for a pretraining config -> {name: (init, network, time)}:
    init 'pretrained' or 'scratch' (random), network the objective whose network is built (None: the checkpoint's),
    time the model time it is read at (the record's probe_inputs; None: an LMD network, which has none).

    - the pretrained encoder: an LMD one as it is; a diffusion one at model time 0 (clean) and at 1 (noise level 0)
    - 'random_init': the LMD network of the same size and seed at random init, the floor of every objective
    - 'own_init': a diffusion objective's own random init, where it differs (adaLN-Zero: at chance for 'cls')
    """
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

    train: (features [N, F, D], labels [N]); val: (features [M, F', D], labels [M]), its first view read. 'knn'
    reads the training features' first view too, and trains nothing (an empty history).
    """
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
    """Inference images/second on images [B, 3, S, S]: (VAE encoding counted, latents given). The first is what a
    user of the classifier pays per raw image; the second is the classifier alone."""
    classifier.eval()
    images = images.to(device)
    encode = lambda: vaes.encode_images(projection, images, autocast, chunk_size)   # noqa: E731
    latents = encode()
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        return (devices.images_per_second(lambda: classifier(encode()), len(images), device),
                devices.images_per_second(lambda: classifier(latents), len(images), device))
