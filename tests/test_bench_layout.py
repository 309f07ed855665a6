"""bench/ as a user finds it: the one GPU script runs every kind of job on CPU (SMOKE=1), the modules import without a
circle, the lab's README names every tool it holds, and every link into bench/RESULTS.md lands on a section."""

from __future__ import annotations

import ast
import os
import re
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the real thing (bench/gpu.sh)")


@cpu_only
def test_gpu_script_smoke_lanes_tools_and_world_size(tmp_path):
    """bench/gpu.sh with SMOKE=1 and two lanes: a measurement job, a tool job (the step profile), a command line and
    a world-size job (after the lanes); each job's files land in its folder and the last table shows each."""
    jobs = ["k: --kernels rms_norm", "prof: profile --variant hf_eager --warmup 1 --top 3",
            "lab: sh echo lab-out=$OUT", "ws: distributed --runs ddp:eager"]
    env = dict(os.environ, OUT=str(tmp_path), SMOKE="1", LANES="2", TOTAL_BUDGET="400")
    done = subprocess.run(["bash", os.path.join(BENCH, "gpu.sh"), *jobs], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=500)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    for name in ("k", "prof", "lab", "ws"):
        assert re.search(rf"== job {name} exit 0 at", out), (name, out[-3000:])
        assert f"######## {name}" in out
    # Lanes: k and lab on lane 0 ... prof on lane 1; the world-size job after both, with every GPU.
    assert "== job k (" in out and ", GPU 0)" in out and ", GPU 1)" in out
    assert out.index("== lanes done") < out.index("== job ws (")
    # The measurement job ran bench.run with its own budget and left its results; the table shows its rows.
    assert (tmp_path / "k" / "results.json").exists()
    assert re.search(r"kernel rms_norm +liger_fx +[0-9.]+ ms .* ok", out), out[-3000:]
    assert "of CPU op time (smoke) in one step" in out  # the profile tool ran in its CPU smoke mode
    assert f"lab-out={tmp_path / 'lab'}" in out  # a command line gets its own $OUT
    assert re.search(r"x1_ddp_eager +[0-9]+ +[0-9]+", out) and (tmp_path / "ws" / "x1_ddp_eager.json").exists()
    assert (tmp_path / "gpu.log").read_text().count("######## ") == 4


def _bench_imports() -> dict[str, set[str]]:
    """module -> the bench modules it imports, at any depth of the file (function-level imports included)."""
    modules = {}
    for folder, _, files in os.walk(BENCH):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                modules[name] = path
    edges = {}
    for name, path in modules.items():
        deps = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bench":
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
        edges[name] = {d for d in deps if d in modules and d not in (name, "bench")}
    return edges


def test_no_import_circle_in_bench():
    edges = _bench_imports()
    assert "bench.e2e" in edges["bench.run"]  # the walk sees imports at all

    def cycle_from(start, path):
        for dep in sorted(edges[path[-1]]):
            if dep == start:
                return path + [dep]
            if dep not in path:
                found = cycle_from(start, path + [dep])
                if found:
                    return found
        return None

    circles = [c for c in (cycle_from(m, [m]) for m in sorted(edges)) if c]
    assert not circles, f"bench modules that import each other: {circles[0]}"


def _anchors(path: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    with open(path) as f:
        for line in f:
            m = re.match(r"#+ (.*)", line)
            if m:
                out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_lab_readme_names_every_tool_and_its_links_land():
    lab = os.path.join(BENCH, "lab")
    with open(os.path.join(lab, "README.md")) as f:
        readme = f.read()
    tools = sorted(f for f in os.listdir(lab) if f.endswith(".py") and f != "__init__.py")
    assert tools
    for tool in tools:
        assert f"| `{tool}` |" in readme, f"bench/lab/README.md has no line for {tool}"
    results = _anchors(os.path.join(BENCH, "RESULTS.md"))
    links = re.findall(r"\.\./RESULTS\.md#([^)]+)\)", readme)
    assert links and not [a for a in links if a not in results], [a for a in links if a not in results]


def test_results_where_we_stand_comes_first_and_every_row_links_to_its_section():
    path = os.path.join(BENCH, "RESULTS.md")
    with open(path) as f:
        text = f.read()
    sections = re.findall(r"^## (.*)$", text, flags=re.M)
    assert sections[0].startswith("Where we stand")
    table = text.split("## Where we stand", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| comparison")]
    assert rows
    anchors = _anchors(path)
    for row in rows:
        links = re.findall(r"\]\(#([^)]+)\)", row)
        assert links, f"a row of 'Where we stand' without a link to its section: {row}"
        assert all(a in anchors for a in links), (row, [a for a in links if a not in anchors])


def test_memory_peak_analysis_on_a_recorded_step():
    """`bench.run memory` needs CUDA to record; its analysis runs on any snapshot. A parameter alive before the step
    (100 bytes), then A (30, x.py) and B (40, y.py) allocated, A freed, C (10, x.py): the peak is 170 bytes at B's
    allocation, holding the parameter, B and A."""
    from bench import mem_peak

    def frames(file, line):
        return [{"filename": "/site-packages/torch/cuda/memory.py", "line": 1, "name": "skipped"},
                {"filename": file, "line": line, "name": "fn"}]

    events = [{"action": "alloc", "addr": 1000, "size": 30, "frames": frames("x.py", 1)},
              {"action": "alloc", "addr": 2000, "size": 40, "frames": frames("y.py", 2)},
              {"action": "free_requested", "addr": 1000, "size": 30, "frames": []},
              {"action": "alloc", "addr": 3000, "size": 10, "frames": frames("x.py", 1)}]
    segments = [{"address": a, "blocks": [{"size": n, "state": "active_allocated"}]}
                for a, n in ((0, 100), (2000, 40), (3000, 10))]
    r = mem_peak.analyse({"segments": segments, "device_traces": [events]})
    assert r["peak_gib"] * mem_peak.GiB == 170 and r["peak_event"] == 1 and r["peak_at"] == "y.py:2 fn"
    groups = {where.split(" (")[0].split(":")[0]: round(gib * mem_peak.GiB) for where, gib, _ in r["groups"]}
    assert groups == {"(alive before the step": 100, "y.py": 40, "x.py": 30}, groups
