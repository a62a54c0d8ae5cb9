"""SurgUn core: erase a visual concept from a text-to-image diffusion model (arXiv 2603.00975).

Pure torch + safetensors (diffusers/transformers only in the diffusers backend); never imports ComfyUI,
A1111 or gradio.
"""

__version__ = "0.1.0"
