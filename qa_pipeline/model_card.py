"""Loss curve for a model card: ``python -m qa_pipeline.model_card RUN_DIR OUT.png``.

Reads ``RUN_DIR/stage1-run/log.jsonl`` and ``RUN_DIR/stage2-run/log.jsonl`` written by ``hmtqa train``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_loss(run_dir: str | Path, out_png: str | Path) -> dict:
    """Plot LM loss (and recall loss) per optimizer step across both stages; return a summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset, summary = 0, {}
    for stage in ("stage1", "stage2"):
        path = run_dir / f"{stage}-run" / "log.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [offset + r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], label=f"{stage} LM/answer loss", lw=1)
        recall = [(offset + r["step"], r["recall_loss"]) for r in rows if "recall_loss" in r]
        if recall:
            ax.plot(*zip(*recall, strict=True), label=f"{stage} recall loss", lw=1, alpha=0.6)
        summary[stage] = {
            "steps": len(rows),
            "first_loss": rows[0]["loss"],
            "last10_loss": sum(r["loss"] for r in rows[-10:]) / min(10, len(rows)),
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
        }
        offset = steps[-1] if steps else offset
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return summary


if __name__ == "__main__":
    print(json.dumps(plot_loss(sys.argv[1], sys.argv[2]), indent=2))  # noqa: T201
