"""Only surgun_core/backends/comfy.py may import ComfyUI; the node layer reaches the core pack-relatively."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_IMPORT = re.compile(r"^\s*(import|from)\s+(comfy|comfy_api|comfy_extras|folder_paths|server|nodes)\b", re.M)


def test_only_the_comfy_backend_imports_comfyui():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "surgun_core").rglob("*.py")
        if p != ROOT / "surgun_core" / "backends" / "comfy.py" and COMFY_IMPORT.search(p.read_text())
    ]
    assert not offenders, f"these core modules import ComfyUI: {offenders}"


def test_node_pack_does_not_import_core_as_installed_package():
    """Inside ComfyUI surgun_core is not installed; nodes/ must import it relative to the pack."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "nodes").rglob("*.py")
        if re.search(r"^\s*(import|from)\s+surgun_core\b", p.read_text(), re.M)
    ]
    assert not offenders, offenders
