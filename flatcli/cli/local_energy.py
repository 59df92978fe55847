"""``flatcli local-energy``: parse, call flatcli.measure.local_energy for each checkpoint, render (MATH.md §1)."""
import enum
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatcli import distributed
from flatcli.cli.common import (DataDirOpt, DataOpt, DepthOpt, DeviceOpt, Loss, ModelOpt, ReplicaOpt, SeedOpt,
                                TrustPickleOpt, WidthOpt, parse_replica, start)
from flatcli.cli.measure_common import (BatchSizeOpt, CheckpointsArg, CsvOpt, InputMaker, JsonOpt, MaxExamplesOpt,
                                        SplitName, SplitOpt, SweepProgress, check_outputs, load_checkpoints,
                                        settings_dict, settings_line, write_results)
from flatcli.cli.render import fmt, table
from flatcli.measure import LocalEnergy, parse_sigmas
from flatcli.measure import local_energy as measure_local_energy

DEFAULT_SIGMAS = "0,0.01,0.02,0.05,0.1,0.2"
COLUMNS = ["checkpoint", "split", "sigma", "samples", "error_mean", "error_sem", "delta_error", "loss_mean",
           "loss_sem", "delta_loss", "noise", "bn", "loss_function", "examples", "seed"]


class Noise(str, enum.Enum):
    multiplicative = "multiplicative"
    additive = "additive"


class BnPolicy(str, enum.Enum):
    eval = "eval"
    recompute = "recompute"


def local_energy(
    checkpoints: CheckpointsArg,
    sigmas: Annotated[str, typer.Option(help="Noise levels σ: a list 0,0.01,0.05 or start:stop:num (evenly spaced, both ends included); each >= 0.")] = DEFAULT_SIGMAS,
    samples: Annotated[int, typer.Option(min=1, help="Noise draws per σ (the same draws at every σ).")] = 50,
    noise: Annotated[Noise, typer.Option(help="multiplicative: w ⊙ (1 + σz); additive: w + σz.")] = Noise.multiplicative,
    bn: Annotated[BnPolicy, typer.Option(help="BatchNorm of the perturbed net: eval (stored statistics) or recompute (re-estimated on training batches, without augmentation).")] = BnPolicy.eval,
    bn_batches: Annotated[int, typer.Option(min=1, help="With --bn recompute: training batches (of --batch-size) to re-estimate the statistics on.")] = 4,
    split: SplitOpt = SplitName.train,
    max_examples: MaxExamplesOpt = None,
    batch_size: BatchSizeOpt = 1000,
    loss: Annotated[Optional[Loss], typer.Option(help="Loss to report next to the error (default: the checkpoint's loss).")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    width: WidthOpt = 128,
    depth: DepthOpt = 2,
    data: DataOpt = None,
    data_dir: DataDirOpt = Path("data"),
    trust_pickle: TrustPickleOpt = False,
    replica: ReplicaOpt = "center",
    csv_out: CsvOpt = None,
    json_out: JsonOpt = None,
):
    """Local energy δε(σ): how much the error (and loss) rises when the weights are perturbed by noise of size σ.

    Higher means sharper. Several checkpoints are measured with the same settings and the same noise draws, side by side.

    Example: flatcli local-energy runs/sgd runs/esgd --csv - | python examples/plot_local_energy.py -o curves.png
    """
    check_outputs(csv_out, json_out)
    sigma_list = parse_sigmas(sigmas)
    dist, dev, console = start(device)
    loaded = load_checkpoints(checkpoints, model=model, width=width, depth=depth, data=data, data_dir=data_dir,
                              loss=loss.value if loss else None, trust_pickle=trust_pickle,
                              replica=parse_replica(replica))
    inputs = InputMaker(split.value, max_examples, seed, dev,
                        bn_examples=bn_batches * batch_size if bn == BnPolicy.recompute else None)
    inputs.check(loaded)
    settings = settings_dict("local-energy", loaded, seed=seed, device=str(dev), sigmas=sigma_list, samples=samples,
                             noise=noise.value, bn=bn.value, bn_batches=bn_batches, split=split.value,
                             max_examples=max_examples, batch_size=batch_size, replica=replica,
                             ranks=dist.world if dist else 1)
    console.print(settings_line(settings))
    # under torchrun each rank computes the draws k ≡ rank (mod ranks); rank 0 gathers, prints and writes
    shard, gather = ((dist.rank, dist.world), distributed.all_gather) if dist else ((0, 1), None)
    units = len(range(shard[0], samples, shard[1])) * sum(s > 0 for s in sigma_list)
    results = []
    with SweepProgress("local energy", len(loaded) * units, console) as progress:
        for ckpt in loaded:
            x = inputs(ckpt)
            results.append(measure_local_energy(
                x.model, x.data, sigma_list, samples=samples, noise=noise.value, bn=bn.value, loss=ckpt.loss,
                batch_size=batch_size, seed=seed, bn_data=x.bn_data, bn_batches=bn_batches,
                callback=progress.callback(ckpt.label), shard=shard, gather=gather))
            inputs.release(ckpt)
            progress.advance(units)
    rows = [row for ckpt, result in zip(loaded, results) for row in energy_rows(ckpt, result, settings)]
    for t in energy_tables([c.label for c in loaded], results, settings):
        console.print(t)
    if dist is None or dist.is_main:
        write_results(rows, COLUMNS, settings, csv_out, json_out)


def energy_rows(ckpt, result: LocalEnergy, settings: dict) -> list[dict]:
    """One tidy row per σ (errors as fractions), with the names in ``COLUMNS``."""
    return [{"checkpoint": ckpt.label, "split": settings["split"], "sigma": p.sigma, "samples": p.samples,
             "error_mean": p.error_mean, "error_sem": p.error_sem, "delta_error": p.delta_error,
             "loss_mean": p.loss_mean, "loss_sem": p.loss_sem, "delta_loss": p.delta_loss,
             "noise": settings["noise"], "bn": settings["bn"], "loss_function": ckpt.loss,
             "examples": result.examples, "seed": settings["seed"]} for p in result]


def plus_minus(mean: float, sem: float) -> str:
    """``+0.0465 ± 0.0016``: the mean rounded to the second significant digit of its standard error."""
    if sem == 0:
        return "0" if mean == 0 else f"{mean:+.4g}"
    if not math.isfinite(sem):
        return f"{mean:+.4g}"
    decimals = min(10, max(0, 1 - math.floor(math.log10(sem))))
    return f"{mean:+.{decimals}f} ± {sem:.{decimals}f}"


def energy_tables(labels: list[str], results: list[LocalEnergy], settings: dict) -> list:
    """Rows = σ, one column per checkpoint, so the flatter one shows at a glance: δε ± sem, then δL ± sem."""
    sizes = sorted({r.examples for r in results})
    examples = f"{sizes[0]} examples" if len(sizes) == 1 else "examples: see the CSV"
    about = (f"{settings['noise']} noise · {settings['samples']} draws · split {settings['split']} ({examples}) · "
             f"bn {settings['bn']} · seed {settings['seed']}")
    tables = []
    for title, base, mean, sem in ((f"δε ± sem (rise of the error, a fraction) · {about}", "error", "delta_error",
                                    "error_sem"), ("δL ± sem (rise of the loss)", "loss", "delta_loss", "loss_sem")):
        columns = ["σ"] + [f"{label}\n{base} {fmt(getattr(r, base))}" for label, r in zip(labels, results)]
        rows = [[f"{sigma:g}"] + [plus_minus(getattr(r.points[j], mean), getattr(r.points[j], sem)) for r in results]
                for j, sigma in enumerate(settings["sigmas"])]
        tables.append(table(title, columns, rows))
    return tables
