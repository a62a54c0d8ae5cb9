"""Names every layer validates against: block presets, "auto", attention kinds, judges, precisions, attacks.

The bottom of the core: it imports nothing of ours, so config.py and the backends can check a setting
without reaching up into the stages that implement it (DESIGN.md section 2).
"""

from __future__ import annotations

AUTO_BLOCKS = "auto"  # pixel-grounded localization picks the blocks (engine/localize.py)
BLOCK_PRESETS = {
    # keys/values of cross-attention: the only attention weights that read the prompt, so a change there
    # acts through the concept's tokens (the UCE/MACE observation)
    "cross-attn-kv": r"attn2\.(to_k|to_v)$",
    "cross-attn": r"attn2\.",  # all of cross-attention (q, k, v, out)
    "self-attn": r"attn1\.",
    "all-attn": r"(attn1|attn2)\.",
    # DiT transformer blocks: SANA attn1/attn2, SD3 joint_blocks.N.{x,context}_block.attn(2), Flux
    # double_blocks.N.{img,txt}_attn (Flux single_blocks fuse attention into linear1/linear2: not included)
    "dit-attn": r"(attn1|attn2|attn)\.",
    # MMDiT text stream (SD3 context_block, Flux txt_attn): the q/k/v of the prompt tokens, which image
    # tokens attend to; the joint-attention counterpart of cross-attn-kv
    "dit-text-qkv": r"(context_block\.attn|txt_attn)\.qkv$",
}
# localization's candidate groups: "cross" (cross-attention K/V per level, and all of them together),
# "self" (self-attention per level), "all" (both)
ATTENTION_KINDS = ("cross", "self", "all")
# how localization ranks the groups (engine/localize.py): "gradient" (the SurgUn loss's gradient in each group's
# LoRA over a few steps: no probe images) or "short-runs" (a short run per group, its probe images judged)
LOCALIZE_METHODS = ("gradient", "short-runs")
# who judges probe images (judges/scorers.py): the base model itself, the toy world's classifier, a local CLIP
SCORER_NAMES = ("diffusion", "toy", "clip")
# what calibration measures on a checkpoint (judges/checkpoint.py): "self" (erase: the erased model as a diffusion
# classifier of held-out base images of the concept, no images drawn; retain: the retained concepts' probe images,
# judged) or "probe" (erase and retain both from the judged probe images of every probe concept); each in words
CALIBRATION_SIGNALS = {"self": "the erased model's own verdict", "probe": "judged probe images"}
PRECISIONS = ("float32", "bfloat16", "float16")
# the retain anchor's form (engine/anchor.py): "output" (the erased model's predictions on retain prompts against the
# frozen model's, over retain images: any layers) or "text" (the LoRA's own output on the retain prompts' tokens:
# layers that read the prompt alone, no denoiser forward a step)
RETAIN_ANCHORS = ("output", "text")
# the learning rate over a run (engine/train.py): "cosine" decays it to 0 by the last step, "constant" keeps it
LR_SCHEDULES = ("cosine", "constant")
# attacks on an erasure (attacks/): concept inversion, prompt prefix (UnlearnDiffAtk), concept vector
# (Ring-A-Bell), phrasings never trained on
ATTACK_NAMES = ("inversion", "prefix", "concept_vector", "phrasings")
