"""The scan benchmark's measuring parts: process-tree memory and replicated pairs."""

import os
import subprocess
import sys

from ubt_core.data.contract import read_pairs
from ubt_core.jobs.scan_bench import replicate_pairs, tree_memory_kib


def test_tree_memory_counts_the_children():
    # the child writes every page of its 200 MiB before it says so: RSS and PSS are read one after the
    # other, so memory still growing between the two reads would put PSS above RSS
    child = subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * (200 * 2**20); print('ready', flush=True);"
                              " time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child_kib, ours_kib = tree_memory_kib(child.pid), tree_memory_kib(os.getpid())
        assert child_kib["pss"] > 150 * 1024
        assert child_kib["rss"] >= child_kib["pss"]  # a shared page counts whole in RSS, split in PSS
        assert ours_kib["pss"] >= child_kib["pss"] + 10 * 1024  # ours plus the child's
    finally:
        child.kill()
        child.communicate()  # reaps it and closes its pipe


def test_replicated_pairs_have_the_size_asked_and_unique_uids(tiny_world, tmp_path):
    out = replicate_pairs(tiny_world["train"], str(tmp_path / "pairs"), 200)  # 80 pairs, copied 2.5 times
    table = read_pairs(out).table  # the contract's reader refuses duplicate uids
    assert table.num_rows == 200
    assert replicate_pairs(tiny_world["train"], out, 200) == out  # a finished set is reused
