"""keep_freed_memory: memory a large tensor held is reused by the next, not faulted in afresh."""

import json
import subprocess
import sys

# Writes a 96 MiB tensor, frees it, then writes a 64 MiB one; prints each one's page faults.
TWO_TENSORS = """
import json, resource, sys
import torch
from draft_training.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for floats in (24 * 2**20, 16 * 2**20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(floats)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del block
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", TWO_TENSORS, mode], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_a_freed_tensors_memory_is_reused_without_faulting_its_pages_again():
    plain, kept = _faults("plain"), _faults("keep")
    assert kept["kept"] is True
    # By default the first tensor's memory goes back to the kernel: the second faults afresh...
    assert plain["faults"][1] > plain["faults"][0] / 2
    # ...kept, the second is written into pages the first one already faulted in.
    assert kept["faults"][1] < kept["faults"][0] / 10
