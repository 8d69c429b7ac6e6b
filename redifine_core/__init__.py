"""ReDiFine core: the Chain of Diffusion and its fix (condition-drop finetuning + CFG scheduling), ComfyUI-free."""

__version__ = "0.1.0"
