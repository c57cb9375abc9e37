"""What machine this is: its last-level cache, free memory, and the versions recorded with every run."""
import datetime
import os
import platform
import re
import subprocess

import torch

import fusedclip

DEFAULT_LLC = 32 << 20
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def cpu_llc():
    """(bytes, source) of one L3 instance: sysfs first, then lscpu, else DEFAULT_LLC."""
    path = "/sys/devices/system/cpu/cpu0/cache/index3/size"
    try:
        with open(path) as f:
            s = f.read().strip()  # e.g. "32768K"
        return int(s.rstrip("KMG")) * _UNITS.get(s[-1:], 1), path
    except (OSError, ValueError):
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
        # "L3 cache: 32 MiB (1 instance)" (util-linux >= 2.34 sums the instances) or "L3 cache: 32768K"
        m = re.search(r"^L3 cache:\s*([\d.]+)\s*([KMG])i?B?(?:\s*\((\d+) instances?\))?", out, re.M)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2)] / int(m.group(3) or 1)), "lscpu"
    except (OSError, subprocess.SubprocessError):
        pass
    return DEFAULT_LLC, "default (no L3 size found)"


def cache_bytes(device):
    """The last-level cache: L2 on a GPU, L3 on the CPU."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return cpu_llc()[0]


def free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def environment(device):
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "fusedclip": fusedclip.__version__,
            "threads": torch.get_num_threads(), "host": platform.node()}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    try:
        from fusedclip import _ext

        meta["fusedclip_build"] = _ext.build_info()
    except Exception as e:  # noqa: BLE001
        meta["fusedclip_build"] = {"error": str(e)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta.update(device_name=p.name, sm=f"{p.major}{p.minor}", sms=p.multi_processor_count,
                    memory_bytes=p.total_memory, driver=_nvidia_driver())
        meta["cache_bytes"], meta["cache_source"] = cache_bytes(device), "L2 (device properties)"
    else:
        meta.update(device_name=cpu_name(), cores=os.cpu_count())
        meta["cache_bytes"], meta["cache_source"] = cpu_llc()
    return meta


def _nvidia_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())
