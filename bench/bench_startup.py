#!/usr/bin/env python3
"""Start-up of ``qtool run`` on the CPU reference backend: wall time outside ``import torch`` and generation
(issue 16, target 6, CPU half: remainder <= 1.5 s).

Contract: ``python3 bench/bench_startup.py CHECKPOINT [--runs 3] [--prompt TEXT] [--baseline-tree DIR] [--profile N]
[--importtime N] [--no-pyc] [--json OUT]``. One untimed warm-up run (page cache, .pyc), then RUNS timed runs of
``python -m qtool run CHECKPOINT PROMPT --backend torch --max-new-tokens 1 --json`` as a fresh process each:
- wall: the subprocess's wall time (interpreter start to exit);
- generation: ``stats.prefill_s + decode_s + graph_s`` from the run's own JSON;
- import torch: a fresh ``python -c "import torch"`` timed in-process (perf_counter around the import), run
  right after each CLI run, so both see the same machine load;
- remainder = wall - import torch - generation; also the child's CPU seconds (user + sys, from rusage).
Every process gets bytecode caches as an installed package has them: PYTHONDONTWRITEBYTECODE is dropped and
PYTHONPYCACHEPREFIX points at a temporary folder (nothing is written into the trees), so the warm-up run
compiles each module once and the timed runs load .pyc files (``--no-pyc`` keeps the environment as it is; with
PYTHONDONTWRITEBYTECODE set, every run compiles qtool's modules again). Prints each run and the medians.
``--baseline-tree DIR`` (another checkout, e.g. /work/main) runs its ``qtool``
the same way, alternating with this tree's run by run, so that both see the same machine load (the CPU is
shared), and prints its table first. ``--profile N`` adds one cProfile'd run and prints the N biggest cumulative
entries outside generation (cProfile inflates times; read it for shares); ``--importtime N`` adds one
``python -X importtime`` run and prints the N slowest top-level imports besides torch. Make the checkpoint with
``qtool quantize --model smollm2-135m --quant fp8 --kv-cache-quant nvfp4 -o /tmp/smol-fp8``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


PYC = {"root": None}     # the bytecode cache folder (mirrors absolute source paths); None with --no-pyc


def env_for(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if PYC["root"]:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = PYC["root"]
    return env


def cli_args(ckpt: str, prompt: str) -> list[str]:
    return ["-m", "qtool", "run", ckpt, prompt, "--backend", "torch", "--max-new-tokens", "1", "--json"]


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_run(ckpt: str, prompt: str, tree: Path = ROOT) -> dict:
    c0, t0 = child_cpu(), time.perf_counter()
    r = subprocess.run([sys.executable, *cli_args(ckpt, prompt)], capture_output=True, text=True, env=env_for(tree),
                       cwd=str(tree))
    wall, cpu = time.perf_counter() - t0, child_cpu() - c0
    if r.returncode != 0:
        sys.exit(f"qtool run failed (rc {r.returncode}): {r.stderr.strip()[-800:]}")
    st = json.loads(r.stdout)["stats"]
    gen = st["prefill_s"] + st["decode_s"] + st.get("graph_s", 0.0)
    it = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); import torch; "
                         "print(time.perf_counter() - t)"], capture_output=True, text=True, env=env_for(tree),
                        cwd=str(tree))
    torch_s = float(it.stdout.strip())
    return dict(wall_s=wall, cpu_s=cpu, import_torch_s=torch_s, generation_s=gen,
                remainder_s=wall - torch_s - gen, text=json.loads(r.stdout)["completions"][0]["text"])


def profile(ckpt: str, prompt: str, top: int) -> None:
    out = Path(tempfile.mkdtemp(prefix="qtool_startup_")) / "run.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), *cli_args(ckpt, prompt)], capture_output=True,
                   env=env_for(ROOT), cwd=str(ROOT), check=True)
    import pstats
    st = pstats.Stats(str(out))
    rows = []
    for (file, line, fn), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        rows.append((ct, f"{Path(file).name}:{line}({fn})" if file != "~" else fn))
    rows.sort(reverse=True)
    print(f"\ncProfile, {top} largest cumulative entries (total {rows[0][0]:.2f} s):")
    for ct, name in rows[:top]:
        print(f"  {ct:7.3f} s  {name}")


def importtime(ckpt: str, prompt: str, top: int) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", *cli_args(ckpt, prompt)], capture_output=True, text=True,
                       env=env_for(ROOT), cwd=str(ROOT))
    tops = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = (s.strip() for s in line[len("import time:"):].split("|"))
        if cum.isdigit() and not name.startswith(" ") and "." not in name.strip():
            tops.append((int(cum) / 1e6, name.strip()))
    tops.sort(reverse=True)
    print(f"\n-X importtime, slowest top-level imports (cumulative, inflated by -X importtime):")
    for s, name in tops[:top]:
        print(f"  {s:7.3f} s  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--baseline-tree", metavar="DIR", help="another checkout to time alternately (e.g. /work/main)")
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--importtime", type=int, default=0, metavar="N")
    ap.add_argument("--no-pyc", action="store_true", help="keep PYTHONDONTWRITEBYTECODE / the bytecode caches as set")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    if not a.no_pyc:
        PYC["root"] = tempfile.mkdtemp(prefix="qtool_startup_pyc_")
    trees = ([("baseline " + a.baseline_tree, Path(a.baseline_tree).resolve())] if a.baseline_tree else []) + \
        [("this tree", ROOT)]
    runs: dict = {name: [] for name, _ in trees}
    for _, tree in trees:
        one_run(a.checkpoint, a.prompt, tree)            # warm-up: page cache, .pyc files
    for _ in range(a.runs):
        for name, tree in trees:
            runs[name].append(one_run(a.checkpoint, a.prompt, tree))
    result = {}
    for name, _ in trees:
        print(f"\n{name}:\n| run | wall s | CPU s | import torch s | generation s | remainder s |\n|---|---|---|---|---|---|")
        for i, r in enumerate(runs[name]):
            print(f"| {i + 1} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['import_torch_s']:.2f} | "
                  f"{r['generation_s']:.2f} | {r['remainder_s']:.2f} |")
        med = {k: statistics.median(r[k] for r in runs[name])
               for k in ("wall_s", "cpu_s", "import_torch_s", "generation_s", "remainder_s")}
        print(f"| median | {med['wall_s']:.2f} | {med['cpu_s']:.2f} | {med['import_torch_s']:.2f} | "
              f"{med['generation_s']:.2f} | {med['remainder_s']:.2f} |")
        print(f"answer: {runs[name][-1]['text']!r}; remainder {med['remainder_s']:.2f} s (target <= 1.5)")
        result[name] = dict(runs=runs[name], median=med)
    print(f"loadavg (1 min) {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if a.importtime:
        importtime(a.checkpoint, a.prompt, a.importtime)
    if a.profile:
        profile(a.checkpoint, a.prompt, a.profile)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
