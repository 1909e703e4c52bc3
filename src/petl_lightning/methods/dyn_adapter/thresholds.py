"""Exit thresholds as pure tensor maths: confidence, exit assignment, cost, candidate search, curve.

Nothing here runs a model: everything works on a table of every exit's confidence and correctness
on held-out images (:class:`ExitOutputs`), so a search over thousands of threshold vectors costs
milliseconds. An image leaves at the first exit whose confidence is ``>=`` its threshold; an exit
whose threshold is ``+inf`` takes no image, so the dynamic path does not evaluate its head at all
(:class:`ExitCosts` charges a head only where it can be taken), which makes "every image at exit k"
cost exactly what the model truncated after exit k costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from petl_lightning.errors import ConfigError

Policy = Literal["pareto", "geometric", "shared", "grid"]


def confidence(logits: Tensor, kind: Literal["max_softmax", "entropy"] = "max_softmax") -> Tensor:
    """Per-image confidence in [0, 1] from logits (..., K).

    ``max_softmax``: the largest class probability. ``entropy``: ``1 - H(p) / log K`` (1 for a
    one-hot prediction, 0 for a uniform one), so "higher is surer" holds for both.
    """
    logp = logits.float().log_softmax(dim=-1)
    if kind == "max_softmax":
        return logp.max(dim=-1).values.exp()
    if kind == "entropy":
        k = logits.shape[-1]
        if k < 2:
            return torch.ones(logits.shape[:-1], device=logits.device)
        return 1.0 - (-(logp.exp() * logp).sum(dim=-1)) / math.log(k)
    raise ConfigError(f"Unknown confidence {kind!r}; use 'max_softmax' or 'entropy'.")


@dataclass
class ExitOutputs:
    """Every exit's confidence and prediction on a set of images (all exits run on every image), with
    what each image executed: its FLOPs in the blocks up to each exit (they depend on the tokens it
    kept where tokens skip work) and the patch tokens it kept in each block."""

    conf: Tensor  # (N, E)
    pred: Tensor  # (N, E)
    labels: Tensor  # (N,)
    block_cost: Tensor  # (N, E) float64
    kept: Tensor  # (N, depth)

    @property
    def correct(self) -> Tensor:
        return self.pred == self.labels[:, None]

    def cost_of(self, costs: ExitCosts, thresholds: Tensor, exits: Tensor) -> Tensor:
        """FLOPs (M, N) of each image leaving at ``exits`` (M, N) under ``thresholds`` (M, E-1)."""
        c = costs.of(thresholds).gather(1, exits.to(costs.fixed.device))
        return c + self.block_cost.T.to(c).gather(0, exits.to(c.device))

    @staticmethod
    def cat(parts: list[ExitOutputs]) -> ExitOutputs:
        keys = ("conf", "pred", "labels", "block_cost", "kept")
        return ExitOutputs(*(torch.cat([getattr(p, k) for p in parts]) for k in keys))


@dataclass
class ExitCosts:
    """FLOPs per image of leaving at each exit outside the blocks, given which early heads are evaluated
    (each image pays its own blocks: :attr:`ExitOutputs.block_cost`).

    ``fixed[k]``: the patch embedding and, for the last exit, the final norm and head; ``heads[k]``:
    early exit ``k``'s head (E-1 values).
    """

    fixed: Tensor  # (E,) float64
    heads: Tensor  # (E-1,) float64

    def of(self, thresholds: Tensor) -> Tensor:
        """Costs (M, E) of leaving at each exit under each threshold vector (M, E-1): an exit's own
        head plus every earlier head that can take images (a threshold below +inf)."""
        thr = thresholds.reshape(-1, self.heads.numel()).to(self.fixed.device)
        paid = (thr < math.inf).to(torch.float64) * self.heads  # (M, E-1): heads that can take images
        before = torch.cat([paid.new_zeros(paid.shape[0], 1), paid.cumsum(dim=1)], dim=1)  # (M, E)
        own = torch.cat([self.heads, self.heads.new_zeros(1)])  # the final head is in fixed[-1]
        return self.fixed + own + before


def assign_exits(conf: Tensor, thresholds: Tensor) -> Tensor:
    """The first exit whose confidence is >= its threshold (the last exit when none is).

    Args:
        conf: (N, E) confidences of every exit on every image.
        thresholds: (E-1,) or (M, E-1) thresholds of the early exits.

    Returns:
        (N,) or (M, N) long.
    """
    single = thresholds.ndim == 1
    thr = thresholds.reshape(-1, conf.shape[1] - 1).to(conf)
    passed = conf[None, :, :-1] >= thr[:, None, :]
    last = torch.ones(passed.shape[:2] + (1,), dtype=torch.bool, device=conf.device)
    exits = torch.cat([passed, last], dim=2).to(torch.uint8).argmax(dim=2)
    return exits[0] if single else exits


def evaluate_thresholds(
    out: ExitOutputs, costs: ExitCosts, thresholds: Tensor, chunk: int = 2048
) -> tuple[Tensor, Tensor, Tensor]:
    """Accuracy (M,), mean cost (M,) and exit shares (M, E) of each threshold vector (M, E-1)."""
    accs, mean_costs, shares = [], [], []
    correct = out.correct.to(torch.float64).T  # (E, N)
    n_exits = out.conf.shape[1]
    for i in range(0, thresholds.shape[0], chunk):
        thr = thresholds[i : i + chunk]
        ex = assign_exits(out.conf, thr)  # (m, N)
        accs.append(correct.gather(0, ex).mean(dim=1))
        mean_costs.append(out.cost_of(costs, thr, ex).mean(dim=1))
        shares.append(F.one_hot(ex, n_exits).to(torch.float64).mean(dim=1))
    return torch.cat(accs), torch.cat(mean_costs), torch.cat(shares)


def _levels(values: Tensor, levels: int) -> Tensor:
    """Up to ``levels`` thresholds for one confidence column: -inf (all pass), midpoints between
    neighbouring distinct values (never on a value, so float noise cannot move an image across),
    and +inf (none passes); evenly spaced in rank when thinned."""
    u = values.float().unique()  # sorted
    inf = torch.tensor([math.inf], device=values.device)
    cand = torch.cat([-inf, 0.5 * (u[:-1] + u[1:]), inf])
    if cand.numel() > levels:
        cand = cand[torch.linspace(0, cand.numel() - 1, max(levels, 2), device=values.device).round().long().unique()]
    return cand


def _geometric(conf: Tensor, resolution: int) -> Tensor:
    """MSDNet's budgeted rule: the share leaving at exit k is proportional to ``q**k``; each ``q``
    on a log grid sets the thresholds exit by exit on the images still running."""
    n, e = conf.shape
    powers = torch.arange(e, dtype=torch.float64)
    cands = []
    for q in torch.logspace(-3, 3, resolution, dtype=torch.float64):
        share = q**powers / (q**powers).sum()
        remaining = torch.ones(n, dtype=torch.bool, device=conf.device)
        thr = []
        for k in range(e - 1):
            want = int(round(float(share[k]) * n))
            c = conf[remaining, k].sort(descending=True).values
            if want <= 0 or c.numel() == 0:
                t = math.inf
            else:  # the lowest value that should pass; ties with it pass too (they cannot be split)
                low = c[min(want, c.numel()) - 1]
                below = c[c < low]
                t = 0.5 * float(low + below[0]) if below.numel() else -math.inf
            thr.append(t)
            remaining &= ~(conf[:, k] >= t)
        cands.append(thr)
    return torch.tensor(cands, dtype=torch.float32, device=conf.device)


def single_exit_thresholds(e: int, device: torch.device | None = None) -> Tensor:
    """(E, E-1): row k sends every image to exit k (``+inf`` before it, ``-inf`` at it)."""
    thr = torch.full((e, e - 1), math.inf, device=device)
    for k in range(e - 1):
        thr[k, k] = -math.inf
    return thr


def candidate_thresholds(conf: Tensor, policy: Policy = "pareto", resolution: int = 0) -> Tensor:
    """Candidate (M, E-1) threshold vectors for a confidence table (N, E); every policy includes
    the E single-exit vectors, so a search never does worse than the best single exit it can afford.

    - ``geometric``: MSDNet's one-parameter family (``resolution`` values of q; default 401).
    - ``shared``: one threshold for every exit.
    - ``grid``: every combination of per-exit thresholds (default: as many levels as keep the
      product near 100k; the most flexible, the most prone to over-fitting small held-out sets).
    - ``pareto`` (default): the union of geometric, shared and a coarse per-exit grid (about 12
      rank levels per exit); the search then picks the best point of their accuracy-cost front.
    """
    n, e = conf.shape
    if e < 2:
        return conf.new_zeros(1, 0)
    early = conf[:, :-1]
    families = [single_exit_thresholds(e, conf.device)]
    if policy in ("shared", "pareto"):
        families.append(_levels(early.flatten(), resolution or 401)[:, None].expand(-1, e - 1))
    if policy in ("geometric", "pareto"):
        families.append(_geometric(conf, resolution or 401))
    if policy in ("grid", "pareto"):
        default = 12 if policy == "pareto" else max(3, int(round(100_000 ** (1.0 / (e - 1)))))
        g = resolution or default
        families.append(torch.cartesian_prod(*[_levels(early[:, k], g) for k in range(e - 1)]).reshape(-1, e - 1))
    if policy not in ("pareto", "geometric", "shared", "grid"):
        raise ConfigError(f"Unknown calibration policy {policy!r}; choose pareto, geometric, shared or grid.")
    return torch.cat([f.float() for f in families]).unique(dim=0)


def search_thresholds(
    out: ExitOutputs, costs: ExitCosts, max_flops: float, policy: Policy = "pareto", resolution: int = 0
) -> tuple[Tensor, float, float, Tensor]:
    """The candidate with the best accuracy whose mean cost is at most ``max_flops`` per image (ties:
    cheapest).

    Returns ``(thresholds (E-1,), accuracy, mean cost, exit shares (E,))``.
    """
    cands = candidate_thresholds(out.conf, policy, resolution)
    acc, cost, share = evaluate_thresholds(out, costs, cands)
    ok = cost <= max_flops * (1 + 1e-9)
    if not bool(ok.any()):
        cheapest = float(cost.min())
        raise ConfigError(
            f"No thresholds meet the budget: the cheapest choice (every image at the first exit) costs "
            f"{cheapest / 1e9:.4g} GFLOPs per image, above the {max_flops / 1e9:.4g} allowed. Raise the "
            f"budget or put the first exit earlier (exits.blocks)."
        )
    best = torch.where(ok, acc, torch.full_like(acc, -1.0)).max()
    tied = ok & (acc >= best - 1e-12)
    idx = int(torch.where(tied, cost, torch.full_like(cost, math.inf)).argmin())
    return cands[idx].cpu(), float(acc[idx]), float(cost[idx]), share[idx].cpu()


def accuracy_cost_curve(
    calib: ExitOutputs,
    costs: ExitCosts,
    full: float,
    budgets: list[float],
    evaluate: ExitOutputs | None = None,
    policy: Policy = "pareto",
) -> list[dict[str, object]]:
    """For each budget (share of ``full`` FLOPs): thresholds searched on ``calib``, then accuracy,
    GFLOPs and exit shares on ``evaluate`` (default ``calib``). Budgets below the cheapest exit
    are left out."""
    ev = calib if evaluate is None else evaluate
    points = []
    for b in budgets:
        try:
            thr, c_acc, c_cost, _ = search_thresholds(calib, costs, b * full, policy)
        except ConfigError:
            continue
        acc, cost, share = evaluate_thresholds(ev, costs, thr[None])
        points.append(
            {
                "budget": b,
                "thresholds": thr.tolist(),
                "acc": float(acc[0]),
                "gflops": float(cost[0]) / 1e9,
                "flops_ratio": float(cost[0]) / full,
                "exit_share": share[0].tolist(),
                "calib_acc": c_acc,
                "calib_gflops": c_cost / 1e9,
            }
        )
    return points


def single_exit_points(out: ExitOutputs, costs: ExitCosts) -> list[dict[str, float]]:
    """Each exit alone (the model truncated there, only that head): GFLOPs and accuracy."""
    e = out.conf.shape[1]
    single = out.cost_of(costs, single_exit_thresholds(e), torch.arange(e)[:, None].expand(e, out.conf.shape[0]))
    single = single.mean(dim=1)
    acc = out.correct.double().mean(dim=0)
    return [{"exit": k, "gflops": float(single[k]) / 1e9, "acc": float(acc[k])} for k in range(single.numel())]


__all__ = [
    "ExitCosts",
    "ExitOutputs",
    "accuracy_cost_curve",
    "assign_exits",
    "candidate_thresholds",
    "confidence",
    "evaluate_thresholds",
    "search_thresholds",
    "single_exit_points",
    "single_exit_thresholds",
]
