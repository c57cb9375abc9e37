"""python -m fusedclip info | bench"""
import argparse
import sys

# What CI runs the suite on (Makefile: test, test-compat); docs/install.md "Supported versions" says the same.
SUPPORTED = ("torch >= 2.6 on Python >= 3.10; the suite runs on torch 2.6.0 (Python 3.10, Triton 3.2), "
             "2.11.0 (Python 3.12, Triton 3.6, CUDA build for sm_90) and 2.14.1 (Python 3.11, Triton 3.8)")


def info():
    import torch

    import fusedclip
    from fusedclip import _ext, backends

    print(f"fusedclip {fusedclip.__version__}")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except ImportError:
        print("triton    not installed")
    if _ext.LOADED:
        b = _ext.build_info()
        archs = f"CUDA kernels for {b['cuda_archs']}" if b["cuda"] else "no CUDA kernels"
        print(f"extension loaded, built against torch {b['torch']}, {archs}")
    else:
        print(f"extension NOT loaded: {_ext.LOAD_ERROR}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}     {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.0f} GiB)")
    else:
        print("GPU       none visible")
    for device in ("cpu", "cuda"):
        print(f"backends for {device}: {fusedclip.available_backends(device)}")
        for name in backends.AUTO_ORDER:
            ok, why = backends.BACKENDS[name].available(device)
            if not ok:
                print(f"  {name} not for {device}: {why}")
    for name, why in backends.UNAVAILABLE.items():
        print(f"backend {name!r} unavailable: {why}")
    print(f"distributed: {'available' if torch.distributed.is_available() else 'not in this torch build'}")
    print(f"supported: {SUPPORTED}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` is the benchmark's own flags
        from fusedclip import bench as _bench

        return _bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fusedclip")
    sub = parser.add_subparsers(dest="cmd", required=True)
    info_parser = sub.add_parser("info", help="versions, build, GPU and available backends")
    info_parser.add_argument("--kernels", action="store_true",
                             help="also each CUDA kernel's registers, spills, shared memory and blocks per SM, "
                                  "per architecture (read from the built module; no GPU needed)")
    sub.add_parser("bench", help="benchmark against torch and the bandwidth limit (flags: bench --help)")
    args = parser.parse_args(argv)
    info()
    if args.kernels:
        from fusedclip import kernel_info

        print()
        kernel_info.print_kernels()


if __name__ == "__main__":
    sys.exit(main())
