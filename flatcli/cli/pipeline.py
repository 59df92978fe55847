"""The one measurement pipeline: checkpoints → inputs → estimator → rows → table / CSV / JSON.

Every measurement command is a thin file: its own options, and an object (a ``Measurement``) that turns them
into an estimator call, rows and tables. ``@measurement_command`` gives the command the options every
measurement shares (checkpoints, data, split, subset, seed, device, outputs); ``run`` does the rest, in this
order: check the output targets, load and check every checkpoint (a mistake in the last one is found before
the first is measured), measure each under one progress bar, then write the outputs in one go (rank 0 only
under torchrun, where the estimators share their work through ``flatcli.parallel``).

This module imports no torch at import time, so ``flatcli CMD --help`` stays instant.
"""
import csv
import enum
import functools
import inspect
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional, Protocol, Sequence

import typer

import flatcli
from flatcli.cli.common import (ClassesOpt, CropOpt, DataDirOpt, DataOpt, DepthOpt, DeviceOpt, InMemory, InMemoryOpt, ModelOpt,
                                Normalize, NormalizeOpt, ReplicaOpt, ResizeOpt, SeedOpt, ThreadsOpt, TrustPickleOpt,
                                WidthOpt, WorkersOpt, check_output_target, parse_replica, start, to_json,
                                write_output)
from flatcli.errors import FlatcliError


class SplitName(str, enum.Enum):
    train = "train"
    test = "test"


CheckpointsArg = Annotated[list[Path], typer.Argument(
    metavar="CHECKPOINT", show_default=False,
    help="One or more run folders, .safetensors/.pt/.pth files, TorchScript archives or .pt2 torch.export programs.")]
SplitOpt = Annotated[SplitName, typer.Option(
    "--split", help="Examples to measure on: train (the training examples, without augmentation) or test.")]
MaxExamplesOpt = Annotated[Optional[int], typer.Option(
    "--max-examples", min=1, show_default="all",
    help="Measure on a fixed random subset of N examples, drawn from --seed (default: all).")]
CsvOpt = Annotated[Optional[str], typer.Option(
    "--csv", help="Write the rows as CSV to PATH, or to stdout with '-'.", show_default=False)]
JsonOpt = Annotated[Optional[str], typer.Option(
    "--json", help="Write {settings, rows} as JSON to PATH, or to stdout with '-'.", show_default=False)]


@dataclass
class Common:
    """The options every measurement command shares, as parsed."""
    checkpoints: list[Path]
    split: SplitName = SplitName.train
    max_examples: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    model: Optional[str] = None
    width: int = 128
    depth: int = 2
    data: Optional[str] = None
    data_dir: Path = Path("data")
    classes: Optional[str] = None
    trust_pickle: bool = False
    in_memory: InMemory = InMemory.auto
    resize: Optional[int] = None
    crop: Optional[int] = None
    normalize: Normalize = Normalize.data
    workers: int = 0
    replica: str = "center"
    csv_out: Optional[str] = None
    json_out: Optional[str] = None


_COMMON_TYPES = {"checkpoints": CheckpointsArg, "split": SplitOpt, "max_examples": MaxExamplesOpt,
                 "seed": SeedOpt, "device": DeviceOpt, "threads": ThreadsOpt, "model": ModelOpt,
                 "width": WidthOpt, "depth": DepthOpt, "data": DataOpt, "data_dir": DataDirOpt, "classes": ClassesOpt,
                 "trust_pickle": TrustPickleOpt, "in_memory": InMemoryOpt, "resize": ResizeOpt, "crop": CropOpt,
                 "normalize": NormalizeOpt, "workers": WorkersOpt, "replica": ReplicaOpt, "csv_out": CsvOpt, "json_out": JsonOpt}


def _param(name: str, annotation, default=inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def measurement_command(fn):
    """Give ``fn(common: Common, **own_options)`` the shared options; Typer sees one flat signature.

    The checkpoints come first, then the command's own options, then the shared ones.
    """
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(fn).parameters.values()
           if p.name != "common"]
    defaults = Common(checkpoints=[])
    shared = [_param(n, t, getattr(defaults, n)) for n, t in _COMMON_TYPES.items() if n != "checkpoints"]
    params = [_param("checkpoints", CheckpointsArg), *own, *shared]

    @functools.wraps(fn)
    def command(**kwargs):
        common = Common(**{n: kwargs.pop(n) for n in _COMMON_TYPES})
        return fn(common, **kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


class Measurement(Protocol):
    """What a measurement command hands the pipeline."""
    name: str  # the command, e.g. "local-energy"
    description: str  # the progress bar's label
    columns: list[str]  # CSV columns after "checkpoint"
    bn_examples: Optional[int]  # training examples to hand over for BatchNorm re-estimation (None: none)

    def settings(self, examples: list[int]) -> dict: ...  # resolved values for the settings line and JSON

    def measure(self, inputs, callback): ...  # the estimator call on one checkpoint

    def rows(self, result) -> list[dict]: ...  # tidy rows (without the checkpoint label)

    def render(self, labels: list[str], results: list, common: Common) -> list: ...  # tables for stderr

    def notes(self, labels: list[str], results: list) -> list[str]: ...  # warning lines (may be empty)

    def details(self, label: str, result) -> Optional[dict]: ...  # per-checkpoint JSON details


def run(measurement: Measurement, common: Common) -> None:
    """The whole command: outputs checked, checkpoints loaded, each measured, results rendered and written."""
    from flatcli import parallel

    check_outputs(common.csv_out, common.json_out)
    dist, dev, console = start(common.device, common.threads)
    team = parallel.SOLO if dist is None else team_of(dist)
    loaded = load_checkpoints(common)
    inputs = InputMaker(common.split.value, common.max_examples, common.seed, dev,
                        bn_examples=measurement.bn_examples)
    inputs.check(loaded)
    for ckpt in loaded:
        check_finite(ckpt, inputs)
    if hasattr(measurement, "check"):  # optional: a measurement's own checks of every checkpoint, before any output
        measurement.check(loaded, inputs)
    examples = [inputs.examples(c) for c in loaded]
    settings = settings_dict(measurement.name, loaded, common, dev, dist, **measurement.settings(examples))
    if common.max_examples is not None:  # what is used: more than a split holds means all of it (with a note)
        settings["max_examples"] = examples[0] if len(set(examples)) == 1 else examples
    console.print(settings_text(settings))
    for note in dict.fromkeys(n for c in loaded for n in getattr(c.data, "notes", ())):
        console.print(f"note: {note}", highlight=False)
    for note in inputs.notes:
        console.print(f"note: {note}")
    results = []
    with SweepProgress(measurement.description, len(loaded), console) as progress, parallel.sharing(team):
        for i, ckpt in enumerate(loaded):
            x = inputs(ckpt)
            results.append(measurement.measure(x, progress.callback(i, ckpt.label)))
            inputs.release(ckpt)
    labels = [c.label for c in loaded]
    details = [d for d in (measurement.details(l, r) for l, r in zip(labels, results)) if d is not None]
    if details:
        settings["per_checkpoint"] = details
    for t in measurement.render(labels, results, common):
        console.print(t)
    for note in measurement.notes(labels, results):
        console.print(f"warning: {note}")
    rows = [{"checkpoint": label, **row} for label, r in zip(labels, results) for row in measurement.rows(r)]
    if team.is_main:
        write_results(rows, ["checkpoint", *measurement.columns], settings, common.csv_out, common.json_out)


PROBE_EXAMPLES = 256  # examples of the quick finite-loss check before any output


def check_finite(loaded, inputs: "InputMaker") -> None:
    """Before the settings line: finite weights, and a finite loss on the first of the examples to be
    measured, so a broken checkpoint is one error line (each estimator checks its whole unperturbed loss)."""
    import torch
    from flatcli.losses import loss_sum
    from flatcli.measure._guard import check_finite_parameters, check_finite_value
    try:
        check_finite_parameters(loaded.model)
        measured = inputs(loaded)  # the examples, cached on the device for the work
        x, y = (t[:PROBE_EXAMPLES] for t in measured.data)
        with torch.no_grad():
            check_finite_value("loss", float(loss_sum(measured.model(x), y, measured.loss)))
    except FlatcliError as e:
        raise FlatcliError(f"{loaded.label!r}: {e.what}", e.fix) from None
    finally:
        inputs.release(loaded)


def team_of(dist):
    """The torchrun job as a ``flatcli.parallel.Team``."""
    from flatcli import distributed, parallel
    return parallel.Team(dist.rank, dist.world, distributed.all_gather, distributed.all_reduce_)


def check_outputs(csv_path: Optional[str], json_path: Optional[str]) -> None:
    """Before any work: each output can be written, and at most one of them goes to stdout."""
    if csv_path == "-" and json_path == "-":
        raise FlatcliError("--csv - and --json - both ask for stdout", "send one of them to a file, e.g. --json out.json")
    if csv_path is not None and csv_path != "-" and json_path is not None and \
            Path(csv_path).resolve() == Path(json_path).resolve():
        raise FlatcliError(f"--csv and --json both name {csv_path!r}", "give them different paths")
    check_output_target(csv_path, "--csv")
    check_output_target(json_path, "--json")


def load_checkpoints(common: Common) -> list:
    """Every checkpoint through the shared loader, data sets read once (one DataCache), all checked up front."""
    from flatcli.cli.options import data_spec_of, model_spec_of
    from flatcli.data.core import parse_classes
    from flatcli.loading import DataCache, load_checkpoint

    cache, replica = DataCache(), parse_replica(common.replica)
    images = {"resize": common.resize, "crop": common.crop, "normalize": common.normalize.value}
    reading = {"in_memory": common.in_memory.value, "workers": common.workers}
    model_spec, data_spec = model_spec_of(common.model, common.width, common.depth), \
        data_spec_of(common.data, common.data_dir, **images, **reading)
    return [load_checkpoint(p, model_spec=model_spec, data_spec=data_spec, trust_pickle=common.trust_pickle,
                            replica=replica, cache=cache, reading=reading,
                            classes=parse_classes(common.classes)) for p in common.checkpoints]


@dataclass
class Inputs:
    """What one measurement call takes: the model and its examples, all on the device."""
    model: object  # torch.nn.Module
    data: tuple  # (x (n, *input_shape) float32 normalized, y (n,) or (n, k))
    bn_data: Optional[tuple]  # training examples for BatchNorm re-estimation
    examples: int
    loss: str  # the checkpoint's loss


@dataclass
class InputMaker:
    """Picks the examples of each checkpoint and moves them to ``device``, once per data set (cached).

    The subset of ``max_examples`` is the first N of a permutation drawn from ``torch.Generator().manual_seed(seed)``,
    so it is the same for every draw, σ and checkpoint on the same data, and the same on every device.
    ``bn_examples``: also hand over that many training examples (same seeded permutation; all when fewer)
    for re-estimating BatchNorm statistics; None: none.
    """
    split: str
    max_examples: Optional[int]
    seed: int
    device: object
    bn_examples: Optional[int] = None
    cache: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def __call__(self, loaded) -> Inputs:
        key = id(loaded.data)  # the DataCache hands every checkpoint on the same data the same object
        if key not in self.cache:
            self.cache[key] = (self._examples(loaded), self._bn_examples(loaded))
        data, bn_data = self.cache[key]
        return Inputs(loaded.model.to(self.device), data, bn_data, len(data[0]), loaded.loss)

    def examples(self, loaded) -> int:
        """How many examples a checkpoint is measured on; the examples stay cached on the device."""
        n = self(loaded).examples
        self.release(loaded)
        return n

    def release(self, loaded) -> None:
        """Once measured, the model goes back to the CPU (where the loader keeps it), freeing the device."""
        loaded.model.to("cpu")

    def check(self, checkpoints: Sequence) -> None:
        """Before any work: every checkpoint's data has the split asked for."""
        for loaded in checkpoints:
            self._split(loaded)

    def _split(self, loaded):
        split = loaded.data.train if self.split == "train" else loaded.data.test
        if split is None:
            raise FlatcliError(f"--split {self.split}: the data of {loaded.label!r} ({loaded.data.spec.name}) "
                               f"has no {self.split} split", "use --split train, or data with a test split")
        return split

    def _examples(self, loaded):
        import torch
        split = self._split(loaded)
        if self.max_examples is not None:
            if self.max_examples > len(split):
                note = (f"--max-examples {self.max_examples} is more than the {len(split)} {self.split} examples "
                        f"of {loaded.data.spec.name}: measuring all {len(split)}")
                if note not in self.notes:
                    self.notes.append(note)
            split = split.subset(self.max_examples, torch.Generator().manual_seed(self.seed))
        return split.to(self.device).tensors()  # normalized on the device: uint8 images cross the bus

    def _bn_examples(self, loaded):
        import torch
        if self.bn_examples is None:
            return None
        split = loaded.data.train.subset(self.bn_examples, torch.Generator().manual_seed(self.seed))
        return split.to(self.device).tensors()


def settings_dict(command: str, checkpoints: Sequence, common: Common, device, dist, **values) -> dict:
    """Every resolved value of a run, for the JSON output and the settings line.

    ``loss`` is the one loss name when all checkpoints share it, else the list of them in checkpoint order.
    """
    import torch
    losses = [c.loss for c in checkpoints]
    return {"command": command, "version": flatcli.__version__, "checkpoints": [c.label for c in checkpoints],
            "loss": losses[0] if len(set(losses)) == 1 else losses, "seed": common.seed, "device": str(device),
            "threads": torch.get_num_threads(), **values, "split": common.split.value,
            "max_examples": common.max_examples, "replica": common.replica, "ranks": dist.world if dist else 1}


def settings_line(settings: dict, skip=("command", "checkpoints", "version")) -> str:
    """``local-energy 0.2.0 on 2 checkpoint(s): seed 0 · device cpu · ...``: the settings, on one line."""
    parts = [f"{k.replace('_', ' ')} {short(v)}" for k, v in settings.items() if k not in skip]
    return (f"{settings['command']} {settings['version']} on {len(settings['checkpoints'])} checkpoint(s): "
            + " · ".join(parts))


def settings_text(settings: dict):
    """The settings line as rich Text: the numbers of the settings highlighted, the command and version not
    (the number highlighter would split ``0.2.0`` into two numbers)."""
    from rich.highlighter import ReprHighlighter
    from rich.text import Text
    head, _, rest = settings_line(settings).partition(": ")
    return Text(head + ": ") + ReprHighlighter()(Text(rest))


def short(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "all" if value is None else str(value)


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """One line per row, exactly ``columns`` in that order (a row missing a column is a bug: KeyError).

    Floats are written as Python's shortest round-trip repr, so reading them back gives the same numbers.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return out.getvalue()


def json_safe(value):
    """NaN/inf → null, so that any JSON reader (not only Python's) accepts the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_results(rows: Sequence[dict], columns: Sequence[str], settings: dict,
                  csv_path: Optional[str], json_path: Optional[str]) -> None:
    """Write the CSV and the JSON ({"settings", "rows"}) once all the work is done (files atomically)."""
    write_output(csv_path, csv_text(rows, columns))
    write_output(json_path, to_json({"settings": settings, "rows": [{c: r[c] for c in columns} for r in rows]}))


class SweepProgress:
    """One bar over the work of every checkpoint, fed by the estimators' ``callback(increment, total)``.

    A checkpoint's total is known when its estimator first reports; the bar's total is then the work done
    so far plus that total for each checkpoint still to come.
    """

    def __init__(self, description: str, checkpoints: int, console):
        from flatcli.cli.render import progress_bar
        self.bar, self.description, self.checkpoints, self.done = progress_bar(console), description, checkpoints, 0

    def __enter__(self) -> "SweepProgress":
        self.bar.__enter__()
        self.task = self.bar.add_task(self.description, total=None, info="")
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def callback(self, index: int, label: str):
        """The callback for checkpoint ``index`` (counted from 0)."""
        first = [True]

        def update(increment: int, total: int) -> None:
            if first[0]:
                first[0] = False
                self.bar.update(self.task, total=self.done + (self.checkpoints - index) * total)
            self.done += increment
            self.bar.update(self.task, completed=self.done, info=label)
        return update
