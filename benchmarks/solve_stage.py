"""SqueezeLLM's solve stage on one block of a large model: this tree against an earlier commit, side by side.

The block is LLaMA-shaped (``benchmarks/scale.py``'s shapes, LLaMA-2-7B by default): seeded N(0, 0.02^2)
weights stored in bf16, as ``scale.py`` writes them, and a seeded Fisher-like sensitivity ``w^2 * z^2``
(``z`` standard normal). Each side solves the block's seven linears as the engine does:
``method.solve(w.float(), stats, cfg)``, then ``dequantize()`` (the engine writes the quantized weight
back), at torch's thread count. The solver's k-means (``weighted_kmeans``) is also timed alone on the
same inputs, so the table tells the k-means from everything around it.

The sides run in separate processes, in turn (A B A B ...), so both see the same hours of this shared
machine; the baseline is a ``git worktree`` of ``--baseline``. Both must produce the same tables and
codes, bit for bit: each side hashes its output, and the report says whether they agree.

    python benchmarks/solve_stage.py --baseline b46d3c1            # 7b block, 3 bits, 2 rounds
    python benchmarks/solve_stage.py --baseline b46d3c1 --bits 4 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEED = 0


def _block(shape_name: str) -> dict[str, Any]:
    """The seven linears of block 0 of ``shape_name``: name -> (bf16 weight, float32 Fisher)."""
    import torch

    from scale import SHAPES, random_tensor

    out = {}
    for name, shape in SHAPES[shape_name].block_tensors(0).items():
        if len(shape) != 2:
            continue
        w = random_tensor(name, shape, SEED)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(SEED + len(out)))
        out[name.rsplit(".", 2)[-2]] = (w, w.float() ** 2 * z**2)
    return out


def worker(src: str, shape_name: str, bits: int) -> dict[str, Any]:
    """Times the block's solve with the sqllm found under ``src`` (this process imports it from there)."""
    sys.path.insert(0, src)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import sqllm
    from sqllm.methods import LayerStats, get_method
    from sqllm.quant.kmeans import weighted_kmeans

    if not Path(sqllm.__file__).resolve().is_relative_to(Path(src).resolve()):
        raise SystemExit(f"imported sqllm from {sqllm.__file__}, not from {src}")
    method = get_method("squeezellm")
    cfg = method.config_cls(bits=bits)
    digest = hashlib.sha256()
    per_matrix: dict[str, Any] = {}
    mats = _block(shape_name)
    weighted_kmeans(*mats["k_proj"], 2**bits, fp16=True)  # builds (or loads) the library
    for name, (w, fisher) in mats.items():
        t = time.perf_counter()
        qm = method.solve(w.float(), LayerStats(name, fisher=fisher), cfg)
        qm.dequantize().to(w.dtype)
        total = time.perf_counter() - t
        t = time.perf_counter()
        weighted_kmeans(w.float(), fisher, 2**bits, fp16=True)
        kmeans = time.perf_counter() - t
        digest.update(qm.dense.lut.numpy().tobytes())
        digest.update(qm.dense.codes.numpy().tobytes())
        per_matrix[name] = {"shape": list(w.shape), "solve_s": total, "kmeans_s": kmeans}
    return {"per_matrix": per_matrix, "output_sha256": digest.hexdigest(), "threads": torch.get_num_threads()}


def _run_side(src: Path, shape_name: str, bits: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--worker", str(src), "--shape", shape_name, "--bits", str(bits)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the worker for {src} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per matrix, the least time over the rounds (the round least disturbed by other jobs)."""
    names = list(runs[0]["per_matrix"])
    best = {n: {k: min(r["per_matrix"][n][k] for r in runs) for k in ("solve_s", "kmeans_s")} for n in names}
    return {
        "per_matrix": {n: {"shape": runs[0]["per_matrix"][n]["shape"], **best[n]} for n in names},
        "block_solve_s": sum(b["solve_s"] for b in best.values()),
        "block_kmeans_s": sum(b["kmeans_s"] for b in best.values()),
        "rounds_block_solve_s": [sum(m["solve_s"] for m in r["per_matrix"].values()) for r in runs],
        "output_sha256": sorted({r["output_sha256"] for r in runs}),
        "threads": runs[0]["threads"],
    }


def render_markdown(doc: dict[str, Any]) -> str:
    from sqllm.report import markdown_table

    base, cur = doc["baseline"], doc["current"]
    rows = []
    for name, b in base["per_matrix"].items():
        c = cur["per_matrix"][name]
        rows.append([name, "x".join(map(str, b["shape"])), f"{b['solve_s']:.2f}", f"{c['solve_s']:.2f}",
                     f"{b['solve_s'] / c['solve_s']:.1f}x", f"{c['kmeans_s']:.2f}"])
    rows.append(["**block**", "", f"{base['block_solve_s']:.1f}", f"{cur['block_solve_s']:.1f}",
                 f"{base['block_solve_s'] / cur['block_solve_s']:.1f}x", f"{cur['block_kmeans_s']:.1f}"])
    same = base["output_sha256"] == cur["output_sha256"] and len(cur["output_sha256"]) == 1
    p, m = doc["protocol"], doc["machine"]
    return "\n".join([
        f"# SqueezeLLM {p['bits']}-bit solve of one {p['shape']} block: {doc['baseline_commit'][:8]} against "
        f"{doc['git_commit'][:8]}",
        "",
        markdown_table(["linear", "shape", f"solve s, {doc['baseline_commit'][:8]}", f"solve s, {doc['git_commit'][:8]}",
                        "speedup", "of which k-means s"], rows),
        "",
        f"Solve: `method.solve(w.float(), stats, cfg)` then `dequantize()`, as the engine runs each linear; "
        f"the k-means column times `weighted_kmeans` alone on the same inputs with this tree. {p['inputs']}. "
        f"Least time per linear over {p['rounds']} rounds, the two sides in separate processes in turn "
        f"(block totals per round: {', '.join(f'{s:.1f}' for s in base['rounds_block_solve_s'])} s before, "
        f"{', '.join(f'{s:.1f}' for s in cur['rounds_block_solve_s'])} s after). torch threads: {cur['threads']}. "
        f"Tables and codes {'identical, bit for bit, on both sides' if same else 'DIFFER between the sides'} "
        f"(sha256 of every LUT and code). Machine: {m['cpu']}, {m['cores']} cores; load average "
        f"{m['loadavg_start']} at the start, {m['loadavg_end']} at the end.",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="commit to compare against (required unless --worker)")
    p.add_argument("--shape", default="7b", help="a shape of benchmarks/scale.py (default 7b)")
    p.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", metavar="SRC", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.shape, a.bits)))
        return
    if not a.baseline:
        p.error("--baseline is required")
    from scale import SHAPES  # only here: a worker must import sqllm from its own tree first

    if a.shape not in SHAPES:
        p.error(f"--shape {a.shape!r} is not one of benchmarks/scale.py's shapes: {', '.join(SHAPES)}")
    sys.path.insert(0, str(ROOT / "src"))
    from sqllm.report import git_commit, machine_info

    base_commit = subprocess.run(["git", "rev-parse", a.baseline], cwd=ROOT, capture_output=True, text=True)
    if base_commit.returncode != 0:
        print(f"solve_stage: {a.baseline!r} is not a commit of this repository", file=sys.stderr)
        sys.exit(2)
    machine = {**machine_info(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), base_commit.stdout.strip()],
                       cwd=ROOT, check=True)
        try:
            for r in range(a.rounds):
                for side, src in (("baseline", tree / "src"), ("current", ROOT / "src")):
                    runs[side].append(_run_side(src, a.shape, a.bits))
                    print(f"round {r + 1} {side}: block "
                          f"{sum(m['solve_s'] for m in runs[side][-1]['per_matrix'].values()):.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    doc = {
        "protocol": {"shape": a.shape, "bits": a.bits, "rounds": a.rounds,
                     "inputs": f"block 0 of benchmarks/scale.py's {a.shape} checkpoint (seed {SEED}: N(0, 0.02^2) "
                               "in bf16), Fisher w^2 z^2 with z seeded standard normal; squeezellm defaults, dense"},
        "machine": machine,
        "git_commit": git_commit(str(ROOT)),
        "baseline_commit": base_commit.stdout.strip(),
        "baseline": _summary(runs["baseline"]),
        "current": _summary(runs["current"]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"solve-stage-{a.shape}-{a.bits}bit"
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(render_markdown(doc))
    print(render_markdown(doc))


if __name__ == "__main__":
    main()
