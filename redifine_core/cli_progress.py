"""Progress on a terminal for the CLI: tqdm bars for one process, plain rank-prefixed lines for a process of a launch.

Both take the core's ``ProgressEvent`` callbacks (``redifine_core.progress``), as the nodes' ProgressBar adapter does.
"""

from __future__ import annotations

from typing import Any

from .progress import ProgressEvent


class TqdmProgress:
    """Map ProgressEvents to one tqdm bar per phase (chain on top, then train / sample / metrics)."""

    ORDER = ("chain", "demo", "train", "sample", "metrics", "dataset")

    def __init__(self, disable: bool = False) -> None:
        self.bars: dict[str, Any] = {}
        self.disable = disable

    def __call__(self, ev: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(ev.phase)
        total = max(int(ev.total or 0), 0) or None
        if bar is None:
            pos = self.ORDER.index(ev.phase) if ev.phase in self.ORDER else len(self.ORDER) + len(self.bars)
            bar = tqdm(total=total, desc=ev.phase, position=pos, leave=ev.phase == "chain", disable=self.disable,
                       dynamic_ncols=True)
            self.bars[ev.phase] = bar
        elif bar.total != total or ev.step < bar.n:
            bar.reset(total=total)
        bar.n = max(int(ev.step), 0)
        if ev.message:
            bar.set_description_str(f"{ev.phase}: {ev.message}"[:70], refresh=False)
        if ev.loss is not None:
            bar.set_postfix_str(f"loss {ev.loss:.4f}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


class RankLines:
    """Progress of one process among several: plain lines with the rank in front, one per chain stage (no bars:
    several processes share one terminal or log file, and none prints another's progress)."""

    def __init__(self, label: str, disable: bool = False) -> None:
        self.label, self.disable = label, disable

    def __call__(self, ev: ProgressEvent) -> None:
        if self.disable or ev.phase != "chain":
            return
        print(f"{self.label} {ev.step}/{ev.total} {ev.message}", flush=True)

    def close(self) -> None:
        pass
