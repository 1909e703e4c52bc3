"""Where DyT's token skipping pays: DyT (default arguments) trained for several budgets, then its
inference rule swept on the same weights, beside training-free token rankers.

    python benchmarks/dyt_budget.py --out benchmarks/results/dyt_budget.jsonl   # resumable
    python benchmarks/dyt_budget.py --out benchmarks/results/dyt_budget.jsonl --report docs

Each cell (task, seed, epochs) trains DyT with its default arguments on the shared real ViT-S/14
(``--img-size``, default 56 px) with the robustness study's budget (AdamW lr 1e-3, no warm-up,
step-wise cosine, batch 32, train800val200 -> test), then evaluates on the test list, on the same
trained weights:

- ``complete``: every token through every MLP;
- ``threshold``: DyT's own gathered path at the calibrated threshold (``agreement=0.99``, the
  default) and at fixed thresholds (0.5 is the paper's rule);
- top-k at keep rates 0.9 / 0.7 / 0.5 / 0.3 per image and block, tokens ranked by DyT's learned
  dispatcher (``learned``), by the class token's attention in that block averaged over heads
  (``attention``, EViT's criterion), or at random (``random``);
- ``last-block``: every token through every MLP except block 12's patch tokens (which the
  class-token head never reads: free for any method).

``--variants`` trains other dispatchers besides the default (``VARIANTS``): ``prior`` (the class
token's attention as a logit prior, ``skipping.class_attention_prior=1``), ``topk`` (top-k training
masks at ``target_rate=0.7``), combinations, and ``exact`` (``training_noise=0``: the training masks
are the inference rule); their rows carry the variant's name.

Every point records test accuracy, agreement with the complete model, keep rate (overall and per
block) and executed GFLOPs per image (papers' convention, head included; the dispatchers' own cost
is counted for every ranker). The ranked rules run DyT's masked path with their own masks (checked
against the gathered top-k path on the first batch: at least 95 % of its images equal within 1e-4;
a near-tie at the cut may swap a token between the two attention implementations). Cells run in their
own process (``--workers`` at a time, one thread each); finished cells are appended to ``--out`` and
skipped when run again.
``--report FOLDER`` writes the table (``dyt_budget.md``) and one accuracy-vs-GFLOPs chart per task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `python benchmarks/dyt_budget.py` finds the `benchmarks` package
    sys.path.insert(0, str(ROOT))

from benchmarks.studies import (  # noqa: E402
    ASSETS,
    budget_trainer,
    load_rows,
    print_row,
    run_cells,
    vits_module,
    vtab_data,
)

RATES = (0.9, 0.7, 0.5, 0.3)
THRESHOLDS = (0.5, 0.3, 0.1, 0.03)
RANKERS = ("learned", "attention", "random")
#: The dispatcher variants (``TokenSkipping`` fields over DyT's defaults).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "prior": {"class_attention_prior": 1.0},
    "topk": {"training_masks": "topk", "target_rate": 0.7},
    "prior+topk": {"class_attention_prior": 1.0, "training_masks": "topk", "target_rate": 0.7},
    "prior+topk+exact": {
        "class_attention_prior": 1.0,
        "training_masks": "topk",
        "target_rate": 0.7,
        "training_noise": 0.0,
    },
    "topk+exact": {"training_masks": "topk", "target_rate": 0.7, "training_noise": 0.0},
}


# -- one cell: train, then sweep -------------------------------------------------------------------
def run_cell(
    task: str, seed: int, epochs: int, img_size: int, root: Path, lr: float, variant: str = "default"
) -> dict[str, Any]:
    import lightning as L
    import torch

    from petl_lightning import DyT

    torch.set_num_threads(1)
    dm = vtab_data(root, task, img_size)
    L.seed_everything(seed, verbose=False)
    module = vits_module(DyT, img_size, lr, skipping=VARIANTS[variant])
    trainer = budget_trainer(epochs)
    t0 = time.time()
    trainer.fit(module, dm)
    row: dict[str, Any] = dict(task=task, seed=seed, epochs=epochs, img_size=img_size, lr=lr, variant=variant)
    row["train_s"] = round(time.time() - t0, 1)
    row["calibrated_threshold"] = round(module.dyt.threshold, 4)
    module.eval()
    with torch.inference_mode():
        row["points"] = sweep(module.model, dm.test_dataloader(), module.dyt.threshold)
    return row


class Tally:
    """Sums of one rule's results over the test set."""

    def __init__(self, depth: int) -> None:
        self.correct = self.agree = self.images = 0
        self.flops = 0.0
        self.kept = [0.0] * depth
        self.offered = 0.0

    def add(self, logits: Any, y: Any, complete_pred: Any, kept: Any, flops: Any, offered_per_block: int) -> None:
        pred = logits.argmax(-1)
        self.correct += int((pred == y).sum())
        self.agree += int((pred == complete_pred).sum())
        self.images += len(y)
        self.flops += float(flops.sum())
        self.kept = [a + float(b) for a, b in zip(self.kept, kept.sum(0))]
        self.offered += offered_per_block * len(y)

    def point(self, rule: str, param: float | None) -> dict[str, Any]:
        per_block = [k / self.offered for k in self.kept]
        return dict(
            rule=rule,
            param=param,
            acc=round(self.correct / self.images, 4),
            agree=round(self.agree / self.images, 4),
            keep=round(statistics.fmean(per_block), 4),
            keep_per_block=[round(k, 3) for k in per_block],
            gflops=round(self.flops / self.images / 1e9, 5),
        )


def ranked_logits(clf: Any, x: Any, ranker: str, keep: list[int | None], generator: Any) -> tuple[Any, Any]:
    """Logits and kept patch tokens (B, depth) when block i's MLP runs on the ``keep[i]`` patch tokens
    ``ranker`` ranks highest (None: all), on DyT's masked path."""
    import torch

    vit = clf.vit
    p = vit.num_prefix_tokens
    t = vit.embed(x)
    kept = []
    for blk, count in zip(vit.dyt_blocks(), keep):
        update, cls_scores = blk.attn_branch_and_class_attention(t)  # DyT's own attention, written out
        t = t + update
        num_patches = t.shape[1] - p
        if count is None or count >= num_patches:
            mask = t.new_ones(t.shape[0], num_patches)
        else:
            if ranker == "learned":
                d = blk.dispatchers["mlp"]
                scores = d.patch_logits(t, p, cls_scores if d.prior_weight is not None else None)
            elif ranker == "attention":
                scores = cls_scores
            else:
                scores = torch.rand(t.shape[0], num_patches, generator=generator)
            mask = torch.zeros_like(scores).scatter_(1, scores.topk(count, dim=1).indices, 1.0)
        full = torch.cat([mask.new_ones(t.shape[0], p), mask], dim=1)
        t = t + blk.adapters["mlp"](t) + full.unsqueeze(-1) * blk.mlp_branch(t)
        kept.append(mask.sum(1))
    features = vit.forward_head(vit.vit.norm(t), pre_logits=True)
    return clf.head(features), torch.stack(kept, dim=1)


def sweep(clf: Any, loader: Any, calibrated: float) -> list[dict[str, Any]]:
    """Every rule's point on ``loader`` (see the module docstring)."""
    import torch

    vit = clf.vit
    depth, num_patches = vit.depth, vit.num_patches
    rules: list[tuple[str, float | None]] = [("complete", None), ("last-block", None), ("calibrated", calibrated)]
    rules += [("threshold", t) for t in THRESHOLDS]
    rules += [(r, rate) for r in RANKERS for rate in RATES]
    tallies = {rule: Tally(depth) for rule in rules}
    generator = torch.Generator().manual_seed(0)
    head = clf.head_flops()
    checked = False
    for x, y in loader:
        complete = clf.head(vit.forward_complete(x))
        complete_pred = complete.argmax(-1)
        all_kept = torch.full((len(y), depth), float(num_patches))
        tallies[("complete", None)].add(
            complete, y, complete_pred, all_kept, vit.executed_flops(all_kept[..., None]) + head, num_patches
        )
        last = [None] * (depth - 1) + [0]
        logits, kept = ranked_logits(clf, x, "learned", last, generator)
        tallies[("last-block", None)].add(
            logits, y, complete_pred, kept, vit.executed_flops(kept[..., None]) + head, num_patches
        )
        for rule in [r for r in rules if r[0] in ("calibrated", "threshold")]:
            vit.set_threshold(float(rule[1] or 0.0))
            out = clf.infer(x)
            tallies[rule].add(out.logits, y, complete_pred, out.kept, out.flops, num_patches)
        vit.set_threshold(calibrated)
        for ranker in RANKERS:
            for rate in RATES:
                count = vit.skipping.keep_count(num_patches, rate)
                logits, kept = ranked_logits(clf, x, ranker, [count] * depth, generator)
                if ranker == "learned" and not checked:  # the masked top-k equals DyT's gathered top-k
                    gathered = clf.head(vit.forward_gathered(x, keep_count=count).features)
                    same = torch.isclose(logits, gathered, atol=1e-4, rtol=1e-4).all(dim=1)
                    # top-k training without noise packs logits at the cut, where the two attention
                    # implementations' rounding can swap a token: allow that in a few images
                    assert same.float().mean() >= 0.95, f"{int((~same).sum())} images differ at keep {rate}"
                flops = vit.executed_flops(kept[..., None]) + head
                tallies[(ranker, rate)].add(logits, y, complete_pred, kept, flops, num_patches)
        checked = True
    return [tallies[rule].point(*rule) for rule in rules]


# -- the report ------------------------------------------------------------------------------------
def mean_points(rows: list[dict[str, Any]]) -> dict[tuple[str, float | None], dict[str, float]]:
    """Per rule: accuracy, agreement, keep rate and GFLOPs averaged over the rows (seeds)."""
    by: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for r in rows:
        for pt in r["points"]:
            by.setdefault((pt["rule"], None if pt["rule"] == "calibrated" else pt["param"]), []).append(pt)
    return {
        k: {m: statistics.fmean(p[m] for p in v) for m in ("acc", "agree", "keep", "gflops")} for k, v in by.items()
    }


def report(rows: list[dict[str, Any]], folder: Path) -> str:
    """The markdown tables: the default dispatcher's budgets, then the variants (and charts in ``folder``)."""
    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["epochs"], r.get("variant", "default")), []).append(r)
    default = {(t, e): rs for (t, e, v), rs in cells.items() if v == "default"}
    charts(default, folder)
    return budget_table(default) + "\n\n" + variant_table(cells)


def budget_table(cells: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    """Per task and budget, the default dispatcher: every rule's accuracy, keep rate and GFLOPs."""
    trios = [f"keep {rate}: learned / attention / random" for rate in (0.7, 0.5, 0.3)]
    head = (
        "| task | epochs | seeds | complete acc | DyT calibrated: acc / keep / GFLOPs x "
        "| DyT thr 0.5 (paper): acc / keep | last block only: acc / GFLOPs x | " + " | ".join(trios) + " |"
    )
    lines = [head, "|" + "---|" * 10]
    for (task, epochs), rs in sorted(cells.items()):
        m = mean_points(rs)
        full = m[("complete", None)]["gflops"]

        def trio(rate: float, m: dict = m) -> str:
            return " / ".join(f"{m[(r, rate)]['acc']:.3f}" for r in RANKERS)

        cal, paper, last = m[("calibrated", None)], m[("threshold", 0.5)], m[("last-block", None)]
        lines.append(
            f"| {task} | {epochs} | {len(rs)} | {m[('complete', None)]['acc']:.3f} "
            f"| {cal['acc']:.3f} / {cal['keep']:.2f} / {cal['gflops'] / full:.2f} "
            f"| {paper['acc']:.3f} / {paper['keep']:.2f} "
            f"| {last['acc']:.3f} / {last['gflops'] / full:.2f} | {trio(0.7)} | {trio(0.5)} | {trio(0.3)} |"
        )
    return "\n".join(lines)


def variant_table(cells: dict[tuple[str, int, str], list[dict[str, Any]]]) -> str:
    """Per task, budget and dispatcher: top-k accuracy by the learned and the attention ranking, the
    learned top 0.7's worst gap to the complete model over seeds (the adoption rule: at most 1 point)."""
    pairs = [f"keep {rate}: learned / attention" for rate in (0.7, 0.5, 0.3)]
    head = (
        "| task | epochs | dispatcher | seeds | complete acc | "
        + " | ".join(pairs)
        + " | worst seed: keep 0.7 - complete |"
    )
    lines = [head, "|" + "---|" * 9]
    order = list(VARIANTS)
    for (task, epochs, variant), rs in sorted(cells.items(), key=lambda kv: (*kv[0][:2], order.index(kv[0][2]))):
        m = mean_points(rs)
        cols = " | ".join(f"{m[('learned', r)]['acc']:.3f} / {m[('attention', r)]['acc']:.3f}" for r in (0.7, 0.5, 0.3))
        worst = min(
            next(p["acc"] for p in r["points"] if p["rule"] == "learned" and p["param"] == 0.7)
            - next(p["acc"] for p in r["points"] if p["rule"] == "complete")
            for r in rs
        )
        complete = m[("complete", None)]["acc"]
        lines.append(f"| {task} | {epochs} | {variant} | {len(rs)} | {complete:.3f} | {cols} | {worst:+.3f} |")
    return "\n".join(lines)


def charts(cells: dict[tuple[str, int], list[dict[str, Any]]], folder: Path) -> None:
    """One accuracy-vs-GFLOPs chart per task: a line per ranker, a line style per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    colours = {"threshold": "C0", "learned": "C1", "attention": "C2", "random": "C3"}
    for task in sorted({t for t, _ in cells}):
        budgets = sorted(e for t, e in cells if t == task)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for style, epochs in zip(styles, budgets):
            m = mean_points(cells[(task, epochs)])
            for rule, colour in colours.items():
                same = ("threshold", "calibrated") if rule == "threshold" else (rule,)
                pts = sorted((v["gflops"], v["acc"]) for k, v in m.items() if k[0] in same)
                label = f"{'DyT threshold' if rule == 'threshold' else rule + ' top-k'}, {epochs} ep"
                ax.plot(*zip(*pts), style, color=colour, marker="o", markersize=3, label=label)
            c, last = m[("complete", None)], m[("last-block", None)]
            ax.plot(
                [c["gflops"]], [c["acc"]], "k*", markersize=9, label=f"complete, {epochs} ep" if style == "-" else None
            )
            ax.plot(
                [last["gflops"]],
                [last["acc"]],
                "ks",
                markersize=5,
                mfc="none",
                label="last block only" if style == "-" else None,
            )
        ax.set_xlabel("executed GFLOPs per image")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"DyT on {task}: accuracy vs GFLOPs by training budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(folder / f"dyt_budget_{task}.png", dpi=120)
        plt.close(fig)


# -- the command -----------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ASSETS / "vtab1k")
    p.add_argument("--tasks", nargs="+", default=["dtd10", "cifar10"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", nargs="+", type=int, default=[5, 25, 100])
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["default"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("dyt_budget.jsonl"))
    p.add_argument("--report", type=Path, default=None, help="write dyt_budget.md and the charts here, then exit")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (JSON) and print its row
    a = p.parse_args()
    if a.cell:
        print_row(run_cell(**json.loads(a.cell), img_size=a.img_size, root=a.root, lr=a.lr))
        return
    done = load_rows(a.out)
    if a.report is not None:
        a.report.mkdir(parents=True, exist_ok=True)
        text = report(done, a.report)
        (a.report / "dyt_budget.md").write_text(text + "\n")
        print(text)
        return
    have = {(r["task"], r["seed"], r["epochs"], r["img_size"], r.get("variant", "default")) for r in done}
    todo = [
        dict(task=t, seed=s, epochs=e, variant=v)
        for v in a.variants
        for e in sorted(a.epochs, reverse=True)  # the longest first, so short ones fill the gaps
        for s in a.seeds
        for t in a.tasks
        if (t, s, e, a.img_size, v) not in have
    ]
    run_cells(
        __file__, todo, a.out, a.workers, ["--img-size", str(a.img_size), "--root", str(a.root), "--lr", str(a.lr)]
    )


if __name__ == "__main__":
    main()
