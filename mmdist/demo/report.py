"""The demo's report: loss curves from the trainers' metrics.jsonl and a report.md with the held-out figures.

matplotlib is imported only when a curve is drawn (it is an optional package;
the demo checks for it before any step runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mmdist.demo.evaluate import QUESTION


def loss_curve(run_dir: Path, out: Path, title: str) -> Optional[str]:
    """PNG of the training loss from a trainer run dir's metrics.jsonl (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "train" and isinstance(record.get("loss"), (int, float)):
            steps.append(record["step"])
            losses.append(record["loss"])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(steps, losses, marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.name


def write_report(run_dir: Path, metrics: dict, gallery: list[dict]) -> Path:
    """RUN_DIR/report.md: the held-out figures, timings, loss curves and the gallery with the model's answers."""
    a, f, t = metrics["align"], metrics["fuse"], metrics["timings_s"]
    lines = [
        "# mmdist demo report",
        "",
        "Frozen seeded ViT (no pretrained vision weights offline) "
        "+ frozen all-MiniLM-L6-v2 (stage 1, align) and frozen",
        "SmolLM2-135M-Instruct (stage 2, fuse) on scikit-learn's handwritten digits; only the stage-1 heads and the",
        "projector train. The held-out digits (every 5th) are never trained on.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| stage-1 connector (`mmdist demo --connector`) | {metrics.get('connector', 'linear')} |",
        "| stage 1: held-out image->text retrieval top-1 (10 captions, chance 10%) "
        f"| {a['heldout_retrieval_top1']:.1%} ({a['heldout_samples']} digits) |",
        "| stage 2: held-out answer accuracy, greedy generation (chance 10%) "
        f"| {f['heldout_answer_accuracy']:.1%} ({f['heldout_samples']} digits) |",
        f"| wall time, shards to report | {t.get('total', 0.0) / 60:.1f} min |",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items() if k != "total"),
        "",
        "## Loss curves",
        "",
        "![stage 1 loss](loss_align.png) ![stage 2 loss](loss_fuse.png)",
        "",
        f'## Held-out digits and the model\'s answers to "{QUESTION}"',
        "",
        "| image | truth | answer | |",
        "|---|---|---|---|",
    ]
    for item in gallery:
        lines.append(
            f"| ![{item['key']}](images/{item['image']}) | {item['truth']} "
            f"| {item['answer']!r} | {'ok' if item['correct'] else 'wrong'} |"
        )
    lines += [
        "",
        "Ask about any image:",
        "",
        f"    mmdist generate --run {run_dir} --image "
        f'{run_dir}/images/{gallery[0]["image"] if gallery else "digit.png"} --prompt "{QUESTION}"',
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
