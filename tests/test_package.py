"""Packaging rules: the core imports without ComfyUI/A1111/gradio; the ComfyUI entry imports cleanly;
style is enforced by ruff from pyproject.toml; torch is never pinned."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_without_front_ends():
    code = (
        "import sys; import surgun_core, surgun_core.surgun, surgun_core.cli, surgun_core.lora, "
        "surgun_core.backends.diffusers, surgun_core.toyworld.evaluate, surgun_core.demo; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'gradio', 'modules')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_comfyui_entry_imports_without_comfyui():
    spec = importlib.util.spec_from_file_location("surgun_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.IN_COMFYUI is False


def test_torch_declared_not_pinned():
    py = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.1"' in py
    req = (ROOT / "requirements.txt").read_text().lower()
    assert not any(line.strip().startswith("torch") for line in req.splitlines())


def test_ruff_lint_and_format():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    subprocess.run([ruff, "check", "."], check=True, cwd=ROOT)
    subprocess.run([ruff, "format", "--check", "."], check=True, cwd=ROOT)


def test_comfy_registry_metadata():
    """[tool.comfy] for the Comfy Registry; nothing a Manager / registry install runs may pin or install torch."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "SurgUn"
    assert meta["project"]["urls"]["Repository"].startswith("https://github.com/")
    assert all((ROOT / p).is_dir() for p in comfy.get("includes", [])), comfy["includes"]
    deps = meta["project"]["dependencies"] + [d for ds in meta["project"]["optional-dependencies"].values() for d in ds]
    req = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    spec = re.compile(r"torch(?![\w.-])\s*(?:\[[^\]]*\])?([^;]*)", re.I)  # torch[extras] <specifiers>; markers
    pins = [d for d in deps + req if (m := spec.match(d)) and re.search(r"==|<|~=", m.group(1))]
    assert not pins, f"torch is pinned: {pins}"
    # ComfyUI-Manager and A1111 run install.py: it installs nothing of torch (tests/test_webui.py runs it)
    install = (ROOT / "install.py").read_text()
    assert not re.search(r"[\"' ]torch\s*[<>=~]", install) and '"torch", "transformers", "gradio"' in install
