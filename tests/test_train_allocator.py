"""clipkit.train.allocator: freed host memory is reused without page faults after keep_freed_memory()."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import subprocess_env

# Touch a 256 MiB malloc'd buffer, free it, allocate and touch it again: print the minor page faults
# the second touch took. glibc serves a buffer this large with its own mmap (and unmaps it on free)
# unless told otherwise, so by default every re-allocation faults all of its pages in again.
PROBE = """
import ctypes, resource, sys
from clipkit.train.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def touch():
    buffer = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(buffer, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(buffer)
    return faults
touch()
print(applied, touch())
"""


def second_touch_faults(mode: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=subprocess_env()
    )
    assert result.returncode == 0, result.stderr
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; a no-op elsewhere")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = (256 << 20) // 4096
    _, default_faults = second_touch_faults("default")
    applied, kept_faults = second_touch_faults("keep")
    assert default_faults > pages // 2  # glibc unmapped it: every page came back through a fault
    assert applied == "True"
    assert kept_faults < pages // 100  # the same pages, still mapped
