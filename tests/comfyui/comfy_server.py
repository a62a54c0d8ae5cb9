"""Support for the real-server tests: a client for a running ComfyUI (COMFYUI_URL) and a converter from the
front end's workflow format (example_workflows/*.json) to the API prompt format that POST /prompt takes.

Start a server with ../shared/tools/comfyui-up <ComfyUI git dir> . 8188 and export
COMFYUI_URL=http://127.0.0.1:8188; without COMFYUI_URL the tests that use this module are skipped.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

URL = os.environ.get("COMFYUI_URL", "").rstrip("/")
# every attack of the audit cut to seconds on the toy world (the published settings take minutes per attack):
# the audit tests in-process and over the server
QUICK_ATTACKS = {
    "inversion": {"steps": 5, "images": 4, "batch_size": 2, "seeds_per_prompt": 1, "sample_steps": 5},
    "prefix": {"steps": 3, "prefix_tokens": 2, "seeds_per_prompt": 1, "sample_steps": 5},
    "concept_vector": {"strengths": [1.0, 3.0], "seeds_per_prompt": 1, "sample_steps": 5},
    "phrasings": {"seeds_per_prompt": 1, "sample_steps": 10},
}
requires_server = pytest.mark.skipif(
    not URL,
    reason="COMFYUI_URL is not set: start ComfyUI with ../shared/tools/comfyui-up and export "
    "COMFYUI_URL=http://127.0.0.1:8188",
)
WORKFLOWS = Path(__file__).resolve().parents[2] / "example_workflows"
CLIENT_ID = "surgun-tests"

# Front-end-only nodes (never sent to the server) and widgets the front end adds to a node by itself, after
# the node's own widgets (PreviewAny: markdown preview, text preview, Markdown/Plaintext toggle).
FRONT_END_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
FRONT_END_WIDGETS = {"PreviewAny": 3}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def get_json(path: str):
    with urllib.request.urlopen(URL + path, timeout=30) as r:
        return json.loads(r.read())


def post_json(path: str, body: dict | None = None):
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:  # ComfyUI explains a rejected prompt in the body
        raise AssertionError(f"POST {path}: {e.code} {e.read().decode(errors='replace')}") from e
    return json.loads(raw) if raw else None


def post_prompt_rejected(prompt: dict) -> tuple[int, dict]:
    """POST /prompt expecting validation to refuse it: (HTTP status, ComfyUI's JSON answer)."""
    data = json.dumps({"prompt": prompt, "client_id": CLIENT_ID}).encode()
    req = urllib.request.Request(URL + "/prompt", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raise AssertionError(f"POST /prompt was accepted: {r.read().decode()}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def run_prompt(prompt: dict, timeout: float = 300) -> dict:
    """POST /prompt, poll /history until the run ends; returns its history entry."""
    pid = post_json("/prompt", {"prompt": prompt, "client_id": CLIENT_ID})["prompt_id"]
    end = time.time() + timeout
    while time.time() < end:
        hist = get_json(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            entry = hist[pid]
            if entry["status"]["status_str"] in ("success", "error"):
                return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")


def messages(entry: dict) -> dict:
    return {kind: data for kind, data in entry["status"].get("messages", [])}


def image_bytes(entry: dict, node_id: str) -> list[bytes]:
    """The PNG files an output node (PreviewImage / SaveImage) of a finished run wrote, through GET /view."""
    out = []
    for img in entry["outputs"][node_id]["images"]:
        q = urllib.parse.urlencode({k: img[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{URL}/view?{q}", timeout=30) as r:
            out.append(r.read())
    return out


def lora_files() -> list[str]:
    return get_json("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def node_by_type(workflow: dict, type_: str, title: str | None = None) -> dict:
    found = [n for n in workflow["nodes"] if n["type"] == type_ and (title is None or n.get("title") == title)]
    assert len(found) == 1, f"expected one {type_} node (title {title!r}) in the workflow, found {len(found)}"
    return found[0]


def set_widget(workflow: dict, node: dict, name: str, value, info: dict) -> None:
    """Set one widget of a UI-format node by name (widgets_values is positional)."""
    index = [w for w, _ in _widget_slots(info[node["type"]])].index(name)
    node["widgets_values"][_value_index(info[node["type"]], index)] = value


def _is_widget(ispec: list) -> bool:
    if isinstance(ispec[0], list):  # V1 combo: the options list itself
        return True
    return ispec[0] in WIDGET_TYPES and not (len(ispec) > 1 and ispec[1].get("forceInput"))


def _widget_slots(spec: dict) -> list[tuple[str, bool]]:
    """(widget name, followed by a control_after_generate value) in the front end's order: input_order's
    required inputs, then its optional ones."""
    slots = []
    for part in ("required", "optional"):
        for name in spec.get("input_order", {}).get(part, list(spec["input"].get(part, {}))):
            ispec = spec["input"][part][name]
            if _is_widget(ispec):
                opts = ispec[1] if len(ispec) > 1 else {}
                # the front end adds the control widget where asked, and by default to seed / noise_seed
                control = ispec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed"))
                slots.append((name, bool(control)))
    return slots


def _value_index(spec: dict, widget_index: int) -> int:
    return sum(1 + control for _, control in _widget_slots(spec)[:widget_index])


def ui_to_api(workflow: dict, info: dict) -> dict:
    """A saved workflow (nodes, links, widgets_values) -> the API prompt {id: {class_type, inputs}}.

    Widget values are read in /object_info's input order; a link into an input overrides its widget. Every
    node type must be in `info` (front-end-only notes excepted), and each node must hold exactly the widget
    values the front end would save for it: a value too few or too many means the workflow is misordered.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONT_END_NODES:
            continue
        assert node.get("mode", 0) == 0, f"node {node['id']}: muted or bypassed nodes are not converted"
        assert node["type"] in info, f"node {node['id']}: {node['type']} is not in /object_info"
        spec, values = info[node["type"]], node.get("widgets_values") or []
        inputs = {}
        if isinstance(values, dict):  # the front end's keyed form (some dynamic nodes)
            inputs.update({name: values[name] for name, _ in _widget_slots(spec) if name in values})
        else:
            i = 0
            for name, control in _widget_slots(spec):
                assert i < len(values), f"node {node['id']} ({node['type']}): no value for widget {name}"
                inputs[name] = values[i]
                i += 1 + control
            extra = FRONT_END_WIDGETS.get(node["type"], 0)
            assert len(values) in (i, i + extra), (
                f"node {node['id']} ({node['type']}): {len(values)} widget values, expected {i}"
            )
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, dst, _dst_slot, _type = links[slot["link"]]
                assert dst == node["id"], f"link {slot['link']} does not end at node {node['id']}"
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
