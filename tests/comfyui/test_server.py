"""Real-server tests of the SurgUn node pack: a running ComfyUI with this pack in custom_nodes.

Start one with ../shared/tools/comfyui-up <ComfyUI git dir> . 8188, then
COMFYUI_URL=http://127.0.0.1:8188 python -m pytest -q tests/comfyui
Without COMFYUI_URL every test here is skipped (CI has no ComfyUI).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

URL = os.environ.get("COMFYUI_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL, reason="COMFYUI_URL is not set: start ComfyUI with ../shared/tools/comfyui-up "
                                "and export COMFYUI_URL=http://127.0.0.1:8188")  # fmt: skip

SURGUN_NODES = ("SurgUnDemoModel", "SurgUnTrain", "SurgUnApplyDelta", "SurgUnSaveDelta")
TOY_DISTRACTORS = "square\ntriangle\ncross\nring"


def _get(path: str):
    with urllib.request.urlopen(URL + path, timeout=30) as r:
        return json.loads(r.read())


def _post(path: str, body: dict | None = None):
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:  # ComfyUI explains a rejected prompt in the body
        raise AssertionError(f"POST {path}: {e.code} {e.read().decode(errors='replace')}") from e
    return json.loads(raw) if raw else None


def run_prompt(prompt: dict, timeout: float = 300) -> dict:
    """POST /prompt, poll /history until the run ends; returns its history entry."""
    pid = _post("/prompt", {"prompt": prompt, "client_id": "surgun-tests"})["prompt_id"]
    end = time.time() + timeout
    while time.time() < end:
        hist = _get(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            entry = hist[pid]
            if entry["status"]["status_str"] in ("success", "error"):
                return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")


def _messages(entry: dict) -> dict:
    return {kind: data for kind, data in entry["status"].get("messages", [])}


def _train_graph(concepts: str, steps: int = 3, prefix: str | None = None, lr: float = 0.006) -> dict:
    g = {
        "1": {"class_type": "SurgUnDemoModel", "inputs": {}},
        "2": {
            "class_type": "SurgUnTrain",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": concepts, "distractors": TOY_DISTRACTORS,
                       "kind": "object", "steps": steps, "learning_rate": lr, "rank": 4,
                       "blocks": "cross-attn-kv", "guidance": 4.0, "seed": 0},
        },
    }  # fmt: skip
    if prefix is not None:
        g["3"] = {"class_type": "SurgUnSaveDelta", "inputs": {"delta": ["2", 1], "filename_prefix": prefix}}
    return g


def _sample_graph(model_node: dict, seed: int = 7) -> dict:
    """Demo Model -> (node "m" from model_node) -> KSampler -> VAEDecode -> PreviewImage."""
    return {
        "1": {"class_type": "SurgUnDemoModel", "inputs": {}},
        "m": model_node,
        "p": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "n": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "l": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 4}},
        "k": {"class_type": "KSampler", "inputs": {"model": ["m", 0], "seed": seed, "steps": 20, "cfg": 4.0,
                                                   "sampler_name": "ddim", "scheduler": "ddim_uniform",
                                                   "positive": ["p", 0], "negative": ["n", 0],
                                                   "latent_image": ["l", 0], "denoise": 1.0}},
        "d": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["1", 2]}},
        "s": {"class_type": "PreviewImage", "inputs": {"images": ["d", 0]}},
    }  # fmt: skip


def _image_bytes(entry: dict) -> list[bytes]:
    out = []
    for img in entry["outputs"]["s"]["images"]:
        q = urllib.parse.urlencode({k: img[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{URL}/view?{q}", timeout=30) as r:
            out.append(r.read())
    return out


def test_object_info_lists_nodes_with_tooltips():
    info = _get("/object_info")
    for node in SURGUN_NODES:
        assert node in info, f"{node} missing from /object_info"
        spec = info[node]
        assert spec["category"] == "SurgUn"
        inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for name, (_type, *opts) in inputs.items():
            assert opts and opts[0].get("tooltip"), f"{node}.{name} has no tooltip"


def test_train_save_then_stock_lora_loader():
    """Demo Model -> Train -> Save; then the same image from Train's MODEL, from the saved file through stock
    LoraLoaderModelOnly, and from the file through Apply Unlearning Delta (same seed)."""
    prefix = f"surgun-test/erase-{uuid.uuid4().hex[:8]}"
    # a large learning rate so that 3 steps change the image visibly
    graph = {**_sample_graph({"class_type": "SurgUnTrain", "inputs": {}}), **_train_graph("circle", 3, prefix, 0.1)}
    graph["k"]["inputs"]["model"] = ["2", 0]  # sample with Train's erased MODEL
    del graph["m"]
    entry = run_prompt(graph)
    assert entry["status"]["status_str"] == "success", _messages(entry)
    saved = entry["outputs"]["3"]["text"][0]
    assert saved.startswith("saved models/loras/" + prefix)
    name = saved.removeprefix("saved models/loras/")
    assert name in _lora_files()

    loader = {"model": ["1", 0], "lora_name": name, "strength_model": 1.0}
    stock = run_prompt(_sample_graph({"class_type": "LoraLoaderModelOnly", "inputs": loader}))
    assert stock["status"]["status_str"] == "success", _messages(stock)
    apply = {"model": ["1", 0], "strength": 1.0, "delta_file": name}
    ours = run_prompt(_sample_graph({"class_type": "SurgUnApplyDelta", "inputs": apply}))
    assert ours["status"]["status_str"] == "success", _messages(ours)
    assert _image_bytes(stock) == _image_bytes(ours) == _image_bytes(entry)
    base = run_prompt(_sample_graph({"class_type": "LoraLoaderModelOnly", "inputs": {**loader, "strength_model": 0.0}}))
    assert _image_bytes(base) != _image_bytes(stock), "the delta did not change the image at all"


def test_empty_concept_fails_with_message():
    entry = run_prompt(_train_graph("  \n# only a comment\n", steps=1, prefix="surgun-test/never-written"))
    assert entry["status"]["status_str"] == "error"
    err = _messages(entry)["execution_error"]
    assert err["node_type"] == "SurgUnTrain"
    assert "concepts" in err["exception_message"] and "empty" in err["exception_message"], err["exception_message"]


def _lora_files() -> list[str]:
    return _get("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]


def test_interrupt_during_train_writes_no_file():
    prefix = f"surgun-test/interrupted-{uuid.uuid4().hex[:8]}"
    pid = _post("/prompt", {"prompt": _train_graph("circle", steps=5000, prefix=prefix), "client_id": "surgun-tests"})
    pid = pid["prompt_id"]
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it runs (the queue may hold earlier work)
        running = [item[1] for item in _get("/queue")["queue_running"]]
        if pid in running:
            break
        time.sleep(0.2)
    time.sleep(3)  # inside Train: generating images or training
    _post("/interrupt")
    end = time.time() + 120
    while time.time() < end:
        hist = _get(f"/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    entry = _get(f"/history/{pid}")[pid]
    assert entry["status"]["status_str"] == "error"
    interrupted = _messages(entry).get("execution_interrupted")
    assert interrupted and interrupted["node_type"] == "SurgUnTrain", entry["status"]["messages"]
    assert not [f for f in _lora_files() if f.startswith(prefix)]


def test_missing_delta_file_is_refused_with_message():
    apply = {"model": ["1", 0], "strength": 1.0, "delta_file": "nope.safetensors"}
    body = {"prompt": _sample_graph({"class_type": "SurgUnApplyDelta", "inputs": apply})}
    data = json.dumps(body).encode()
    req = urllib.request.Request(URL + "/prompt", data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    text = e.value.read().decode()
    assert "delta_file" in text and "nope.safetensors" in text, text
