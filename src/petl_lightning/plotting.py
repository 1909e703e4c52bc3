"""Every chart the package draws, and the one function that sends a figure to the active loggers.

Imported lazily (callbacks import it inside their hooks), so ``import petl_lightning`` never
imports matplotlib; matplotlib itself is the ``plots`` extra and is imported only when a figure is
drawn. Figures are built with ``matplotlib.figure.Figure`` (no pyplot: no global state, no GUI backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from petl_lightning.errors import require

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs: Any) -> Figure:
    """A new matplotlib Figure, or a one-line error naming the ``plots`` extra."""
    return require("matplotlib.figure", "plots").Figure(**kwargs)


def exit_labels(stats: dict[str, Tensor]) -> list[str]:
    """Names of the exits: ``block03`` (the exit after 3 blocks) when the module reports
    ``exit_depths``, else ``exit0``, ``exit1``, ..."""
    n = int(stats["exit_share"].numel())
    depths = stats.get("exit_depths")
    if depths is not None and int(depths.numel()) == n:
        return [f"block{int(d):02d}" for d in depths.tolist()]
    return [f"exit{k}" for k in range(n)]


def block_labels(stats: dict[str, Tensor]) -> list[str]:
    """Names of the blocks of ``keep_rate_per_layer``: ``block01`` ... (1-based, as exit depths)."""
    return [f"block{i + 1:02d}" for i in range(int(stats["keep_rate_per_layer"].numel()))]


def has_exits(stats: dict[str, Tensor]) -> bool:
    """Whether the module has more than one exit (an exit chart says something)."""
    return int(stats["exit_share"].numel()) > 1


def skips_tokens(stats: dict[str, Tensor]) -> bool:
    """Whether any block processed fewer than all of its tokens (a keep-rate chart says something)."""
    return bool((stats["keep_rate_per_layer"] < 1.0).any())


def inference_stats_figure(stats: dict[str, Tensor], title: str = "", charts: tuple[str, ...] | None = None) -> Figure:
    """Bar charts of the exit shares (annotated with each exit's accuracy where known) and of the
    per-block token keep rates. ``charts``: ``("exits", "keep")`` or a subset; default: the ones
    with content, or the exit panel alone when neither has."""
    if charts is None:
        charts = tuple(c for c, on in (("exits", has_exits(stats)), ("keep", skips_tokens(stats))) if on) or ("exits",)
    fig = _figure(figsize=(4.2 * len(charts) + 0.6, 3.4), dpi=110)
    axes = fig.subplots(1, len(charts), squeeze=False)
    for ax, chart in zip(axes[0], charts):
        if chart == "exits":
            share = stats["exit_share"].double().cpu()
            names = [lab.removeprefix("block").lstrip("0") or "0" for lab in exit_labels(stats)]
            bars = ax.bar(names, share.tolist(), color="#4C72B0")
            acc = stats.get("exit_acc")
            for k, bar in enumerate(bars):
                text = f"{share[k]:.2f}"
                if acc is not None and not math.isnan(float(acc[k])):
                    text += f"\nacc {float(acc[k]):.2f}"
                ax.annotate(
                    text,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
            ax.set_ylim(0, 1.15)
            ax.set_xlabel("exit (after block)")
            ax.set_ylabel("share of images")
            ax.set_title("exit shares", fontsize=9)
        elif chart == "keep":
            keep = stats["keep_rate_per_layer"].double().cpu()
            ax.bar(
                [lab.removeprefix("block").lstrip("0") for lab in block_labels(stats)], keep.tolist(), color="#55A868"
            )
            overall = float(stats["keep_rate"])
            ax.axhline(overall, color="gray", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("block")
            ax.set_ylabel("share of patch tokens kept")
            ax.set_title(f"token keep rate (overall {overall:.2f})", fontsize=9)
        else:
            raise ValueError(f"Unknown chart {chart!r}; use 'exits' or 'keep'.")
        ax.grid(axis="y", alpha=0.3)
    gflops = stats.get("gflops")
    suffix = ""
    if gflops is not None and "gflops_backbone" in stats:
        suffix = f"  {float(gflops):.3g} GFLOPs/img ({float(gflops) / float(stats['gflops_backbone']):.2f}x backbone)"
    fig.suptitle(f"{title}{suffix}".strip(), fontsize=9)
    fig.tight_layout()
    return fig


def accuracy_gflops_figure(
    series: dict[str, list[dict[str, Any]]],
    single_exits: list[dict[str, Any]] | None = None,
    title: str = "accuracy vs executed GFLOPs",
) -> Figure:
    """Accuracy-vs-GFLOPs curves: one line per named series of points (``gflops``, ``acc``, and
    ``budget`` to annotate), plus each single exit's point. Budgets that chose the same point share
    one label; labels alternate above and below the line so they do not overlap."""
    fig = _figure(figsize=(6.0, 4.2), dpi=120)
    ax = fig.subplots()
    for name, points in series.items():
        if not points:
            continue
        line = ax.plot([p["gflops"] for p in points], [100 * p["acc"] for p in points], "o-", label=name)[0]
        labels: dict[tuple[float, float], list[str]] = {}
        for p in points:
            if "budget" in p:
                labels.setdefault((round(p["gflops"], 6), round(100 * p["acc"], 4)), []).append(f"{p['budget']:g}")
        for i, (xy, names) in enumerate(sorted(labels.items())):
            ax.annotate(
                ",".join(names),
                xy,
                textcoords="offset points",
                xytext=(4, 8 if i % 2 else -12),
                fontsize=7,
                color=line.get_color(),
            )
    if single_exits:
        ax.plot(
            [p["gflops"] for p in single_exits],
            [100 * p["acc"] for p in single_exits],
            "s--",
            color="gray",
            label="single exit (model truncated there)",
        )
        for p in single_exits:
            ax.annotate(
                f"exit {p['exit']}",
                (p["gflops"], 100 * p["acc"]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
                color="gray",
            )
    ax.set_xlabel("executed GFLOPs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{title} (labels: FLOPs budget)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as an image at ``path`` (folders created)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    return p


def log_figure(trainer: Any, key: str, fig: Figure, path: Path | None = None) -> None:
    """Send ``fig`` to whatever loggers ``trainer`` has: an image to loggers with ``log_image``
    (W&B; the saved file at ``path`` when given), a figure to loggers whose experiment has
    ``add_figure`` (TensorBoard); others are skipped."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path) if path is not None else fig])
        elif hasattr(getattr(logger, "experiment", None), "add_figure"):
            logger.experiment.add_figure(key, fig, global_step=trainer.global_step, close=False)


__all__ = [
    "accuracy_gflops_figure",
    "block_labels",
    "exit_labels",
    "has_exits",
    "inference_stats_figure",
    "log_figure",
    "save_figure",
    "skips_tokens",
]
