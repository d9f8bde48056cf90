"""
What an objective is, in one record: everything train.py, finetune.py, sample.py, util/ and tools/ need to know
about a way of pretraining the masked latent ViT. They ask the record and never compare an objective's name, so a
new objective is one new file in relatives/ that ends with `OBJECTIVE = Objective(...)` (docs/forking.md).
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

import lmd


@dataclass
class Flag:
    """One of an objective's own train.py flags: its config key's default, its help, and argparse's extras
    (type=float, choices=..., action=...). `--mask-ratio` is the flag of the key `mask_ratio`."""
    default: object
    help: str
    argparse: dict = field(default_factory=dict)


def flag(default, help, **argparse):
    """Flag(default, help, argparse={...}), written as flag(0.75, "...", type=float)."""
    return Flag(default, help, argparse)


def fixed_ratio(config):
    """The schedule of an objective that masks a fixed share of tokens all along: its --mask-ratio."""
    ratio = config["mask_ratio"]
    return lambda progress: ratio


@dataclass
class Objective:
    """An objective of train.py --objective NAME.

    name             the --objective value, and config["objective"] of its runs
    summary          a few words for --objective's help: what it trains
    build            (config, grid, channels) -> the network, an nn.Module with train.py's training call
                     model(latents, mask_ratio, normalize_targets, generator=...) -> (loss, predictions, mask)
    schedule         config -> the mask ratio as a function of training progress in [0, 1]; it raises
                     lmd.ConfigError for a setting that cannot work (a ratio outside what the model accepts)
    flags            its own train.py flags {config key: Flag}; the other objectives' flags are refused with it
    defaults         its values for train.py's shared flags where they differ from LMD's (batch size, lr, ...)
    held_out_ratio   config -> the ratio of the held-out loss (None: the schedule's ratio at the end of training)
    loss_name        what its loss is, in words ("masked-token loss", "eps loss")
    held_out_key     the held-out loss's name in summary.json and eval.json
    sampler          how sample.py samples it: dict(sampling_steps, eta) of DDIM; None: it cannot generate
    grid             what its grid pictures show: "reconstructions" (of masked validation images) or "samples"
    describe         config -> its masking and noise in a few words, for the line a run starts with
    decoder_transfers  whether --init from one of its runs takes the decoder too (LMD's fills in masked tokens:
                     no use to a denoiser, so only its encoder is taken)
    lowest_time      config -> the model time of the least noisy input its encoder was trained on: None (no time
                     input), 0 (clean) or 1 (noise level 0); the probes read the encoder there
    """
    name: str
    summary: str
    build: Callable
    schedule: Callable
    flags: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    held_out_ratio: Optional[Callable] = None
    loss_name: str = "masked-token loss"
    held_out_key: str = "held_out_loss"
    sampler: Optional[dict] = None
    grid: str = "reconstructions"
    describe: Callable = lambda config: ""
    decoder_transfers: bool = True
    lowest_time: Callable = lambda config: None

    def mask_ratio_held_out(self, config):
        """The ratio the held-out loss is measured at (runs of one objective compare at it)."""
        return self.held_out_ratio(config) if self.held_out_ratio else self.schedule(config)(1.0)

    def run_defaults(self):
        """{config key: value}: its shared-flag defaults and its own flags' defaults."""
        return {**self.defaults, **{key: own.default for key, own in self.flags.items()}}


class UnknownObjective(lmd.ConfigError):
    """A run or a flag names an objective that no module in relatives/ declares."""
