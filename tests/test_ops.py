"""torch.library.opcheck on every registered operator of both namespaces: the native ops (torch.ops.fusedclip,
schemas in csrc/ops.cpp, fakes in fusedclip/ops.py) and the Triton backend's custom ops (torch.ops.fusedclip_triton,
fusedclip/triton_*.py), from one table of sample inputs keyed by operator name. The operators are enumerated from
the dispatcher, so an operator added without a sample here fails test_every_registered_op_has_a_sample.

opcheck runs each sample through the schema check (the declared mutations and aliasing are what the kernel does),
the fake (meta) implementation against the real one, and AOT autograd's dispatch, static and dynamic shapes. The
samples are fresh random gradients of mixed scales (one log-uniform scale in [1e-3, 10) per tensor), in several
dtypes, with an empty tensor and one larger than a chunk, and every optional tensor argument both absent and given.

The Triton ops run where the Triton backend does: compiled on CUDA tensors, or in Triton's interpreter on CPU
tensors. TRITON_INTERPRET=1 must be set before Triton is imported, so on CPU their cases run in a pytest process
of their own: `make test-triton-interpret` (part of `make test`), which selects the "triton" cases.
"""

import pytest
import torch

import fusedclip
from fusedclip import _ext
from fusedclip.testing import make_grads
from fusedclip.zclip import BUFFER, MEAN, STEPS, VAR

NAMESPACES = ("fusedclip", "fusedclip_triton")
HAS_GPU = torch.cuda.is_available()


def registered_ops(namespace):
    """The operator names the dispatcher knows in `namespace` (overload names dropped)."""
    names = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        ns, _, rest = qualified.partition("::")
        if ns == namespace:
            names.add(rest.split(".")[0])
    return sorted(names)


# ---- the sample table: op name -> [(label, make(device) -> positional arguments)] ----------------------------

MIXED = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7,), (33, 5), (0,), (20000,), (3, 4, 5)]  # an empty tensor; one longer than a chunk (16384 elements)
WARMUP = 4


def grads(device, seed, dtypes=MIXED, shapes=SHAPES):
    return make_grads(shapes, dtypes, device=device, seed=seed, scale="mixed")


def acc(dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def norms_buffer(device, dtypes=MIXED, n=len(SHAPES)):
    """A per-tensor norms buffer of random values: every entry must be written."""
    return torch.randn(n, dtype=acc(dtypes), device=device)


def zclip_config(**kw):
    """The kernels' config for a ZClip with these arguments (csrc/common/zclip_rule.h ZConfigSlot)."""
    return fusedclip.ZClip(warmup_steps=WARMUP, **kw)._config


def zclip_state(device, seed, warm):
    """A ZClip state: in warm-up (two norms collected), or past it with a random EMA mean and variance."""
    g = torch.Generator().manual_seed(seed)
    s = torch.zeros(BUFFER + WARMUP, dtype=torch.float64)
    if warm:
        s[STEPS] = 2
        s[BUFFER:BUFFER + 2] = torch.rand(2, generator=g, dtype=torch.float64) * 3
    else:
        s[STEPS] = WARMUP + 3
        s[MEAN] = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 + 0.5
        s[VAR] = float(torch.rand((), generator=g, dtype=torch.float64)) * 0.3
    return s.to(device)


def agc_args(device, seed, dtypes, norm_type):
    # units (rows of 2-D and up, else the whole tensor) far above and below their threshold: random scales
    shapes = [(8, 3, 3), (33, 129), (7,), (1, 40000), ()]
    weights = make_grads(shapes, dtypes, device=device, seed=seed, scale="mixed")
    return (weights, make_grads(shapes, dtypes, device=device, seed=seed + 1, scale="mixed"), 0.01, 1e-3, norm_type)


def coefs(device, seed, dtype=torch.float32, n=len(SHAPES)):
    """Per-tensor coefficients for scale_each_: log-uniform in [1e-3, 1), every other one exactly 1 (not written)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.pow(10.0, -3.0 * torch.rand(n, generator=g, dtype=torch.float64))
    c[1::2] = 1.0
    return c.to(device=device, dtype=dtype)


def scalar(x, device, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=device)


SAMPLES = {
    "total_norm": [
        ("l2", lambda d: (grads(d, 1), 2.0, None)),
        ("inf", lambda d: (grads(d, 2), float("inf"), None)),
        ("l1-fp64-per-tensor", lambda d: (grads(d, 3, [torch.float32, torch.float64]), 1.0,
                                          norms_buffer(d, [torch.float64]))),
        ("l3-per-tensor", lambda d: (grads(d, 4), 3.0, norms_buffer(d))),
        ("l2-unrounded-float64", lambda d: (grads(d, 5), 2.0, None, torch.float64)),
        ("l2-per-tensor-float64", lambda d: (grads(d, 6), 2.0, norms_buffer(d), torch.float64)),
    ],
    "clip_": [
        ("clipping-l2", lambda d: (grads(d, 5), 0.05, 2.0, None, None, None)),
        ("not-clipping-inf", lambda d: (grads(d, 6), 1e9, float("inf"), None, None, None)),
        ("fp64-l1", lambda d: (grads(d, 7, [torch.float64, torch.float32]), 0.5, 1.0, None, None, None)),
        ("per-tensor", lambda d: (grads(d, 8), 0.5, 2.0, norms_buffer(d), None, None)),
        ("amp", lambda d: (grads(d, 9), 0.5, 2.0, None, scalar(0.37, d), scalar(0.0, d))),
        ("all-extras", lambda d: (grads(d, 10), 0.5, 2.0, norms_buffer(d), scalar(2.0 ** -7, d), scalar(0.0, d))),
    ],
    "scale_": [
        ("clipping", lambda d: (grads(d, 11), 1.0, scalar(123.0, d))),
        ("not-clipping", lambda d: (grads(d, 12), 1.0, scalar(0.25, d))),
        ("fp64-norm", lambda d: (grads(d, 13, [torch.float64]), 0.5, scalar(3.0, d, torch.float64))),
    ],
    "scale_each_": [
        ("mixed-fp32-coefs", lambda d: (grads(d, 29), coefs(d, 29))),
        ("fp64-grads-fp64-coefs", lambda d: (grads(d, 30, [torch.float64, torch.float32]),
                                             coefs(d, 30, torch.float64))),
    ],
    "clamp_": [
        ("mixed", lambda d: (grads(d, 14), 0.1)),
        ("fp64", lambda d: (grads(d, 15, [torch.float64]), 2.5)),
    ],
    "zclip_": [
        ("warm-up", lambda d: (grads(d, 16), zclip_state(d, 16, warm=True), zclip_config(), None, None, None, None)),
        ("zscore", lambda d: (grads(d, 17), zclip_state(d, 17, warm=False), zclip_config(max_grad_norm=1.0),
                              None, None, None, None)),
        ("percentile-fp64", lambda d: (grads(d, 18, [torch.float64]), zclip_state(d, 18, warm=False),
                                       zclip_config(mode="percentile"), None, None, None, None)),
        ("given-norm-skip", lambda d: (grads(d, 19), zclip_state(d, 19, warm=False),
                                       zclip_config(on_spike="skip"), scalar(50.0, d), None, scalar(0.0, d), None)),
        ("amp", lambda d: (grads(d, 20), zclip_state(d, 20, warm=False), zclip_config(), None, scalar(0.5, d),
                           scalar(0.0, d), None)),
        ("coef-out", lambda d: (grads(d, 21), zclip_state(d, 21, warm=False), zclip_config(clip_option="mean"),
                                None, None, None, scalar(0.0, d))),
    ],
    "agc_": [
        ("l2-fp32", lambda d: agc_args(d, 22, [torch.float32], 2.0)),
        ("inf-mixed", lambda d: agc_args(d, 23, MIXED, float("inf"))),
        ("l1-fp64", lambda d: agc_args(d, 24, [torch.float64], 1.0)),
    ],
    "table": [
        ("mixed", lambda d: (grads(d, 25, [torch.float32, torch.float64, torch.bfloat16]),)),
    ],
    "build_info": [
        ("no-arguments", lambda d: ()),
    ],
}

# Samples that only one namespace takes: the native schemas have defaults for the optional tensors, the Triton
# ops none (torch 2.6's custom_op wrapper; fusedclip/backends/triton/clip.py says why).
NATIVE_ONLY_SAMPLES = {
    "total_norm": [("defaults", lambda d: (grads(d, 26), 2.0))],
    "clip_": [("defaults", lambda d: (grads(d, 27), 0.5, 2.0))],
    "zclip_": [("defaults", lambda d: (grads(d, 28), zclip_state(d, 28, warm=False), zclip_config()))],
}

# The checks each op cannot pass, with the reason (None: all of opcheck's default checks).
# fusedclip::table hands out the kernels' table for kernels written outside the library (the Triton backend, which
# calls it eagerly, never under torch.compile): a host-side int among its results, and no fake implementation.
# fusedclip::build_info takes and returns no tensor: nothing for fake tensors or autograd to check.
ONLY_SCHEMA = ("test_schema",)
CHECKS = {
    ("fusedclip", "table"): ONLY_SCHEMA,
    ("fusedclip", "build_info"): ONLY_SCHEMA,
}


def devices_for(namespace):
    """Where this process can run the namespace's kernels."""
    if namespace == "fusedclip":
        return [d for d in ("cpu", "cuda") if "native" in fusedclip.available_backends(d)]
    return [d for d in ("cpu", "cuda") if "triton" in fusedclip.available_backends(d)]


def cases():
    out = []
    for ns in NAMESPACES:
        for name in registered_ops(ns):
            table = SAMPLES.get(name, []) + (NATIVE_ONLY_SAMPLES.get(name, []) if ns == "fusedclip" else [])
            for label, make in table:
                for device in ("cpu", "cuda"):
                    marks = [pytest.mark.gpu] if device == "cuda" else []
                    out.append(pytest.param(ns, name, make, device, marks=marks,
                                            id=f"{ns}::{name}-{label}-{device}"))
    return out


def test_both_namespaces_are_registered():
    assert _ext.LOADED, _ext.LOAD_ERROR
    assert {"total_norm", "clip_", "scale_", "clamp_", "zclip_", "agc_", "table"} <= set(registered_ops("fusedclip"))
    if "triton" in fusedclip.backends.BACKENDS:
        assert {"total_norm", "clip_", "scale_", "clamp_", "zclip_", "agc_"} <= set(
            registered_ops("fusedclip_triton"))


def test_every_registered_op_has_a_sample():
    missing = [f"{ns}::{name}" for ns in NAMESPACES for name in registered_ops(ns) if not SAMPLES.get(name)]
    assert not missing, f"no opcheck sample for {missing}: add them to tests/test_ops.py's SAMPLES"


def test_the_samples_are_not_degenerate():
    """Fresh random values of mixed scales: no all-zero gradient, magnitudes spread over decades."""
    g = grads("cpu", 0)
    nonempty = [t.double() for t in g if t.numel()]
    assert all(bool((t != 0).any()) for t in nonempty)
    rms = sorted(float(t.square().mean().sqrt()) for t in nonempty)
    assert rms[-1] / rms[0] > 3, rms
    assert not torch.equal(grads("cpu", 1)[0], grads("cpu", 2)[0])


@pytest.mark.parametrize("ns, name, make, device", cases())
def test_opcheck(ns, name, make, device):
    if device not in devices_for(ns):
        where = (" (on CPU under TRITON_INTERPRET=1: `make test-triton-interpret`)"
                 if ns == "fusedclip_triton" and device == "cpu" else "")
        pytest.skip(f"torch.ops.{ns} does not run on {device} here{where}")
    op = getattr(getattr(torch.ops, ns), name).default
    checks = CHECKS.get((ns, name))
    kwargs = {"test_utils": checks} if checks else {}
    torch.library.opcheck(op, make(device), **kwargs)
