"""A small workload for compute-sanitizer (memcheck, racecheck, synccheck): every public function through
every fused backend on mixed-dtype lists with odd sizes, unaligned views and empty tensors.
Exits non-zero if a result is wrong (the sanitizer reports memory and sync errors on its own)."""
import sys

import torch

import fusedclip


def grads(device, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n, dtype) in enumerate([(1, torch.float32), (0, torch.float16), (16387, torch.bfloat16),
                                    (40000, torch.float32), (3, torch.float64), (70001, torch.float16)]):
        t = torch.randn(n + 1, generator=g).to(device=device, dtype=dtype)
        out.append(t[1:] if i % 2 else t[:n])  # odd offsets: some data pointers are not 16-byte aligned
    return out


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    backends = [b for b in fusedclip.available_backends(device) if b != "torch"]
    for backend in backends:
        for p in (2.0, float("inf"), 1.0, 3.0):
            gs = grads(device, 1)
            ref = torch.linalg.vector_norm(torch.cat([x.double().flatten() for x in gs]), p)
            params = []
            for x in gs:
                q = torch.nn.Parameter(torch.zeros_like(x))
                q.grad = x
                params.append(q)
            n = fusedclip.clip_(params, 0.5, p, backend=backend)
            assert abs(n.double().item() - ref.item()) <= 1e-5 * ref.item(), (backend, p, n.item(), ref.item())
            fusedclip.clip_(params, 1e9, p, backend=backend)  # the no-write path
            total, norms = fusedclip.clip_(params, 0.5, p, per_tensor=True, backend=backend)  # per-tensor pass
            assert norms.numel() == len(params)
        if backend == "native":  # AMP in the same pass: unscale, found_inf
            gs = grads(device, 3)
            found_inf = torch.zeros((), device=device)
            torch.ops.fusedclip.clip_(gs, 1.0, 2.0, None, torch.tensor(0.5, device=device), found_inf)
            assert float(found_inf) == 0.0
        gs = grads(device, 2)
        fusedclip.get_total_norm(gs, backend=backend)
        fusedclip.clip_grads_with_norm_([torch.nn.Parameter(torch.zeros_like(x)) for x in gs], 1.0,
                                        torch.tensor(3.0, device=device), backend=backend)
        ps = []
        for x in gs:
            q = torch.nn.Parameter(torch.zeros_like(x))
            q.grad = x
            ps.append(q)
        fusedclip.clip_value_(ps, 0.1, backend=backend)
        assert all(float(x.abs().max()) <= float(torch.tensor(0.1, dtype=x.dtype)) for x in gs if x.numel())
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"sanitize_clip: {backend} ok")
    print(f"sanitize_clip: backends {backends} done")


if __name__ == "__main__":
    main()
