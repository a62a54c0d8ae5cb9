"""Custom socket types shared by the SurgUn nodes."""

import numpy as np
import torch
from comfy_api.latest import io

# A trained erasure: a surgun_core.lora.LoraDelta (kohya-keyed LoRA tensors + header metadata).
UnlearnDelta = io.Custom("UNLEARN_DELTA")
CATEGORY = "SurgUn"


def pil_to_image(pil) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.array(pil.convert("RGB"))).float().div(255).unsqueeze(0)
