"""The ``privimage`` command: one subcommand per pipeline stage, plus small tools.

Each subcommand lives in ``privimage/commands/<name>.py`` and provides ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only to build their own parser, so ``privimage --help`` stays
fast and does not load torch.

Errors in what the user asked for or in the files a run keeps (:mod:`privimage.errors`: bad settings,
impossible budgets, missing or corrupt files, a busy run directory) and refused writes (a full disk, a
read-only file system, no permission) end with exit code 2 and one line naming the value or the path and the
cause; set ``PRIVIMAGE_DEBUG=1`` to see the traceback instead. Ctrl-C ends with exit code 130; the run
directory's lock is released and ``--resume`` continues from the last checkpoint. Anything else is a bug in
privimage and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from privimage.progress import close_all

# name -> (module, one-line summary shown by `privimage --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "budget": ("privimage.commands.budget",
               "calibrate the DP-SGD noise for an (epsilon, delta) budget and show its split"),
    "evaluate": ("privimage.commands.evaluate",
                 "FID (or proxy FID), IS, precision/recall, classification accuracy and a report of a run"),
    "query": ("privimage.commands.query",
              "DP semantic query: select the public classes the sensitive images resemble; build the subset"),
    "run": ("privimage.commands.run", "the whole pipeline (query, pre-train, DP fine-tune, sample, evaluate) into a run dir"),
    "sweep": ("privimage.commands.sweep",
              "epsilon sweep: one run per (epsilon, seed), sharing the public work (query classifier, pre-training)"),
    "pretrain": ("privimage.commands.pretrain", "pre-train a run directory's UNet on its public subset (--resume)"),
    "finetune": ("privimage.commands.finetune", "DP-SGD fine-tune a run directory's UNet on the sensitive data (--resume)"),
    "sample": ("privimage.commands.sample", "draw samples and a grid from a run directory's released EMA model"),
    "export": ("privimage.commands.export",
               "write RUN_DIR/release/: the publishable weights, config, privacy statement, samples and report"),
    "audit": ("privimage.commands.audit",
              "empirical privacy audit: a lower bound on the fine-tune's epsilon from canaries, vs. its claim"),
}

_DESCRIPTION = """\
Train image generators under differential privacy, the PrivImage way:
a DP semantic query picks the public classes that look like your sensitive data, a generator is
pre-trained on those public images, then fine-tuned on the sensitive images with DP-SGD. One
(epsilon, delta) budget covers the query and the fine-tune together.
"""

_EPILOG = "Run `privimage COMMAND --help` for what each command takes and what its settings mean for privacy."


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (and the hint to use --help), exit code 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse's signature
        message = " ".join(message.split())  # one line, whatever line breaks a value held
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="privimage", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from privimage import __version__
    parser.add_argument("--version", action="version", version=f"privimage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=summary, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


#: Commands whose work every rank shares under torchrun; the others run on rank 0 alone (privimage.distributed).
DISTRIBUTED_COMMANDS = ("run", "pretrain", "finetune", "sample")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _run_launched(args)
    except KeyboardInterrupt:
        if _debug():
            raise
        close_all()
        print(f"privimage {args.command}: interrupted (a run continues from its last checkpoint with --resume)",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only the user's errors are turned into one line, see _one_line
        line = _one_line(err)
        if line is None or _debug():
            raise
        close_all()
        print(f"privimage {args.command}: error: {line}", file=sys.stderr)
        return 2


def _run_launched(args) -> int:
    """The command in this process: under torchrun, inside the process group (rank 0 alone for most commands)."""
    from privimage import distributed

    launch = distributed.init_from_env()
    try:
        if launch is not None and args.command not in DISTRIBUTED_COMMANDS:
            if launch.rank != 0:
                return 0
            with distributed.alone():  # rank 0 does the work as one process: no collective waits for the others
                return int(args._run(args) or 0)
        return int(args._run(args) or 0)
    finally:
        distributed.shutdown()


def _debug() -> bool:
    return os.environ.get("PRIVIMAGE_DEBUG", "") not in ("", "0")


def _one_line(err: Exception) -> str | None:
    """The one-line message for an error the user can act on; ``None`` for a bug (which keeps its traceback)."""
    from privimage.errors import PrivimageError, describe_os_error

    if isinstance(err, (PrivimageError, ValueError)):  # StorageError (an OSError too) words its own message
        text = str(err)
    elif isinstance(err, OSError) and err.errno is None:  # raised with a message of its own
        text = str(err)
    elif isinstance(err, OSError):
        text = f"{err.filename or 'a file'}: {describe_os_error(err)}" + (f" ({err.filename2})" if err.filename2 else "")
    elif isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        text = (f"out of memory ({str(err).splitlines()[0][:120] if str(err) else 'MemoryError'}): lower the batch "
                f"sizes in the config; a run continues from its last checkpoint with --resume")
    else:
        return None
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":
    raise SystemExit(main())
