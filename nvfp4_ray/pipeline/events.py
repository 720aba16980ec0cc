"""Progress and log events: bars on a terminal, plain lines in logs, JSON for machines.

``--log-format text``: a progress bar per stage on a terminal (stderr); when stderr is
not a terminal (``ray job logs``, CI) a line per stage at each tenth of progress.
``--log-format json``: one JSON object per event on stdout.
Either way the job's last line on stdout is one JSON summary (see cli.py).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

from nvfp4_ray.io.storage import redact


class Events:
    def __init__(self, log_format: str = "text", stream=None):
        self.json = log_format == "json"
        self.stream = stream or (sys.stdout if self.json else sys.stderr)
        self.tty = not self.json and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.timings: dict[str, float] = {}
        self._bars: dict[str, object] = {}
        self._progress: dict[str, list] = {}

    def _emit(self, event: str, **fields) -> None:
        if self.json:
            record = {"time": round(time.time(), 3), "event": event, **fields}
            self.stream.write(redact(json.dumps(record, default=str)) + "\n")
        else:
            message = fields.pop("message", "")
            details = " ".join(f"{k}={v}" for k, v in fields.items())
            line = " ".join(part for part in (f"[nvfp4-ray] {event}", message, details) if part)
            if self.tty and self._bars:
                from tqdm import tqdm

                tqdm.write(redact(line), file=self.stream)
                return
            self.stream.write(redact(line) + "\n")
        self.stream.flush()

    def info(self, message: str, **fields) -> None:
        self._emit("info", message=message, **fields)

    def warning(self, message: str, **fields) -> None:
        self._emit("warning", message=message, **fields)

    @contextmanager
    def stage(self, name: str):
        start = time.monotonic()
        self._emit("stage_start", stage=name)
        try:
            yield
        finally:
            elapsed = time.monotonic() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            self.close_progress(name)
            self._emit("stage_end", stage=name, seconds=round(elapsed, 3))

    def progress(self, name: str, total: int, unit: str = "it") -> None:
        """Start a progress counter for ``name`` (one bar per stage)."""
        self._progress[name] = [0, total, 0]
        if self.tty:
            from tqdm import tqdm

            self._bars[name] = tqdm(total=total, desc=name, unit=unit, file=self.stream, leave=True)

    def advance(self, name: str, count: int = 1, **fields) -> None:
        state = self._progress.get(name)
        if state is None:
            return
        state[0] += count
        done, total, last_tenth = state
        if name in self._bars:
            self._bars[name].update(count)
        elif self.json:
            self._emit("progress", stage=name, done=done, total=total, **fields)
        else:
            tenth = done * 10 // max(total, 1)
            if tenth > last_tenth or done == total:
                state[2] = tenth
                self._emit("progress", message=f"{name} {done}/{total}")

    def close_progress(self, name: str) -> None:
        bar = self._bars.pop(name, None)
        if bar is not None:
            bar.close()
        self._progress.pop(name, None)
