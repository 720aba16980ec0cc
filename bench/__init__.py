"""The benchmark of nvfp4-ray against llm-compressor 0.14 (see bench/README.md)."""

import time


def log(message: str) -> None:
    """A progress line with the wall-clock time, flushed at once: a run cut short by a
    time limit still shows where it was."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
