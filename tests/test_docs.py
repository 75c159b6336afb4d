"""The README's result tables are the benchmark scripts' output for the committed result files, to the letter:
a hand edit of a number (or a result file changed without regenerating the tables) fails here."""
import json
import os
import re

import pytest

from conftest import ROOT, load_script as _script


def _section(path, name):
    text = open(path, encoding="utf-8").read()
    m = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, flags=re.S)
    assert m, f"{path} lacks the {name} markers"
    return m.group(1)


def _results(name):
    return json.load(open(os.path.join(ROOT, "scripts", "results", name), encoding="utf-8"))


def test_readme_prune_table_is_the_scripts_output():
    bench = _script("bench_prune")
    out = _results("prune_cpu.json")
    want = bench.table(out["results"]) + "\n\n" + bench.footnote(out)
    assert _section(os.path.join(ROOT, "README.md"), "bench_prune") == want


SEARCH_CELLS = os.path.join(ROOT, "scripts", "results", "search_quick")


@pytest.mark.parametrize("tag", sorted(os.listdir(SEARCH_CELLS)))
def test_readme_search_table_is_the_scripts_output(tag):
    bench = _script("bench_search")
    assert _section(os.path.join(ROOT, "README.md"), f"bench_search_{tag}") == \
        bench.markdown(bench.load_cells(SEARCH_CELLS, tag), tag)


def test_profiles_table_lists_every_shipped_profile_with_its_measured_ppl():
    bench = _script("bench_search")
    profiles = os.path.join(ROOT, "profiles")
    table = _section(os.path.join(profiles, "README.md"), "profiles")
    assert table == bench.profiles_markdown(profiles, SEARCH_CELLS)
    shipped = sorted(f for f in os.listdir(profiles) if f.endswith(".json"))
    assert [line.split("`")[1] for line in table.splitlines()[2:]] == shipped


def test_readme_kvbudget_table_is_the_scripts_output():
    bench = _script("bench_kvbudget")
    assert _section(os.path.join(ROOT, "README.md"), "bench_kvbudget") == bench.markdown(_results("kvbudget_cpu.json"))


def test_readme_llava_table_is_the_scripts_output():
    bench = _script("bench_llava")
    assert _section(os.path.join(ROOT, "README.md"), "bench_llava") == bench.markdown(_results("llava_cpu.json"))
