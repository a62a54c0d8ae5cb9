"""Live training numbers for the browser: one websocket event per progress update of SurgUn Train.

The pack's web/surgun.js listens for EVENT and draws the numbers and a loss sparkline on the node.
Imports without ComfyUI: outside a running ComfyUI server (ComfyUI used as a library) it sends nothing.
"""

from __future__ import annotations

import math

EVENT = "surgun.train"
"""Websocket message type; web/surgun_format.js has the same name."""


def send_train_update(node_id: str, payload: dict) -> None:
    """Send {"node": node_id, **payload} as EVENT to the browser that queued the prompt.

    Args:
        node_id: the node's execution id (`cls.hidden.unique_id`).
        payload: phase, step, total and the step's numbers (loss, L_T, L_D, L_C, L_R; erase, retain if
            measured). Non-finite floats are sent as null: NaN is not JSON and the browser would drop the
            whole message.
    """
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI used as a library, without its server
        return
    server = getattr(PromptServer, "instance", None)  # set when the server starts
    if server is None:
        return
    data = {**{k: _finite(v) for k, v in payload.items()}, "node": str(node_id)}
    # like ComfyUI's own "progress": to the client that queued the prompt (client_id None: every client)
    server.send_sync(EVENT, data, getattr(server, "client_id", None))


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
