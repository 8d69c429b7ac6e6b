"""ComfyUI-ReDiFine: ComfyUI loads this folder as a custom node pack (classic NODE_CLASS_MAPPINGS API).

``redifine_core`` is imported by its absolute name everywhere. When it is not installed (ComfyUI-Manager only runs
``pip install -r requirements.txt``), this folder is appended to the END of ``sys.path`` so the bundled copy is
found without shadowing any module ComfyUI already has (ComfyUI's own ``nodes`` module stays first).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import redifine_core  # noqa: F401  (installed with pip, or already on the path)
except ImportError:
    if _HERE not in sys.path:
        sys.path.append(_HERE)
    import redifine_core  # noqa: F401

if __package__:  # loaded as a package, as ComfyUI's custom_nodes loader does
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:
    # Imported as a bare module: pytest does this to a checkout's root ``__init__.py`` when the folder name is not an
    # identifier (``ComfyUI-ReDiFine``, the name git clone and ComfyUI-Manager give). There is no package to load the
    # nodes from, and nothing asks for them.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
