"""The machine a benchmark ran on, in one line (every bench script's `cpu` field)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def cpu_description() -> str:
    """Model name, cores and the vector extensions that decide which path `auto` takes (bf16, VNNI)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"
    name = re.search(r"model name\s*:\s*(.+)", info)
    flags = set(m.group(1).split()) if (m := re.search(r"flags\s*:\s*(.+)", info)) else set()
    extras = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f in flags]
    return f"{name.group(1).strip() if name else 'unknown CPU'}, {os.cpu_count()} cores ({', '.join(extras) or 'no AVX2'})"
