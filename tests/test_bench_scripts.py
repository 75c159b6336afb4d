"""The benchmark scripts' own machinery (what makes a long benchmark resumable)."""
import argparse
import os
import platform
import subprocess
import sys

import pytest

from conftest import load_script


def test_cell_lock_is_taken_over_only_from_a_dead_runner_of_this_host(tmp_path):
    take_lock = load_script("bench_search").take_lock
    lock = str(tmp_path / "cell.json.lock")
    assert take_lock(lock) and not take_lock(lock)  # held by a live runner (this process)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open(lock, "w", encoding="utf-8") as f:  # a killed runner's lock
        f.write(f"{platform.node()} {gone.pid}")
    assert take_lock(lock) and open(lock, encoding="utf-8").read().split() == [platform.node(), str(os.getpid())]
    with open(lock, "w", encoding="utf-8") as f:  # another machine's runner: never taken over
        f.write(f"not-{platform.node()} {gone.pid}")
    assert not take_lock(lock)


def test_search_variants_combine_and_unknown_names_are_refused():
    bench = load_script("bench_search")
    v = bench.variant_settings("evolution+b200")
    assert v["sampler"] == "evolution" and v["budget"] == 200 and v["range"] == bench.DEFAULT_VARIANT["range"]
    assert bench.variant_settings("default") == bench.DEFAULT_VARIANT
    with pytest.raises(argparse.ArgumentTypeError, match="unknown variant 'fast'"):
        bench.variant_settings("r0.1+fast")
