"""Many tasks over one frozen backbone: a mixed batch equals each image's own task's module (logits,
exits, kept tokens) for every method, with tasks of different class counts; the backbone is held
once; checkpoints of another backbone or method are refused in one line; ``petl-lightning serve``
answers a plain HTTP client as the modules do, and bad requests with a one-line 400."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from PIL import Image

from cli_helpers import BIN, ENV, assert_one_line, run, tiny_task
from petl_lightning import (
    AdapterConfig,
    ARCConfig,
    CheckpointError,
    ConfigError,
    DynAdapterConfig,
    DyT,
    DyTConfig,
    ExitConfig,
    LoRAConfig,
    RepAdapter,
    RepAdapterConfig,
    VTAB1kDataModule,
    adapt,
)
from petl_lightning.adapted import ViTClassifier
from petl_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, petl_transform
from petl_lightning.methods.config import MethodConfig
from petl_lightning.serve.command import serve_main
from petl_lightning.tasks.checkpoints import load_trained
from petl_lightning.tasks.multitask import MultiTaskModel
from petl_lightning.tasks.multitask.routing import MultiTaskLinear

CLASSES = (3, 5, 7)
EXITS = ExitConfig(blocks=[1, 2])
METHODS: dict[str, Callable[[int], MethodConfig]] = {
    "repadapter": lambda k: RepAdapterConfig(),
    "arc": lambda k: ARCConfig(adapter_dim=8),
    "lora": lambda k: LoRAConfig(placement="attn_mlp"),
    "adapter": lambda k: AdapterConfig(),
    "dyt": lambda k: DyTConfig(),
    "dyn_adapter": lambda k: DynAdapterConfig(num_classes=k, exits=EXITS),
    "dyn_adapter_dyt": lambda k: DynAdapterConfig(num_classes=k, base=DyTConfig(), exits=EXITS),
}


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=4).eval()


def trained_like(vit: torch.nn.Module, method: str, k: int, seed: int) -> ViTClassifier:
    """A classifier of ``method`` over ``vit`` whose trained tensors are random (so tasks differ)."""
    config = METHODS[method](k)
    adapted = adapt(vit, config)
    clf = adapted if isinstance(config, DynAdapterConfig) else ViTClassifier(adapted, k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clf.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return clf.eval()


def tasks_of(method: str, vit: torch.nn.Module, x: torch.Tensor | None = None) -> dict[str, ViTClassifier]:
    tasks = {f"k{k}": trained_like(vit, method, k, seed=k) for k in CLASSES}
    for i, clf in enumerate(tasks.values()):  # each task its own thresholds: some images leave early, some not
        if method.startswith("dyn_adapter") and x is not None:
            with torch.no_grad():
                confidence = torch.stack([clf.confidence(lg) for lg in clf.forward_exits(x)[:-1]])
            clf.thresholds.copy_(confidence.quantile((0.6, 0.4, 0.5)[i], dim=1))
        if method == "dyt":
            clf.vit.set_threshold((0.5, 0.45, 0.55)[i])
    return tasks


@pytest.mark.parametrize(
    ("method", "adapters"),
    [(m, "batched") for m in METHODS] + [(m, "grouped") for m in ("repadapter", "arc", "lora")],
)
def test_mixed_batch_equals_each_images_own_task_module(method: str, adapters: str) -> None:
    vit = tiny_vit()
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tasks = tasks_of(method, vit, x)
    task = torch.tensor([0, 1, 2, 0, 2, 1, 1, 0, 2, 2, 0, 1])
    with torch.no_grad():
        refs = [c.infer(x[task == t]) for t, c in enumerate(tasks.values())]
        model = MultiTaskModel(tasks, adapters).eval()  # type: ignore[arg-type]
        out = model.infer(x, [model.task_names[t] for t in task.tolist()])
        rows = model(x, task)
    assert isinstance(rows, list) and [r.shape[0] for r in rows] == [CLASSES[t] for t in task.tolist()]
    linears = [m for m in model.modules() if isinstance(m, MultiTaskLinear)]
    assert all(m.batched == (adapters == "batched") for m in linears)
    assert bool(linears) == (method not in ("adapter", "dyt", "dyn_adapter_dyt"))  # dyn_adapter: a RepAdapter base
    exits = []
    for t, ref in enumerate(refs):
        k, mine = CLASSES[t], task == t
        torch.testing.assert_close(out.logits[mine, :k], ref.logits, atol=1e-5, rtol=0)
        assert torch.isinf(out.logits[mine, k:]).all()
        torch.testing.assert_close(torch.stack([r for r, m in zip(rows, mine) if m]), ref.logits, atol=1e-5, rtol=0)
        if ref.kept is not None:
            assert torch.equal(out.kept[mine], ref.kept)
        if method.startswith("dyn_adapter"):
            assert torch.equal(out.exit_index[mine], ref.exit_index)
            exits += ref.exit_index.tolist()
    if method.startswith("dyn_adapter"):
        assert len(set(exits)) >= 2, f"the thresholds should send images to different exits, got {exits}"
    if "dyt" in method:
        assert 0.0 < float(out.keep_rate().mean()) < 1.0
    # the route matters: image 0 (task k3) run as task k5 gives task k5's logits, not task k3's
    with torch.no_grad():
        other = model.infer(x[:1], ["k5"]).logits[0, :3]
    assert (other - out.logits[0, :3]).abs().max() > 1e-3


def test_the_backbone_is_held_once_and_each_task_adds_its_trained_tensors() -> None:
    vit = tiny_vit()
    backbone = sum(p.numel() for p in vit.parameters())
    tasks = tasks_of("repadapter", vit)
    trained = sum(p.numel() for c in tasks.values() for p in c.parameters() if p.requires_grad)
    model = MultiTaskModel(tasks)
    assert sum(p.numel() for p in model.parameters()) == backbone + trained  # parameters() counts each tensor once
    assert trained < 0.1 * backbone


def test_tasks_that_cannot_share_a_batch_are_refused() -> None:
    vit = tiny_vit()
    with pytest.raises(CheckpointError, match="another backbone.*other weights"):
        MultiTaskModel({"a": trained_like(vit, "repadapter", 3, 0), "b": trained_like(tiny_vit(1), "repadapter", 3, 1)})
    with pytest.raises(CheckpointError, match="another method or configuration"):
        MultiTaskModel({"a": trained_like(vit, "repadapter", 3, 0), "b": trained_like(vit, "arc", 3, 1)})
    model = MultiTaskModel({"a": trained_like(vit, "dyt", 3, 0), "b": trained_like(vit, "dyt", 3, 1)})
    with pytest.raises(ConfigError, match="Unknown task 'c'; this model has a, b"):
        model(torch.zeros(1, 3, 32, 32), ["c"])
    with pytest.raises(ConfigError, match="2 task ids for 1 images"):
        model(torch.zeros(1, 3, 32, 32), ["a", "b"])
    assert model(torch.zeros(2, 3, 32, 32), ["a", "b"]).shape == (2, 3)  # same class counts: one tensor


def write_checkpoint(module: L.LightningModule, root: Path, path: Path) -> Path:
    """``module`` after one training step on the tiny task, saved as a fit run saves it."""
    dm = VTAB1kDataModule(root=str(root), task="tiny", img_size=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    trainer.save_checkpoint(path)
    return path


TINY_DYT = dict(model_name="vit_tiny_patch16_224", pretrained=False, img_size=32, model_kwargs={"depth": 2})


@pytest.fixture(scope="module")
def dyt_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two DyT checkpoints of 2 and 3 classes over one random ViT-Ti, and a RepAdapter one."""
    folder = tmp_path_factory.mktemp("ckpts")
    tiny_task(folder / "data")
    L.seed_everything(0, verbose=False)
    return {
        "two": write_checkpoint(DyT(num_classes=2, **TINY_DYT), folder / "data", folder / "two.ckpt"),
        "three": write_checkpoint(DyT(num_classes=3, **TINY_DYT), folder / "data", folder / "three.ckpt"),
        "rep": write_checkpoint(RepAdapter(num_classes=2, **TINY_DYT), folder / "data", folder / "rep.ckpt"),
    }


def test_from_checkpoints_equals_the_modules_and_refuses_another_method(dyt_checkpoints: dict[str, Path]) -> None:
    model = MultiTaskModel.from_checkpoints({"two": dyt_checkpoints["two"], "three": dyt_checkpoints["three"]})
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names = ["two", "three", "three", "two", "three", "two"]
    with torch.no_grad():
        rows = model(x, names)
        for name in ("two", "three"):
            module = load_trained(dyt_checkpoints[name])
            mine = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(torch.stack([rows[i] for i in mine]), module(x[mine]), atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match="trained by RepAdapter, task 'two' by DyT"):
        MultiTaskModel.from_checkpoints({"two": dyt_checkpoints["two"], "rep": dyt_checkpoints["rep"]})


def test_serve_refuses_bad_tasks_in_one_line_before_starting(
    dyt_checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    two, rep = str(dyt_checkpoints["two"]), str(dyt_checkpoints["rep"])
    assert_one_line(run("serve", "--task", f"two={two}", "--task", f"rep={rep}"), "trained by RepAdapter")
    for argv, message in (
        (["--task", two], "give NAME=CKPT"),
        (["--task", f"a={two}", "--task", f"a={two}"], "given twice"),
        (["--task", f"a={two}", "--port", "70000"], "not a TCP port"),
    ):
        assert serve_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    """A plain HTTP POST; the status and the JSON reply."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def as_json(task: str, image: bytes) -> tuple[bytes, str]:
    return json.dumps({"task": task, "image": base64.b64encode(image).decode()}).encode(), "application/json"


def as_form(task: str, image: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    head = f'--{b}\r\nContent-Disposition: form-data; name="task"\r\n\r\n{task}\r\n--{b}\r\n'
    head += 'Content-Disposition: form-data; name="image"; filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    return head.encode() + image + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


@pytest.mark.slow
def test_server_answers_mixed_tasks_as_the_modules_and_bad_requests_with_400(
    dyt_checkpoints: dict[str, Path], dtd10_root: Path, tmp_path: Path
) -> None:
    """``petl-lightning serve`` in its own process, asked by a plain HTTP client with real images."""
    ckpts = {name: dyt_checkpoints[name] for name in ("two", "three")}
    files = sorted((dtd10_root / "dtd10" / "images").rglob("*.jpg"))[::40][:4]
    expected = {}
    for name, path in ckpts.items():
        module = load_trained(path)
        norm = module.input_normalization or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        transform = petl_transform(32, norm["mean"], norm["std"])
        with torch.no_grad():
            for f in files:
                prob = module(transform(Image.open(f).convert("RGB"))[None]).softmax(-1)[0]
                expected[name, f.name] = (int(prob.argmax()), float(prob.max()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(BIN / "petl-lightning"), "serve", "--port", str(port), "--batch_timeout", "0.05"]
    args += [a for name, path in ckpts.items() for a in ("--task", f"{name}={path}")]
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            args, env=ENV, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not become healthy in 180 s"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200 and reply.read() == b"ok":
                        break
            except OSError:
                time.sleep(0.5)
        jobs = [(name, f, enc) for name in ckpts for f in files for enc in (as_json, as_form)]
        with ThreadPoolExecutor(8) as pool:  # requests of both tasks at once: batched together
            replies = list(pool.map(lambda job: post(f"{url}/predict", *job[2](job[0], job[1].read_bytes())), jobs))
        for (name, f, _), (status, reply) in zip(jobs, replies):
            assert status == 200, reply
            assert reply["task"] == name and reply["class"] == expected[name, f.name][0]
            assert reply["confidence"] == pytest.approx(expected[name, f.name][1], abs=1e-4)
            assert 0.0 <= reply["keep_rate"] <= 1.0
        image = files[0].read_bytes()
        for (body, kind), message in (
            (as_json("four", image), "Unknown task 'four'; this server has two, three."),
            (as_json("two", b"not an image"), "'image' is not an image"),
            (as_form("two", b"GIF89a broken"), "'image' is not an image"),
            ((b"{not json", "application/json"), "not JSON or a form"),
            ((json.dumps({"task": "two"}).encode(), "application/json"), "has no 'image'"),
        ):
            status, reply = post(f"{url}/predict", body, kind)
            assert status == 400 and message in reply["detail"] and "\n" not in reply["detail"], reply
        status, reply = post(f"{url}/predict", *as_json("three", image))  # and it goes on answering
        assert status == 200 and reply["class"] == expected["three", files[0].name][0]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    deadline = time.monotonic() + 30
    while True:  # every process the server started (LitServe's workers) is gone too
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "server processes left running"
        time.sleep(0.5)


def test_serve_without_litserve_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "litserve", None)  # as if the [serve] extra were not installed
    assert serve_main(["--task", "a=x.ckpt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: litserve is not installed; install the extra: pip install 'petl-lightning[serve]'.", err


def test_server_replies_name_the_exit_block_and_keep_rate_of_each_image() -> None:
    """The server's answers for a mixed batch of a Dyn-Adapter over DyT (no HTTP: its LitAPI's predict)."""
    from petl_lightning.serve.api import MultiTaskAPI
    from petl_lightning.serve.requests import BadRequest, ImageRequest

    vit = tiny_vit()
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = MultiTaskModel(tasks_of("dyn_adapter_dyt", vit, x)).eval()
    api = MultiTaskAPI(model)
    api.setup("cpu")
    images = [
        Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy())
        for i in range(6)
    ]
    names = ["k3", "k7", "k5", "k3", "k7", "k5"]
    replies = api.predict([ImageRequest(n, im) for n, im in zip(names, images)] + [BadRequest("no")])
    assert replies[-1] == BadRequest("no")  # a bad request is answered on its own, the others still are
    batch = torch.stack([api.transforms[n](im) for n, im in zip(names, images)])
    with torch.no_grad():
        out = model.infer(batch, names)
    for i, reply in enumerate(replies[:-1]):
        assert reply["task"] == names[i] and reply["class"] == int(out.logits[i].argmax())
        assert reply["confidence"] == pytest.approx(float(out.logits[i].softmax(-1).max()), abs=1e-6)
        assert reply["exit_block"] == model.exit_depths[int(out.exit_index[i])]
        assert reply["keep_rate"] == pytest.approx(float(out.keep_rate()[i]), abs=1e-9)
