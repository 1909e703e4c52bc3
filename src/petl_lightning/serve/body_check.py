"""An ASGI middleware answering HTTP 400 with one line to a ``POST /predict`` whose body is neither
JSON nor a form (LitServe would answer 500 and log a traceback); every other request passes untouched."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from petl_lightning.serve.requests import USAGE

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


class BodyCheck:
    """Reads a ``POST /predict`` body; if it is not a form and not JSON, answers 400 itself, else
    hands the request on with the same body."""

    def __init__(self, app: ASGIApp, path: str = "/predict") -> None:
        self.app, self.path = app, path

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if headers.get("content-type", "").split(";")[0].strip() in FORMS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            json.loads(body)
        except ValueError:
            detail = json.dumps({"detail": f"The request body is not JSON or a form; {USAGE}."}).encode()
            await send(
                {"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]}
            )
            return await send({"type": "http.response.body", "body": detail})
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


__all__ = ["BodyCheck"]
