"""The Trainer callbacks loraflow adds: a progress line per log event, and stop-and-checkpoint on SIGTERM."""

from __future__ import annotations

import signal
import time
from typing import Any

import torch
from transformers import TrainerCallback

from loraflow_trainer import progress


class LineLogCallback(TrainerCallback):
    """One progress line per log event (``progress.emit``): step, loss, lr, throughput, time left.

    Throughput is over the window since the previous log line (tokens seen, padding
    excluded); the estimate of time left is from the mean step time of this attempt.
    ``losses`` and ``tokens_at_start`` are what the run's metrics read afterwards.
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens_at_start = 0
        self._started = 0.0
        self._first_step = 0
        self._last: tuple[float, int] = (0.0, 0)

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume the state already holds the tokens of earlier attempts.
        self.tokens_at_start = int(state.num_input_tokens_seen)
        self._started, self._first_step = time.perf_counter(), state.global_step
        self._last = (self._started, self.tokens_at_start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        pace: dict[str, float] = {}
        if "loss" in logs:
            self.losses.append(float(logs["loss"]))
            now, tokens = time.perf_counter(), int(state.num_input_tokens_seen)
            if now > self._last[0] and tokens > self._last[1]:
                pace["tokens_per_second"] = (tokens - self._last[1]) / (now - self._last[0])
            self._last = (now, tokens)
            done = state.global_step - self._first_step
            if done > 0 and state.max_steps > 0:
                pace["eta_seconds"] = (now - self._started) / done * max(state.max_steps - state.global_step, 0)
        if state.is_world_process_zero:
            progress.emit("log", step=state.global_step, max_steps=state.max_steps, **logs, **pace)


class StopOnSignalCallback(TrainerCallback):
    """On SIGTERM/SIGINT, checkpoint at the end of the current step and stop, so a retry resumes.

    The handlers live only while the training loop runs; outside it the process's own
    handlers apply (the CLI turns SIGTERM into an interrupt).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signalled: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        progress.emit("signal", signal=signal.Signals(signum).name, action="checkpoint and stop")
        self.signalled = signum

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1:
            # Every rank stops at the same step, or the ones still stepping wait on a
            # collective the stopped ones never join (a signal reaches ranks at different steps).
            flag = torch.tensor([0 if self.signalled is None else int(self.signalled)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and self.signalled is None:
                self.signalled = int(flag.item())
        if self.signalled is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
