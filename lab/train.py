"""train.py with the lab's objectives: python -m lab.train --objective ddpm|maskdm|umd ... (train.py's flags).

The relatives train through train.py's own loop: this file only hands it the lab's records."""

import train
from lab import OBJECTIVES
from util import cli


def build_parser():
    return train.build_parser(OBJECTIVES)


def main(argv=None):
    return train.main(argv, objectives=OBJECTIVES)


if __name__ == "__main__":
    cli.run_cli(main)
