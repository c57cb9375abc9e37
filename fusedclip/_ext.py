"""Loads the compiled extension (fusedclip._C), says how it was built, and says loudly when it cannot load.

A fusedclip whose kernels do not load would otherwise run torch's clip under the user's nose ("auto" falls back
to backend="torch"), so the reason is raised as a warning once, at import: the compiled module is missing (the
source folder shadows the installed package, or it was never built), or it was built against another torch
than the one importing it (the binary is tied to the torch it was compiled with; setup.py records that torch's
version in _build_info.py).
"""
import os
import warnings

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

try:
    from ._build_info import TORCH_VERSION as BUILT_FOR_TORCH  # written by setup.py
except ImportError:
    BUILT_FOR_TORCH = None


class ExtensionNotLoadedWarning(RuntimeWarning):
    """fusedclip's compiled kernels did not load: "auto" runs torch's clip, backend="native" raises."""


def _is_source_checkout():
    root = os.path.dirname(PACKAGE_DIR)
    return os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc"))


def _installed_elsewhere():
    """The folder of an installed fusedclip that has a compiled module, if it is not this one."""
    try:
        from importlib import metadata

        dist = metadata.distribution("fusedclip")
        for f in dist.files or []:
            if f.name.startswith("_C.") and f.name.endswith((".so", ".pyd")):
                where = os.path.dirname(os.path.abspath(str(dist.locate_file(f))))
                if os.path.realpath(where) != os.path.realpath(PACKAGE_DIR):
                    return where
    except Exception:  # no installed distribution, or one without a file list
        pass
    return None


def _why_not_loaded(error):
    found = torch.__version__
    if BUILT_FOR_TORCH and BUILT_FOR_TORCH != found:
        return (f"it was built for torch {BUILT_FOR_TORCH} but this is torch {found}, and a compiled extension only "
                f"loads into the torch it was built with. Rebuild it against this torch: "
                f"pip install --no-build-isolation --force-reinstall --no-deps fusedclip (or . in its source folder)")
    if _is_source_checkout() and BUILT_FOR_TORCH is None:
        elsewhere = _installed_elsewhere()
        if elsewhere:
            return (f"Python imported fusedclip from its source folder ({PACKAGE_DIR}), which has no compiled "
                    f"module, instead of the installed package ({elsewhere}): run from another directory, or "
                    "install for development with `pip install --no-build-isolation -e .`")
        return (f"fusedclip is imported from its source folder ({PACKAGE_DIR}), which has not been built: "
                "`pip install --no-build-isolation -e .` builds it in place (or `pip install --no-build-isolation .` "
                "and run from another directory)")
    return f"{error}. Reinstall with `pip install --no-build-isolation --force-reinstall --no-deps .`"


try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.fusedclip operators)

    LOAD_ERROR = None
except ImportError as e:
    _C = None
    LOAD_ERROR = _why_not_loaded(e)
    warnings.warn(f"fusedclip's compiled kernels did not load, so backend='auto' runs torch's own clip: "
                  f"{LOAD_ERROR}", ExtensionNotLoadedWarning, stacklevel=2)

LOADED = _C is not None


def build_info():
    """{'cuda': bool, 'cuda_archs': str, 'torch': str, ...} of the loaded extension (empty if it did not load)."""
    if not LOADED:
        return {}
    info = dict(kv.split("=", 1) for kv in torch.ops.fusedclip.build_info().split(";"))
    info["cuda"] = info.get("cuda") == "1"
    return info


HAS_CUDA_KERNELS = bool(build_info().get("cuda"))

HOW_TO_BUILD = "build it with `pip install --no-build-isolation .` (see the README's Install section)"
HOW_TO_BUILD_CUDA = ("reinstall with the CUDA toolkit matching torch.version.cuda on PATH (or CUDA_HOME set), "
                     "or FUSEDCLIP_CUDA=1 to make a missing toolkit an error")
