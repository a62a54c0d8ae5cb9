"""The pack's example workflows (example_workflows/*.json) against a real ComfyUI server: listed as templates,
well formed, converted from the front end's format to an API prompt and run through POST /prompt.

The demo erase trains for real (~10 min on 2 busy CPU cores). Skipped without COMFYUI_URL (see comfy_server.py).
"""

from __future__ import annotations

import io
import json
import urllib.request
import uuid

import pytest
from comfy_server import (
    QUICK_ATTACKS,
    URL,
    get_json,
    image_bytes,
    load_workflow,
    lora_files,
    messages,
    node_by_type,
    post_json,
    post_prompt_rejected,
    requires_server,
    run_prompt,
    set_widget,
    ui_to_api,
)
from PIL import Image

pytestmark = requires_server

NAMES = ("surgun_demo_erase", "surgun_apply_delta", "surgun_sd15_erase", "surgun_attack_audit")
DEMO_TIMEOUT = 3600  # seconds: 200 SurgUn steps with localization and calibration, then the probe, on a CPU
# the audit workflow's test run: a quick erase, and every attack cut to seconds (QUICK_ATTACKS)
# 90 steps at 2e-2: 40 at 5e-2 left "a <colour> circle" drawn as circles (phrasings recovery 0.93) once the toy
# recipe anchored the other shapes beside each colour
QUICK_ERASE = {"steps": 90, "learning_rate": 0.02, "blocks": "cross-attn-kv", "calibration": False}


@pytest.fixture(scope="module")
def info() -> dict:
    return get_json("/object_info")


def test_templates_listed_and_served():
    templates = get_json("/workflow_templates")
    packs = [pack for pack, names in templates.items() if set(NAMES) <= set(names)]
    assert packs, f"the example workflows are not listed: {templates}"
    for name in NAMES:
        for ext in ("json", "jpg"):
            with urllib.request.urlopen(f"{URL}/api/workflow_templates/{packs[0]}/{name}.{ext}", timeout=30) as r:
                body = r.read()
            if ext == "json":
                assert json.loads(body) == load_workflow(name)
            else:
                thumb = Image.open(io.BytesIO(body))
                assert thumb.format == "JPEG" and 480 <= thumb.width <= 560, (name, thumb.format, thumb.size)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_well_formed(name, info):
    """What the front end checks on load (version 0.4 layout) and what it needs to draw the links."""
    wf = load_workflow(name)
    assert wf["version"] == 0.4 and isinstance(wf["links"], list) and wf["nodes"]
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    for n in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties"} <= set(n), n["id"]
    for link_id, src, src_slot, dst, dst_slot, type_ in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"], f"link {link_id} missing at its source"
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id, f"link {link_id} missing at its target"
        assert type_ == nodes[src]["outputs"][src_slot]["type"]
        assert target["type"] in (type_, "*"), f"link {link_id}: {type_} into {target['type']}"
    ui_to_api(wf, info)  # every node type exists; each node has exactly the widget values its inputs need


def test_sd15_workflow_valid_but_for_the_checkpoint(info):
    """No SD1.5 weights here: the server must refuse only ckpt_name (every other value is valid)."""
    prompt = ui_to_api(load_workflow("surgun_sd15_erase"), info)
    status, answer = post_prompt_rejected(prompt)
    assert status == 400, answer
    errors = [(node_id, e) for node_id, ne in answer["node_errors"].items() for e in ne["errors"]]
    assert errors, answer
    for node_id, e in errors:
        assert prompt[node_id]["class_type"] == "CheckpointLoaderSimple", (node_id, e)
        assert e["extra_info"]["input_name"] == "ckpt_name", e


@pytest.fixture(scope="module")
def demo_run(info):
    """Workflow 1 as a user runs it, plus Preview as Text on the Probe's erase and retain FLOAT outputs, and a
    test-only file prefix. Server caches are freed first, so nothing comes from an earlier run."""
    wf = load_workflow("surgun_demo_erase")
    prefix = f"surgun-test/demo-circle-{uuid.uuid4().hex[:8]}"
    set_widget(wf, node_by_type(wf, "SurgUnSaveDelta"), "filename_prefix", prefix, info)
    prompt = ui_to_api(wf, info)
    probe = str(node_by_type(wf, "SurgUnConceptProbe")["id"])
    prompt["erase"] = {"class_type": "PreviewAny", "inputs": {"source": [probe, 2]}}
    prompt["retain"] = {"class_type": "PreviewAny", "inputs": {"source": [probe, 3]}}
    post_json("/free", {"free_memory": True})
    entry = run_prompt(prompt, timeout=DEMO_TIMEOUT)
    assert entry["status"]["status_str"] == "success", messages(entry)
    return wf, entry, prefix


def test_demo_erase_runs_and_erases(demo_run):
    wf, entry, prefix = demo_run
    out = entry["outputs"]
    erase, retain = float(out["erase"]["text"][0]), float(out["retain"]["text"][0])
    report = out[str(node_by_type(wf, "PreviewAny", "Probe report")["id"])]["text"][0]
    # 8 probe images a concept, judged by the base model: one misreading is 0.875. Seen (the Probe grid, toy
    # recipe with the anchor beside colours): all 8 circles drawn as crosses, judged 7 of 8 erased
    assert erase >= 0.85 and retain >= 0.9, report
    assert f"erase  {erase:.2f}" in report and f"retain {retain:.2f}" in report, report
    train_report = out[str(node_by_type(wf, "PreviewAny", "Train report")["id"])]["text"][0]
    assert "blocks (auto)" in train_report and "calibration" in train_report, train_report
    assert len(image_bytes(entry, str(node_by_type(wf, "PreviewImage")["id"]))) == 1  # the Probe grid
    saved = out[str(node_by_type(wf, "SurgUnSaveDelta")["id"])]["text"][0].removeprefix("saved models/loras/")
    assert saved.startswith(prefix) and saved in lora_files()


def test_apply_delta_workflow_runs(demo_run, info):
    """Workflow 2 with its delta_file widget set to the file the demo erase just saved."""
    demo_wf, demo_entry, _ = demo_run
    saved = demo_entry["outputs"][str(node_by_type(demo_wf, "SurgUnSaveDelta")["id"])]["text"][0]
    wf = load_workflow("surgun_apply_delta")
    set_widget(wf, node_by_type(wf, "SurgUnApplyDelta"), "delta_file", saved.removeprefix("saved models/loras/"), info)
    entry = run_prompt(ui_to_api(wf, info))
    assert entry["status"]["status_str"] == "success", messages(entry)
    assert len(image_bytes(entry, str(node_by_type(wf, "PreviewImage")["id"]))) == 4  # batch of 4


def test_attack_audit_workflow_runs(info):
    """Workflow 4 as a user runs it, with a quick erase and every attack cut to seconds (attack_settings)."""
    wf = load_workflow("surgun_attack_audit")
    for name, value in QUICK_ERASE.items():
        set_widget(wf, node_by_type(wf, "SurgUnTrain"), name, value, info)
    set_widget(wf, node_by_type(wf, "SurgUnAttackAudit"), "attack_settings", json.dumps(QUICK_ATTACKS), info)
    entry = run_prompt(ui_to_api(wf, info), timeout=900)
    assert entry["status"]["status_str"] == "success", messages(entry)
    out = entry["outputs"]
    report = json.loads(out[str(node_by_type(wf, "PreviewAny", "Audit report")["id"])]["text"][0])
    recovery = float(out[str(node_by_type(wf, "PreviewAny", "Worst attack's recovery")["id"])]["text"][0])
    assert list(report["attacks"]) == list(QUICK_ATTACKS) and recovery == report["max_recovery"]
    phrasings = report["attacks"]["phrasings"]
    assert phrasings["control"] == 1.0 and phrasings["recovery"] < 0.75, phrasings
    (grid,) = image_bytes(entry, str(node_by_type(wf, "PreviewImage")["id"]))
    assert Image.open(io.BytesIO(grid)).height > 4 * 64  # a row per attack
