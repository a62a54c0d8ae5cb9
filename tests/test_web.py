"""The live view: nodes/live.py (server side, with a stand-in PromptServer) and web/ (syntax and unit tests
through node, when node is installed). No browser here: what the browser draws is not tested."""

import importlib.util
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH: web/*.js not checked")


def _load_live():
    spec = importlib.util.spec_from_file_location("surgun_live_under_test", ROOT / "nodes" / "live.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _FakeServer:
    def __init__(self, client_id):
        self.client_id = client_id
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def fake_server(monkeypatch):
    """A `server` module whose PromptServer.instance records what is sent (ComfyUI's server.py stand-in)."""
    srv = _FakeServer(client_id="client-1")
    module = types.ModuleType("server")
    module.PromptServer = type("PromptServer", (), {"instance": srv})
    monkeypatch.setitem(sys.modules, "server", module)
    return srv


def test_update_goes_to_the_client_that_queued_the_prompt(fake_server):
    live = _load_live()
    stats = {"loss": 0.5, "L_T": 0.25, "L_D": 0.125, "L_C": -1.0, "L_R": 0.0}
    live.send_train_update("7", {"phase": "train", "step": 3, "total": 10, **stats})
    assert fake_server.sent == [
        ("surgun.train", {"node": "7", "phase": "train", "step": 3, "total": 10, **stats}, "client-1")
    ]


def test_non_finite_numbers_are_sent_as_null(fake_server):
    """NaN/inf are not JSON: the browser would drop the whole message."""
    live = _load_live()
    live.send_train_update(5, {"phase": "train", "step": 1, "total": 1, "loss": math.nan, "L_T": math.inf})
    _, data, _ = fake_server.sent[0]
    assert data["node"] == "5" and data["loss"] is None and data["L_T"] is None


def test_no_server_is_a_no_op(monkeypatch):
    live = _load_live()
    monkeypatch.setitem(sys.modules, "server", None)  # `import server` raises ImportError
    live.send_train_update("1", {"phase": "train", "step": 1, "total": 1})
    module = types.ModuleType("server")
    module.PromptServer = type("PromptServer", (), {})  # imported, never started: no .instance yet
    monkeypatch.setitem(sys.modules, "server", module)
    live.send_train_update("1", {"phase": "train", "step": 1, "total": 1})


def test_web_directory_is_exported_and_holds_the_extension():
    spec = importlib.util.spec_from_file_location("surgun_pack_web", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    web = (ROOT / mod.WEB_DIRECTORY).resolve()
    assert (web / "surgun.js").is_file() and (web / "surgun_format.js").is_file()


@needs_node
@pytest.mark.parametrize("js", sorted(p.name for p in (ROOT / "web").glob("*.js")))
def test_web_js_parses(js):
    # one file per call: `node --check a.js b.js` checks only a.js
    subprocess.run([NODE, "--check", str(ROOT / "web" / js)], check=True, cwd=ROOT)


@needs_node
def test_web_unit_tests_pass():
    r = subprocess.run([NODE, "--test", "tests/web/"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "# fail 0" in r.stdout and "# pass 0" not in r.stdout, r.stdout  # a renamed file must not run 0 tests
