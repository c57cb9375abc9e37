"""Route torch.nn.utils' clipping functions to fusedclip, so training code that calls torch's names
(HF Trainer and Accelerate, Lightning, nanoGPT-style loops) uses the fused kernels unchanged.

    import fusedclip
    fusedclip.patch_torch()          # from here on torch.nn.utils.clip_grad_norm_ is fusedclip's
    ...
    fusedclip.unpatch_torch()        # torch's own function objects are back (`is`-identical)

    with fusedclip.patched():        # the same, for a block (also usable as a decorator)
        trainer.fit(model)

What is replaced: clip_grad_norm_, clip_grad_value_, get_total_norm and clip_grads_with_norm_ in
torch.nn.utils, and those of the four names that torch.nn.utils.clip_grad defines publicly
(clip_grad_norm_ and clip_grad_value_ in torch 2.14; get_total_norm and clip_grads_with_norm_ are
private there). The replacements keep torch's signatures (max_norm, norm_type, error_if_nonfinite,
foreach, clip_value), accept generators, and return what fusedclip returns (a 0-dim tensor).
Also timm's adaptive gradient clipping, when timm.utils is imported at the time of patching (fusedclip does not
import timm itself: that takes seconds): timm.utils.agc.adaptive_clip_grad and its copies in timm.utils and
timm.utils.clip_grad (which dispatch_clip_grad(mode="agc") and timm's --clip-mode agc call) become
fusedclip.clip_agc_ (same arguments).
Also FSDP1's FullyShardedDataParallel.clip_grad_norm_ (what Accelerate and Lightning Fabric call under FSDP1),
by fusedclip.fsdp.clip_grad_norm_ (its shards reduced over the FSDP process group); the first patching
imports torch.distributed.fsdp for it (about a second).

Decisions:
- torch's deprecated `clip_grad_norm` (no underscore) is left in place: it looks up
  clip_grad.clip_grad_norm_ when called, so while patched it reaches fusedclip anyway, and it keeps
  its FutureWarning.
- The private helpers torch's own clip_grad_norm_ calls (clip_grad._get_total_norm,
  clip_grad._clip_grads_with_norm_) are never replaced: fusedclip's backend="torch" runs torch's
  original functions, and they must stay torch all the way down. For the same reason, in a torch
  whose clip_grad module defines a public name that its clip_grad_norm_ calls by that name, the
  clip_grad module's copy of that name is left alone (torch.nn.utils' copy is still replaced).
- Code that did `from torch.nn.utils import clip_grad_norm_` BEFORE patching keeps torch's function
  (it holds its own reference); patch before importing such code. Attribute calls
  (`torch.nn.utils.clip_grad_norm_(...)`, as Accelerate and Lightning make) always see the patch.
- patch_torch() and unpatch_torch() are idempotent switches: patching twice is patching once, and
  one unpatch_torch() restores torch whatever came before it (it also ends the effect of any open
  patched() blocks; their exits then change nothing).
- patched() blocks nest and may be open in several threads at once: torch stays patched while any
  block (or a patch_torch() call not yet undone) holds it, and is restored when the last one lets go.
  The backend used is that of the most recent holder still holding. Patching is process-wide, like
  torch's module attributes themselves: a block in one thread patches torch for every thread.
- If something else replaces one of these torch attributes while fusedclip's patch is installed,
  unpatching leaves that replacement in place rather than overwrite it.
"""
import contextlib
import inspect
import sys
import threading
import types
import warnings

import torch
import torch.distributed
import torch.nn.utils
import torch.nn.utils.clip_grad

from . import _core, backends
from . import agc as _agc
from . import clip as _clip

__all__ = ["patch_torch", "unpatch_torch", "patched", "is_patched"]

_backend = "auto"  # the backend the installed functions use; read on every call, written under _lock


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """fusedclip.clip_grad_norm_, installed by fusedclip.patch_torch() as torch.nn.utils.clip_grad_norm_."""
    if isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)
        if not parameters:  # torch's warning, for drop-in fidelity
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    return _clip.clip_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, backend=_backend)


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """fusedclip.get_total_norm, installed by fusedclip.patch_torch() as torch.nn.utils.get_total_norm."""
    return _clip.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach, backend=_backend)


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """fusedclip.clip_grads_with_norm_, installed by fusedclip.patch_torch() as
    torch.nn.utils.clip_grads_with_norm_."""
    return _clip.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach, backend=_backend)


def clip_grad_value_(parameters, clip_value, foreach=None):
    """fusedclip.clip_grad_value_, installed by fusedclip.patch_torch() as torch.nn.utils.clip_grad_value_."""
    return _clip.clip_value_(parameters, clip_value, foreach, backend=_backend)


def adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """fusedclip.clip_agc_, installed by fusedclip.patch_torch() as timm's adaptive_clip_grad (timm.utils.agc,
    timm.utils, timm.utils.clip_grad)."""
    return _agc.clip_agc_(parameters, clip_factor, eps, norm_type, backend=_backend)


def _timm_targets():
    """timm's adaptive_clip_grad and the modules that hold a copy of it, if timm.utils is imported."""
    if "timm.utils" not in sys.modules:
        return []
    owners = [sys.modules.get(name) for name in ("timm.utils.agc", "timm.utils", "timm.utils.clip_grad")]
    return [(m, "adaptive_clip_grad", adaptive_clip_grad) for m in owners
            if m is not None and hasattr(m, "adaptive_clip_grad")]


_REPLACEMENTS = {
    "clip_grad_norm_": clip_grad_norm_,
    "get_total_norm": get_total_norm,
    "clip_grads_with_norm_": clip_grads_with_norm_,
    "clip_grad_value_": clip_grad_value_,
}


def fsdp_clip_grad_norm_(self, max_norm, norm_type=2.0):
    """fusedclip.fsdp.clip_grad_norm_, installed by fusedclip.patch_torch() as FSDP1's
    FullyShardedDataParallel.clip_grad_norm_ (same signature, called on the root FSDP module)."""
    from .distributed import fsdp  # imported by _targets() before this can be installed
    return fsdp.clip_grad_norm_(self, max_norm, norm_type, backend=_backend)


def _names_torch_calls():
    """Global names that torch's own clipping functions (the ones backend="torch" runs) look up when called."""
    names = set()
    for fn in (_core.torch_clip_grad_norm_, _core.torch_get_total_norm, _core.torch_clip_grads_with_norm_,
               _core.torch_clip_grad_value_):
        code = getattr(inspect.unwrap(fn), "__code__", None)
        if code is not None:
            names.update(code.co_names)
    return names


def _targets():
    """(owner, name, replacement) triples to install: torch.nn.utils' names, torch.nn.utils.clip_grad's, and
    FSDP1's method (its module is imported here, on first patching, not at `import fusedclip`: it takes
    about a second to import, and FSDP1 may be imported after patching)."""
    out = [(torch.nn.utils, name, fn) for name, fn in _REPLACEMENTS.items()]
    calls = _names_torch_calls()
    out += [(torch.nn.utils.clip_grad, name, fn) for name, fn in _REPLACEMENTS.items()
            if hasattr(torch.nn.utils.clip_grad, name) and name not in calls]
    if torch.distributed.is_available():  # a torch built without distributed has no FSDP
        from .distributed import fsdp
        out.append((fsdp.FullyShardedDataParallel, "clip_grad_norm_", fsdp_clip_grad_norm_))
    return out


_TARGETS = []  # filled by the first _install()

_lock = threading.RLock()
_holders = {}       # token -> backend, in the order they took hold; the newest still holding picks the backend
_originals = {}     # (owner, name) -> (the object there before patching, ours); non-empty exactly while installed
_EXPLICIT = "patch_torch"  # the token of patch_torch() (one, however often it is called)


def _check_backend(backend):
    backends.check_name(backend, "patch_torch")


def _install():
    if not _TARGETS:
        _TARGETS.extend(_targets())
    for owner, name, replacement in _TARGETS + _timm_targets():  # timm's: looked up each time (imported since?)
        current = getattr(owner, name)
        if current is not replacement:
            _originals[(owner, name)] = (current, replacement)
            setattr(owner, name, replacement)


def _restore():
    for (owner, name), (original, replacement) in _originals.items():
        if getattr(owner, name, None) is replacement:  # not replaced again by someone else since
            setattr(owner, name, original)
    _originals.clear()


def _sync():
    """Makes torch's attributes match _holders. Call with _lock held."""
    global _backend
    if _holders:
        _backend = next(reversed(_holders.values()))
        if not _originals:
            _install()
    else:
        if _originals:
            _restore()
        _backend = "auto"


def patch_torch(backend="auto"):
    """Routes torch.nn.utils.clip_grad_norm_, clip_grad_value_, get_total_norm and clip_grads_with_norm_
    (and torch.nn.utils.clip_grad's public copies, FSDP1's FullyShardedDataParallel.clip_grad_norm_, and timm's
    adaptive_clip_grad when timm.utils is imported) to fusedclip, with this backend ("auto", "native", "torch",
    ...). Idempotent; calling it again changes only the backend.

    Args:
        backend (str): the backend the routed functions run on: "auto" (default), "native", "triton", or "torch"
            (the patch stays installed but runs torch's own code, for A/B runs).

    Returns:
        None
    """
    _check_backend(backend)
    with _lock:
        _holders.pop(_EXPLICIT, None)
        _holders[_EXPLICIT] = backend
        _sync()


def unpatch_torch():
    """Puts torch's original function objects back (`is`-identical). Idempotent; a no-op when not patched.
    Also ends the effect of open patched() blocks (their exits then change nothing).

    Returns:
        None
    """
    with _lock:
        _holders.clear()
        _sync()


def is_patched():
    """Whether torch.nn.utils' clipping functions are fusedclip's right now.

    Returns:
        bool
    """
    with _lock:
        return bool(_originals)


@contextlib.contextmanager
def patched(backend="auto"):
    """A block (or, as a decorator, a function) in which torch's clipping functions are fusedclip's.
    On exit, even by an exception, the state before the block comes back: blocks nest, and a
    patch_torch() made before or inside the block stays in force after it.

    Args:
        backend (str): as in patch_torch. Default "auto".

    Returns:
        A context manager (usable as a decorator).
    """
    _check_backend(backend)
    token = object()
    with _lock:
        _holders[token] = backend
        _sync()
    try:
        yield
    finally:
        with _lock:
            if _holders.pop(token, None) is not None:
                _sync()
