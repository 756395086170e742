"""ComfyUI nodes of the MACE pack: thin V3 adapters over ``mace_ops``."""
from __future__ import annotations

from .comfy_compat import ComfyExtension, check_core, io

check_core()  # an incompatible ComfyUI: one clear ImportError here, not a traceback mid-run

from .cfr_node import MaceRefineCrossAttention
from .ace_node import MaceGatedErasure
from .text_gate_node import MaceTextGate
from .erasure_io_nodes import MaceLoadErasure, MaceSaveErasure
from .fusion_node import MaceFuseLoras
from .mass_erase_node import MaceMassErase
from .lora_train_node import MaceTrainConceptLora
from .training_images_node import MaceTrainingImages
from .preview_nodes import MaceBeforeAfterGrid, MaceConceptProbe
from .unet_pt_nodes import MaceLoadUNetPt, MaceSaveUNetPt
from .erasure_check_node import MaceErasureCheck

NODES: list[type[io.ComfyNode]] = [MaceRefineCrossAttention, MaceSaveErasure, MaceLoadErasure, MaceFuseLoras,
                                  MaceTrainingImages, MaceTrainConceptLora, MaceMassErase, MaceBeforeAfterGrid,
                                  MaceConceptProbe, MaceSaveUNetPt, MaceLoadUNetPt, MaceGatedErasure, MaceTextGate,
                                  MaceErasureCheck]


class MaceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> MaceExtension:
    return MaceExtension()
