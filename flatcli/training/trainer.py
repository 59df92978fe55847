"""The training loop: steps, evaluation, self-describing checkpoints, exact resume, interruption, divergence."""
import csv
import io
import math
import time
from pathlib import Path

import torch

import flatcli
from flatcli import checkpoint as ckpt
from flatcli import distributed
from flatcli.data import Data, DataSpec, Split, augment_batch, load_data
from flatcli.devices import autocast
from flatcli.errors import FlatcliError
from flatcli.io import make_run_dir, write_text_atomic
from flatcli.losses import evaluate
from flatcli.models import ModelSpec, build_model, check_fits
from flatcli.training.algorithms import STEPPERS
from flatcli.training.batches import BatchStream, mix_seed, scheduled_lr
from flatcli.training.config import TrainConfig

EVAL_BATCH = 1024   # examples per forward pass when evaluating: fixed, so recorded metrics are reproducible
SYNC_EVERY = 20     # steps between host syncs (progress display and the non-finite loss check)


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C) after saving a resumable state."""

    def __init__(self, step: int, out: Path | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.out = step, out


def split_batches(split: Split, batch_size: int = EVAL_BATCH):
    for start in range(0, len(split), batch_size):
        yield split.batch(torch.arange(start, min(start + batch_size, len(split))))


def evaluate_model(model, split: Split | None, loss: str, amp: bool = False) -> tuple[float, float]:
    """Mean loss and 0-1 error on a split, in eval mode (the model's mode is restored)."""
    if split is None:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        def forward(x):
            with autocast(device, amp):
                return model(x)
        return evaluate(model, split_batches(split), loss, forward=forward)
    finally:
        model.train(was_training)


class Trainer:
    """Trains ``cfg.algo`` on ``data``; writes a run folder under ``out`` (when given) every epoch.

    ``dist`` (under torchrun): SGD/eSGD shard every global minibatch over the ranks; rSGD gives each rank
    y / P replicas. Every rank holds the same metrics; rank 0 alone writes files.
    """

    def __init__(self, cfg: TrainConfig, data: Data, model_spec: ModelSpec, device: torch.device,
                 out: str | Path | None = None, init_state: dict | None = None, init_source=None,
                 dist: distributed.Dist | None = None):
        self.cfg, self.data, self.model_spec, self.device = cfg.validate(), data, model_spec, device
        self.dist = dist
        self.writes = dist is None or dist.is_main
        self.out = Path(out) if out is not None else None
        if self.out is not None and self.writes:
            make_run_dir(self.out)
        self.train_split = data.train.to(device)
        self.test_split = data.test.to(device) if data.test is not None else None
        self.replica_ids = self._local_replicas()
        # replica a starts from its own seed, so the initialization does not depend on how ranks split them
        self.models = [build_model(model_spec, data.input_shape, data.num_outputs, seed=mix_seed(cfg.seed, 11, a))
                       for a in self.replica_ids]
        check_fits(self.models[0], data.input_shape, data.num_outputs, label=model_spec.name)
        for m in self.models:
            if init_state is not None:
                ckpt.load_into(m, init_state, init_source)
            m.to(device).train()
        self.streams = [BatchStream(len(self.train_split), cfg.batch_size, cfg.seed, a) for a in self.replica_ids]
        self.stepper = STEPPERS[cfg.algo](self.models, cfg, self.next_batch, device, dist,
                                          global_batch=self.streams[0].batch_size)
        self.step = self.epoch = self.epoch_step = 0
        self.rows: list[dict] = []
        self.seconds = 0.0
        self.metrics: dict = {}
        self._reset_running()

    def _local_replicas(self) -> list[int]:
        if self.cfg.algo != "rsgd":
            return [0]
        y, world = self.cfg.replicas, self.dist.world if self.dist else 1
        if y % world:
            raise FlatcliError(f"--replicas {y} cannot be split evenly over {world} ranks",
                               f"use a multiple of {world} replicas or another --nproc_per_node")
        rank = self.dist.rank if self.dist else 0
        return list(range(rank * y // world, (rank + 1) * y // world))

    # -- data ---------------------------------------------------------------------------------
    def next_batch(self, stream: int):
        """The next minibatch of local stream ``stream``; data-parallel ranks keep their shard of it."""
        s = self.streams[stream]
        idx = s.next()
        shard = (lambda t: torch.tensor_split(t, self.dist.world)[self.dist.rank]) \
            if self.dist is not None and self.cfg.algo != "rsgd" else None
        augment = self.cfg.augment and self.data.images
        if shard and not augment:
            idx = shard(idx)
        x, y = self.train_split.batch(idx)
        if augment:  # drawn for the whole global minibatch, so every world size sees the same crops and flips
            a = self.replica_ids[stream]
            g = torch.Generator(device=x.device).manual_seed(mix_seed(self.cfg.seed, 7, a, s.epoch, s.index))
            x = augment_batch(x, g)
            if shard:
                x, y = shard(x), shard(y)
        return x, y

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.streams[0].batches_per_epoch // self.stepper.minibatches_per_step)

    @property
    def total_steps(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.steps) if self.cfg.steps else total

    # -- the loop -----------------------------------------------------------------------------
    def _reset_running(self):
        self.running = [0.0, 0.0, 0]   # this epoch's loss sum, error sum, examples (this rank's share)
        self.window: list[tuple] = []  # (loss sum, error sum, examples) of each step since the last sync
        self.global_running = {"loss": math.nan, "error": math.nan}

    def _sync(self, stop: bool) -> bool:
        """One host sync (and, under torchrun, one all-reduce): running means, the non-finite check, the stop vote.

        Sums are accumulated step by step in double precision on the host, so they do not depend on where the
        syncs fall (an interrupted and resumed run records the same metrics).
        """
        pairs = torch.stack([torch.stack((l, e.float())) for l, e, _ in self.window]).tolist() if self.window else []
        for (loss, err), (_, _, n) in zip(pairs, self.window):
            self.running = [self.running[0] + loss, self.running[1] + err, self.running[2] + n]
        losses, self.window = [loss for loss, _ in pairs], []
        flat = [*losses, *self.running, float(stop)]
        if self.dist is not None:
            total = torch.tensor(flat, dtype=torch.float64, device=self.device)
            distributed.all_reduce_([total])
            flat = total.tolist()
        window, (loss_sum, err_sum, n, stops) = flat[:len(losses)], flat[len(losses):]
        self.global_running = {"loss": loss_sum / max(n, 1), "error": err_sum / max(n, 1)}
        bad = [i for i, v in enumerate(window) if not math.isfinite(v)]
        if bad:
            where = f"; the last good checkpoint is in {self.out}" if self.out else ""
            step = self.step - len(window) + 1 + bad[0]
            raise FlatcliError(f"the training loss became {window[bad[0]]} at step {step}{where}",
                               f"use a smaller learning rate than --lr {self.cfg.lr:g}")
        return stops > 0

    def _set_lr(self):
        cfg = self.cfg
        lr = scheduled_lr(cfg.lr, cfg.lr_schedule, self.step / self.total_steps, self.epoch, cfg.milestones, cfg.lr_decay)
        for group in self.stepper.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def run(self, progress=None, should_stop=lambda: False) -> dict:
        """Train to the end of the budget; ``progress(event, info)`` hears "start", "step" and "epoch" events.

        ``should_stop()`` is asked after every step (under torchrun the ranks vote at each sync); a yes saves a
        resumable state and raises Interrupted.
        """
        progress = progress or (lambda event, info: None)
        progress("start", {"total": self.total_steps, "done": self.step})
        if self.out is not None and self.step == 0:
            self.save(complete=False)  # a last good checkpoint exists even if the first epoch diverges
        tick = time.perf_counter()
        while self.step < self.total_steps:
            self._set_lr()
            loss_sum, err_sum, n = self.stepper.step()
            self.window.append((loss_sum, err_sum, n))
            self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
            end_of_epoch = self.epoch_step == self.steps_per_epoch
            stop = should_stop()
            if self.step % SYNC_EVERY == 0 or end_of_epoch or self.step == self.total_steps or \
                    (stop and self.dist is None):
                stop = self._sync(stop)
                progress("step", {"step": self.step, "epoch": self.epoch, **self.global_running})
            else:
                stop = False
            if end_of_epoch:
                self.seconds += time.perf_counter() - tick
                self._end_epoch(progress)
                tick = time.perf_counter()
            if stop and self.step < self.total_steps:
                self.seconds += time.perf_counter() - tick
                if self.out is not None:
                    self.save(complete=False)
                raise Interrupted(self.step, self.out)
        self.seconds += time.perf_counter() - tick
        model = self.stepper.report_model()
        train = evaluate_model(model, self.train_split, self.cfg.loss, self.cfg.amp)
        test = evaluate_model(model, self.test_split, self.cfg.loss, self.cfg.amp)
        self.metrics = {"train_loss": train[0], "train_error": train[1], "test_loss": test[0], "test_error": test[1]}
        if self.out is not None:
            self.save(complete=True)
        return self.metrics

    def _end_epoch(self, progress):
        cfg, model = self.cfg, self.stepper.report_model()
        test = evaluate_model(model, self.test_split, cfg.loss, cfg.amp)
        running = self.global_running
        row = {"epoch": self.epoch + 1, "step": self.step, "lr": self.stepper.optimizer.param_groups[0]["lr"],
               "train_loss": running["loss"], "train_error": running["error"],
               "test_loss": test[0], "test_error": test[1], "seconds": round(self.seconds, 3)}
        if cfg.algo in ("esgd", "rsgd"):
            row["gamma"] = self.stepper.optimizer.current_gamma  # γ of the coming step, after scoping
        if cfg.algo == "rsgd":
            row.update(self._replica_metrics(model, test[1]))
        self.rows.append(row)
        self.epoch, self.epoch_step = self.epoch + 1, 0
        self._reset_running()
        progress("epoch", row)
        if self.out is not None:
            self.save(complete=False)

    def _replica_metrics(self, center, center_test_error: float) -> dict:
        cfg = self.cfg
        center_train = evaluate_model(center, self.train_split, cfg.loss, cfg.amp)
        test = torch.tensor(sum(evaluate_model(m, self.test_split, cfg.loss, cfg.amp)[1] for m in self.models),
                            dtype=torch.float64)
        if self.dist is not None:
            distributed.all_reduce_([test])
        # the replicas' train error is the running one of the epoch (train_error): no extra passes over the data
        return {"replica_distance": self.stepper.replica_distance(),
                "center_train_error": center_train[1], "center_test_error": center_test_error,
                "replicas_train_error": self.global_running["error"],
                "replicas_test_error": float(test) / cfg.replicas}

    # -- checkpoints --------------------------------------------------------------------------
    def metadata(self, complete: bool) -> dict:
        cfg = self.cfg
        return {"format": "flatcli-run", "version": flatcli.__version__, "model": self.model_spec.to_dict(),
                "data": self.data.spec.to_dict(), "input_shape": list(self.data.input_shape),
                "num_outputs": self.data.num_outputs, "num_classes": self.data.num_classes,
                "loss": cfg.loss, "algo": cfg.algo, "hyper": cfg.to_dict(), "seed": cfg.seed,
                "epoch": self.epoch, "step": self.step, "complete": complete,
                "replicas": cfg.replicas if cfg.algo == "rsgd" else 0,
                "parameters": sum(p.numel() for p in self.models[0].parameters()), "metrics": self.metrics}

    def _gather_replicas(self) -> tuple[dict, list, dict]:
        """Every replica's weights, optimizer state and data position, in replica order (from all ranks)."""
        local = [(a, {k: v.detach().cpu() for k, v in m.state_dict().items()}, st, s.state())
                 for a, m, st, s in zip(self.replica_ids, self.models, self.stepper.extra_state()["replicas"],
                                        self.streams)]
        parts = distributed.all_gather(local) if self.dist is not None else [local]
        everything = sorted((item for part in parts for item in part), key=lambda item: item[0])
        weights = {f"{a}.{k}": v for a, sd, _, _ in everything for k, v in sd.items()}
        states = [{"step_count": st["step_count"], "momentum": [None if b is None else b.cpu() for b in st["momentum"]]}
                  for _, _, st, _ in everything]
        return weights, states, {a: pos for a, _, _, pos in everything}

    def save(self, complete: bool) -> None:
        """Write the run folder (rank 0 only; every rank takes part in gathering what it holds)."""
        out, meta = self.out, self.metadata(complete)
        center = self.stepper.report_model()
        running = list(self.running)
        if self.dist is not None:
            total = torch.tensor(running, dtype=torch.float64, device=self.device)
            distributed.all_reduce_([total])
            running = total.tolist()
        streams = {a: s.state() for a, s in zip(self.replica_ids, self.streams)}
        if self.cfg.algo == "rsgd":
            replicas, replica_states, streams = self._gather_replicas()
            optimizer, extra = None, {"replicas": replica_states}
        else:
            optimizer, extra = self.stepper.optimizer.state_dict(), self.stepper.extra_state()
        if not self.writes:
            return
        if self.cfg.algo == "rsgd":
            ckpt.save_weights(out / ckpt.REPLICAS, replicas)
        ckpt.save_weights(out / ckpt.WEIGHTS, center.state_dict(), meta)
        ckpt.save_torch(out / ckpt.STATE, {
            "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step, "seconds": self.seconds,
            "optimizer": optimizer, "streams": streams,
            "running": running, "extra": extra})
        write_text_atomic(out / ckpt.METRICS, rows_to_csv(self.rows))

    @classmethod
    def resume(cls, run: str | Path, device: torch.device, epochs: int | None = None,
               steps: int | None = None, dist: distributed.Dist | None = None) -> "Trainer":
        """Rebuild a trainer from a run folder, exactly where it stopped (under any number of ranks)."""
        raw = ckpt.read_checkpoint(run)
        run = Path(raw.path)
        if raw.meta is None or raw.meta.get("format") != "flatcli-run" or not (run / ckpt.STATE).is_file():
            raise FlatcliError(f"{str(run)!r} is not a resumable flatcli run folder", "pass the --out folder of a run")
        meta = raw.meta
        cfg = TrainConfig.from_dict(meta["hyper"])
        cfg.epochs = epochs or cfg.epochs
        cfg.steps = steps if steps is not None else cfg.steps
        data = load_data(DataSpec.from_dict(meta["data"]))
        self = cls(cfg, data, ModelSpec.from_dict(meta["model"]), device, out=run, dist=dist)
        state = ckpt.load_torch_state(run / ckpt.STATE)
        if state["step"] != meta["step"]:
            raise FlatcliError(f"{str(run)!r} has weights and training state of different steps", "start a fresh run")
        if cfg.algo == "rsgd":
            for a, m in zip(self.replica_ids, self.models):
                ckpt.load_into(m, ckpt.replica_state(raw, a), run)
            self.stepper.load_extra_state({"replicas": [state["extra"]["replicas"][a] for a in self.replica_ids]})
        else:
            ckpt.load_into(self.models[0], raw.state_dict, run)
            self.stepper.optimizer.load_state_dict(state["optimizer"])
            self.stepper.load_extra_state(state["extra"])
        for a, s in zip(self.replica_ids, self.streams):
            s.load_state(state["streams"][a])
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.seconds = state["seconds"]
        if dist is None or dist.is_main:  # the saved sums are over all ranks: one rank carries them on
            self.running = list(state["running"])
        self.rows = read_metrics(run / ckpt.METRICS)
        return self


def rows_to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file() or not path.read_text().strip():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if k not in ("epoch", "step") else int(v)) if v not in ("", "None") else None
                 for k, v in row.items()} for row in csv.DictReader(f)]
