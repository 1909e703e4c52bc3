"""HFImageDataModule: save_to_disk folders, image folders, the hub cache, every bad input, and one run
through the console script that must equal the same images read from VTAB-1K lists."""

from __future__ import annotations

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import ENV, TINY_MODEL, metric, run
from petl_lightning.errors import DataError, MissingExtraError

datasets = pytest.importorskip("datasets", reason="the hf extra is not installed: pip install 'petl-lightning[hf]'")

from petl_lightning.data.hf import HFImageDataModule, HFSource  # noqa: E402

DTD10 = Path(__file__).resolve().parents[2] / "shared" / "assets" / "vtab1k" / "dtd10"
SMALL = {"img_size": 16, "batch_size": 4, "num_workers": 0}


def random_images(n: int, seed: int = 0, size: int = 12) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def split(n: int, labels: list | None = None, seed: int = 0, class_names: list[str] | None = None, **extra: list):
    """A split of ``n`` tiny random PNGs (``image``) and labels 0, 1, 2, 0, ... (``label``)."""
    ds = datasets.Dataset.from_dict(
        {"image": random_images(n, seed), "label": labels or [i % 3 for i in range(n)], **extra}
    )
    ds = ds.cast_column("image", datasets.Image())
    return ds.cast_column("label", datasets.ClassLabel(names=class_names)) if class_names else ds


def saved(tmp_path: Path, name: str = "toy", **splits) -> Path:
    folder = tmp_path / name
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def test_reads_a_saved_dataset_dict(tmp_path: Path) -> None:
    path = saved(tmp_path, train=split(9), test=split(6, seed=1))
    dm = HFImageDataModule(str(path), **SMALL)
    assert dm.task == "toy" and dm.num_classes == 3 and dm.class_names is None
    assert dm.val_split is None and set(dm.sources) == {"train", "test"}
    train = dm.source("train")
    assert train.labels == [0, 1, 2] * 3 and train.name(4) == "train[4]" == train.where(4)
    assert train.image(0).mode == "RGB"
    assert np.array_equal(np.asarray(train.image(1)), np.asarray(random_images(9)[1]))
    x, y = next(iter(dm.train_dataloader()))
    assert tuple(x.shape) == (4, 3, 16, 16) and y.dtype.is_floating_point is False
    sub = train.subset([5, 2])
    assert isinstance(sub, HFSource) and sub.labels == [2, 2] and sub.name(0) == "train[5]"


def test_loader_workers_read_the_same_batches(tmp_path: Path) -> None:
    """The source travels to worker processes (the Arrow file is memory-mapped again there)."""
    path = saved(tmp_path, train=split(8), test=split(3, seed=1))
    batches = {}
    for workers in (0, 1):
        dm = HFImageDataModule(str(path), **{**SMALL, "num_workers": workers})
        batches[workers] = [x for x, _ in dm.train_dataloader()]
    assert all((a == b).all() for a, b in zip(batches[0], batches[1], strict=True))


def test_class_label_names_and_the_optional_val_split(tmp_path: Path) -> None:
    names = ["cat", "dog", "owl"]
    path = saved(
        tmp_path,
        train=split(9, class_names=names),
        validation=split(3, seed=2, class_names=names),
        test=split(3, seed=1, class_names=names),
    )
    dm = HFImageDataModule(str(path), name="pets", **SMALL)
    assert dm.class_names == names and dm.num_classes == 3 and dm.task == "pets"
    assert dm.val_split == "val" and dm.source("val").name(2) == "validation[2]"
    assert len(dm.val_dataloader().dataset) == 3
    few = HFImageDataModule(str(path), shots=1, **SMALL)
    assert sorted(few.source("train").labels) == [0, 1, 2]


def test_split_mapping_and_per_split_folders(tmp_path: Path) -> None:
    folder = tmp_path / "per_split"
    split(6).save_to_disk(str(folder / "fit"))
    split(3, seed=1).save_to_disk(str(folder / "holdout"))
    dm = HFImageDataModule(str(folder), splits={"train": "fit", "test": "holdout"}, **SMALL)
    assert len(dm.source("train")) == 6 and dm.source("test").name(0) == "holdout[0]"


def test_columns_by_other_names_among_others(tmp_path: Path) -> None:
    ds = split(6, note=["x"] * 6).rename_columns({"image": "img", "label": "y"})
    dm = HFImageDataModule(str(saved(tmp_path, train=ds, test=ds)), image_column="img", label_column="y", **SMALL)
    assert dm.source("test").labels == [0, 1, 2, 0, 1, 2]


def test_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # imagefolder's Arrow cache
    root = tmp_path / "shapes"
    for split_name, n in (("train", 2), ("validation", 1), ("test", 1)):
        for c, img in enumerate(random_images(2 * n)):
            (root / split_name / f"c{c % 2}").mkdir(parents=True, exist_ok=True)
            img.save(root / split_name / f"c{c % 2}" / f"{c}.png")
    dm = HFImageDataModule(str(root), **SMALL)
    assert dm.class_names == ["c0", "c1"] and dm.val_split == "val" and len(dm.source("train")) == 4


def test_hub_name_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that is no local path goes to ``load_dataset`` (which reads the cache offline)."""
    asked = []

    def load_dataset(name: str, config: str | None = None) -> object:
        asked.append((name, config))
        return datasets.DatasetDict(train=split(3), test=split(3))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dm = HFImageDataModule("someone/toys", config="small", **SMALL)
    assert asked == [("someone/toys", "small")] and dm.task == "toys"


COLUMNS = r"its columns are image, label\. Pass --data\.init_args\."
BAD = [
    ("missing path", {"path": "/no/such/folder"}, r"^Dataset path '/no/such/folder' not found: pass --data\.init_args"),
    (
        "uncached name",
        {"path": "nobody/no_such_dataset"},
        r"^Dataset 'nobody/no_such_dataset' is neither a local folder nor a hub dataset in the Hugging Face cache "
        r"\(.*\)\. Pass an existing folder",
    ),
    (
        "image column",
        {"image_column": "pic"},
        rf"^Split 'train' of '.*toy' has no column 'pic'; {COLUMNS}image_column\.$",
    ),
    ("label column", {"label_column": "y"}, rf"^Split 'train' of '.*toy' has no column 'y'; {COLUMNS}label_column\.$"),
    (
        "split",
        {"splits": {"train": "train", "test": "eval"}},
        r"^Dataset '.*toy' has no split 'eval' \(for test\); it has train, test\. Map the splits with",
    ),
    (
        "split keys",
        {"splits": {"train": "train"}},
        r"^splits=\{'train': 'train'\} must map train and test .*; missing test\.$",
    ),
]


@pytest.mark.parametrize(("case", "args", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, args: dict, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = saved(tmp_path, train=split(3), test=split(3))
    with pytest.raises(DataError) as err:
        HFImageDataModule(**{"path": str(path), **args, **SMALL})
    text = str(err.value)
    assert "\n" not in text and err.value.__cause__ is None  # one line, no chained traceback
    assert re.search(message, text), text


def test_a_file_or_a_folder_without_images_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"^Dataset path '.*notes\.txt' is not a folder: pass --data\.init_args\.path"):
        HFImageDataModule(str(tmp_path / "notes.txt"), **SMALL)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"^'.*empty' cannot be read as a saved dataset \(save_to_disk\) or an image"):
        HFImageDataModule(str(tmp_path / "empty"), **SMALL)


def test_a_missing_test_split_names_those_there_are(tmp_path: Path) -> None:
    path = saved(tmp_path, train=split(3), validation=split(3))
    with pytest.raises(
        DataError, match=r"^Dataset '.*toy' has no split 'test' \(for test\); it has train, validation\."
    ):
        HFImageDataModule(str(path), **SMALL)


def test_non_integer_labels_and_non_image_columns(tmp_path: Path) -> None:
    words = split(3, labels=["a", "b", "a"])
    integers = r"^Label column 'label' of split 'train' holds string values, not integer class indices: encode it"
    with pytest.raises(DataError, match=rf"{integers} \(dataset\.class_encode_column\('label'\)\)"):
        HFImageDataModule(str(saved(tmp_path, train=words, test=words)), **SMALL)
    floats = split(3, labels=[0.0, 1.0, 0.5])
    with pytest.raises(DataError, match=r"holds float\d+ values, not integer class indices"):
        HFImageDataModule(str(saved(tmp_path, "f", train=floats, test=floats)), **SMALL)
    paths = datasets.Dataset.from_dict({"image": ["a.png"], "label": [0]})
    with pytest.raises(DataError, match=r"^Column 'image' of split 'train' holds string values, not images: cast it"):
        HFImageDataModule(str(saved(tmp_path, "p", train=paths, test=paths)), **SMALL)


def test_single_dataset_and_unlabelled_rows(tmp_path: Path) -> None:
    split(3).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match=r"holds a single saved Dataset, with no splits: save a DatasetDict"):
        HFImageDataModule(str(tmp_path / "one"), **SMALL)
    names = ["a", "b", "c"]
    path = saved(tmp_path, train=split(3, class_names=names), test=split(3, labels=[0, -1, 1], class_names=names))
    with pytest.raises(DataError, match=r"^test\[1\]: label -1 is outside \[0, 3\) .*-1 marks an unlabelled row"):
        HFImageDataModule(str(path), **SMALL)


def test_a_corrupt_image_is_named(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b"not a png", "path": None}], "label": [0]})
    ds = ds.cast_column("image", datasets.Image())
    dm = HFImageDataModule(str(saved(tmp_path, train=ds, test=ds)), **SMALL)
    with pytest.raises(DataError, match=r"^train\[0\]: image cannot be read \(.*\)\.$"):
        dm.source("train").image(0)


def test_missing_datasets_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingExtraError, match=r"^datasets is not installed; .*pip install 'petl-lightning\[hf\]'"):
        HFImageDataModule(str(tmp_path), **SMALL)


# -- one run through the console script, against the same images read from VTAB-1K lists ----------


def dtd10_as_dataset(out: Path) -> Path:
    """dtd10's train800val200.txt (train) and test.txt (test) as a datasets folder, rows in list order."""
    names = (DTD10 / "classes.txt").read_text().split()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def rows(list_file: str) -> datasets.Dataset:
        pairs = [line.rsplit(maxsplit=1) for line in (DTD10 / list_file).read_text().splitlines() if line.strip()]
        images = [{"bytes": (DTD10 / rel).read_bytes(), "path": rel} for rel, _ in pairs]
        return datasets.Dataset.from_dict({"image": images, "label": [int(y) for _, y in pairs]}, features=features)

    datasets.DatasetDict(train=rows("train800val200.txt"), test=rows("test.txt")).save_to_disk(str(out))
    return out


@pytest.mark.slow  # console-script processes (the marker's rule); 19 s on an idle 2-core machine, 38 s busy
def test_hf_dataset_trains_exactly_as_the_vtab_lists(tmp_path: Path) -> None:
    """Same images, same order, same seed: the HF run and the VTAB-1K run reach the same test accuracy."""
    if not (DTD10 / "test.txt").is_file():
        pytest.skip(f"dtd10 assets not found at {DTD10} (shared assets absent)")
    folder = dtd10_as_dataset(tmp_path / "dtd10")
    common = [
        "-c", "recipes/repadapter.yaml", *TINY_MODEL, "--model.init_args.model_kwargs", "{depth: 2}",
        "--data.init_args.img_size", "32", "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "16",
        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    data = {
        "hf": ["--data", "HFImageDataModule", "--data.init_args.path", str(folder)],
        "vtab": ["--data.init_args.root", str(DTD10.parent), "--data.init_args.task", "dtd10"],
    }
    env = {**ENV, "OMP_NUM_THREADS": "1"}  # the two runs share the cores

    def both(command: str, *extra: str) -> dict[str, str]:
        def one(kind: str) -> str:
            out = str(tmp_path / f"run_{kind}")
            proc = run(command, *common, *data[kind], "--trainer.default_root_dir", out, *extra, env=env, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc.stdout

        with ThreadPoolExecutor(2) as pool:
            return dict(zip(data, pool.map(one, data)))

    both("fit")
    tested = both("test", "--ckpt_path", "last")
    acc = {kind: metric(out, "test/acc") for kind, out in tested.items()}
    assert acc["hf"] == pytest.approx(acc["vtab"], abs=1e-6), acc
