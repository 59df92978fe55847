"""What the measurement commands (local-energy, local-entropy) share: checkpoints → models and examples on a
device, the resolved settings, one progress bar over all the work, and CSV/JSON output with a fixed column order.

The order of work in a command: check the output targets, load and check every checkpoint (so that a mistake in
the last one is found before the first is measured), measure each, then write the outputs in one go.
"""
import csv
import enum
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional, Sequence

import torch
import typer

import flatcli
from flatcli.cli.common import check_output_target, to_json, write_output
from flatcli.cli.options import data_spec_of, model_spec_of
from flatcli.cli.render import progress_bar
from flatcli.errors import FlatcliError
from flatcli.loading import DataCache, Loaded, load_checkpoint


class SplitName(str, enum.Enum):
    train = "train"
    test = "test"


CheckpointsArg = Annotated[list[Path], typer.Argument(
    metavar="CHECKPOINT", show_default=False,
    help="One or more run folders, .safetensors/.pt/.pth files or TorchScript archives.")]
SplitOpt = Annotated[SplitName, typer.Option(
    "--split", help="Examples to measure on: train (the training examples, without augmentation) or test.")]
MaxExamplesOpt = Annotated[Optional[int], typer.Option(
    "--max-examples", min=1, help="Measure on a fixed random subset of N examples, drawn from --seed (default: all).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")]
CsvOpt = Annotated[Optional[str], typer.Option(
    "--csv", help="Write the rows as CSV to PATH, or to stdout with '-'.", show_default=False)]
JsonOpt = Annotated[Optional[str], typer.Option(
    "--json", help="Write {settings, rows} as JSON to PATH, or to stdout with '-'.", show_default=False)]


def check_outputs(csv_path: Optional[str], json_path: Optional[str]) -> None:
    """Before any work: each output can be written, and at most one of them goes to stdout."""
    if csv_path == "-" and json_path == "-":
        raise FlatcliError("--csv - and --json - both ask for stdout", "send one of them to a file, e.g. --json out.json")
    if csv_path is not None and csv_path != "-" and json_path is not None and \
            Path(csv_path).resolve() == Path(json_path).resolve():
        raise FlatcliError(f"--csv and --json both name {csv_path!r}", "give them different paths")
    check_output_target(csv_path, "--csv")
    check_output_target(json_path, "--json")


def load_checkpoints(paths: Sequence[Path], *, model: Optional[str], width: int, depth: int, data: Optional[str],
                     data_dir: Path, loss: Optional[str], trust_pickle: bool, replica) -> list[Loaded]:
    """Every checkpoint through the shared loader, data sets read once (one DataCache), all checked up front."""
    cache = DataCache()
    model_spec, data_spec = model_spec_of(model, width, depth), data_spec_of(data, data_dir)
    return [load_checkpoint(p, model_spec=model_spec, data_spec=data_spec, loss=loss, trust_pickle=trust_pickle,
                            replica=replica, cache=cache) for p in paths]


@dataclass
class Inputs:
    """What one measurement call takes: the model and its examples, all on the device."""
    model: torch.nn.Module
    data: tuple[torch.Tensor, torch.Tensor]  # (x (n, *input_shape) float32 normalized, y (n,) or (n, k))
    bn_data: Optional[tuple[torch.Tensor, torch.Tensor]]  # training examples for BatchNorm re-estimation
    examples: int


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
    device: torch.device
    bn_examples: Optional[int] = None
    cache: dict = field(default_factory=dict)

    def __call__(self, loaded: Loaded) -> Inputs:
        key = id(loaded.data)  # the DataCache hands every checkpoint on the same data the same object
        if key not in self.cache:
            self.cache[key] = (self._examples(loaded), self._bn_examples(loaded))
        data, bn_data = self.cache[key]
        return Inputs(loaded.model.to(self.device), data, bn_data, len(data[0]))

    def release(self, loaded: Loaded) -> None:
        """Once measured, the model goes back to the CPU (where the loader keeps it), freeing the device."""
        loaded.model.to("cpu")

    def check(self, checkpoints: Sequence[Loaded]) -> None:
        """Before any work: every checkpoint's data has the split asked for."""
        for loaded in checkpoints:
            self._split(loaded)

    def _split(self, loaded: Loaded):
        split = loaded.data.train if self.split == "train" else loaded.data.test
        if split is None:
            raise FlatcliError(f"--split {self.split}: the data of {loaded.label!r} ({loaded.data.spec.name}) "
                               f"has no {self.split} split", "use --split train, or data with a test split")
        return split

    def _examples(self, loaded: Loaded):
        split = self._split(loaded)
        if self.max_examples is not None:
            split = split.subset(self.max_examples, torch.Generator().manual_seed(self.seed))
        return split.to(self.device).tensors()  # normalized on the device: uint8 images cross the bus

    def _bn_examples(self, loaded: Loaded):
        if self.bn_examples is None:
            return None
        split = loaded.data.train.subset(self.bn_examples, torch.Generator().manual_seed(self.seed))
        return split.to(self.device).tensors()


def settings_dict(command: str, checkpoints: Sequence[Loaded], **values) -> dict:
    """Every resolved value of a run, for the JSON output and the settings line.

    ``loss`` is the one loss name when all checkpoints share it, else the list of them in checkpoint order.
    """
    losses = [c.loss for c in checkpoints]
    return {"command": command, "version": flatcli.__version__, "checkpoints": [c.label for c in checkpoints],
            "loss": losses[0] if len(set(losses)) == 1 else losses, **values}


def settings_line(settings: dict, skip=("command", "checkpoints")) -> str:
    """``local-energy: seed 0 · device cpu · ...``: the settings, on one line, for stderr."""
    parts = [f"{k.replace('_', ' ')} {_short(v)}" for k, v in settings.items() if k not in skip]
    return f"{settings['command']} on {len(settings['checkpoints'])} checkpoint(s): " + " · ".join(parts)


def _short(value) -> str:
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
        writer.writerow([row[c] for c in columns])
    return out.getvalue()


def _json_safe(value):
    """NaN/inf → null, so that any JSON reader (not only Python's) accepts the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(rows: Sequence[dict], columns: Sequence[str], settings: dict,
                  csv_path: Optional[str], json_path: Optional[str]) -> None:
    """Write the CSV and the JSON ({"settings", "rows"}) once all the work is done (files atomically)."""
    write_output(csv_path, csv_text(rows, columns))
    write_output(json_path, to_json(_json_safe({"settings": settings,
                                                 "rows": [{c: r[c] for c in columns} for r in rows]})))


class SweepProgress:
    """One bar over the work of every checkpoint, fed by the library's ``callback(done, total)``.

        with SweepProgress("local energy", total=len(checkpoints) * units, console=console) as progress:
            for c in checkpoints:
                measure(..., callback=progress.callback(c.label))
                progress.advance(units)
    """

    def __init__(self, description: str, total: Optional[int], console):
        self.bar, self.description, self.total, self.offset = progress_bar(console), description, total, 0

    def __enter__(self) -> "SweepProgress":
        self.bar.__enter__()
        self.task = self.bar.add_task(self.description, total=self.total, info="")
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def callback(self, label: str, remaining: Optional[int] = None):
        """The callback for the next checkpoint: its ``done`` counts from where the previous ones ended.

        ``remaining``: when a checkpoint's work is known only once the library reports its ``total`` (the bar
        was made with ``total=None``), the checkpoints left, this one included; the bar's total becomes the
        work done so far + remaining × total.
        """
        offset = self.offset

        def update(done: int, total: int) -> None:
            size = {} if remaining is None else {"total": offset + remaining * total}
            self.bar.update(self.task, completed=offset + done, info=label, **size)
        return update

    def advance(self, units: int) -> None:
        """Mark one checkpoint's ``units`` as done (also when the library had nothing to report)."""
        self.offset += units
        self.bar.update(self.task, completed=self.offset)
