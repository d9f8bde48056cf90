"""Optimiser settings: which parameters skip weight decay, the learning-rate schedule, layer-wise lr decay."""

import math


def skips_weight_decay(name, parameter):
    """Biases, norms (all 1-D) and the class and mask tokens are not decayed, as in MAE."""
    return parameter.ndim <= 1 or name.endswith(("cls_token", "mask_token"))


def parameter_groups(model, weight_decay):
    """AdamW groups: weight decay on the matrices only (see skips_weight_decay)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if skips_weight_decay(name, parameter) else decay).append(parameter)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def learning_rate(step, total_steps, warmup_steps, peak_lr, min_lr=0.0):
    """Per-step linear warm-up to `peak_lr`, then a half-cycle cosine down to `min_lr`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def layer_decay_groups(classifier, weight_decay, layer_decay):
    """Optimiser groups of a LatentClassifier with layer-wise lr decay (`lr_scale`), frozen parameters skipped. The
    patch embedding and class token are layer 0, block k layer k + 1, the final norm and head layer n + 1 (n blocks);
    layer i trains at lr * layer_decay ** (n + 1 - i): the early, most general layers move least."""
    top = len(classifier.encoder.blocks) + 1
    groups = {}
    for name, parameter in classifier.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = 0 if name.startswith(("encoder.patch_embed", "encoder.cls_token")) else top
        no_decay = skips_weight_decay(name, parameter)
        group = groups.setdefault((layer, no_decay), dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                                                          lr_scale=layer_decay ** (top - layer)))
        group["params"].append(parameter)
    return list(groups.values())
