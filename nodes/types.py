"""Custom socket types shared by the SurgUn nodes."""

from comfy_api.latest import io

# A trained erasure: a surgun_core.lora.LoraDelta (kohya-keyed LoRA tensors + header metadata).
UnlearnDelta = io.Custom("UNLEARN_DELTA")
CATEGORY = "SurgUn"
