"""The one buffered run: what the MLflow TrialRun (harness.stores.tracking) and the portable record's run
(harness.stores.runrecord) share. `log` is cheap (values buffered; steps a resumed run already logged skipped),
`flush` hands the buffer to the sink every `flush_every` values or `flush_seconds`, and always when asked
(evals, checkpoints, the end); the training thread's time in logging calls adds up in `log_seconds`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from harness import schema
from harness.schema import MLFLOW_RUN_STATUS


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class BufferedRun:
    """A child run with a metric buffer. A sink defines `_entry` (one buffered value), `_send` (a batch to the
    store; wait: until it is stored), `set_tags`, and optionally `_close` (before the end status)."""

    tracker: Any
    run_id: str
    system_metrics: bool = True
    flush_every: int = 500
    flush_seconds: float = 10.0
    min_step: int = -1  # on resume: steps <= this were logged by the killed run and are not logged again
    log_seconds: float = 0.0
    _buffer: list = field(default_factory=list)
    _last_flush: float = field(default_factory=time.perf_counter)

    def _entry(self, key: str, value: float, timestamp: int, step: int) -> Any:
        raise NotImplementedError

    def _send(self, batch: list, wait: bool) -> None:
        raise NotImplementedError

    def set_tags(self, tags: dict[str, str]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float], final: bool = False) -> None:
        if step <= self.min_step and not final:
            return
        ts = now_ms()
        self._buffer.extend(self._entry(k, float(v), ts, step) for k, v in metrics.items() if v is not None)
        if len(self._buffer) >= self.flush_every or time.perf_counter() - self._last_flush > self.flush_seconds:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Send the buffer; wait=True: until everything sent so far is stored (before checkpoints and at the end)."""
        t0 = time.perf_counter()
        batch, self._buffer = self._buffer, []
        self._send(batch, wait)
        self._last_flush = time.perf_counter()
        self.log_seconds += self._last_flush - t0

    def end(self, status: str) -> None:
        """Flush, set kb.status and the MLflow run status; safe to call twice."""
        try:
            self.flush()
        finally:
            self._close()
            self.set_tags({schema.TAG_STATUS: status})
            self.tracker.client.set_terminated(self.run_id, MLFLOW_RUN_STATUS.get(status, "FAILED"))
