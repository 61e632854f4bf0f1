"""Shared test helpers."""

from alexnet.cli import build_parser


def run_command(*argv: str) -> int:
    """Runs `alexnet ARGV` through the real parser but without cli.main's error handling,
    so a user error arrives as its exception (cli.main turns it into one line and exit 2)."""
    args = build_parser().parse_args(list(argv))
    return args.func(args)
