"""Training metrics: `metrics.jsonl` (one JSON object per line) and `loss.png`."""

from __future__ import annotations

import json
from pathlib import Path


class TrainingLog:
    """metrics.jsonl (one JSON object per line, `split` train or val) and loss.png. On resume the lines after
    the checkpoint's step are dropped: those steps run again."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.path, self.png, self.enabled = out_dir / "metrics.jsonl", out_dir / "loss.png", enabled
        self.records: list[dict] = []

    def truncate(self, step: int) -> None:
        if self.enabled and self.path.exists():
            self.records = [r for r in map(_parse, self.path.read_text().splitlines()) if r and r["step"] <= step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            tmp.replace(self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        if not self.enabled or not self.records:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for split, style in (("train", "-"), ("val", "o-")):
            points = [(r["step"], r["loss"]) for r in self.records if r["split"] == split]
            if points:
                ax.plot(*zip(*points), style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (cross-entropy + z-loss)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.png.with_suffix(".tmp.png"), dpi=100)
        plt.close(fig)
        self.png.with_suffix(".tmp.png").replace(self.png)


def _parse(line: str) -> dict | None:
    """A metrics line; None for a blank line or the half-written last line of a killed run."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
