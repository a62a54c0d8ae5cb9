"""A1111/Forge install hook: runs at every launch of the web UI, so it must be quick and idempotent.

Installs only the non-torch packages the SurgUn tab needs that the host lacks, through A1111's own
launch helpers. torch, transformers and gradio are the host's: never installed, upgraded or pinned here
(the tab works with the host's versions; diffusers is only needed for `surgun ui`, outside the web UI).
ComfyUI-Manager runs install.py too, after installing requirements.txt itself: there is no `launch`
module there, and nothing is left to do.
"""

try:
    import launch
except ImportError:  # not inside A1111/Forge (ComfyUI-Manager): requirements.txt is already installed
    launch = None

# (module to import, pip requirement) for what the tab imports
TAB_REQUIREMENTS = [
    ("safetensors", "safetensors>=0.4"),
    ("numpy", "numpy>=1.24"),
    ("PIL", "pillow>=9.0"),
    ("tqdm", "tqdm>=4.60"),
]
HOST_OWNED = ("torch", "transformers", "gradio")  # never touched


def missing() -> list[str]:
    return [req for module, req in TAB_REQUIREMENTS if not launch.is_installed(module)]


def install() -> list[str]:
    if launch is None:
        return []
    todo = missing()
    for req in todo:
        assert not req.startswith(HOST_OWNED), req
        launch.run_pip(f'install "{req}"', f"SurgUn requirement: {req}")
    return todo


install()
