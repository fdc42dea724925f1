"""ComfyUI-facing node classes, listed explicitly (as ComfyUI core's extensions do).

A node module that fails to import fails the pack's import, loudly, in ComfyUI's log: a missing
node is never silent. A new node is added to ``NODES`` here.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apg import SD35TunerAPG, SD35TunerAPGGuider, SD35TunerCompareCFGAPG
from .cache import SD35TunerCacheLatents
from .caption import Caption
from .dataset import ImagesToDataset, LoadDataset, PreviewDataset, SmartCrop
from .dataset_save import SaveDataset
from .train_lora import SD35TunerTrainLora
from .train_settings import SD35TunerTrainSettings

NODES: list[type[io.ComfyNode]] = [
    LoadDataset,
    SmartCrop,
    Caption,
    ImagesToDataset,
    PreviewDataset,
    SaveDataset,
    SD35TunerCacheLatents,
    SD35TunerTrainSettings,
    SD35TunerTrainLora,
    SD35TunerAPG,
    SD35TunerAPGGuider,
    SD35TunerCompareCFGAPG,
]


class SD35TunerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
