"""finetune.py with the lab's objectives: python -m lab.finetune --checkpoint RUN ... (finetune.py's flags) probes a
relative's encoder (ddpm, MaskDM, UMD) at model times 0 and 1, beside the same floors as LMD's."""

import finetune
from lab import OBJECTIVES
from util import cli


build_parser = finetune.build_parser   # the same flags


def main(argv=None):
    return finetune.main(argv, objectives=OBJECTIVES)


if __name__ == "__main__":
    cli.run_cli(main)
