"""Progress bars on stderr (tqdm) for the command line: one driven by library callbacks (stage, fraction), one
driven by job snapshots polled from the service."""

from __future__ import annotations

import sys


class _TqdmBar:
    def __init__(self, enabled: bool, width: int):
        self.bar = None
        self.width = width
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc:<%d} {percentage:3.0f}%%|{bar}| {elapsed}" % width)

    def show(self, label: str, fraction: float) -> None:
        if self.bar is None:
            return
        self.bar.set_description_str(label[: self.width])
        self.bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ProgressBar(_TqdmBar):
    """Pass as `progress=` to library calls: it is called with (stage, overall fraction in [0, 1])."""

    def __init__(self, enabled: bool = True):
        super().__init__(enabled, 22)

    def __call__(self, stage: str, fraction: float) -> None:
        self.show(stage, fraction)


class JobProgressBar(_TqdmBar):
    """Pass as `on_progress=` to NBAClient.wait: it is called with each new job snapshot (status, stage, progress)."""

    def __init__(self, enabled: bool = True):
        super().__init__(enabled, 26)

    def __call__(self, job: dict) -> None:
        stage = job.get("stage") or job.get("status") or ""
        self.show(f"{job.get('status', '')}: {stage}", float(job.get("progress") or 0.0))
