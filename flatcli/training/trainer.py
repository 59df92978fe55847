"""The training loop: steps, evaluation, self-describing checkpoints, exact resume, interruption, divergence.

The loop knows no algorithm by name: ``flatcli.training.algorithms`` holds one object per algorithm that owns
its models, optimizer(s), state and reported model.

A run folder holds ``state.pt`` — the whole resumable state in one file (the algorithm's weights and
optimizer state, the data order, the metrics so far, the metadata), replaced in one atomic rename — and the
files people read, written after it from the same state: ``model.safetensors`` (the reported model and its
metadata), the algorithm's extra weight files (rSGD: ``replicas.safetensors``) and ``metrics.csv``. A kill at
any moment leaves a ``state.pt`` of the previous or of the new save, consistent in itself, and resume reads
nothing else. A save happens only when the weights and a probe of the loss are finite, so the last save is
always a good checkpoint. One process at a time trains in a folder (``.lock``).
"""
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
from flatcli.io import RunLock, make_run_dir, remove_stray_temporaries, write_text_atomic
from flatcli.losses import evaluate
from flatcli.models import ModelSpec, build_model, check_fits
from flatcli.training.algorithms import algorithm_class
from flatcli.training.batches import BatchStream, mix_seed, scheduled_lr
from flatcli.training.config import TrainConfig

EVAL_BATCH = 1024   # examples per forward pass when evaluating: fixed, so recorded metrics are reproducible
SYNC_EVERY = 20     # steps between host syncs (progress display and the non-finite loss check)
STATE_FORMAT = 2    # state.pt layout: everything to resume in one file


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C) after saving a resumable state."""

    def __init__(self, step: int, out: Path | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.out = step, out


def split_batches(split: Split, batch_size: int = EVAL_BATCH, limit: int | None = None):
    n = len(split) if limit is None else min(limit, len(split))
    for start in range(0, n, batch_size):
        yield split.batch(torch.arange(start, min(start + batch_size, n)))


def evaluate_model(model, split: Split | None, loss: str, amp: bool = False, limit: int | None = None):
    """Mean loss and 0-1 error on a split (its first ``limit`` examples), in eval mode (the mode is restored)."""
    if split is None:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        def forward(x):
            with autocast(device, amp):
                return model(x)
        return evaluate(model, split_batches(split, limit=limit), loss, forward=forward)
    finally:
        model.train(was_training)


class Trainer:
    """Trains ``cfg.algo`` on ``data``; writes a run folder under ``out`` (when given) every epoch, and every
    ``save_every`` steps when given.

    ``dist`` (under torchrun): data-parallel algorithms shard every global minibatch over the ranks; others
    (rSGD) give each rank its own models. Every rank holds the same metrics; rank 0 alone writes files.
    """

    def __init__(self, cfg: TrainConfig, data: Data, model_spec: ModelSpec, device: torch.device,
                 out: str | Path | None = None, init_state: dict | None = None, init_source=None,
                 dist: distributed.Dist | None = None, save_every: int | None = None):
        self.cfg, self.data, self.model_spec, self.device = cfg.validate(), data, model_spec, device
        self.dist, self.save_every, self.lock = dist, save_every, None
        self.writes = dist is None or dist.is_main
        self.out = Path(out) if out is not None else None
        if self.out is not None and self.writes:
            make_run_dir(self.out)
            self.lock = RunLock(self.out)  # held until this process ends
            remove_stray_temporaries(self.out)
        self.train_split = data.train.to(device)
        self.test_split = data.test.to(device) if data.test is not None else None
        algorithm = algorithm_class(cfg.algo)
        self.model_ids = algorithm.local_models(cfg, dist)
        # model a starts from its own seed, so the initialization does not depend on how ranks split them
        models = [build_model(model_spec, data.input_shape, data.num_outputs, seed=mix_seed(cfg.seed, 11, a))
                  for a in self.model_ids]
        check_fits(models[0], data.input_shape, data.num_outputs, label=model_spec.name)
        for m in models:
            if init_state is not None:
                ckpt.load_into(m, init_state, init_source)
            m.to(device).train()
        self.streams = [BatchStream(len(self.train_split), cfg.batch_size, cfg.seed, a) for a in self.model_ids]
        self.algorithm = algorithm(models, self.model_ids, cfg, self.next_batch, device, dist,
                                   global_batch=self.streams[0].batch_size)
        self._start_gamma()
        self.step = self.epoch = self.epoch_step = 0
        self.rows: list[dict] = []
        self.seconds = 0.0
        self.metrics: dict = {}
        self.last_good: int | None = None  # the step of the last save, a good checkpoint
        self._reset_running()

    def _start_gamma(self) -> None:
        """The γ schedule's horizon (this run's total steps), and for gamma="auto" the balanced γ_0 of the initial
        weights, which replaces "auto" in the config (so the checkpoint records it and a resume reuses it)."""
        schedule = self.algorithm.gamma_schedule
        if schedule is None:
            return
        schedule.total = self.total_steps
        if self.cfg.gamma == "auto":
            mean_loss = lambda m: evaluate_model(m, self.train_split, self.cfg.loss, self.cfg.amp)[0]  # noqa: E731
            self.cfg.gamma = schedule.gamma0 = self.algorithm.balanced_gamma(mean_loss)
            self.cfg.gamma_auto = True

        # -- data ---------------------------------------------------------------------------------
    def next_batch(self, stream: int):
        """The next minibatch of local stream ``stream``; data-parallel ranks keep their shard of it."""
        s = self.streams[stream]
        idx = s.next()
        shard = (lambda t: torch.tensor_split(t, self.dist.world)[self.dist.rank]) \
            if self.dist is not None and self.algorithm_data_parallel else None
        augment = self.cfg.augment and self.data.images
        if shard and not augment:
            idx = shard(idx)
        x, y = self.train_split.batch(idx)
        if augment:  # drawn for the whole global minibatch, so every world size sees the same crops and flips
            a = self.model_ids[stream]
            g = torch.Generator(device=x.device).manual_seed(mix_seed(self.cfg.seed, 7, a, s.epoch, s.index))
            x = augment_batch(x, g)
            if shard:
                x, y = shard(x), shard(y)
        return x, y

    @property
    def algorithm_data_parallel(self) -> bool:
        return self.algorithm.data_parallel

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.streams[0].batches_per_epoch // self.algorithm.minibatches_per_step)

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
            self._diverged(f"the training loss became {window[bad[0]]} at step {self.step - len(window) + 1 + bad[0]}")
        return stops > 0

    def _diverged(self, what: str):
        where = (f"; the last good checkpoint (step {self.last_good}) is in {self.out}"
                 if self.out is not None and self.last_good is not None else "")
        raise FlatcliError(f"{what}{where}", f"use a smaller learning rate than --lr {self.cfg.lr:g}")

    def _set_lr(self):
        """The learning rate and (entropic algorithms) the coupling γ_t of the coming step."""
        cfg = self.cfg
        self.algorithm.set_lr(scheduled_lr(cfg.lr, cfg.lr_schedule, self.step / self.total_steps, self.epoch,
                                           cfg.milestones, cfg.lr_decay))
        if self.algorithm.gamma_schedule is not None:
            self.algorithm.set_gamma(self.algorithm.gamma_schedule(self.step))

    def run(self, progress=None, should_stop=lambda: False) -> dict:
        """Train to the end of the budget; ``progress(event, info)`` hears "start", "step" and "epoch" events.

        ``should_stop()`` is asked after every step (under torchrun the ranks vote at each sync); a yes saves a
        resumable state and raises Interrupted.
        """
        try:
            return self._run(progress or (lambda event, info: None), should_stop)
        finally:
            self.close()

    def close(self) -> None:
        """Release the run folder (another process may then train or resume in it)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _run(self, progress, should_stop) -> dict:
        progress("start", {"total": self.total_steps, "done": self.step})
        if self.out is not None and self.step == 0:
            self.save(complete=False)  # a last good checkpoint exists even if the first epoch diverges
        tick = time.perf_counter()
        while self.step < self.total_steps:
            self._set_lr()
            self.window.append(self.algorithm.step())
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
            elif self.save_every and self.step % self.save_every == 0 and self.step < self.total_steps:
                self._sync(False)
                self.save(complete=False)
            if stop and self.step < self.total_steps:
                self.seconds += time.perf_counter() - tick
                if self.out is not None:
                    self.save(complete=False)
                raise Interrupted(self.step, self.out)
        self.seconds += time.perf_counter() - tick
        return self._finish()

    def _finish(self) -> dict:
        model = self.algorithm.report_model()
        train = evaluate_model(model, self.train_split, self.cfg.loss, self.cfg.amp)
        test = evaluate_model(model, self.test_split, self.cfg.loss, self.cfg.amp)
        if not math.isfinite(train[0]) or not self._finite_weights():
            self._diverged(f"the trained weights give a non-finite training loss ({train[0]}) at step {self.step}")
        self.metrics = {"train_loss": train[0], "train_error": train[1], "test_loss": test[0], "test_error": test[1]}
        if self.out is not None:
            self.save(complete=True, checked=True)
        return self.metrics

    def _evaluate(self, model, split: str):
        return evaluate_model(model, self.train_split if split == "train" else self.test_split, self.cfg.loss,
                              self.cfg.amp)

    def _end_epoch(self, progress):
        if self.algorithm.gamma_schedule is not None:  # the row's γ is the coming step's, as before schedules
            self.algorithm.set_gamma(self.algorithm.gamma_schedule(self.step))
        model = self.algorithm.report_model()
        test = evaluate_model(model, self.test_split, self.cfg.loss, self.cfg.amp)
        running = self.global_running
        row = {"epoch": self.epoch + 1, "step": self.step, "lr": self.algorithm.lr,
               "train_loss": running["loss"], "train_error": running["error"],
               "test_loss": test[0], "test_error": test[1], "seconds": round(self.seconds, 3),
               **self.algorithm.epoch_metrics(self._evaluate, test[1], running)}
        self.rows.append(row)
        self.epoch, self.epoch_step = self.epoch + 1, 0
        self._reset_running()
        progress("epoch", row)
        if self.out is not None:
            self.save(complete=False)

    # -- checkpoints --------------------------------------------------------------------------
    def metadata(self, complete: bool) -> dict:
        cfg = self.cfg
        return {"format": "flatcli-run", "version": flatcli.__version__, "model": self.model_spec.to_dict(),
                "data": self.data.spec.to_dict(), "input_shape": list(self.data.input_shape),
                "num_outputs": self.data.num_outputs, "num_classes": self.data.num_classes,
                "loss": cfg.loss, "algo": cfg.algo, "hyper": cfg.to_dict(), "seed": cfg.seed,
                "epoch": self.epoch, "step": self.step, "complete": complete, **self.algorithm.metadata(),
                "parameters": sum(p.numel() for p in self.algorithm.models[0].parameters()),
                "metrics": self.metrics}

    def _finite_weights(self) -> bool:
        """Every local model's parameters finite, on every rank (one all-reduce under torchrun)."""
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in self.algorithm.models:
            for p in m.parameters():
                bad += (~torch.isfinite(p.detach())).sum()
        if self.dist is not None:
            distributed.all_reduce_([bad])
        return float(bad) == 0

    def _check_good(self, model) -> None:
        """Before a save: finite weights, and a finite loss of the reported model on its first training batch."""
        probe = evaluate_model(model, self.train_split, self.cfg.loss, self.cfg.amp, limit=EVAL_BATCH)[0]
        if not self._finite_weights() or not math.isfinite(probe):
            self._diverged(f"the weights at step {self.step} give a non-finite loss ({probe})")

    def _streams(self) -> dict:
        """Every model's data position, by global index (gathered from all ranks)."""
        local = {a: s.state() for a, s in zip(self.model_ids, self.streams)}
        if self.dist is None:
            return local
        return {a: pos for part in distributed.all_gather(local) for a, pos in part.items()}

    def save(self, complete: bool, checked: bool = False) -> None:
        """Write the run folder (rank 0 only; every rank takes part in the collectives): state.pt first, in
        one atomic step, then the files people read."""
        center = self.algorithm.report_model()
        if not checked:
            self._check_good(center)
        meta = self.metadata(complete)
        running = list(self.running)
        if self.dist is not None:
            total = torch.tensor(running, dtype=torch.float64, device=self.device)
            distributed.all_reduce_([total])
            running = total.tolist()
        algorithm_state, streams = self.algorithm.state_dict(), self._streams()
        kept, self.last_good = self.last_good, self.step
        if not self.writes:
            return
        try:
            ckpt.save_torch(self.out / ckpt.STATE, {
                "format": STATE_FORMAT, "meta": meta, "step": self.step, "epoch": self.epoch,
                "epoch_step": self.epoch_step, "seconds": self.seconds, "running": running, "streams": streams,
                "rows": self.rows, "algorithm": algorithm_state})
            kept = self.step
            ckpt.save_weights(self.out / ckpt.WEIGHTS, center.state_dict(), meta)
            for name, tensors in self.algorithm.extra_weights(algorithm_state).items():
                ckpt.save_weights(self.out / name, tensors)
            write_text_atomic(self.out / ckpt.METRICS, rows_to_csv(self.rows))
        except FlatcliError as e:  # a full disk: say what the folder still holds
            held = (f"the run folder keeps the state of step {kept}: --resume {self.out} continues from there"
                    if kept is not None else "nothing resumable was saved")
            raise FlatcliError(f"{e.what}; {held}", e.fix) from None

    @classmethod
    def resume(cls, run: str | Path, device: torch.device, epochs: int | None = None,
               steps: int | None = None, dist: distributed.Dist | None = None, save_every: int | None = None,
               model: str | None = None) -> "Trainer":
        """Rebuild a trainer from a run folder's state.pt, exactly where it stopped (under any number of ranks).

        ``model``: the ``--model`` the user gave; a ``module:function`` model is imported only when it is that.
        """
        state = read_state(Path(run))
        meta = ckpt.check_run_metadata(state["meta"], Path(run))
        cfg = TrainConfig.from_dict(meta["hyper"])
        cfg.epochs = epochs or cfg.epochs
        cfg.steps = steps if steps is not None else cfg.steps
        model_spec = ckpt.model_spec_from_metadata(meta, user_model=model, source=run)
        data = load_data(DataSpec.from_dict(meta["data"]), download=False)
        self = cls(cfg, data, model_spec, device, out=run, dist=dist, save_every=save_every)
        self.algorithm.load_state_dict(state["algorithm"])
        for a, s in zip(self.model_ids, self.streams):
            s.load_state(state["streams"][a])
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.seconds, self.rows, self.last_good = state["seconds"], list(state["rows"]), state["step"]
        if dist is None or dist.is_main:  # the saved sums are over all ranks: one rank carries them on
            self.running = list(state["running"])
        return self


def read_state(run: Path) -> dict:
    """The resumable state of a run folder, or a FlatcliError that says why there is none."""
    if not run.is_dir():
        raise FlatcliError(f"{str(run)!r} is not a run folder", "pass the --out folder of a run")
    path = run / ckpt.STATE
    if not path.exists():
        saved = (run / ckpt.WEIGHTS).exists()
        raise FlatcliError(f"{str(run)!r} has no {ckpt.STATE}: " + (
            "it holds weights but no training state" if saved else
            "nothing was saved there (the run was stopped before its first save)"),
            "start the run again without --resume" if not saved else "pass the --out folder of a flatcli run")
    state = ckpt.load_torch_state(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FlatcliError(f"{str(path)!r} is not a training state this flatcli version can resume",
                           "start a fresh run (or resume it with the flatcli version that wrote it)")
    return state


def rows_to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
