"""One error type for everything a user can get wrong, and the CLI wrapper that prints it.

Scripts call `run_cli(main)`: a `CloError` becomes one line on stderr
(`error: <file>:<line>: <field>: what is wrong`) and exit status 2, never a traceback; Ctrl-C
outside a loop that saves its own progress becomes `interrupted` and exit status 130.
"""

import argparse
import sys


class CloError(Exception):
    """A problem with the user's input (files, flags, checkpoints), stated in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are CloErrors: `error: train.py: argument --batch-size: invalid int
    value: 'x'` in one line (plain argparse prints its usage too), exit status 2 as before."""

    def error(self, message):
        raise CloError(f"{self.prog}: {message}")


def run_cli(main) -> None:
    try:
        main()
    except CloError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
