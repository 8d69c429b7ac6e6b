"""ReDiFine's ComfyUI nodes: thin adapters from ComfyUI types to ``redifine_core``, one module per feature.

Modules import each other relatively (ComfyUI has its own top-level ``nodes`` module, so never ``import nodes``)
and import ComfyUI only lazily through ``_comfy``, so this package imports and unit-tests without ComfyUI.
"""

from .cfg_schedule import ReDiFineCFGScheduleModel
from .chain import ReDiFineChain
from .check import ReDiFineCheck
from .dataset import ReDiFineDataset
from .generate import ReDiFineGenerate
from .metrics import ReDiFineCollapseMetrics
from .native import ReDiFinePipelineFromNative, ReDiFinePipelineToNative
from .pipeline import ReDiFineLoadPipeline
from .plot_schedule import ReDiFinePlotSchedule
from .train import ReDiFineTrainLoRA

NODE_CLASS_MAPPINGS = {
    "ReDiFineLoadPipeline": ReDiFineLoadPipeline,
    "ReDiFineDataset": ReDiFineDataset,
    "ReDiFineTrainLoRA": ReDiFineTrainLoRA,
    "ReDiFineGenerate": ReDiFineGenerate,
    "ReDiFineCFGScheduleModel": ReDiFineCFGScheduleModel,
    "ReDiFinePlotSchedule": ReDiFinePlotSchedule,
    "ReDiFineChain": ReDiFineChain,
    "ReDiFineCheck": ReDiFineCheck,
    "ReDiFineCollapseMetrics": ReDiFineCollapseMetrics,
    "ReDiFinePipelineToNative": ReDiFinePipelineToNative,
    "ReDiFinePipelineFromNative": ReDiFinePipelineFromNative,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ReDiFineLoadPipeline": "ReDiFine Load Pipeline",
    "ReDiFineDataset": "ReDiFine Dataset",
    "ReDiFineTrainLoRA": "ReDiFine Train LoRA (condition drop)",
    "ReDiFineGenerate": "ReDiFine Generate (CFG schedule)",
    "ReDiFineCFGScheduleModel": "CFG Schedule for MODEL",
    "ReDiFinePlotSchedule": "ReDiFine Plot CFG Schedule",
    "ReDiFineChain": "Chain of Diffusion",
    "ReDiFineCheck": "ReDiFine Check",
    "ReDiFineCollapseMetrics": "ReDiFine Collapse Metrics",
    "ReDiFinePipelineToNative": "ReDiFine Pipeline to MODEL/CLIP/VAE",
    "ReDiFinePipelineFromNative": "ReDiFine Pipeline from MODEL/CLIP/VAE (shared weights)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
