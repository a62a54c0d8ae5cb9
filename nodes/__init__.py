"""ComfyUI node layer of SurgUn (V3 schema), thin over surgun_core.

This package imports without ComfyUI so its pure helpers (parsing.py) are testable anywhere; the modules
that define nodes import comfy and are imported only by extension.py, which the pack's root __init__.py
loads when running inside ComfyUI.
"""
