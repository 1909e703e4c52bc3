"""``petl-lightning serve``: many tasks' checkpoints served from one backbone over HTTP (LitServe).

    petl-lightning serve --task cifar=runs/cifar/checkpoints/last.ckpt --task dtd=runs/dtd/checkpoints/last.ckpt
    curl -F task=dtd -F image=@photo.jpg http://127.0.0.1:8000/predict
    # {"task": "dtd", "class": 3, "confidence": 0.91}     (+ "exit_block" / "keep_rate" for dynamic methods)

Every checkpoint must be of one method over one backbone (refused in one line otherwise). Requests
of any tasks that arrive together are run as one mixed batch; ``GET /health`` answers ``ok``; a bad
request (unknown task, not an image) gets HTTP 400 with one line, and the server goes on.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence

from petl_lightning.errors import ConfigError, require, run_user_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="petl-lightning serve", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--task", action="append", required=True, metavar="NAME=CKPT", help="a task and its .ckpt (repeat)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--weights", default=None, help="the backbone weights file, when it is not where training found it")
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--max_batch_size", type=int, default=16, help="requests run together (any tasks mixed)")
    p.add_argument("--batch_timeout", type=float, default=0.01, help="seconds to wait for a batch to fill")
    return p


def parse_tasks(items: Sequence[str]) -> dict[str, str]:
    """``NAME=CKPT`` pairs to a dict; malformed or repeated names are refused in one line."""
    tasks: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--task {item!r}: give NAME=CKPT, e.g. --task cifar=runs/cifar/checkpoints/last.ckpt.")
        if name in tasks:
            raise ConfigError(f"--task {name!r} is given twice; each task needs its own name.")
        tasks[name] = path
    return tasks


def check_port(host: str, port: int) -> None:
    """Refuse in one line a port that cannot be listened on (before the slow model load)."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535).")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"Cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host."
            ) from None


def serve(ns: argparse.Namespace) -> None:
    ls = require("litserve", "serve")
    from petl_lightning.serve.api import MultiTaskAPI
    from petl_lightning.serve.body_check import BodyCheck
    from petl_lightning.tasks.multitask import MultiTaskModel

    if ns.max_batch_size < 1 or ns.batch_timeout < 0:
        raise ConfigError("--max_batch_size must be at least 1 and --batch_timeout 0 or more.")
    tasks = parse_tasks(ns.task)
    check_port(ns.host, ns.port)
    model = MultiTaskModel.from_checkpoints(tasks, ns.weights)
    api = MultiTaskAPI(model, ns.max_batch_size, ns.batch_timeout)
    server = ls.LitServer(api, accelerator=ns.accelerator, devices=1, timeout=60, middlewares=[BodyCheck])
    print(f"serving {', '.join(tasks)} on http://{ns.host}:{ns.port}/predict", flush=True)
    server.run(host=ns.host, port=ns.port, generate_client_file=False)


def serve_main(argv: Sequence[str]) -> int:
    """Entry of ``petl-lightning serve``: returns when the server stops; 2 on a user error."""
    ns = build_parser().parse_args(list(argv))
    return run_user_command(lambda: serve(ns))


__all__ = ["check_port", "parse_tasks", "serve_main"]
