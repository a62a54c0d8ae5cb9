"""Real-server tests of the SurgUn node pack: a running ComfyUI with this pack in custom_nodes.

Start one with ../shared/tools/comfyui-up <ComfyUI git dir> . 8188, then
COMFYUI_URL=http://127.0.0.1:8188 python -m pytest -q tests/comfyui
Without COMFYUI_URL every test here is skipped (CI has no ComfyUI).
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import uuid

import pytest
from comfy_server import (
    CLIENT_ID,
    URL,
    get_json,
    image_bytes,
    lora_files,
    messages,
    post_json,
    requires_server,
    run_prompt,
)
from PIL import Image

pytestmark = requires_server

SURGUN_NODES = ("SurgUnDemoModel", "SurgUnTrain", "SurgUnApplyDelta", "SurgUnSaveDelta", "SurgUnConceptProbe",
                "SurgUnLocalize", "SurgUnAttackAudit")  # fmt: skip
TOY_DISTRACTORS = "square\ntriangle\ncross\nring"


def _train_graph(concepts: str, steps: int = 3, prefix: str | None = None, lr: float = 0.006) -> dict:
    g = {
        "1": {"class_type": "SurgUnDemoModel", "inputs": {}},
        "2": {
            "class_type": "SurgUnTrain",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": concepts, "distractors": TOY_DISTRACTORS,
                       "kind": "object", "steps": steps, "learning_rate": lr, "rank": 4,
                       "blocks": "cross-attn-kv", "calibration": False, "guidance": 4.0, "seed": 0},
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


def test_object_info_lists_nodes_with_tooltips():
    info = get_json("/object_info")
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
    assert entry["status"]["status_str"] == "success", messages(entry)
    saved = entry["outputs"]["3"]["text"][0]
    assert saved.startswith("saved models/loras/" + prefix)
    name = saved.removeprefix("saved models/loras/")
    assert name in lora_files()

    loader = {"model": ["1", 0], "lora_name": name, "strength_model": 1.0}
    stock = run_prompt(_sample_graph({"class_type": "LoraLoaderModelOnly", "inputs": loader}))
    assert stock["status"]["status_str"] == "success", messages(stock)
    apply = {"model": ["1", 0], "strength": 1.0, "delta_file": name}
    ours = run_prompt(_sample_graph({"class_type": "SurgUnApplyDelta", "inputs": apply}))
    assert ours["status"]["status_str"] == "success", messages(ours)
    assert image_bytes(stock, "s") == image_bytes(ours, "s") == image_bytes(entry, "s")
    base = run_prompt(_sample_graph({"class_type": "LoraLoaderModelOnly", "inputs": {**loader, "strength_model": 0.0}}))
    assert image_bytes(base, "s") != image_bytes(stock, "s"), "the delta did not change the image at all"


def test_empty_concept_fails_with_message():
    entry = run_prompt(_train_graph("  \n# only a comment\n", steps=1, prefix="surgun-test/never-written"))
    assert entry["status"]["status_str"] == "error"
    err = messages(entry)["execution_error"]
    assert err["node_type"] == "SurgUnTrain"
    assert "concepts" in err["exception_message"] and "empty" in err["exception_message"], err["exception_message"]


def test_interrupt_during_train_writes_no_file():
    prefix = f"surgun-test/interrupted-{uuid.uuid4().hex[:8]}"
    pid = post_json("/prompt", {"prompt": _train_graph("circle", steps=5000, prefix=prefix), "client_id": CLIENT_ID})
    pid = pid["prompt_id"]
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it runs (the queue may hold earlier work)
        running = [item[1] for item in get_json("/queue")["queue_running"]]
        if pid in running:
            break
        time.sleep(0.2)
    time.sleep(3)  # inside Train: generating images or training
    post_json("/interrupt")
    end = time.time() + 120
    while time.time() < end:
        hist = get_json(f"/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    entry = get_json(f"/history/{pid}")[pid]
    assert entry["status"]["status_str"] == "error"
    interrupted = messages(entry).get("execution_interrupted")
    assert interrupted and interrupted["node_type"] == "SurgUnTrain", entry["status"]["messages"]
    assert not [f for f in lora_files() if f.startswith(prefix)]


def test_missing_delta_file_is_refused_with_message():
    apply = {"model": ["1", 0], "strength": 1.0, "delta_file": "nope.safetensors"}
    body = {"prompt": _sample_graph({"class_type": "SurgUnApplyDelta", "inputs": apply})}
    data = json.dumps(body).encode()
    req = urllib.request.Request(URL + "/prompt", data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    text = e.value.read().decode()
    assert "delta_file" in text and "nope.safetensors" in text, text


def test_attack_audit_of_an_applied_delta():
    """Demo Model -> Train -> Apply Unlearning Delta (Train's delta on the demo model) -> SurgUn Attack Audit, its
    grid to PreviewImage and its report and recovery to Preview as Text."""
    # enough that new phrasings rarely bring the circle back (40 steps at 5e-2 were before the toy recipe anchored
    # the other shapes beside each colour: "a <colour> circle" then still drew circles, recovery 0.93)
    graph = _train_graph("circle", steps=90, lr=0.02)
    graph["ap"] = {"class_type": "SurgUnApplyDelta", "inputs": {"model": ["1", 0], "strength": 1.0, "delta": ["2", 1]}}
    settings = {"phrasings": {"seeds_per_prompt": 1, "sample_steps": 10},
                "concept_vector": {"strengths": [1.0, 3.0], "seeds_per_prompt": 1, "sample_steps": 5}}  # fmt: skip
    graph["a"] = {"class_type": "SurgUnAttackAudit",
                  "inputs": {"model": ["ap", 0], "base_model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                             "concept": "circle", "kind": "object", "attacks": "phrasings, concept_vector", "seed": 0,
                             "attack_settings": json.dumps(settings)}}  # fmt: skip
    graph["g"] = {"class_type": "PreviewImage", "inputs": {"images": ["a", 0]}}
    graph["r"] = {"class_type": "PreviewAny", "inputs": {"source": ["a", 1]}}
    graph["v"] = {"class_type": "PreviewAny", "inputs": {"source": ["a", 2]}}
    entry = run_prompt(graph, timeout=600)
    assert entry["status"]["status_str"] == "success", messages(entry)
    report = json.loads(entry["outputs"]["r"]["text"][0])
    recovery = float(entry["outputs"]["v"]["text"][0])
    assert report["concept"] == "circle" and report["scorer"] == "toy"
    assert list(report["attacks"]) == ["phrasings", "concept_vector"]
    phrasings = report["attacks"]["phrasings"]
    assert phrasings["control"] == 1.0 and phrasings["recovery"] < 0.75, phrasings  # the erasure holds, the base not
    assert 0.0 <= recovery <= 1.0 and recovery == report["max_recovery"]
    (png,) = image_bytes(entry, "g")
    grid = Image.open(io.BytesIO(png))
    assert grid.mode == "RGB" and grid.width > 4 * 64 and grid.height > 2 * 64  # two rows: base | erased
    rates = ", ".join(f"{k} {a['recovery']:.2f} (base {a['control']:.2f})" for k, a in report["attacks"].items())
    print(f"audit over the server: recovery {recovery:.2f}; {rates}; grid {grid.size}")  # shown with -s


def test_attack_audit_refuses_an_unknown_attack():
    graph = {"1": {"class_type": "SurgUnDemoModel", "inputs": {}},
             "a": {"class_type": "SurgUnAttackAudit",
                   "inputs": {"model": ["1", 0], "base_model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                              "concept": "circle", "kind": "object", "attacks": "ringabell", "seed": 0}},
             "r": {"class_type": "PreviewAny", "inputs": {"source": ["a", 1]}}}  # fmt: skip
    entry = run_prompt(graph)
    assert entry["status"]["status_str"] == "error"
    err = messages(entry)["execution_error"]
    assert err["node_type"] == "SurgUnAttackAudit" and "attacks" in err["exception_message"], err
    assert "ringabell" in err["exception_message"] and "phrasings" in err["exception_message"]
