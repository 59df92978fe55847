"""What every command shares: the consoles, the one-line error boundary, option types and output writers."""
import enum
import json
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from flatcli.errors import FlatcliError
from flatcli.io import atomic_path, check_writable_dir


def stderr_console(quiet: bool = False) -> Console:
    """The human view (tables, progress, notes) always goes to stderr; stdout carries data only.

    ``quiet``: ranks other than 0 of a torchrun job print nothing (rank 0 speaks for the job).
    """
    return Console(stderr=True, quiet=quiet)


CPU_THREADS = 1  # the default on the CPU: the figures in benchmarks/RESULTS_threads.md


def start(device_name: str, threads: int | None = None):
    """Resolve the device, set the CPU threads and join a torchrun job if launched by one:
    (dist or None, device, stderr console).

    ``threads`` None: one thread when the work runs on the CPU (flatcli's small models gain nothing from more,
    and lose much on a busy machine: benchmarks/RESULTS_threads.md); torch's own default with an accelerator.
    """
    from flatcli import distributed
    from flatcli.devices import resolve_device, set_threads

    device = resolve_device(device_name)
    set_threads(threads if threads is not None else CPU_THREADS if device.type == "cpu" else None)
    dist, device = distributed.setup(device)
    return dist, device, stderr_console(quiet=dist is not None and not dist.is_main)


def print_error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _click_exceptions():
    """Typer >= 0.22 vendors its own click; older Typer uses the click package. Catch both."""
    modules = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(__import__(name, fromlist=["UsageError"]))
        except ImportError:
            pass
    aborts = {typer.Abort, *(m.Abort for m in modules if hasattr(m, "Abort"))}
    return tuple(m.UsageError for m in modules), tuple(m.ClickException for m in modules), tuple(aborts)


USAGE_ERRORS, CLICK_ERRORS, ABORTS = _click_exceptions()


def describe_usage_error(error, args) -> tuple[str, str | None]:
    """(what, fix): click's message in flatcli's words, with the value the user gave when it concerns one option."""
    param = getattr(error, "param", None)
    args = list(sys.argv[1:] if args is None else args)
    for opt in getattr(param, "opts", None) or []:
        for i in reversed(range(len(args))):  # the last occurrence is the one that counts
            arg = args[i]
            if arg == opt and i + 1 < len(args) and opt.startswith("-"):
                return in_plain_words(opt, args[i + 1], error.message)
            if arg.startswith(opt + "="):
                return in_plain_words(opt, arg[len(opt) + 1:], error.message)
    return error.format_message(), None


_BOUNDS = ((r"greater than or equal to (\S+)", "is below {0}", "give {opt} {0} or more"),
           (r"greater than (\S+)", "is not above {0}", "give {opt} a value above {0}"),
           (r"less than or equal to (\S+)", "is above {0}", "give {opt} {0} or less"),
           (r"less than (\S+)", "is not below {0}", "give {opt} a value below {0}"),
           (r"a valid integer.*", "is not a whole number", "give {opt} an integer, e.g. 10"),
           (r"a valid number.*", "is not a number", "give {opt} a number, e.g. 0.1"),
           (r"a valid boolean.*", "is not true or false", "give {opt} true or false"))


def in_plain_words(opt: str, value: str, message: str) -> tuple[str, str | None]:
    """The type checker's wording ("Input should be greater than or equal to 1", "Value error, 'x' is not one
    of 'a', 'b'.") as flatcli's "what — fix": ("--samples 0 is below 1", "give --samples 1 or more")."""
    message = message.strip()
    choices = re.fullmatch(r"(?:Value error, )?'?(.*?)'? is not one of (.*?)\.?", message)
    if choices:
        names = ", ".join(c.strip().strip("'") for c in choices.group(2).split(","))
        return f"{opt} {value} is not one of {names}", f"use one of: {names}"
    should = re.fullmatch(r"Input should be (.*?)\.?", message)
    if should:
        for pattern, what, fix in _BOUNDS:
            m = re.fullmatch(pattern, should.group(1))
            if m:
                return f"{opt} {value} {what.format(*m.groups())}", fix.format(*m.groups(), opt=opt)
        return f"{opt} {value} is not {should.group(1)}", None
    return f"{opt} {value}: {message.removeprefix('Value error, ')}", None


def flag_names(command) -> dict[str, str]:
    """{parameter name: its long flag} for a click command (``max_examples`` → ``--max-examples``)."""
    names = {}
    for p in getattr(command, "params", []):
        opts = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        if opts and p.name:
            names[p.name] = opts[0]
    return names


def in_flag_terms(message: str, flags: dict[str, str]) -> str:
    """The library names keyword arguments as ``name=value``; on the command line they are ``--flag value``."""
    if not flags:
        return message
    pattern = re.compile(r"(?<![\w\-.])(" + "|".join(map(re.escape, sorted(flags, key=len, reverse=True))) + r")=")
    return pattern.sub(lambda m: flags[m.group(1)] + " ", message)


def without_flag_hints(params: list) -> list:
    """A flag takes no value: no ``<bool>`` in its help line (an empty metavar leaves the type column blank)."""
    for p in params:
        if getattr(p, "is_flag", False) and not getattr(p, "count", False):
            p.metavar = ""
    return params


class FlatcliCommand(TyperCommand):
    """Reports the library's errors in the words of this command's flags."""

    def get_params(self, ctx):
        return without_flag_hints(super().get_params(ctx))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FlatcliError as e:
            raise FlatcliError(in_flag_terms(e.what, flag_names(self)),
                               in_flag_terms(e.fix, flag_names(self)) if e.fix else None) from None


class FlatcliGroup(TyperGroup):
    """Catches user mistakes once, at the boundary: one line on stderr, exit 2, no traceback; Ctrl-C: one
    line, exit 130."""

    def get_params(self, ctx):
        return without_flag_hints(super().get_params(ctx))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # before Typer turns it into a silent Exit(130)
            interrupted()

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name or "flatcli", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except FlatcliError as e:
            print_error(str(e))
            sys.exit(2)
        except KeyboardInterrupt:
            interrupted()
        except USAGE_ERRORS as e:
            if not e.format_message().strip():  # no arguments at all: the help already said everything
                sys.exit(e.exit_code)
            command = " ".join(["flatcli", *e.ctx.command_path.split()[1:]]) if e.ctx else "flatcli"
            what, fix = describe_usage_error(e, args)
            print_error(f"{what} — {fix} (see '{command} --help')" if fix else f"{what} — see '{command} --help'")
            sys.exit(e.exit_code)
        except CLICK_ERRORS as e:
            print_error(e.format_message())
            sys.exit(e.exit_code)
        except ABORTS:
            interrupted()

        finally:
            if "flatcli.distributed" in sys.modules:  # imported by a command that joined a torchrun job
                sys.modules["flatcli.distributed"].shutdown()
        if rv == 130:  # Typer turned a Ctrl-C into a silent Exit(130) before a command could report it
            interrupted()
        sys.exit(rv if isinstance(rv, int) else 0)


def interrupted() -> None:
    """Ctrl-C: one line, exit 130 (no traceback, and no output file: outputs are written atomically, last)."""
    try:
        sys.stderr.write("interrupted — nothing was written; run the command again\n")
        sys.stderr.flush()
    finally:
        sys.exit(130)


DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random draw; the same seed gives the same result.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="Architecture: linear, mlp, lenet, convnet, resnet20, resnet110, resnet18, tv:NAME "
                    "(any torchvision model), committee:K[:binary] (a committee machine of K sign units, K odd), timm:NAME (timm extra), hf:FOLDER (a local Hugging Face image classifier; hf extra) "
                    "or module:function (your own factory).")]
WidthOpt = Annotated[int, typer.Option("--width", min=1, help="Hidden width of the mlp.")]
DepthOpt = Annotated[int, typer.Option("--depth", min=1, help="Hidden layers of the mlp.")]
DataOpt = Annotated[Optional[str], typer.Option(
    "--data", help="digits (real 8x8 handwritten digits, embedded), teacher (synthetic, embedded), mnist, fashion-mnist, cifar10, cifar100, imagefolder:PATH, "
                   "or a tensors file (.npz, .safetensors, .pt with x, y[, x_test, y_test]).")]
class InMemory(str, enum.Enum):
    auto = "auto"
    yes = "yes"
    no = "no"


class Normalize(str, enum.Enum):
    data = "data"
    imagenet = "imagenet"
    none = "none"


ClassesOpt = Annotated[Optional[str], typer.Option(
    "--classes", metavar="A,B", show_default=False,
    help="A binary task: keep only classes A and B of the data, relabelled 0 and 1 (measurements: default the "
         "checkpoint's own).")]
DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="Where torchvision data sets are stored or downloaded.")]
InMemoryOpt = Annotated[InMemory, typer.Option(
    "--in-memory", help="Image folders: yes reads every image up front (fastest), no reads images when used "
                        "(for sets larger than memory; with --max-examples only those are read), auto decides by size.")]
ResizeOpt = Annotated[Optional[int], typer.Option(
    "--resize", min=1, show_default=False, help="Image folders: resize the shorter side to this many pixels (bilinear).")]
CropOpt = Annotated[Optional[int], typer.Option(
    "--crop", min=1, show_default=False, help="Image folders: then a centre crop of this size (e.g. --resize 256 --crop 224).")]
NormalizeOpt = Annotated[Normalize, typer.Option(
    "--normalize", help="Image folders: data (the training images' mean/std), imagenet, or none (pixels / 255).")]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", min=0, help="Image folders read when used: DataLoader worker processes (0: this process).")]
TrustPickleOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading a whole pickled model. Unpickling runs code from the file: only for files you trust.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", min=1, show_default="1 on the CPU, torch's default with a GPU",
    help="CPU threads for torch (the settings line says how many are used).")]
ReplicaOpt = Annotated[str, typer.Option(
    "--replica", help="For rSGD runs: measure the center (default) or replica N.")]


class Loss(str, enum.Enum):
    cross_entropy = "cross-entropy"
    mse = "mse"


def parse_replica(value: str):
    if value == "center":
        return None
    try:
        index = int(value)
    except ValueError:
        raise FlatcliError(f"replica={value!r} is not 'center' or a number", "use center or a replica index") from None
    if index < 0:
        raise FlatcliError(f"replica={value!r} is negative", "use center or a replica index from 0")
    return index


def check_output_target(path: Optional[str], option: str) -> None:
    """Fail before any work when an output file cannot be written (``-`` is stdout)."""
    if path is not None and path != "-":
        if Path(path).is_dir():
            raise FlatcliError(f"{option} {path!r} is a folder", f"name a file, e.g. {option} "
                                                                  f"{str(Path(path) / 'out')}.{option[2:]}")
        parent = Path(path).parent
        if not parent.is_dir():
            raise FlatcliError(f"{option} {path!r}: folder {str(parent)!r} does not exist", "create it first or pick another path")
        check_writable_dir(parent, what=f"{option} {path!r}")


def write_output(path: Optional[str], text: str) -> None:
    """Write data to stdout (``-``) or atomically to a file."""
    if path is None:
        return
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def json_safe(value):
    """NaN/inf → null (strict JSON, which every reader accepts), paths and enums → strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a numpy or torch scalar
        return json_safe(value.item())
    return repr(value)


def to_json(obj) -> str:
    """Strict JSON (no NaN or Infinity tokens), indented."""
    return json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
