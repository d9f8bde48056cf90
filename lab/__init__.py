"""The objectives train.py can pretrain with: LMD and its relatives, masked diffusion models built from lmd.py's parts,
one file per method, each ending with its record (objective.py says what a record holds).

    objective     the record of an objective, and its flags
    lmd_objective LMD's record (the method itself is lmd.py): masking, no noise
    diffusion     what the relatives share: the noise schedule (diffusers' DDPMScheduler), time conditioning
                  (adaLN-Zero), the time-conditioned ViT (lmd.MaskedLatentViT with adaLN-Zero blocks), the DDIM sampler
    ddpm          plain diffusion: the masked ViT with no mask, predicting the noise (train.py --objective ddpm)
    maskdm        MaskDM stage 1: block masks, the noise of the visible tokens only (train.py --objective maskdm);
                  stage 2 is ddpm fine-tuning (train.py --objective ddpm --init RUN)
    umd           UMD: a clean half (MAE: time 0, no noise, x0 on the masked tokens) and a noised half (eps on the
                  visible tokens, x0 on the masked ones) of every batch, one model (train.py --objective umd)

Any other module here that defines OBJECTIVE is found and registered too: a fork adds an objective in one file.
Every model has train.py's training call, model(latents, mask_ratio, normalize_targets, generator=...) -> (loss,
predictions, mask), and draws its times, noise and masks from the step's generator, so that a resumed run is
bit-identical to an uninterrupted one.
"""

import importlib
import pkgutil

from relatives import ddpm, diffusion, lmd_objective, maskdm, umd  # noqa: F401  (diffusion: for its readers)
from relatives.objective import Objective, UnknownObjective  # noqa: F401

REGISTRY = {}   # name -> Objective, in the order of --objective's choices


def register(objective):
    """Make `objective` (an Objective) known to train.py, finetune.py, sample.py and tools/. -> the objective."""
    REGISTRY[objective.name] = objective
    return objective


for module in (lmd_objective, ddpm, maskdm, umd):
    register(module.OBJECTIVE)
for info in pkgutil.iter_modules(__path__):   # a fork's own objective: relatives/NAME.py with OBJECTIVE = ...
    found = getattr(importlib.import_module(f"{__name__}.{info.name}"), "OBJECTIVE", None)
    if isinstance(found, Objective) and found.name not in REGISTRY:
        register(found)


def names():
    """The registered objectives' names, LMD first."""
    return tuple(REGISTRY)


def get(name):
    """The record of objective `name`."""
    if name not in REGISTRY:
        raise UnknownObjective(f"unknown objective {name!r}; choose one of {', '.join(REGISTRY)} (a new one: a module "
                               "in relatives/ that defines OBJECTIVE, see docs/forking.md)")
    return REGISTRY[name]


def of(config):
    """The record of a run's config (runs from before the relatives existed are LMD runs)."""
    return get(config.get("objective", "lmd"))


def build_model(config, grid, channels):
    """The network of a run config (objective, model, patch_size and the objective's own keys) on a grid x grid x
    channels latent."""
    return of(config).build(config, grid, channels)


def own_flags():
    """{config key: [(objective name, Flag), ...]}: every objective's own train.py flags, in registry order."""
    flags = {}
    for objective in REGISTRY.values():
        for key, own in objective.flags.items():
            flags.setdefault(key, []).append((objective.name, own))
    return flags


def flags_not_read(name):
    """The flags (config keys) that objective `name` ignores: given on the command line, they are an error."""
    return set(own_flags()) - set(get(name).flags)
