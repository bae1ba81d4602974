"""ASGI entry point for uvicorn: WebSocket echo on any path, Django for plain HTTP.

Sending the text "headers" returns the handshake's request headers as JSON instead of an echo.
"""

import json
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoapp.settings")

django_app = get_asgi_application()


async def application(scope, receive, send):
    if scope["type"] != "websocket":
        await django_app(scope, receive, send)
        return
    event = await receive()
    if event["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        if event.get("text") == "headers":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            await send({"type": "websocket.send", "text": json.dumps(headers)})
        elif event.get("text") is not None:
            await send({"type": "websocket.send", "text": event["text"]})
        else:
            await send({"type": "websocket.send", "bytes": event.get("bytes") or b""})
