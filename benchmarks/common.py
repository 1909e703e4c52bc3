"""Shared pieces of the performance benchmark: the :class:`Entry` record and timing helpers.

Each ``benchmarks/<name>_entries.py`` module exposes
``entries(model_name: str, img_size: int, num_classes: int) -> list[Entry]``; ``benchmark.py``
collects them and times every entry alternately in one run, so all figures share the same machine
state (round-robin repeats, median).
"""

from __future__ import annotations

import gc
import resource
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Entry:
    """One row of the benchmark table.

    Args:
        label: row name, e.g. ``"RepAdapter (merged)"``.
        module: callable ``images -> logits``; put in eval mode for inference timing and in train
            mode for the training step (a training step is timed only when it has parameters with
            ``requires_grad``; merged / frozen forms have none and show "n/a").
        trainable_params: parameters a user trains for this method (adapters + heads).
        gflops: inference GFLOPs per image in the papers' convention (1 multiply-add = 1 FLOP);
            for dynamic methods the value at the stated budget.
        notes: free text shown in the table (e.g. "r=0.5", "fused attention").
        train_module: optional different module to time the training step with (e.g. the unmerged
            form behind a merged entry); defaults to ``module``. Entries sharing one training
            module are trained (and measured) once.
        extra: anything else worth keeping (e.g. exit shares, thresholds); written to ``--json``.
    """

    label: str
    module: nn.Module
    trainable_params: int
    gflops: float
    notes: str = ""
    train_module: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def count_trainable(module: nn.Module) -> int:
    """Parameters with ``requires_grad`` (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values() if p.requires_grad)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings are honest (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` for ``dtype`` on ``device`` (``None``: full precision)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def time_forward(fn: Callable[[Tensor], Any], x: Tensor, device: torch.device, iters: int = 1) -> float:
    """Seconds per call of ``fn(x)`` averaged over ``iters`` calls (synchronised)."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    synchronize(device)
    return (time.perf_counter() - t0) / iters


def round_robin_inference(
    fns: Sequence[Callable[[Tensor], Any]],
    x: Tensor,
    device: torch.device,
    repeats: int = 5,
    warmup: int = 1,
    iters: int = 1,
    amp_dtype: torch.dtype | None = None,
) -> list[list[float]]:
    """Time several forwards alternately: ``repeats`` rounds, each calling every fn once in turn.

    Alternating (rather than timing each fn in a block) spreads drifts of a shared machine (clock,
    other jobs) evenly over the entries. Returns per-fn lists of seconds per batch.
    """
    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode(), autocast_for(device, amp_dtype):
        for fn in fns:
            for _ in range(warmup):
                fn(x)
        synchronize(device)
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                times[i].append(time_forward(fn, x, device, iters))
    return times


def images_per_second(batch_size: int, seconds: Sequence[float]) -> float:
    """Throughput from the median time per batch."""
    return batch_size / statistics.median(seconds)


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_M_MMAP_THRESHOLD = -3


def _libc() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return None


def configure_malloc_for_rss(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation above ``threshold`` bytes with its own mmap (returned to
    the OS on free), so the process RSS follows live tensor memory during a step. By default glibc
    raises this threshold dynamically up to 32 MiB, after which freed tensors stay in the heap and a
    later step's RSS growth shows nothing. Returns whether it could be set (glibc only)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1)


def malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so an RSS baseline is tight."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class PeakRSS:
    """Context manager sampling the process RSS in a thread; ``peak_delta`` is the peak growth.

    PyTorch ops release the GIL, so the sampler runs while a forward/backward executes; glibc
    returns large (mmap'd) tensor buffers on free, so RSS follows live tensor memory closely.
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        malloc_trim()
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def peak_delta(self) -> int:
        return max(self.peak - self.base, 0)


def train_step_stats(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    device: torch.device,
    repeats: int = 2,
    amp_dtype: torch.dtype | None = None,
    loss_is_output: bool = False,
) -> dict[str, float]:
    """Training images/s (median of ``repeats`` timed steps after one warm-up step) and the peak
    memory of one step (forward + cross-entropy + backward + AdamW update), in MiB.

    Memory is the step's own peak above what was allocated before it (activations, gradients and
    optimizer state; not the weights): on CUDA from ``torch.cuda.max_memory_allocated``; on CPU from
    the process RSS sampled every millisecond by a background thread during the first step
    (``tracemalloc`` does not see PyTorch's C++ allocations). The CPU figure is an approximation.
    With ``loss_is_output`` the module returns the loss itself (e.g. a method's own training loss);
    otherwise cross-entropy of its logits against ``y`` is used.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return {"train_img_s": float("nan"), "peak_mem_mib": float("nan")}
    module.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_for(device, amp_dtype):
            out = module(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            loss = out.float() if loss_is_output else loss_fn(out.float(), y)
        loss.backward()
        opt.step()

    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with PeakRSS() as rss:
            step()
        peak = rss.peak_delta / 2**20
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)  # the optimiser (and its state) goes with this frame
    module.eval()
    return {"train_img_s": images_per_second(x.shape[0], times), "peak_mem_mib": peak}


__all__ = [
    "Entry",
    "PeakRSS",
    "configure_malloc_for_rss",
    "malloc_trim",
    "autocast_for",
    "count_trainable",
    "images_per_second",
    "round_robin_inference",
    "synchronize",
    "time_forward",
    "train_step_stats",
]
