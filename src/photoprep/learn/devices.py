"""Which torch device a stage runs on, from its ``device`` param (``auto``, ``cuda`` or ``cpu``)."""

from __future__ import annotations

import torch

from photoprep.core.errors import UserError


def pick_device(choice: str, key: str) -> torch.device:
    """``cpu``; ``cuda`` (without CUDA a user error naming the param ``key``); ``auto``: CUDA if any."""
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise UserError(f"{key}: cuda, but no CUDA device is available (use auto or cpu)")
    return torch.device("cuda" if choice in ("cuda", "auto") and available else "cpu")


def device_name(device: torch.device) -> str:
    """``cuda (<GPU name>)`` or ``cpu (<n> threads)``, for logs and perf files."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
