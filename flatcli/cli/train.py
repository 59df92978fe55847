"""``flatcli train``: parse, train, render. The loop itself lives in flatcli.training (imported when it runs)."""
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatcli.cli.common import (ClassesOpt, CropOpt, DataDirOpt, DepthOpt, DeviceOpt, InMemory, InMemoryOpt, Loss, Normalize,
                                NormalizeOpt, ResizeOpt, SeedOpt, ThreadsOpt, WidthOpt, WorkersOpt, start)
from flatcli.errors import FlatcliError
from flatcli.optim import defaults as OD
from flatcli.training.config import ALGOS, SCHEDULES, TrainConfig

D = TrainConfig()  # the defaults, in one place
DEFAULT_DATA = "digits"  # real data that ships with flatcli; a default run takes seconds on two cores
ESGD, RSGD, BOTH, OPT = ("Entropy-SGD (--algo esgd)", "Replicated SGD (--algo rsgd)",
                         "Entropic algorithms (--algo esgd and rsgd)", "Optimization")
DATA, RUN = "Model and data", "Run folder"
SCOPING = ("γ_1 of --gamma-schedule exp: γ_t = γ_0 (1 + γ_1)^t with t the optimizer steps already completed "
           "(γ_0 at the first step), the same for eSGD and rSGD (the seed's scoping). Keep lr·γ_t (eSGD: langevin-lr·γ_t) "
           "below 1 for the whole run.")
GAMMA_HELP = ("γ_0: coupling strength (eSGD: of w' to w; rSGD: of the replicas to their center), or auto: the "
              "balanced start, γ_0 = training loss / coupling term of the initial weights (rSGD: Σ L(w^a) / Σ ½|w^a − w̄|²; "
              "eSGD: L(w) / ½|w|²), as in the authors' own code. Default 0.1: flatcli's, tuned on the teacher set "
              "(docs/reproduction/tuning.md) and kept on the digits, where a balanced start did no better.")
SCHEDULE_HELP = ("How γ runs over the run's total steps T: constant; exp (γ_0 (1+γ_1)^t with --gamma-growth, or "
                 "geometric from γ_0 to --gamma-final); linear or cosine (from γ_0 to --gamma-final). Default: "
                 "constant (exp when --gamma-growth is given): on the digits (3 seeds, 10 epochs) exp and cosine from "
                 "--gamma auto ended within the seeds' spread of it. The authors' practice is exp from --gamma auto "
                 "up ×1e4 (--gamma-ratio 1e4), with lr·γ_final kept below 1 here.")


def parse_gamma(text: str):
    """--gamma: a number >= 0 or "auto"."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise FlatcliError(f"--gamma {text!r} is neither a number nor auto",
                           "write e.g. --gamma 0.1 or --gamma auto") from None
    if not value >= 0:
        raise FlatcliError(f"--gamma {text!r} is negative", "use a coupling >= 0, or auto")
    return value


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
    epochs: Annotated[Optional[int], typer.Option(min=1, show_default=str(D.epochs), help="Budget in epochs; an epoch is n/B minibatch gradients per model, for every algorithm.")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many optimizer steps (outer steps for eSGD).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per minibatch.", rich_help_panel=OPT)] = D.batch_size,
    lr: Annotated[Optional[float], typer.Option(show_default=f"{D.lr or 0.1} for sgd, {OD.RSGD_LR} for rsgd, {OD.ESGD_LR} for esgd", help="Learning rate (eSGD: the outer rate η).", rich_help_panel=OPT)] = None,
    momentum: Annotated[float, typer.Option(min=0.0, help="Momentum.", rich_help_panel=OPT)] = D.momentum,
    nesterov: Annotated[bool, typer.Option(help="Nesterov momentum.", rich_help_panel=OPT)] = D.nesterov,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="L2 weight decay.", rich_help_panel=OPT)] = D.weight_decay,
    lr_schedule: Annotated[str, typer.Option(help=f"{', '.join(SCHEDULES)} (cosine: to 0 over the run; step: × --lr-decay at each milestone).", rich_help_panel=OPT)] = D.lr_schedule,
    milestones: Annotated[str, typer.Option(help="Epochs of the step schedule, e.g. 30,60.", rich_help_panel=OPT)] = "",
    lr_decay: Annotated[float, typer.Option(min=0.0, help="Factor of the step schedule.", rich_help_panel=OPT)] = D.lr_decay,
    langevin_steps: Annotated[int, typer.Option(min=1, help="L: minibatch gradients per outer step.", rich_help_panel=ESGD)] = D.langevin_steps,
    langevin_lr: Annotated[float, typer.Option(help="η': the Langevin learning rate.", rich_help_panel=ESGD)] = D.langevin_lr,
    langevin_noise: Annotated[float, typer.Option(min=0.0, help="ε: Langevin noise; the step adds sqrt(η') ε ξ.", rich_help_panel=ESGD)] = D.noise,
    noise: Annotated[Optional[float], typer.Option("--noise", min=0.0, hidden=True, help="Old spelling of --langevin-noise.")] = None,
    alpha: Annotated[float, typer.Option(help="α: averaging factor of μ, in [0, 1).", rich_help_panel=ESGD)] = D.alpha,
    gamma: Annotated[str, typer.Option(help=GAMMA_HELP, rich_help_panel=BOTH)] = str(D.gamma),
    gamma_schedule: Annotated[Optional[str], typer.Option(show_default="constant", help=SCHEDULE_HELP, rich_help_panel=BOTH)] = None,
    gamma_final: Annotated[Optional[float], typer.Option(min=0.0, show_default=False, help="γ at the last step of the exp, linear and cosine schedules.", rich_help_panel=BOTH)] = None,
    gamma_ratio: Annotated[Optional[float], typer.Option(min=0.0, show_default=False, help="The same end as a multiple of γ_0: γ_final = ratio · γ_0 (the form for --gamma auto).", rich_help_panel=BOTH)] = None,
    gamma_growth: Annotated[float, typer.Option(min=0.0, help=SCOPING, rich_help_panel=BOTH)] = D.gamma_growth,
    replicas: Annotated[int, typer.Option(min=2, help="y: number of replicas.", rich_help_panel=RSGD)] = D.replicas,
    coupling_every: Annotated[int, typer.Option(min=1, help="K: the coupling acts every K steps.", rich_help_panel=RSGD)] = D.coupling_every,
    model: Annotated[Optional[str], typer.Option(show_default="mlp", rich_help_panel=DATA, help="Architecture: linear, mlp, lenet, convnet, resnet20, resnet110, resnet18, tv:NAME (any torchvision model), committee:K[:binary] (a committee machine of K sign units, K odd) or module:function (your own factory).")] = None,
    width: WidthOpt = 128,
    depth: DepthOpt = 2,
    data: Annotated[Optional[str], typer.Option(show_default="digits", rich_help_panel=DATA, help="digits (real 8x8 handwritten digits, embedded), teacher (synthetic, embedded), mnist, fashion-mnist, cifar10, cifar100, imagefolder:PATH, or a tensors file (.npz, .safetensors, .pt with x, y[, x_test, y_test]).")] = None,
    data_dir: DataDirOpt = Path("data"),
    classes: ClassesOpt = None,
    data_seed: Annotated[int, typer.Option(min=0, help="Seed of the teacher data, of the digits' train/test split and of data subsets.", rich_help_panel=DATA)] = 0,
    n_train: Annotated[Optional[int], typer.Option(min=1, help="Training examples (teacher size, or a cap).", show_default=False, rich_help_panel=DATA)] = None,
    n_test: Annotated[Optional[int], typer.Option(min=1, help="Test examples (teacher size, or a cap).", show_default=False, rich_help_panel=DATA)] = None,
    augment: Annotated[bool, typer.Option(help="Random crop + flip on image data.", rich_help_panel=DATA)] = D.augment,
    in_memory: Annotated[InMemory, typer.Option("--in-memory", rich_help_panel=DATA, help=InMemoryOpt.__metadata__[0].help)] = InMemory.auto,
    resize: Annotated[Optional[int], typer.Option(min=1, show_default=False, rich_help_panel=DATA, help=ResizeOpt.__metadata__[0].help)] = None,
    crop: Annotated[Optional[int], typer.Option(min=1, show_default=False, rich_help_panel=DATA, help=CropOpt.__metadata__[0].help)] = None,
    normalize: Annotated[Normalize, typer.Option(rich_help_panel=DATA, help=NormalizeOpt.__metadata__[0].help)] = Normalize.data,
    workers: Annotated[int, typer.Option(min=0, rich_help_panel=DATA, help=WorkersOpt.__metadata__[0].help)] = 0,
    loss: Annotated[Optional[Loss], typer.Option(show_default="cross-entropy, mse for float targets", help="Training loss.")] = None,
    amp: Annotated[bool, typer.Option(help="bf16 autocast where the device supports it.")] = D.amp,
    seed: SeedOpt = D.seed,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    out: Annotated[Optional[str], typer.Option(show_default="runs/DATA-MODEL-ALGO, numbered if taken", help="Run folder to write.", rich_help_panel=RUN)] = None,
    save_every: Annotated[Optional[int], typer.Option(min=1, show_default="every epoch", help="Also save every N steps (each save is atomic: a kill at any moment leaves a resumable folder).", rich_help_panel=RUN)] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from the weights of this checkpoint.", show_default=False, rich_help_panel=RUN)] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run folder exactly where it stopped.", show_default=False, rich_help_panel=RUN)] = None,
):
    """Train a network with SGD, Entropy-SGD or replicated SGD and write a self-describing run folder.

    Example: flatcli train --algo esgd --epochs 20 --out runs/esgd  (on the built-in digits; --data teacher
    for the synthetic set)
    """
    stop = {"asked": False, "trainer": None}
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _on_sigint(stop))
    try:
        if out is not None and not out.strip():
            raise FlatcliError("--out '' names no folder", "give a folder, e.g. --out runs/mine")
        dist, dev, console = start(device, threads)
        ranks = f" × {dist.world} ranks" if dist else ""
        if resume is not None:
            from flatcli.training import Trainer
            trainer = Trainer.resume(resume, dev, epochs=epochs, steps=steps, dist=dist, save_every=save_every,
                                     model=model)
            console.print(f"resuming {resume} at step {trainer.step} (epoch {trainer.epoch}) on {dev}{ranks} "
                          f"({threads_in_use()} thread(s))", soft_wrap=True)  # one line, for logs and greps
        else:
            cfg = TrainConfig(algo=algo, epochs=epochs or D.epochs, steps=steps, batch_size=batch_size, lr=lr,
                              momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                              lr_schedule=lr_schedule, milestones=parse_milestones(milestones), lr_decay=lr_decay,
                              seed=seed, loss=(loss.value if loss else "cross-entropy"), augment=augment, amp=amp,
                              langevin_steps=langevin_steps, langevin_lr=langevin_lr,
                              noise=noise if noise is not None else langevin_noise, alpha=alpha,
                              gamma=parse_gamma(gamma), gamma_growth=gamma_growth, gamma_schedule=gamma_schedule,
                              gamma_final=gamma_final, gamma_ratio=gamma_ratio, replicas=replicas, coupling_every=coupling_every)
            cfg.validate()
            images = {"resize": resize, "crop": crop, "normalize": normalize.value, "in_memory": in_memory.value,
                      "workers": workers}
            trainer = new_trainer(cfg, model, width, depth, data, data_dir, data_seed, n_train, n_test, loss, out,
                                  init, save_every, dist, dev, console, images, classes)
            console.print(f"training {trainer.model_spec.name} on {trainer.data.spec.name} with {cfg.algo} on "
                          f"{dev}{ranks} ({threads_in_use()} thread(s)): {len(trainer.data.train)} examples, "
                          f"batch {cfg.batch_size}, "
                          f"{trainer.total_steps} steps → {trainer.out}", soft_wrap=True)
        stop["trainer"] = trainer
        if stop["asked"]:
            raise KeyboardInterrupt
        run_with_progress(trainer, console, stop)
    except KeyboardInterrupt:
        _interrupted_before_training(stop)
    finally:
        signal.signal(signal.SIGINT, previous)


def threads_in_use() -> int:
    import torch
    return torch.get_num_threads()


def _on_sigint(stop: dict) -> None:
    """During training: ask the loop to save and stop at the next step. Before: stop at once."""
    stop["asked"] = True
    if stop["trainer"] is None:
        raise KeyboardInterrupt


def _interrupted_before_training(stop: dict) -> None:
    trainer = stop["trainer"]
    saved = trainer is not None and trainer.out is not None and trainer.last_good is not None
    typer.echo("interrupted before the first step: " + (f"the initial state is saved in {trainer.out}" if saved
                                                        else "nothing was saved"), err=True)
    sys.exit(130)


def new_trainer(cfg, model, width, depth, data, data_dir, data_seed, n_train, n_test, loss, out, init, save_every,
                dist, dev, console, images=None, classes=None):
    """A fresh run: the model (from --model, or the --init checkpoint's metadata), the data, the folder."""
    from flatcli import distributed
    from flatcli.checkpoint import model_spec_from_metadata, read_checkpoint
    from flatcli.data import DataSpec, load_data
    from flatcli.data.core import parse_classes
    from flatcli.models import ModelSpec
    from flatcli.training import Trainer

    init_raw = read_checkpoint(init) if init is not None else None
    if model is None and init_raw is not None and init_raw.meta is not None:
        model_spec = model_spec_from_metadata(init_raw.meta, None, init)
    else:
        model_spec = ModelSpec(name=model or "mlp", width=width, depth=depth)
    data_obj = load_data(DataSpec(name=data or DEFAULT_DATA, data_dir=str(data_dir), seed=data_seed,
                                  n_train=n_train, n_test=n_test, classes=parse_classes(classes), **(images or {})))
    for note in data_obj.notes:
        console.print(f"note: {note}", highlight=False)
    if loss is None and data_obj.num_classes is None:
        cfg.loss = "mse"
    out = Path(out) if out else default_out(data or DEFAULT_DATA, model_spec.name, cfg.algo)
    replacing = (out / "model.safetensors").exists()
    if dist is not None:  # every rank must write into the same folder, the one rank 0 picked
        out = Path(distributed.broadcast(str(out)))
    trainer = Trainer(cfg, data_obj, model_spec, dev, out=out, dist=dist, save_every=save_every,
                      init_state=init_raw.state_dict if init_raw is not None else None, init_source=init)
    if replacing:  # said once the folder is ours (a run in use is refused first, in one line)
        console.print(f"note: replacing the run in {out} (use --resume {out} to continue it instead)")
    return trainer


def run_with_progress(trainer, console, stop: dict) -> None:
    from flatcli.cli.render import progress_bar, table
    from flatcli.training import Interrupted

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
        sys.exit(130)  # (a typer.Exit(130) would read as a Ctrl-C that nobody reported)
    rows = [[split, metrics[f"{split}_loss"], metrics[f"{split}_error"]] for split in ("train", "test")]
    console.print(table(f"{trainer.cfg.algo} · {trainer.model_spec.name} · step {trainer.step}",
                        ["split", "loss", "error"], rows))
    console.print(f"checkpoint: {trainer.out}")
