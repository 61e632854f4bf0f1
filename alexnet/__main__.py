"""`python -m alexnet` and the `alexnet` command."""

import sys


def run() -> int:
    """The command: cli.main, with a Ctrl-C while its modules (torch) are still being
    imported ending in the same one line as a later one, not a traceback."""
    try:
        from alexnet.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("alexnet: interrupted\n")
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
