"""One-line errors for the command-line scripts: a mistake the user can fix is printed as one line."""

import argparse
import re
import signal
import sys

import lmd


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, no network). Scripts print it as one line and exit 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (which saves first, see pretraining.StopRequest): stop like Ctrl-C."""


def _terminate(signal_number, frame):
    raise Terminated


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (what was wrong, and where to look) instead of the usage block."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main):
    """Run a script's main(), turning a UserError (or the method's ConfigError) into one line and exit status 2."""
    # Python's default SIGTERM ends the process at once, skipping the exit handlers that stop the loader workers
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (UserError, lmd.ConfigError) as error:
        # A UserError raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its last line.
        message = re.sub(r"^[\w.]*(UserError|ConfigError): ", "", str(error).strip().splitlines()[-1])
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)
