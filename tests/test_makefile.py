"""The Makefile's build flags: the AMX-avoiding flags go to the llama.cpp build only where the compiler targets x86-64."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def no_amx_flags(target_arch: str) -> str:
    out = subprocess.run(
        ["make", "--no-print-directory", "--eval", "print-no-amx: ; @echo '[$(NO_AMX)]'", "print-no-amx",
         f"TARGET_ARCH={target_arch}"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def test_amx_flags_only_for_x86_64_compilers():
    assert no_amx_flags("x86_64-linux-gnu") == "[-mno-amx-tile -mno-amx-int8 -mno-amx-bf16]"
    assert no_amx_flags("aarch64-linux-gnu") == "[]"  # gcc for ARM rejects -mno-amx-*
    assert no_amx_flags("arm64-apple-darwin23") == "[]"


def test_the_setup_recipe_passes_them_to_cmake_only_on_x86_64():
    def setup_commands(arch: str) -> str:
        return subprocess.run(["make", "-n", "-B", ".venv/.setup-x", f"TARGET_ARCH={arch}", "STAMP=.venv/.setup-x"],
                              cwd=REPO_ROOT, capture_output=True, text=True).stdout  # fmt: skip

    assert "-mno-amx-tile" in setup_commands("x86_64-linux-gnu")
    assert "-mno-amx" not in setup_commands("aarch64-linux-gnu")
