"""How a training run stops: what it says it kept, the command that resumes, and the guard that
makes a signal, an error on another rank or a lost peer end every process with that message.

    with guarded_run(cfg, resumed_from) as run:      # setup(), the signal and peer watches
        tr = build_trainer(cfg, run.runtime, run.log, ...)
        run.adopt(tr)                                # now a stop can say what last.pt holds
        fit(tr)

`guarded_run` joins the process group with the collective timeout (`--dist-timeout`), watches
SIGTERM while native code waits (`watchdog.SignalWatch`) and the other ranks' heartbeats
(`watchdog.PeerWatch`). On the way out: Ctrl-C or SIGTERM prints where the run stands and is
raised on (exit 130/143); a failure on this rank is told to the other ranks, which stop naming
it; a collective that failed because a peer was lost becomes one `PeerLost` line naming the rank,
its host and pid, and the command that resumes (exit 2, no backend traceback).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cocoshard.config import TrainConfig
from cocoshard.errors import Interrupted, UserError
from cocoshard.training.checkpoint import LAST
from cocoshard.training.runlog import RunLog
from cocoshard.training.runtime import Runtime, cleanup, setup
from cocoshard.training.trainer import Trainer
from cocoshard.training.watchdog import STOPPED, PeerLost, PeerWatch, SignalWatch


def resume_command(out: str | Path, distributed: bool) -> str:
    """The command that continues the run in `out`."""
    if distributed:
        launch = f"torchrun ... -m cocoshard train --out {out} --resume auto"
        return f"the same launch command with --resume auto ({launch})"
    return f"cocoshard train --out {out} --resume"


def interrupted_lines(tr: Trainer) -> list[str]:
    """What a run stopped by Ctrl-C, SIGTERM or a lost peer says: what is kept and how to go on."""
    if tr.saved is None:
        return [
            f"stopped during epoch {tr.epoch + 1}: nothing was saved yet, nothing to resume; start again "
            "with the same command"
        ]
    epochs, batch = tr.saved
    inside = f" and {batch} of the {tr.steps_per_epoch} steps of epoch {epochs + 1}" if batch else ""
    return [
        f"stopped during epoch {tr.epoch + 1}: {tr.out / LAST} holds epoch {epochs} of {tr.cfg.epochs}"
        + inside,
        f"  resume with: {resume_command(tr.out, tr.runtime.distributed)}",
    ]


class GuardedRun:
    """A run's process-level objects: its runtime, log and peer watch, and its trainer once built."""

    def __init__(self, runtime: Runtime, log: RunLog, peers: PeerWatch, resumed_from: Path | None) -> None:
        self.runtime, self.log, self.peers = runtime, log, peers
        self.resumed_from = resumed_from
        self.trainer: Trainer | None = None

    def adopt(self, tr: Trainer) -> None:
        """The trainer is built: its writes are guarded, its position is what a stop reports."""
        tr.saving = self.peers.saving
        self.trainer = tr

    def where_it_stands(self) -> list[str]:
        """What is kept and how to go on, whenever the run stops."""
        if self.trainer is not None:
            return interrupted_lines(self.trainer)
        if self.resumed_from is not None:
            return [f"{self.resumed_from} is as it was: resume with the same command and --resume"]
        return ["nothing was saved: start the same command again"]


@contextmanager
def guarded_run(cfg: TrainConfig, resumed_from: Path | None) -> Iterator[GuardedRun]:
    """Set the run up (device, process group, watches) and turn every way it can stop into what
    the user should read (see the module's docstring)."""
    holder: list[GuardedRun] = []

    def where_it_stands() -> list[str]:
        return holder[0].where_it_stands() if holder else ["nothing was saved: start the same command again"]

    with SignalWatch(where_it_stands) as signals:
        runtime = setup(cfg.device, cfg.amp, cfg.amp_dtype, timeout_s=cfg.dist_timeout)
        log = RunLog(cfg.out, enabled=runtime.is_main)
        run = GuardedRun(
            runtime, log, PeerWatch(None, runtime, cfg.dist_timeout, where_it_stands), resumed_from
        )
        holder.append(run)
        try:
            try:
                run.peers = PeerWatch.start(runtime, cfg.dist_timeout, where_it_stands)
                signals.farewell = run.peers.say_stopped
                yield run
            except UserError as exc:
                run.peers.close(f"{STOPPED}: {exc}")
                raise
            except Exception as exc:  # a collective that failed because a peer was lost is said so
                verdict = run.peers.explain()
                if verdict is None:
                    run.peers.close(f"{STOPPED}: {type(exc).__name__}: {exc}")
                    raise
                raise PeerLost(verdict) from None
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM, wherever it came (explaining a failure too)
            signals.acknowledge()
            name = signal.Signals(exc.signum if isinstance(exc, Interrupted) else signal.SIGINT).name
            run.peers.close(f"{STOPPED}: interrupted by {name}")
            for line in run.where_it_stands():
                log.note(line)
            raise
        finally:
            if run.trainer is not None:
                for loader in (run.trainer.train_loader, run.trainer.val_loader):
                    loader.close()  # stop worker processes now rather than at garbage collection
            log.close()
            run.peers.close()
            cleanup(abandon=run.peers.lost)
