"""One error type for everything a user can get wrong, and the CLI wrapper that prints it.

Scripts call `run_cli(main)`: a `CloError` becomes one line on stderr
(`error: <file>:<line>: <field>: what is wrong`) and exit status 2, never a traceback.
"""

import sys


class CloError(Exception):
    """A problem with the user's input (files, flags, checkpoints), stated in one line."""


def run_cli(main) -> None:
    try:
        main()
    except CloError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
