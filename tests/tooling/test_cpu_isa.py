"""The CPU loops' instruction-set variants (csrc/cpu/cpu_simd.h) compute the same bits: every variant this
processor runs against the baseline one, on every dtype, with specials (inf, NaN with both signs and odd
payloads, subnormals; random products, among them ties), clipping and not, for the norm kinds and ops that have
variants."""
import pytest
import torch

import fusedclip
from fusedclip import _ext
from fusedclip.testing import bits

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="the extension did not load")

CURRENT, SUPPORTED = _ext._C.cpu_isa() if _ext.LOADED else ("", "")
VARIANTS = [v for v in SUPPORTED.split(",") if v and v != "baseline"]


@pytest.fixture
def isa():
    def use(name):
        _ext._C.set_cpu_isa(name)
    yield use
    _ext._C.set_cpu_isa(CURRENT)


def specials(dtype, n, seed):
    """Random values of every magnitude the dtype has, with specials mixed in and ties after scaling."""
    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-30, 30, (n,), generator=g))
    x = x.to(dtype)
    bits_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    raw = x.view(bits_dtype)
    picks = torch.randint(0, n, (n // 16,), generator=g)
    x[picks[0::6]] = float("inf")
    x[picks[1::6]] = -float("inf")
    x[picks[2::6]] = info.tiny / 4 if dtype != torch.bfloat16 else info.tiny  # subnormals (bf16: its tiny)
    x[picks[3::6]] = -info.tiny / 2 if dtype != torch.bfloat16 else -info.tiny
    # NaNs with a sign and an odd payload (the bit pattern of an exponent-all-ones value)
    nan_bits = {torch.float16: 0x7D01, torch.bfloat16: 0x7F81, torch.float32: 0x7F800401,
                torch.float64: 0x7FF0000000000401}[dtype]
    raw[picks[4::6]] = nan_bits
    raw[picks[5::6]] = nan_bits | (1 << (8 * x.element_size() - 1)) - (1 << (8 * x.element_size()))
    return x


def finite_values(dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 1e-2).to(dtype)


def run_all(make, isa_name, isa):
    """Every op with a variant on fresh copies of the same gradients; results as raw bits."""
    isa(isa_name)
    out = {}
    for p in (2.0, float("inf"), 1.0):
        for clip in (True, False):
            params = make()
            norm = fusedclip.clip_(params, 1.0 if clip else 1e30, p, backend="native")
            out[("clip", p, clip)] = [norm.reshape(1)] + [q.grad for q in params]
    # a finite coefficient applied to the specials too (clip_ with an inf or NaN among them scales by 0 or NaN)
    params = make()
    fusedclip.clip_grads_with_norm_(params, 1.0, torch.tensor(3.0), backend="native")
    out["scale"] = [q.grad for q in params]
    params = make()
    fusedclip.clip_value_(params, 0.5, backend="native")
    out["clamp"] = [q.grad for q in params]
    return out


@pytest.mark.parametrize("variant", VARIANTS or [pytest.param("none", marks=pytest.mark.skip(
    reason="this processor runs only the baseline variant"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("values", ["finite", "specials"])
def test_variants_give_the_same_bits(variant, dtype, values, isa):
    sizes = [0, 1, 31, 33, 16384, 16384 * 2 + 17, 70001]
    gen = finite_values if values == "finite" else specials

    def make():
        params = []
        for i, n in enumerate(sizes):
            p = torch.nn.Parameter(torch.empty(n, dtype=dtype))
            p.grad = gen(dtype, n, seed=i) if n else torch.empty(0, dtype=dtype)
            params.append(p)
        return params

    base = run_all(make, "baseline", isa)
    other = run_all(make, variant, isa)
    for key in base:
        for a, b in zip(base[key], other[key]):
            assert torch.equal(bits(a), bits(b)), (key, dtype, values)
    # and the variants' scaling is torch's: x * coef in fp32 (fp64 for fp64), rounded once to the dtype
    if values == "finite":
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # the kernel's arithmetic
        coef = torch.tensor(1.0, dtype=acc) / (torch.tensor(3.0, dtype=acc) + torch.tensor(1e-6, dtype=acc))
        for q, scaled in zip(make(), other["scale"]):
            assert torch.equal(bits(scaled), bits((q.grad.to(coef.dtype) * coef).to(dtype))), dtype


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="cannot run the CPU loops as 'sse9'"):
        _ext._C.set_cpu_isa("sse9")
