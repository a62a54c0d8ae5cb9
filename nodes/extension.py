"""The SurgUn ComfyExtension: the V3 node list ComfyUI loads through comfy_entrypoint()."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .audit_node import SurgUnAttackAudit
from .delta_nodes import SurgUnApplyDelta, SurgUnSaveDelta
from .demo_node import SurgUnDemoModel
from .localize_node import SurgUnLocalize
from .probe_node import SurgUnConceptProbe
from .train_node import SurgUnTrain


class SurgUnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            SurgUnDemoModel,
            SurgUnTrain,
            SurgUnApplyDelta,
            SurgUnSaveDelta,
            SurgUnConceptProbe,
            SurgUnLocalize,
            SurgUnAttackAudit,
        ]


async def comfy_entrypoint() -> SurgUnExtension:
    return SurgUnExtension()
