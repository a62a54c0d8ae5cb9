"""ComfyUI entry point of the SurgUn node pack.

ComfyUI imports this file from custom_nodes/. Outside ComfyUI (tests, pip installs, A1111) nothing
ComfyUI-specific is imported, so the repository root imports cleanly without ComfyUI. Inside ComfyUI the
V3 extension is exposed through `comfy_entrypoint` (no NODE_CLASS_MAPPINGS: if both exist, V1 wins).
"""

try:
    import comfy_api.latest  # noqa: F401
except ImportError:  # not inside ComfyUI
    IN_COMFYUI = False
else:
    IN_COMFYUI = True

if IN_COMFYUI:
    from .nodes.extension import comfy_entrypoint  # noqa: F401

# Served at /extensions/<folder>/ and loaded by the browser (web/surgun.js); V3 packs declare it here too.
WEB_DIRECTORY = "./web"
