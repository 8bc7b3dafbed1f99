"""Choice of the compute device: auto (CUDA, then Apple MPS, then CPU) or explicit."""

from __future__ import annotations

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Return the device names usable on this machine, best first (always ends with ``"cpu"``)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``/``None``/a name into a :class:`torch.device`, checking it exists.

    Raises
    ------
    DeviceError
        If an explicit device (e.g. ``"cuda"``) is not available here.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise DeviceError(f"Unknown device {device!r}: choose one of {', '.join(DEVICE_CHOICES)}.")
    if base not in available_devices():
        raise DeviceError(
            f"Device {device!r} was requested but is not available on this machine "
            f"(available: {', '.join(available_devices())}). Choose 'auto' or 'cpu'."
        )
    return torch.device(name)


def available_memory() -> int | None:
    """Bytes this process can still allocate in main memory, or None when unknown: the kernel's
    ``MemAvailable`` (Linux), at most what the process's cgroup (a container, a SLURM job) has
    left under its limit; elsewhere None (then no check is made)."""
    found = []
    try:
        with open("/proc/meminfo") as fh:
            found += [int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        return None
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as a, open(usage) as b:
                text = a.read().strip()
                if text != "max" and int(text) < 1 << 60:
                    found.append(max(0, int(text) - int(b.read().strip())))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None
