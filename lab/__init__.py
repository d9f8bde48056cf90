"""The lab: LMD's relatives, sampling and the generation judge, and the research instruments. It imports the core
(lmd.py, train.py, finetune.py, util/); the core never imports it, so deleting this folder leaves LMD whole.

The relatives, masked diffusion models grown from lmd.py's parts, one file per method, each ending with its record
(util/objective.py says what a record holds):
    diffusion     what the relatives share: the noise schedule (diffusers' DDPMScheduler), time conditioning
                  (adaLN-Zero), the time-conditioned ViT (lmd.MaskedLatentViT with adaLN-Zero blocks), the DDIM sampler
    ddpm          plain diffusion: the masked ViT with no mask, predicting the noise
    maskdm        MaskDM stage 1: block masks, the noise of the visible tokens only; stage 2 is ddpm fine-tuning
                  (--objective ddpm --init RUN)
    umd           UMD: a clean half (MAE: time 0, no noise, x0 on the masked tokens) and a noised half (eps on the
                  visible tokens, x0 on the masked ones) of every batch, one model
They train through train.py's loop and are probed by finetune.py's, given the lab's OBJECTIVES:
    python -m lab.train --objective ddpm ...          (train.py's flags)
    python -m lab.finetune --checkpoint RUN ...       (finetune.py's flags)
Sampling and judging: lab/sample.py, lab/judge.py, lab/pictures.py. Instruments: race (LMD against pixel MAE over
wall-clock time), family (the relatives side by side), curve (samples against training time), ablation (the four
schedulers), bench (throughput). Their pages are lab/docs/.

Any other module here that defines OBJECTIVE is found and registered too: a fork adds an objective in one file.
Every model has train.py's training call, model(latents, mask_ratio, normalize_targets, generator=...) -> (loss,
predictions, mask), and draws its times, noise and masks from the step's generator, so that a resumed run is
bit-identical to an uninterrupted one.
"""

import importlib
import pkgutil

import train as core_train   # not `train`: lab.train is this package's own module
from lab import ddpm, maskdm, umd
from util.objective import Objective, of

OBJECTIVES = dict(core_train.OBJECTIVES)   # name -> Objective, in the order of --objective's choices: LMD first


def register(objective):
    """Make `objective` (an Objective) known to the lab's scripts and instruments. -> the objective."""
    OBJECTIVES[objective.name] = objective
    return objective


for module in (ddpm, maskdm, umd):
    register(module.OBJECTIVE)
NOT_OBJECTIVES = {"diffusion", "pictures", "judge", "sample", "train", "finetune", "race", "family", "curve",
                  "ablation", "bench", "make_figures"}
for info in pkgutil.iter_modules(__path__):   # a fork's own objective: lab/NAME.py with OBJECTIVE = ...
    if info.name not in NOT_OBJECTIVES | set(OBJECTIVES) and not info.ispkg:
        found = getattr(importlib.import_module(f"{__name__}.{info.name}"), "OBJECTIVE", None)
        if isinstance(found, Objective) and found.name not in OBJECTIVES:
            register(found)


def get(name):
    """The record of objective `name`."""
    return of({"objective": name}, OBJECTIVES)


def optimizer_step(model, optimizer, latents, schedule, progress, lr, generator, normalize_targets=False,
                   autocast=None):
    """One step as train.py's loop takes it (ratio, forward, loss, backward, AdamW), for the instruments that race or
    time steps outside that loop (race.py, family.py's step costs) -> (loss [], detached; the mask ratio)."""
    import torch
    mask_ratio = schedule(progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(latents.device.type, dtype=autocast, enabled=autocast is not None):
        loss, _, _ = model(latents, mask_ratio, normalize_targets, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), mask_ratio
