"""``flatcli train``: parse, train, render. The loop itself lives in flatcli.training."""
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatcli.checkpoint import read_checkpoint
from flatcli import distributed
from flatcli.cli.common import DataDirOpt, DataOpt, DepthOpt, DeviceOpt, Loss, ModelOpt, SeedOpt, WidthOpt, start
from flatcli.cli.render import progress_bar, table
from flatcli.data import DataSpec, load_data
from flatcli.errors import FlatcliError
from flatcli.models import ModelSpec
from flatcli.training import Interrupted, Trainer, TrainConfig
from flatcli.training.config import ALGOS, SCHEDULES

D = TrainConfig()  # the defaults, in one place
ESGD, RSGD, OPT = "Entropy-SGD (--algo esgd)", "Replicated SGD (--algo rsgd)", "Optimization"


def parse_milestones(text: str) -> list[int]:
    try:
        return [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise FlatcliError(f"--milestones {text!r} is not a list of epochs", "write e.g. 30,60,90") from None


def default_out(data: str, model: str, algo: str) -> Path:
    stem = "-".join(s.replace(":", "_").replace("/", "_").replace(".", "_") for s in (Path(data).name, model, algo))
    out, k = Path("runs") / stem, 1
    while out.exists():
        k += 1
        out = Path("runs") / f"{stem}-{k}"
    return out


def train(
    algo: Annotated[str, typer.Option(help=f"Algorithm: {', '.join(ALGOS)}.", rich_help_panel=OPT)] = D.algo,
    epochs: Annotated[Optional[int], typer.Option(min=1, help=f"Budget in epochs; an epoch is n/B minibatch gradients per model, for every algorithm. [default: {D.epochs}]")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many optimizer steps (outer steps for eSGD).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per minibatch.", rich_help_panel=OPT)] = D.batch_size,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (eSGD: the outer rate η). [default: 0.1 for sgd and rsgd, 1.0 for esgd]", rich_help_panel=OPT)] = None,
    momentum: Annotated[float, typer.Option(min=0.0, help="Momentum.", rich_help_panel=OPT)] = D.momentum,
    nesterov: Annotated[bool, typer.Option(help="Nesterov momentum.", rich_help_panel=OPT)] = D.nesterov,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="L2 weight decay.", rich_help_panel=OPT)] = D.weight_decay,
    lr_schedule: Annotated[str, typer.Option(help=f"{', '.join(SCHEDULES)} (cosine: to 0 over the run; step: × --lr-decay at each milestone).", rich_help_panel=OPT)] = D.lr_schedule,
    milestones: Annotated[str, typer.Option(help="Epochs of the step schedule, e.g. 30,60.", rich_help_panel=OPT)] = "",
    lr_decay: Annotated[float, typer.Option(min=0.0, help="Factor of the step schedule.", rich_help_panel=OPT)] = D.lr_decay,
    langevin_steps: Annotated[int, typer.Option(min=1, help="L: minibatch gradients per outer step.", rich_help_panel=ESGD)] = D.langevin_steps,
    langevin_lr: Annotated[float, typer.Option(help="η': the Langevin learning rate.", rich_help_panel=ESGD)] = D.langevin_lr,
    noise: Annotated[float, typer.Option(min=0.0, help="ε: Langevin noise; the step adds sqrt(η') ε ξ.", rich_help_panel=ESGD)] = D.noise,
    alpha: Annotated[float, typer.Option(help="α: averaging factor of μ, in [0, 1).", rich_help_panel=ESGD)] = D.alpha,
    gamma: Annotated[float, typer.Option(min=0.0, help="γ_0: coupling strength (eSGD and rSGD).", rich_help_panel=RSGD)] = D.gamma,
    gamma_growth: Annotated[float, typer.Option(min=0.0, help="γ_1: scoping, γ_t = γ_0 (1 + γ_1)^t over optimizer steps t. Keep lr·γ_t (eSGD: langevin-lr·γ_t) below 1 for the whole run.", rich_help_panel=RSGD)] = D.gamma_growth,
    replicas: Annotated[int, typer.Option(min=2, help="y: number of replicas.", rich_help_panel=RSGD)] = D.replicas,
    coupling_every: Annotated[int, typer.Option(min=1, help="K: the coupling acts every K steps.", rich_help_panel=RSGD)] = D.coupling_every,
    model: ModelOpt = None,
    width: WidthOpt = 128,
    depth: DepthOpt = 2,
    data: DataOpt = None,
    data_dir: DataDirOpt = Path("data"),
    data_seed: Annotated[int, typer.Option(help="Seed of the teacher data and of data subsets.")] = 0,
    n_train: Annotated[Optional[int], typer.Option(min=1, help="Training examples (teacher size, or a cap).")] = None,
    n_test: Annotated[Optional[int], typer.Option(min=1, help="Test examples (teacher size, or a cap).")] = None,
    augment: Annotated[bool, typer.Option(help="Random crop + flip on image data.")] = D.augment,
    loss: Annotated[Optional[Loss], typer.Option(help="Training loss. [default: cross-entropy, mse for float targets]")] = None,
    amp: Annotated[bool, typer.Option(help="bf16 autocast where the device supports it.")] = D.amp,
    seed: SeedOpt = D.seed,
    device: DeviceOpt = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Run folder to write. [default: runs/DATA-MODEL-ALGO, numbered if taken]")] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from the weights of this checkpoint.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run folder exactly where it stopped.")] = None,
):
    """Train a network with SGD, Entropy-SGD or replicated SGD and write a self-describing run folder.

    Example: flatcli train --algo esgd --epochs 20 --out runs/esgd
    """
    dist, dev, console = start(device)
    ranks = f" × {dist.world} ranks" if dist else ""
    if resume is not None:
        trainer = Trainer.resume(resume, dev, epochs=epochs, steps=steps, dist=dist)
        console.print(f"resuming {resume} at step {trainer.step} (epoch {trainer.epoch}) on {dev}{ranks}")
    else:
        cfg = TrainConfig(algo=algo, epochs=epochs or D.epochs, steps=steps, batch_size=batch_size, lr=lr,
                          momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, lr_schedule=lr_schedule,
                          milestones=parse_milestones(milestones), lr_decay=lr_decay, seed=seed,
                          loss=(loss.value if loss else "cross-entropy"), augment=augment, amp=amp,
                          langevin_steps=langevin_steps, langevin_lr=langevin_lr, noise=noise, alpha=alpha,
                          gamma=gamma, gamma_growth=gamma_growth, replicas=replicas, coupling_every=coupling_every)
        cfg.validate()
        init_raw = read_checkpoint(init) if init is not None else None
        if model is None and init_raw is not None and init_raw.meta is not None:
            model_spec = ModelSpec.from_dict(init_raw.meta["model"])
        else:
            model_spec = ModelSpec(name=model or "mlp", width=width, depth=depth)
        data_obj = load_data(DataSpec(name=data or "teacher", data_dir=str(data_dir), seed=data_seed,
                                      n_train=n_train, n_test=n_test))
        if loss is None and data_obj.num_classes is None:
            cfg.loss = "mse"
        out = out or default_out(data or "teacher", model_spec.name, algo)
        if (out / "model.safetensors").exists():
            console.print(f"note: replacing the run in {out} (use --resume {out} to continue it instead)")
        if dist is not None:  # every rank must write into the same folder, the one rank 0 picked
            out = Path(distributed.broadcast(str(out)))
        trainer = Trainer(cfg, data_obj, model_spec, dev, out=out, dist=dist,
                          init_state=init_raw.state_dict if init_raw is not None else None, init_source=init)
        console.print(f"training {model_spec.name} on {data_obj.spec.name} with {cfg.algo} on {dev}{ranks}: "
                      f"{len(data_obj.train)} examples, batch {cfg.batch_size}, {trainer.total_steps} steps → {out}")
    run_with_progress(trainer, console)


def run_with_progress(trainer: Trainer, console) -> None:
    stop = {"asked": False}

    def on_sigint(signum, frame):
        stop["asked"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar = progress_bar(console)
    try:
        with bar:
            task = bar.add_task("train", total=trainer.total_steps, completed=trainer.step, info="")

            def progress(event, info):
                if event == "step":
                    bar.update(task, completed=info["step"],
                               info=f"epoch {info['epoch'] + 1} loss {info['loss']:.4f} err {info['error']:.3f}")
                elif event == "epoch":
                    bar.console.print(f"epoch {info['epoch']}: train loss {info['train_loss']:.4f} "
                                      f"err {info['train_error']:.4f} · test loss {info['test_loss']:.4f} "
                                      f"err {info['test_error']:.4f}")

            metrics = trainer.run(progress, should_stop=lambda: stop["asked"])
    except Interrupted as e:
        console.print(f"interrupted at step {e.step}; the state is saved. Continue with: "
                      f"flatcli train --resume {e.out}")
        raise typer.Exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    rows = [[split, metrics[f"{split}_loss"], metrics[f"{split}_error"]] for split in ("train", "test")]
    console.print(table(f"{trainer.cfg.algo} · {trainer.model_spec.name} · step {trainer.step}",
                        ["split", "loss", "error"], rows))
    console.print(f"checkpoint: {trainer.out}")
