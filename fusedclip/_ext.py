"""Loads the compiled extension (fusedclip._C) and says how it was built."""
import torch

try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.fusedclip operators)

    LOAD_ERROR = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = str(e)

LOADED = _C is not None


def build_info():
    """{'cuda': bool, 'cuda_archs': str, 'torch': str} of the loaded extension (empty if it did not load)."""
    if not LOADED:
        return {}
    info = dict(kv.split("=", 1) for kv in torch.ops.fusedclip.build_info().split(";"))
    info["cuda"] = info.get("cuda") == "1"
    return info


HAS_CUDA_KERNELS = bool(build_info().get("cuda"))

HOW_TO_BUILD = "build it with `pip install --no-build-isolation .` (see the README's Install section)"
HOW_TO_BUILD_CUDA = ("reinstall with the CUDA toolkit matching torch.version.cuda on PATH (or CUDA_HOME set), "
                     "or FUSEDCLIP_CUDA=1 to make a missing toolkit an error")
