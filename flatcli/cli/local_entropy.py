"""``flatcli local-entropy``: parse, call flatcli.measure.local_entropy for each checkpoint, render (MATH.md §2)."""
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatcli import distributed
from flatcli.cli.common import (DataDirOpt, DataOpt, DepthOpt, DeviceOpt, Loss, ModelOpt, ReplicaOpt, SeedOpt,
                                TrustPickleOpt, WidthOpt, parse_replica, start)
from flatcli.cli.local_energy import plus_minus
from flatcli.cli.measure_common import (CheckpointsArg, CsvOpt, InputMaker, JsonOpt, MaxExamplesOpt, SplitName,
                                        SplitOpt, SweepProgress, check_outputs, load_checkpoints, settings_dict,
                                        settings_line, write_results)
from flatcli.cli.render import fmt, table
from flatcli.errors import FlatcliError
from flatcli.measure import LocalEntropyResult, parse_gammas
from flatcli.measure import local_entropy as measure_local_entropy

DEFAULT_GAMMAS = "0.3,1,3,10,30,100,300"
COLUMNS = ["checkpoint", "gamma", "local_entropy", "local_entropy_sem", "distance", "loss_mean", "error_mean",
           "beta", "chains", "steps", "burn_in", "sampler", "acceptance", "langevin_lr", "curvature",
           "checkpoint_loss", "checkpoint_error", "examples", "parameters", "loss_function", "split", "seed"]


def local_entropy(
    checkpoints: CheckpointsArg,
    gammas: Annotated[str, typer.Option(help="Couplings γ: a list 1,10,100 or start:stop:num (geometrically spaced, both ends included); each > 0. Large γ probes the immediate neighbourhood of the weights, small γ a wider one.")] = DEFAULT_GAMMAS,
    beta: Annotated[Optional[float], typer.Option(help="Inverse temperature β of the Langevin chains (default: the number of examples in use, so that the energy is the summed loss).", show_default=False)] = None,
    steps: Annotated[int, typer.Option(min=1, help="Langevin steps per ladder γ (one full-batch forward-backward pass per chain and step).")] = 120,
    burn_in: Annotated[int, typer.Option(min=0, help="Of those, steps discarded before averaging (and used to tune the step size); fewer than --steps.")] = 30,
    chains: Annotated[int, typer.Option(min=1, help="Independent Langevin chains; the ± is the standard error over chains.")] = 4,
    chains_per_pass: Annotated[int, typer.Option(min=1, help="Chains computed together in one vectorized pass; under torchrun the passes are shared out among the processes, so use --chains ≥ this × processes. The chains are the same whatever it is; only the float rounding differs.")] = 4,
    langevin_lr: Annotated[Optional[float], typer.Option(help="A fixed Langevin step η at every γ (default: c/(curvature + γ), each chain tuning c toward 60% acceptance during burn-in).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Minibatch for SGLD (default: all the examples: full-batch Langevin with a Metropolis correction, MALA, which is exact).", show_default=False)] = None,
    split: SplitOpt = SplitName.train,
    max_examples: MaxExamplesOpt = None,
    loss: Annotated[Optional[Loss], typer.Option(help="Loss L of the energy βL (default: the checkpoint's loss).", show_default=False)] = None,
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
    """Local entropy s(γ): the log-volume of low-loss weights around the checkpoint, per parameter, relative to a flat landscape.

    0 for a flat landscape, negative around a curved minimum: closer to 0 is flatter. Compare checkpoints at the same γ, β and examples; several checkpoints are measured side by side with the same settings.

    Example: flatcli local-entropy runs/sgd runs/esgd runs/rsgd --csv entropy.csv
    """
    check_outputs(csv_out, json_out)
    gamma_list = sorted(set(parse_gammas(gammas)))
    check_budget(steps, burn_in, beta, langevin_lr)
    dist, dev, console = start(device)
    loaded = load_checkpoints(checkpoints, model=model, width=width, depth=depth, data=data, data_dir=data_dir,
                              loss=loss.value if loss else None, trust_pickle=trust_pickle,
                              replica=parse_replica(replica))
    inputs = InputMaker(split.value, max_examples, seed, dev)
    inputs.check(loaded)
    betas = [float(beta) if beta is not None else float(examples_of(inputs, c)) for c in loaded]
    settings = settings_dict("local-entropy", loaded, seed=seed, device=str(dev), gammas=gamma_list,
                             beta=betas[0] if len(set(betas)) == 1 else betas,
                             beta_from="--beta" if beta is not None else "the number of examples",
                             steps=steps, burn_in=burn_in, chains=chains, chains_per_pass=chains_per_pass,
                             langevin_lr=langevin_lr or "auto",
                             batch_size=batch_size, split=split.value, max_examples=max_examples, replica=replica,
                             ranks=dist.world if dist else 1)
    console.print(settings_line(settings))
    passes = -(-chains // chains_per_pass)
    if dist and passes < dist.world:
        console.print(f"note: {chains} chains make {passes} pass(es) of up to {chains_per_pass}, fewer than the "
                      f"{dist.world} processes; to use them all, give --chains {chains_per_pass * dist.world} or "
                      f"a smaller --chains-per-pass")
    # under torchrun each rank runs the passes p ≡ rank (mod ranks) of chains_per_pass chains each; rank 0
    # gathers, prints and writes
    shard, gather = ((dist.rank, dist.world), distributed.all_gather) if dist else ((0, 1), None)
    my_passes = len(range(shard[0], passes, shard[1]))
    results = []
    with SweepProgress("local entropy", None, console) as progress:  # the ladder's length comes with the work
        for i, (ckpt, b) in enumerate(zip(loaded, betas)):
            x = inputs(ckpt)
            results.append(measure_local_entropy(
                x.model, x.data, gamma_list, beta=b, steps=steps, burn_in=burn_in, chains=chains,
                chains_per_pass=chains_per_pass, langevin_lr=langevin_lr, batch_size=batch_size, loss=ckpt.loss,
                seed=seed, callback=progress.callback(ckpt.label, remaining=len(loaded) - i), shard=shard,
                gather=gather))
            inputs.release(ckpt)
            progress.advance(len(results[-1].ladder) * steps * my_passes)  # the library's total
    settings["per_checkpoint"] = [details(c, r) for c, r in zip(loaded, results)]
    rows = [row for ckpt, result in zip(loaded, results) for row in entropy_rows(ckpt, result, settings)]
    for t in entropy_tables([c.label for c in loaded], results, settings):
        console.print(t)
    if dist is None or dist.is_main:
        write_results(rows, COLUMNS, settings, csv_out, json_out)


def check_budget(steps: int, burn_in: int, beta: Optional[float], langevin_lr: Optional[float]) -> None:
    """Before any work: the values no option type can check on its own."""
    if burn_in >= steps:
        raise FlatcliError(f"--burn-in {burn_in} is not smaller than --steps {steps}",
                           "use fewer burn-in steps or more steps, e.g. --steps 120 --burn-in 30")
    for option, value in (("--beta", beta), ("--langevin-lr", langevin_lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise FlatcliError(f"{option} {value:g} is not a positive number", f"give {option} > 0 or leave it out")


def examples_of(inputs: InputMaker, ckpt) -> int:
    """How many examples a checkpoint is measured on (the default β); the examples stay cached on the device."""
    n = inputs(ckpt).examples
    inputs.release(ckpt)
    return n


def details(ckpt, result: LocalEntropyResult) -> dict:
    """What the measurement resolved for one checkpoint: β, curvature, sampler and the whole internal ladder."""
    return {"checkpoint": ckpt.label, "beta": result.beta, "examples": result.n_examples,
            "parameters": result.n_params, "curvature": result.curvature, "sampler": result.sampler,
            "acceptance": result.acceptance, "loss_function": ckpt.loss, "checkpoint_loss": result.loss,
            "checkpoint_error": result.error,
            "ladder": [vars(p) for p in result.ladder]}


def entropy_rows(ckpt, result: LocalEntropyResult, settings: dict) -> list[dict]:
    """One tidy row per asked γ, with the names in ``COLUMNS``; acceptance and lr are those of that γ."""
    at = {p.gamma: p for p in result.ladder}
    nearest = lambda g: at[min(at, key=lambda x: abs(math.log(x / g)))]
    return [{"checkpoint": ckpt.label, "gamma": r.gamma, "local_entropy": r.local_entropy,
             "local_entropy_sem": r.local_entropy_sem, "distance": r.distance, "loss_mean": r.loss_mean,
             "error_mean": r.error_mean, "beta": result.beta, "chains": result.chains, "steps": result.steps,
             "burn_in": result.burn_in, "sampler": result.sampler, "acceptance": nearest(r.gamma).acceptance,
             "langevin_lr": nearest(r.gamma).langevin_lr, "curvature": result.curvature,
             "checkpoint_loss": result.loss, "checkpoint_error": result.error, "examples": result.n_examples,
             "parameters": result.n_params, "loss_function": ckpt.loss,
             "split": settings["split"], "seed": settings["seed"]} for r in result.rows]


def entropy_tables(labels: list[str], results: list[LocalEntropyResult], settings: dict) -> list:
    """Rows = γ, one column per checkpoint: s ± sem (closer to 0 = flatter), then the distance and loss."""
    first = results[0]
    shared = lambda name, text: (text.format(getattr(first, name)) if len({getattr(r, name) for r in results}) == 1
                                 else f"{name.replace('n_', '')}: see the CSV")
    examples, beta = shared("n_examples", "{} examples"), shared("beta", "β {:g}")
    about = (f"{shared('sampler', '{}').upper()} · {first.chains} chains × {first.steps} steps "
             f"({first.burn_in} burn-in) · "
             f"split {settings['split']} ({examples}) · {beta} · seed {settings['seed']}")
    head = lambda label, r: f"{label}\ncurvature {fmt(r.curvature, 3)}"
    s_rows = [[f"{g:g}"] + [plus_minus(r.rows[j].local_entropy, r.rows[j].local_entropy_sem) for r in results]
              for j, g in enumerate(settings["gammas"])]
    d_rows = [[f"{g:g}"] + [v for r in results for v in (f"{r.rows[j].distance:.3g}", f"{r.rows[j].loss_mean:.4g}")]
              for j, g in enumerate(settings["gammas"])]
    return [table(f"s(γ) ± sem (local entropy per parameter; 0 = flat, closer to 0 = flatter) · {about}",
                  ["γ"] + [head(label, r) for label, r in zip(labels, results)], s_rows),
            table("⟨|w' − w|²⟩/N (mean squared distance per parameter) and ⟨L(w')⟩ (mean loss) at each γ; "
                  "L(w) is the checkpoint's own loss",
                  ["γ"] + [f"{label}\n{what}" for label, r in zip(labels, results)
                           for what in ("distance", f"loss (L(w) {r.loss:.4g})")], d_rows)]
