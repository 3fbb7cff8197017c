"""How a run shows where it is, on stderr: tqdm bars on a terminal, plain lines in a log, or nothing.

``bars``: the passes' own tqdm bars (what a terminal shows).  ``lines``: no bars; one line per finished stage,
curvature pass and shot, each stamped with the seconds since the run began, so a log written to a file or a
pipe tells where a long run is::

    [  61.2 s] build: 48.9 s
    [ 140.7 s] curvature pass 1: 8 windows, 41.0 s
    [ 163.0 s] shot 1/2: kept 0.950 (target 0.950), 63.3 s

``off``: silent (``--quiet``).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

MODES = ("bars", "lines", "off")


class Progress:
    """Where a run reports progress; `mode` is one of `MODES`, `stream` defaults to sys.stderr."""

    def __init__(self, mode: str, stream: TextIO | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode, self.stream, self.start = mode, stream, time.perf_counter()

    @classmethod
    def of(cls, progress: "bool | str | Progress | None") -> "Progress":
        """None: bars on a terminal, lines otherwise; True: bars; False: off; a mode name; or a Progress."""
        if isinstance(progress, Progress):
            return progress
        if progress is None:
            return cls("bars" if sys.stderr.isatty() else "lines")
        if isinstance(progress, bool):
            return cls("bars" if progress else "off")
        return cls(progress)

    @property
    def bars(self) -> bool:
        """Whether the passes should draw their tqdm bars."""
        return self.mode == "bars"

    def silence_libraries(self) -> Callable[[], None]:
        """Without bars, turn off transformers' own bars (loading and writing weights) until the returned
        function is called; with bars, change nothing."""
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return lambda: None
        if self.bars or not hf_logging.is_progress_bar_enabled():
            return lambda: None
        hf_logging.disable_progress_bar()
        return hf_logging.enable_progress_bar

    def line(self, text: str) -> None:
        """One line `[<seconds since start> s] text` (lines mode only)."""
        if self.mode == "lines":
            stream = self.stream or sys.stderr
            print(f"[{time.perf_counter() - self.start:7.1f} s] {text}", file=stream, flush=True)
