"""What train.py and finetune.py ask of a pretraining objective, in one record (LMD's is in train.py; the lab passes
its relatives' in: train.main(argv, objectives=...)). The core asks the record, never an objective's name."""

from dataclasses import dataclass, field
from typing import Callable, Optional

from util.cli import UserError


@dataclass
class Flag:
    """One of an objective's own train.py flags (`--mask-ratio` for key `mask_ratio`): default, help, argparse's."""
    default: object
    help: str
    argparse: dict = field(default_factory=dict)


def flag(default, help, **argparse):
    """Flag(default, help, argparse={...}), written as flag(0.75, "...", type=float)."""
    return Flag(default, help, argparse)


@dataclass
class Objective:
    """An objective of train.py --objective NAME:

    name             the --objective value, and config["objective"] of its runs
    summary          a few words for --objective's help: what it trains
    build            (config, grid, channels) -> the network, an nn.Module with train.py's training call
                     model(latents, mask_ratio, normalize_targets, generator=...) -> (loss, predictions, mask)
    schedule         config -> the mask ratio as a function of training progress in [0, 1] (or lmd.ConfigError)
    flags            its own train.py flags {config key: Flag}; the other objectives' flags are refused with it
    defaults         its values for train.py's shared flags where they differ from LMD's (batch size, lr, ...)
    held_out_ratio   config -> the ratio of the held-out loss (None: the schedule's ratio at the end of training)
    loss_name        what its loss is, in words ("masked-token loss", "eps loss")
    held_out_key     the held-out loss's name in summary.json and eval.json
    sample_grid      (model, projection, config) -> its grid writer when grids are samples; None: pictures.GridWriter
    sampler          how the lab's sampler samples it: dict(sampling_steps, eta) of DDIM; None: it cannot generate
    describe         config -> its masking and noise in a few words, for the line a run starts with
    decoder_transfers  whether --init from its runs takes the decoder too (not LMD's: no use to a denoiser)
    lowest_time      config -> the model time of its least noisy training input, read by the probes (None, 0 or 1)
    probe_inputs     (latents, time, indices, seed) -> (inputs, times [B]) at model `time`, each image's own noise;
                     None: an objective without a time input"""
    name: str
    summary: str
    build: Callable
    schedule: Callable
    flags: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    held_out_ratio: Optional[Callable] = None
    loss_name: str = "masked-token loss"
    held_out_key: str = "held_out_loss"
    sample_grid: Optional[Callable] = None
    sampler: Optional[dict] = None
    describe: Callable = lambda config: ""
    decoder_transfers: bool = True
    lowest_time: Callable = lambda config: None
    probe_inputs: Optional[Callable] = None

    def mask_ratio_held_out(self, config):
        """The ratio the held-out loss is measured at (runs of one objective compare at it)."""
        return self.held_out_ratio(config) if self.held_out_ratio else self.schedule(config)(1.0)

    def own_defaults(self):
        """{config key: value}: its own flags' defaults."""
        return {key: own.default for key, own in self.flags.items()}

    def run_defaults(self):
        """{config key: value}: its shared-flag defaults and its own flags' defaults."""
        return {**self.defaults, **self.own_defaults()}


def of(config, objectives):
    """The record of a run's config among `objectives` {name: Objective} (older runs: LMD); a missing one: UserError."""
    name = config.get("objective", "lmd")
    if name not in objectives:
        raise UserError(f"the objective {name!r} is not one of this script's ({', '.join(objectives)}): the relatives "
                        "(ddpm, maskdm, umd) are the lab's; run python -m lab.train or python -m lab.finetune, "
                        "which take the same flags")
    return objectives[name]
