"""Building VTAB-1K from TFDS (data/prepare.py, data/vtab_splits.py).

The split definitions and label functions are checked as pure Python. The builds run offline on
``tfds.testing.mock_data`` with VTAB's split sizes (tests/tfds_mock.py); they need the
``[prepare]`` extra and are skipped, saying so, without it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from petl_lightning.data import prepare
from petl_lightning.data.check import check_main
from petl_lightning.data.vtab import VTAB_TASKS, VTAB1kDataModule
from petl_lightning.data.vtab_splits import (
    MANUAL_DOWNLOAD_TASKS,
    VTAB_SOURCES,
    bin_names,
    limit_spec,
    slice_ranges,
    slice_size,
)
from petl_lightning.errors import DataError, MissingExtraError

pytestmark = pytest.mark.slow  # builds tasks through (mocked) TensorFlow Datasets: make test, not make test-fast

TESTS = Path(__file__).resolve().parent
SRC = VTAB_SOURCES
TEST_LIMIT = 300  # test images built for the tasks whose canonical test list is too big for CI


# -- the definitions, as pure Python ---------------------------------------------------------------
def test_every_task_has_vtabs_split_sizes_and_class_count() -> None:
    assert list(SRC) == list(VTAB_TASKS)
    published = {
        "cifar": 10000,
        "caltech101": 6084,
        "dtd": 1880,
        "oxford_flowers102": 6149,
        "oxford_iiit_pet": 3669,
        "svhn": 26032,
        "sun397": 21750,
        "patch_camelyon": 32768,
        "eurosat": 5400,
        "resisc45": 6300,
        "diabetic_retinopathy": 42670,
        "clevr_count": 15000,
        "clevr_dist": 15000,
        "dmlab": 22735,
        "kitti": 711,
        "dsprites_loc": 73728,
        "dsprites_ori": 73728,
        "smallnorb_azi": 12150,
        "smallnorb_ele": 12150,
    }
    for task, src in SRC.items():
        sizes = {name: slice_size(spec, src.sizes) for name, spec in src.lists.items()}
        assert (
            sizes
            == {"train800": 800, "val200": 200, "test": published[task]}
            == {"train800": 800, "val200": 200, "test": src.test_size}
        ), task
        if src.class_names is not None:
            assert len(src.class_names) == VTAB_TASKS[task].num_classes, task
    assert MANUAL_DOWNLOAD_TASKS == ("resisc45", "diabetic_retinopathy")


def test_slices_are_vtabs() -> None:
    """val200 carved out of tfds train starts at VTAB's percentage of it; test slices are VTAB's."""
    assert SRC["cifar"].lists == {"train800": "train[:800]", "val200": "train[45000:45200]", "test": "test"}
    assert SRC["caltech101"].lists["val200"] == "train[2754:2954]"  # 90% of 3060
    assert SRC["oxford_iiit_pet"].lists["val200"] == "train[2944:3144]"  # 80% of 3680
    assert SRC["svhn"].lists["val200"] == "train[65931:66131]"
    assert SRC["eurosat"].lists == {"train800": "train[:800]", "val200": "train[16200:16400]", "test": "train[21600:]"}
    assert SRC["resisc45"].lists["test"] == "train[25200:]"
    assert SRC["clevr_count"].lists == {"train800": "train[:800]", "val200": "train[63000:63200]", "test": "validation"}
    assert SRC["dsprites_loc"].lists == {
        "train800": "train[:800]",
        "val200": "train[589824:590024]",
        "test": "train[663552:]",
    }
    assert SRC["smallnorb_azi"].lists == {"train800": "train[:800]", "val200": "test[:200]", "test": "test[12150:]"}
    assert SRC["dtd"].lists == {"train800": "train[:800]", "val200": "validation[:200]", "test": "test"}
    assert {SRC[t].tfds_name for t in ("sun397", "diabetic_retinopathy", "dmlab", "kitti")} == {
        "sun397/tfds:4.*.*",
        "diabetic_retinopathy_detection/btgraham-300:3.*.*",
        "dmlab:2.0.1",
        "kitti:3.1.0",
    }


def test_slice_arithmetic_and_limits() -> None:
    sizes = {"train": 50000, "test": 10000}
    assert slice_ranges("train[:800]+train[45000:45200]", sizes) == [("train", 0, 800), ("train", 45000, 45200)]
    assert limit_spec("train[:800]+train[45000:45200]", 900, sizes) == "train[0:800]+train[45000:45100]"
    assert limit_spec("train[663552:]", 5, SRC["dsprites_loc"].sizes) == "train[663552:663557]"
    assert slice_size(limit_spec("test", 300, sizes), sizes) == 300
    with pytest.raises(ValueError, match="outside the 10000 examples"):
        slice_ranges("test[:10001]", sizes)
    with pytest.raises(ValueError, match="unsupported split spec"):
        slice_ranges("train[10%:]", sizes)


def _objects(**fields: Any) -> dict[str, Any]:
    return {"objects": {k: np.asarray(v) for k, v in fields.items()}}


def test_label_functions_on_hand_made_examples() -> None:
    count, dist = SRC["clevr_count"].label, SRC["clevr_dist"].label
    assert [count(_objects(size=[0] * n)) for n in (3, 4, 10)] == [0, 1, 7]
    coords = lambda *depths: _objects(pixel_coords=[[10.0, 20.0, d] for d in depths])  # noqa: E731
    # bins (0, 8], (8, 8.5], (8.5, 9], (9, 9.5], (9.5, 10], (10, 100] of the closest object's depth
    assert [dist(coords(*d)) for d in ([12.0, 7.5], [8.0], [8.2], [9.2, 30.0], [9.5], [9.7], [10.5], [99.0])] == [
        0,
        0,
        1,
        3,
        3,
        4,
        5,
        5,
    ]
    kitti = SRC["kitti"].label
    car, van, truck, pedestrian, tram = 0, 1, 2, 3, 6
    scene = lambda *objs: _objects(type=[t for t, _ in objs], location=[[1.0, 1.5, z] for _, z in objs])  # noqa: E731
    assert kitti(scene((car, 5.0))) == 0 and kitti(scene((van, 8.0))) == 0  # (-100, 8]
    assert kitti(scene((truck, 15.0), (car, 40.0))) == 1  # (8, 20]: the closest vehicle counts
    assert kitti(scene((car, 30.0), (pedestrian, 2.0))) == 2  # a pedestrian is no vehicle
    assert kitti(scene((pedestrian, 3.0), (tram, 9.0))) == 3  # no car/van/truck: the last bin
    loc, ori = SRC["dsprites_loc"].label, SRC["dsprites_ori"].label
    assert [loc({"label_x_position": x}) for x in (0, 1, 2, 17, 31)] == [0, 0, 1, 8, 15]
    assert [ori({"label_orientation": o}) for o in range(40)] == [int(np.floor(o / 2.5)) for o in range(40)]
    assert bin_names(40, 16)[:3] == ("0-2", "3-4", "5-7") and bin_names(32, 16)[-1] == "30-31"
    assert SRC["smallnorb_azi"].label({"label_azimuth": 17, "label_elevation": 3}) == 17
    assert SRC["smallnorb_ele"].label({"label_azimuth": 17, "label_elevation": 3}) == 3
    assert SRC["dtd"].label({"label": np.int64(46)}) == 46


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_images_are_written_as_tfds_stores_them() -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(jpeg, format="JPEG")
    assert prepare.encode_image(jpeg.getvalue(), scale_pixels=False) == (jpeg.getvalue(), ".jpg")
    png = _png(np.zeros((4, 4), np.uint8))
    assert prepare.encode_image(png, scale_pixels=False) == (png, ".png")
    mask = np.array([[0, 1], [1, 0]], np.uint8)  # dSprites stores 0/1
    data, suffix = prepare.encode_image(_png(mask), scale_pixels=True)
    assert suffix == ".png" and np.asarray(Image.open(io.BytesIO(data))).tolist() == [[0, 255], [255, 0]]
    with pytest.raises(DataError, match="neither JPEG nor PNG"):
        prepare.encode_image(b"GIF89a....", scale_pixels=False)


def test_a_tfds_version_with_other_split_sizes_is_refused() -> None:
    builder = SimpleNamespace(
        data_dir_root="/tfds",
        is_prepared=lambda: True,
        download_and_prepare=lambda **_: None,
        info=SimpleNamespace(
            full_name="dtd/9.0.0",
            splits={"train": SimpleNamespace(num_examples=1880), "validation": SimpleNamespace(num_examples=1000)},
        ),
    )
    tfds = SimpleNamespace(
        builder=lambda name, data_dir: builder, download=SimpleNamespace(DownloadConfig=lambda manual_dir: None)
    )
    with pytest.raises(DataError, match=r"dtd/9.0.0 has 1000 examples in 'validation', VTAB-1K's slices assume 1880"):
        prepare._open_builder(tfds, SRC["dtd"], None, None)


def test_without_tfds_prepare_data_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    dm = VTAB1kDataModule(str(tmp_path / "vtab"), "dtd", prepare=True, num_workers=0)  # no folder yet: fine
    assert dm.num_classes == 47
    with pytest.raises(MissingExtraError) as err:  # the one missing-extra error of the package
        dm.prepare_data()
    assert str(err.value) == (
        "Cannot build VTAB-1K tasks: tensorflow-datasets is not installed: pip install 'petl-lightning[prepare]'."
    )
    assert not (tmp_path / "vtab").exists()  # nothing written
    with pytest.raises(DataError, match="root .* does not exist"):  # setup() runs the usual checks
        dm.setup("fit")


def test_prepare_refuses_custom_tasks_and_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="prepare=True builds the 19 VTAB-1K tasks.*'mytask' is not one"):
        VTAB1kDataModule(str(tmp_path), "mytask", prepare=True)
    with pytest.raises(DataError, match="only the 19 VTAB-1K tasks can be built"):
        prepare.prepare_task(tmp_path, "mytask")
    assert prepare.prepare_main(["--root", str(tmp_path), "--tasks", "dtd,cifarr"]) == 2
    assert prepare.parse_tasks("specialized,dtd,eurosat") == [
        "patch_camelyon",
        "eurosat",
        "resisc45",
        "diabetic_retinopathy",
        "dtd",
    ]


# -- builds on mock data (needs the [prepare] extra) -----------------------------------------------
@pytest.fixture(scope="module")
def mock() -> Any:
    pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed (pip install '.[prepare]')")
    sys.path.insert(0, str(TESTS))
    import tfds_mock

    return tfds_mock


# dtd, eurosat and kitti at their canonical sizes; the others' test lists are 12k-74k images, so
# they are built with TEST_LIMIT test images (their canonical sizes are checked above).
BUILDS = {
    "dtd": None,
    "eurosat": None,
    "kitti": None,
    "clevr_count": TEST_LIMIT,
    "dsprites_loc": TEST_LIMIT,
    "smallnorb_azi": TEST_LIMIT,
}


@pytest.fixture(scope="module")
def built(mock: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    with mock.vtab_mock_data():
        for task, limit in BUILDS.items():
            assert prepare.prepare_task(root, task, test_limit=limit) is True
    return root


def _lines(path: Path) -> list[tuple[str, int]]:
    return [(p, int(y)) for p, y in (line.rsplit(maxsplit=1) for line in path.read_text().splitlines())]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_built_tasks_have_exact_sizes_labels_and_manifest(built: Path) -> None:
    for task, limit in BUILDS.items():
        folder, n = built / task, VTAB_TASKS[task].num_classes
        lists = {name: _lines(folder / f"{name}.txt") for name in ("train800", "val200", "train800val200", "test")}
        assert [len(v) for v in lists.values()] == [800, 200, 1000, limit or SRC[task].test_size], task
        assert lists["train800val200"] == lists["train800"] + lists["val200"]
        assert all(0 <= y < n for rows in lists.values() for _, y in rows), task
        assert all((folder / p).is_file() for rows in lists.values() for p, _ in rows)
        assert len(list((folder / "images").rglob("*.*"))) == 1000 + len(lists["test"])  # no extra image
        assert len((folder / "classes.txt").read_text().splitlines()) == n
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["num_classes"] == n and manifest["canonical"] is (limit is None)
        assert manifest["source"]["tfds_builder"] == SRC[task].builder and manifest["source"]["version"]
        assert {k: v["images"] for k, v in manifest["splits"].items()} == {k: len(v) for k, v in lists.items()}
        assert manifest["splits"]["val200"]["tfds_split"] == SRC[task].lists["val200"]
        for name, digest in manifest["sha256"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert not list(built.glob(".*.partial-*"))
    dm = VTAB1kDataModule(str(built), "eurosat", img_size=32, num_workers=0, check_images="header")
    assert len(dm.dataset("train800val200")) == 1000 and len(dm.dataset("test")) == 5400
    assert dm.dataset("test")[0][0].shape == (3, 32, 32)


def test_labels_follow_the_vtab_mapping_of_the_source_examples(built: Path, mock: Any) -> None:
    import tensorflow_datasets as tfds

    with mock.vtab_mock_data():
        for task in ("dtd", "clevr_count", "dsprites_loc", "smallnorb_azi"):
            builder = tfds.builder(SRC[task].tfds_name)
            for name in ("train800", "val200"):
                part, first, _ = slice_ranges(SRC[task].lists[name], SRC[task].sizes)[0]
                rows = _lines(built / task / f"{name}.txt")
                expected = [SRC[task].label(mock.mock_example(builder, part, first + i)) for i in range(len(rows))]
                assert [y for _, y in rows] == expected, (task, name)
    clevr = [y for _, y in _lines(built / "clevr_count" / "train800.txt")]
    assert clevr[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 0]  # the mock's scenes hold 3 + i % 8 objects
    pixels = np.asarray(Image.open(built / "dsprites_loc" / "images/train800/000000.png"))
    assert set(np.unique(pixels)) <= {0, 255} and pixels.max() == 255  # dSprites' 0/1 times 255


def test_building_twice_gives_identical_files(built: Path, mock: Any, tmp_path: Path) -> None:
    with mock.vtab_mock_data():
        assert prepare.prepare_task(tmp_path, "dtd") is True
        assert prepare.prepare_task(tmp_path, "dtd") is False  # already there: skipped
    assert _tree_digest(tmp_path / "dtd") == _tree_digest(built / "dtd")


def test_a_failing_build_leaves_no_folder(mock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fail_at_the_500th(raw: bytes, scale_pixels: bool) -> tuple[bytes, str]:
        calls.append(1)
        if len(calls) == 500:
            raise OSError("disk full")
        return raw, ".png"

    monkeypatch.setattr(prepare, "encode_image", fail_at_the_500th)
    with mock.vtab_mock_data(), pytest.raises(OSError, match="disk full"):
        prepare.prepare_task(tmp_path, "dtd")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dtd.lock"]


KILLED_BUILD = """
import sys
sys.path.insert(0, {tests!r})
from petl_lightning.data.prepare import prepare_tasks
import tfds_mock
with tfds_mock.vtab_mock_data():
    prepare_tasks({root!r}, ["kitti", "eurosat"])
"""


def test_a_killed_build_resumes_and_skips_finished_tasks(built: Path, mock: Any, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD.format(tests=str(TESTS), root=str(tmp_path))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".eurosat.partial-*/images/test/*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "kitti" / "manifest.json").is_file()  # finished before the kill
    assert not (tmp_path / "eurosat").exists() and list(tmp_path.glob(".eurosat.partial-*"))
    kitti_mtime = (tmp_path / "kitti" / "test.txt").stat().st_mtime_ns
    with mock.vtab_mock_data():
        report = prepare.prepare_tasks(tmp_path, ["kitti", "eurosat"])
    assert (report.built, report.skipped, report.failed) == (["eurosat"], ["kitti"], {})
    assert (tmp_path / "kitti" / "test.txt").stat().st_mtime_ns == kitti_mtime
    assert not list(tmp_path.glob(".*.partial-*"))
    assert _tree_digest(tmp_path / "eurosat") == _tree_digest(built / "eurosat")


def test_manual_download_tasks_say_what_is_needed_and_others_still_build(
    mock: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manual = tmp_path / "manual"
    with mock.vtab_mock_data():
        code = prepare.prepare_main(
            ["--root", str(tmp_path / "vtab"), "--tasks", "diabetic_retinopathy,kitti", "--manual-dir", str(manual)]
        )
    out, err = capsys.readouterr()
    assert code == 1 and (tmp_path / "vtab" / "kitti" / "test.txt").is_file()
    assert not (tmp_path / "vtab" / "diabetic_retinopathy").exists()
    assert err.strip() == (
        "error: diabetic_retinopathy: tfds needs a manual download of diabetic_retinopathy_detection/btgraham-300: "
        f"{SRC['diabetic_retinopathy'].manual}; tfds expects train, test, sample, trainLabels.csv in {manual}/ "
        "(set manual_dir to use another folder), then run again."
    )
    assert out.splitlines()[-1] == "1 built, 0 already there, 1 not built: diabetic_retinopathy."


def test_datamodule_prepares_then_reads(mock: Any, built: Path, tmp_path: Path) -> None:
    dm = VTAB1kDataModule(str(tmp_path / "vtab"), "dtd", prepare=True, img_size=32, num_workers=0)
    with mock.vtab_mock_data():
        dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 1000 and len(dm.test_dataloader().dataset) == 1880
    assert _tree_digest(tmp_path / "vtab" / "dtd") == _tree_digest(built / "dtd")


def test_vtab_check_on_built_folders(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_main(["--root", str(built), "--tasks", "dtd,eurosat,kitti"]) == 0
    capsys.readouterr()
    task_dir = tmp_path / "dtd"
    shutil.copytree(built / "dtd", task_dir)
    (task_dir / "images/train800/000003.png").unlink()
    shutil.copyfile(task_dir / "images/val200/000009.png", task_dir / "images/test/000020.png")
    rows = (task_dir / "test.txt").read_text().splitlines()
    rows[5] = "images/test/000005.png 47"
    (task_dir / "test.txt").write_text("\n".join(rows) + "\n")
    assert check_main(["--root", str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "dtd: test.txt:6: label 47 is outside [0, 47)",
        "dtd: train800.txt:4: image images/train800/000003.png is missing",
        "dtd: test.txt:21: test image images/test/000020.png has the same bytes as training image "
        "images/val200/000009.png (val200.txt:10)",
        "dtd: test.txt is not the file manifest.json describes (sha256 differs)",
        "vtab-check: 1 of 1 task folders have problems",
    ]


DDP_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import lightning as L
from petl_lightning.data.vtab import VTAB1kDataModule
from petl_lightning.methods.baselines import LinearProbe
import tfds_mock

log = {log!r}

class Logged(VTAB1kDataModule):
    def prepare_data(self):
        with open(log, "a") as f:
            f.write(f"prepare_data on rank {{os.environ['RANK']}}\\n")
        super().prepare_data()

with tfds_mock.vtab_mock_data():
    dm = Logged({root!r}, "dtd", prepare=True, img_size=32, batch_size=128, num_workers=0)
    model = LinearProbe(num_classes=dm.num_classes, model_name="vit_tiny_patch16_224", pretrained=False,
                        img_size=32, model_kwargs={{"depth": 1, "patch_size": 8}})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, dm, verbose=False)
with open(log, "a") as f:
    f.write(f"rank {{os.environ['RANK']}} tested {{len(dm.dataset('test'))}} images\\n")
"""


def test_ddp_prepares_once_on_rank_0(mock: Any, built: Path, tmp_path: Path) -> None:
    """Two DDP processes (torchrun) build a DataModule on a root without the task: rank 0 alone
    builds it in prepare_data, then both read it in setup."""
    script, log, root = tmp_path / "ddp_prepare.py", tmp_path / "log.txt", tmp_path / "vtab"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), log=str(log), root=str(root)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(log.read_text().splitlines()) == [
        "prepare_data on rank 0",
        "rank 0 tested 1880 images",
        "rank 1 tested 1880 images",
    ]
    assert _tree_digest(root / "dtd") == _tree_digest(built / "dtd")
    assert sorted(p.name for p in root.iterdir()) == [".dtd.lock", "dtd"]
