"""The CPU trainer's host memory: a step's freed activations are reused, not faulted in again."""

import subprocess
import sys

import pytest

from plmscale.training.host_memory import keep_freed_memory

# Page faults per allocation of a 64 MiB tensor in a fresh process, once the same size was allocated and
# freed a few times (a step's activations): glibc's tcache holds the small ends that 64-byte alignment
# splits off, so the heap settles only after a few rounds.
FAULTS = """
import resource, sys, torch
from plmscale.training.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    torch.ones(16 << 20)
before = faults()
for _ in range(5):
    torch.ones(16 << 20)
print((faults() - before) / 5)
"""


def faults_per_allocation(mode: str) -> float:
    run = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return float(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activations_are_not_faulted_in_again():
    default, kept = faults_per_allocation("default"), faults_per_allocation("keep")
    # glibc's default maps a block this large afresh each time: one fault per page touched (4 KiB pages:
    # 16,384; fewer with transparent huge pages); kept in the heap, the pages are already there.
    assert default >= 16, default
    assert kept <= default / 20, (kept, default)


def test_the_users_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not keep_freed_memory()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert not keep_freed_memory()
