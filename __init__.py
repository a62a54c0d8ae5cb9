"""ComfyUI entry point of the SurgUn node pack.

ComfyUI imports this file from custom_nodes/. Outside ComfyUI (tests, pip installs, A1111) nothing
ComfyUI-specific is imported, so the repository root imports cleanly without ComfyUI. The V3 nodes
(issue 3) hook in here behind the same guard.
"""

try:
    import comfy_api.latest  # noqa: F401
except ImportError:  # not inside ComfyUI
    IN_COMFYUI = False
else:
    IN_COMFYUI = True

WEB_DIRECTORY = "./web"
