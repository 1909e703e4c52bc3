"""The 19 VTAB-1K tasks as Google's VTAB benchmark defines them, as plain data and pure functions.

For each task: the TensorFlow Datasets builder and version, the tfds split and slice each VTAB-1K
list takes (``train800``, ``val200``, ``test``; ``train800val200`` is ``train800`` + ``val200``),
and the function that maps a decoded tfds example to the task's label. Written from the definitions
in Google's ``task_adaptation`` package (VTAB's reference code): a validation list carved out of a
tfds ``train`` split starts at the same percentage of it as there, and every label function gives
the same label as there. Nothing here imports TensorFlow, so the split arithmetic and the labels are
tested without it.

The slices are absolute, computed from the split sizes of the tfds versions named here (the tfds
catalogue's numbers), so they hold without asking tfds; ``prepare.py`` checks the sizes tfds reports
against these before it reads anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

Example = Mapping[str, Any]
LISTS = ("train800", "val200", "test")
TRAIN_SIZE, VAL_SIZE = 800, 200

# VTAB's distance bins: a label is the largest i with thresholds[i] < value (value <= thresholds[0]
# matches no bin and gives -1, which the builder rejects as out of range).
CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_VEHICLE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_VEHICLE_TYPES = (0, 1, 2)  # tfds kitti object types Car, Van, Truck
KITTI_NO_VEHICLE_DEPTH = 1000.0  # VTAB appends this depth, so an image without vehicles is the last bin


@dataclass(frozen=True)
class TaskSource:
    """Where a VTAB-1K task comes from and how its labels are made.

    Attributes:
        task: VTAB-1K folder name.
        builder: tfds builder name, with its config (``sun397/tfds``).
        version: tfds version pattern, as VTAB pins it (``3.*.*``).
        sizes: examples in each tfds split of that version, which the absolute slices assume.
        lists: tfds split spec of ``train800``, ``val200`` and ``test``.
        test_size: the published size of the task's VTAB-1K test list.
        label: decoded tfds example -> label.
        label_rule: the label function in words (written to the manifest).
        class_names: names of the derived classes; ``None``: the names of tfds' ``label_key`` feature.
        label_key: the tfds feature the labels come from (for the class names).
        image_key: the tfds image feature VTAB uses.
        scale_pixels: the stored pixels are 0/1 (dSprites) and VTAB multiplies them by 255.
        manual: what tfds needs downloaded by hand into its manual folder, and from where.
        manual_files: the files or folders tfds reads there.
    """

    task: str
    builder: str
    version: str
    sizes: Mapping[str, int]
    lists: Mapping[str, str]
    test_size: int
    label: Callable[[Example], int]
    label_rule: str
    class_names: tuple[str, ...] | None = None
    label_key: str = "label"
    image_key: str = "image"
    scale_pixels: bool = False
    manual: str | None = None
    manual_files: tuple[str, ...] = ()

    @property
    def tfds_name(self) -> str:
        """``builder:version``, the name ``tfds.builder`` takes."""
        return f"{self.builder}:{self.version}"


_SPEC = re.compile(r"^(\w+)(?:\[(\d*):(\d*)\])?$")


def slice_ranges(spec: str, sizes: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """``(split, start, stop)`` of each ``+``-joined part of a tfds split spec such as
    ``train[:800]+train[45000:45200]`` (absolute indices only, as this module writes them)."""
    parts = []
    for part in spec.split("+"):
        m = _SPEC.match(part.strip())
        if m is None or m.group(1) not in sizes:
            raise ValueError(f"unsupported split spec {part!r} (splits: {', '.join(sizes)})")
        n = sizes[m.group(1)]
        start, stop = int(m.group(2) or 0), int(m.group(3) or n)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"split spec {part!r} is outside the {n} examples of {m.group(1)!r}")
        parts.append((m.group(1), start, stop))
    return parts


def slice_size(spec: str, sizes: Mapping[str, int]) -> int:
    """Number of examples a split spec selects."""
    return sum(stop - start for _, start, stop in slice_ranges(spec, sizes))


def limit_spec(spec: str, limit: int, sizes: Mapping[str, int]) -> str:
    """The spec of the first ``limit`` examples of ``spec`` (for small test builds)."""
    out, left = [], limit
    for split, start, stop in slice_ranges(spec, sizes):
        take = min(left, stop - start)
        if take > 0:
            out.append(f"{split}[{start}:{start + take}]")
        left -= take
    if not out:
        raise ValueError(f"a limit of {limit} examples selects nothing")
    return "+".join(out)


def _carved(train: int, percent: int, test_from: int | None = None) -> dict[str, str]:
    """VTAB's lists when val200 is carved out of tfds ``train``: it starts at ``percent``% of it."""
    start = train * percent // 100
    lists = {"train800": f"train[:{TRAIN_SIZE}]", "val200": f"train[{start}:{start + VAL_SIZE}]"}
    if test_from is not None:
        lists["test"] = f"train[{test_from}:]"
    return lists


def _official(val: str = "validation", test: str = "test") -> dict[str, str]:
    """VTAB's lists when tfds has a validation split: the first 800 / 200 of train / validation."""
    return {"train800": f"train[:{TRAIN_SIZE}]", "val200": f"{val}[:{VAL_SIZE}]", "test": test}


# -- label functions (each gives the label VTAB's preprocessing gives) ------------------------------
def label_feature(ex: Example) -> int:
    """The tfds ``label`` feature as it is."""
    return int(ex["label"])


def bin_by_thresholds(value: float, thresholds: tuple[float, ...]) -> int:
    """The largest ``i`` with ``thresholds[i] < value`` (-1 if none), VTAB's binning."""
    return max((i for i, t in enumerate(thresholds) if t < value), default=-1)


def clevr_count(ex: Example) -> int:
    """Number of objects minus 3 (CLEVR scenes hold 3-10 objects: 8 classes)."""
    return len(ex["objects"]["size"]) - 3


def clevr_distance(ex: Example) -> int:
    """Bin of the depth of the closest object (``pixel_coords[:, 2]``), 6 classes."""
    depths = [float(c[2]) for c in ex["objects"]["pixel_coords"]]
    return bin_by_thresholds(min(depths, default=float("inf")), CLEVR_DIST_THRESHOLDS)


def kitti_vehicle_distance(ex: Example) -> int:
    """Bin of the depth of the closest car, van or truck (``location[:, 2]``); 3 = no vehicle."""
    objects = ex["objects"]
    depths = [
        float(loc[2])
        for typ, loc in zip(objects["type"], objects["location"], strict=True)
        if int(typ) in KITTI_VEHICLE_TYPES
    ]
    return bin_by_thresholds(min([*depths, KITTI_NO_VEHICLE_DEPTH]), KITTI_VEHICLE_THRESHOLDS)


def binned(key: str, values: int, bins: int) -> Callable[[Example], int]:
    """``floor(ex[key] / (values / bins))``, VTAB's merging of dSprites' values into fewer classes,
    in exact integer arithmetic."""

    def label(ex: Example) -> int:
        return int(ex[key]) * bins // values

    return label


def attribute(key: str) -> Callable[[Example], int]:
    """The tfds feature ``key`` as it is (smallNORB's azimuth and elevation)."""

    def label(ex: Example) -> int:
        return int(ex[key])

    return label


def bin_names(values: int, bins: int) -> tuple[str, ...]:
    """``"first-last"`` of the original values merged into each bin by :func:`binned`."""
    members: list[list[int]] = [[] for _ in range(bins)]
    for v in range(values):
        members[v * bins // values].append(v)
    return tuple(f"{m[0]}-{m[-1]}" for m in members)


def _threshold_names(thresholds: tuple[float, ...]) -> tuple[str, ...]:
    return tuple(f"({lo:g}, {hi:g}]" for lo, hi in pairwise(thresholds))


_CLEVR_SIZES = {"train": 70000, "validation": 15000, "test": 15000}
_DSPRITES_SIZES = {"train": 737280}
_SMALLNORB_SIZES = {"train": 24300, "test": 24300}
_DSPRITES_TEST = 737280 * 90 // 100  # VTAB: train 80%, val 10%, test the last 10% of tfds train
_SMALLNORB_LISTS = _official(val="test", test="test[12150:]")  # VTAB: val the first half of test, test the rest
_DR_MANUAL = (
    "Kaggle's diabetic-retinopathy-detection files "
    "(https://www.kaggle.com/c/diabetic-retinopathy-detection/data): train.zip.00* unpacked into "
    "train/, test.zip.00* into test/, sample.zip into sample/, and trainLabels.csv"
)

VTAB_SOURCES: dict[str, TaskSource] = {
    s.task: s
    for s in [
        TaskSource(
            "cifar",
            "cifar100",
            "3.*.*",
            {"train": 50000, "test": 10000},
            {**_carved(50000, 90), "test": "test"},
            10000,
            label_feature,
            "tfds label (CIFAR-100 fine label)",
        ),
        TaskSource(
            "caltech101",
            "caltech101",
            "3.*.*",
            {"train": 3060, "test": 6084},
            {**_carved(3060, 90), "test": "test"},
            6084,
            label_feature,
            "tfds label",
        ),
        TaskSource(
            "dtd",
            "dtd",
            "3.*.*",
            {"train": 1880, "validation": 1880, "test": 1880},
            _official(),
            1880,
            label_feature,
            "tfds label",
        ),
        TaskSource(
            "oxford_flowers102",
            "oxford_flowers102",
            "2.*.*",
            {"train": 1020, "validation": 1020, "test": 6149},
            _official(),
            6149,
            label_feature,
            "tfds label",
        ),
        # VTAB pinned 3.*.*; tfds now builds only 4.0.0 (same splits, a few corrupt images fixed).
        TaskSource(
            "oxford_iiit_pet",
            "oxford_iiit_pet",
            "4.*.*",
            {"train": 3680, "test": 3669},
            {**_carved(3680, 80), "test": "test"},
            3669,
            label_feature,
            "tfds label",
        ),
        TaskSource(
            "svhn",
            "svhn_cropped",
            "3.*.*",
            {"train": 73257, "test": 26032, "extra": 531131},
            {**_carved(73257, 90), "test": "test"},
            26032,
            label_feature,
            "tfds label",
        ),
        TaskSource(
            "sun397",
            "sun397/tfds",
            "4.*.*",
            {"train": 76128, "validation": 10875, "test": 21750},
            _official(),
            21750,
            label_feature,
            "tfds label",
        ),
        TaskSource(
            "patch_camelyon",
            "patch_camelyon",
            "2.*.*",
            {"train": 262144, "validation": 32768, "test": 32768},
            _official(),
            32768,
            label_feature,
            "tfds label",
        ),
        TaskSource(
            "eurosat",
            "eurosat/rgb",
            "2.*.*",
            {"train": 27000},
            _carved(27000, 60, test_from=21600),
            5400,
            label_feature,
            "tfds label",
        ),
        TaskSource(
            "resisc45",
            "resisc45",
            "3.*.*",
            {"train": 31500},
            _carved(31500, 60, test_from=25200),
            6300,
            label_feature,
            "tfds label",
            manual="NWPU-RESISC45.rar (https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs) extracted",
            manual_files=("NWPU-RESISC45",),
        ),
        TaskSource(
            "diabetic_retinopathy",
            "diabetic_retinopathy_detection/btgraham-300",
            "3.*.*",
            {"train": 35126, "validation": 10906, "test": 42670},
            _official(),
            42670,
            label_feature,
            "tfds label (retinopathy grade 0-4)",
            manual=_DR_MANUAL,
            manual_files=("train", "test", "sample", "trainLabels.csv"),
        ),
        TaskSource(
            "clevr_count",
            "clevr",
            "3.*.*",
            _CLEVR_SIZES,
            {**_carved(70000, 90), "test": "validation"},
            15000,
            clevr_count,
            "number of objects - 3",
            class_names=tuple(str(n) for n in range(3, 11)),
        ),
        TaskSource(
            "clevr_dist",
            "clevr",
            "3.*.*",
            _CLEVR_SIZES,
            {**_carved(70000, 90), "test": "validation"},
            15000,
            clevr_distance,
            f"bin of min(objects.pixel_coords[:, 2]) by {CLEVR_DIST_THRESHOLDS}",
            class_names=_threshold_names(CLEVR_DIST_THRESHOLDS),
        ),
        TaskSource(
            "dmlab",
            "dmlab",
            "2.0.1",
            {"train": 65550, "validation": 22628, "test": 22735},
            _official(),
            22735,
            label_feature,
            "tfds label",
        ),
        TaskSource(
            "kitti",
            "kitti",
            "3.1.0",
            {"train": 6347, "validation": 423, "test": 711},
            _official(),
            711,
            kitti_vehicle_distance,
            f"bin of the closest car/van/truck depth (objects.location[:, 2], {KITTI_NO_VEHICLE_DEPTH:g} if "
            f"none) by {KITTI_VEHICLE_THRESHOLDS}",
            class_names=(*_threshold_names(KITTI_VEHICLE_THRESHOLDS), "no vehicle"),
        ),
        TaskSource(
            "dsprites_loc",
            "dsprites",
            "2.*.*",
            _DSPRITES_SIZES,
            _carved(737280, 80, test_from=_DSPRITES_TEST),
            73728,
            binned("label_x_position", 32, 16),
            "label_x_position (0-31) * 16 // 32",
            class_names=bin_names(32, 16),
            scale_pixels=True,
        ),
        TaskSource(
            "dsprites_ori",
            "dsprites",
            "2.*.*",
            _DSPRITES_SIZES,
            _carved(737280, 80, test_from=_DSPRITES_TEST),
            73728,
            binned("label_orientation", 40, 16),
            "label_orientation (0-39) * 16 // 40",
            class_names=bin_names(40, 16),
            scale_pixels=True,
        ),
        TaskSource(
            "smallnorb_azi",
            "smallnorb",
            "2.*.*",
            _SMALLNORB_SIZES,
            _SMALLNORB_LISTS,
            12150,
            attribute("label_azimuth"),
            "tfds label_azimuth",
            label_key="label_azimuth",
        ),
        TaskSource(
            "smallnorb_ele",
            "smallnorb",
            "2.*.*",
            _SMALLNORB_SIZES,
            _SMALLNORB_LISTS,
            12150,
            attribute("label_elevation"),
            "tfds label_elevation",
            label_key="label_elevation",
        ),
    ]
}

MANUAL_DOWNLOAD_TASKS = tuple(t for t, s in VTAB_SOURCES.items() if s.manual)

__all__ = [
    "MANUAL_DOWNLOAD_TASKS",
    "VTAB_SOURCES",
    "TaskSource",
    "bin_by_thresholds",
    "bin_names",
    "limit_spec",
    "slice_ranges",
    "slice_size",
]
