"""Large models on a small machine: random LLaMA-shaped bf16 checkpoints quantized with streamed weights.

``python benchmarks/scale.py build 7b`` writes a random LLaMA-2-7B-shaped checkpoint (bf16 safetensors
shards + ``model.safetensors.index.json``, the SmolLM2 tokenizer, vocabulary 49152) under ``/work/big``,
one shard at a time: at most one shard's tensors are in memory. ``python benchmarks/scale.py run 7b``
quantizes it (SqueezeLLM 3-bit, GPTQ 4-bit g128; 2 calibration windows of 256 tokens) and evaluates the
packed result, each in its own process, and records wall time per stage and peak RSS
(``benchmarks/results/scale.{json,md}``).

The weights are seeded normals times 0.02 (norms are ones), so activations stay finite through 40
blocks; perplexity is meaningless (about the vocabulary size), memory and time are what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BIG = Path(os.environ.get("SQLLM_BIG", "/work/big"))
VOCAB = 49152
INIT_STD = 0.02
SHARD_BYTES = 1024**3  # one shard in memory at a time while building


@dataclass(frozen=True)
class Shape:
    """A LLaMA geometry (the vocabulary is SmolLM2's, so its tokenizer serves every shape)."""

    hidden: int
    intermediate: int
    blocks: int
    heads: int
    kv_heads: int

    def block_tensors(self, b: int) -> dict[str, tuple[int, ...]]:
        """Names and shapes of decoder block ``b``'s parameters."""
        d, f, hd = self.hidden, self.intermediate, self.hidden // self.heads
        p = f"model.layers.{b}."
        return {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (self.kv_heads * hd, d),
            p + "self_attn.v_proj.weight": (self.kv_heads * hd, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Every parameter of the model in storage order: embeddings, blocks, final norm, head."""
        yield "model.embed_tokens.weight", (VOCAB, self.hidden)
        for b in range(self.blocks):
            yield from self.block_tensors(b).items()
        yield "model.norm.weight", (self.hidden,)
        yield "lm_head.weight", (VOCAB, self.hidden)

    def n_params(self) -> int:
        return sum(torch.Size(s).numel() for _, s in self.tensors())


SHAPES = {
    "1b": Shape(hidden=2048, intermediate=5632, blocks=22, heads=32, kv_heads=4),  # TinyLlama-1.1B
    "7b": Shape(hidden=4096, intermediate=11008, blocks=32, heads=32, kv_heads=32),  # LLaMA-2-7B
    "13b": Shape(hidden=5120, intermediate=13824, blocks=40, heads=40, kv_heads=40),  # LLaMA-2-13B
}


def llama_config(shape: Shape) -> dict:
    """``config.json`` of a LLaMA model of ``shape`` stored in bf16, with SmolLM2's special tokens."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.blocks,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "dtype": "bfloat16",
    }


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 ``shape``: ones for norm weights, else N(0, 0.02^2) from a generator seeded by ``seed`` and
    the name (each tensor is reproducible alone, whatever order the shards are written in)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen) * INIT_STD).to(torch.bfloat16)


def shard_plan(shape: Shape, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards of at most ``shard_bytes`` (bf16), in storage order."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in shape.tensors():
        nbytes = 2 * torch.Size(s).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += nbytes
    return shards


def tokenizer_folder() -> Path:
    from sqllm.models import resolve_model_path

    return Path(resolve_model_path("smollm2-135m"))


def build_checkpoint(name: str, dest: Path, *, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the random ``SHAPES[name]`` model to ``dest`` (skipped when already complete).

    Written into a temporary sibling and renamed, so an interrupted build never looks complete.
    """
    shape = SHAPES[name]
    if (dest / "model.safetensors.index.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    plan = shard_plan(shape, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(plan, 1):
        fname = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        tensors = {t: random_tensor(t, s, seed) for t, s in shard}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({t: fname for t in tensors})
        del tensors
        print(f"{name}: shard {i}/{len(plan)} written", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = tokenizer_folder()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok / f).is_file():
            shutil.copy(tok / f, tmp / f)
    (tmp / "shape.json").write_text(json.dumps({"name": name, **asdict(shape), "seed": seed,
                                                "init_std": INIT_STD, "params": shape.n_params()}))
    os.replace(tmp, dest)
    return dest


RESULTS = ROOT / "benchmarks" / "results"
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"
CALIB = {"nsamples": 2, "calib_seqlen": 256}
EVAL = {"seqlen": 256, "windows": 1}
RUNS = {
    "squeezellm-3bit": ["--method", "squeezellm", "--bits", "3"],
    "gptq-4bit-g128": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
    # no calibration: the quickest whole pass over a model's weights (read, quantize, write)
    "rtn-4bit-g128": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
}
DEFAULT_RUNS = ["squeezellm-3bit", "gptq-4bit-g128"]


def measured(argv: list[str], log: Path) -> dict:
    """Run ``argv`` in a child process (stdout+stderr to ``log``): wall seconds, the child's own peak
    RSS (from ``wait4``, not the maximum over all children so far) and its exit code."""
    import subprocess
    import time

    # the child runs this checkout's sqllm, as the parent does, whatever an installed copy points at
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"argv": argv, "seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "exit_code": proc.returncode, "log": str(log)}


def run_shape(name: str, runs: list[str], out_root: Path, resume: bool = False) -> list[dict]:
    """Quantize the random ``name`` model with each of ``runs`` and evaluate the packed output.

    ``resume`` continues a killed quantization from its work folder (``sqllm quantize --resume``); the row
    then records it, because its wall time covers only the resumed part."""
    import json as _json

    from sqllm.report import git_commit, machine_info

    ckpt = BIG / f"llama-{name}-random"
    rows = []
    for run in runs:
        out = out_root / f"{name}-{run}"
        qjson, ejson = out_root / f"{name}-{run}.quantize.json", out_root / f"{name}-{run}.eval.json"
        row = {"shape": name, "params": SHAPES[name].n_params(), "run": run, "commit": git_commit(str(ROOT)),
               "load_average": os.getloadavg()[0], "cpu": machine_info()["cpu"], "calibration": CALIB, "eval": EVAL,
               "threads": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)}  # what the children get
        cli = [sys.executable, "-m", "sqllm.cli"]
        q = measured([*cli, "quantize", str(ckpt), *RUNS[run], "--calib", str(WIKI / "wiki.valid.tokens"),
                      "--nsamples", str(CALIB["nsamples"]), "--calib-seqlen", str(CALIB["calib_seqlen"]),
                      "--output", str(out), "--resume" if resume else "--overwrite", "--json", str(qjson)],
                     out_root / f"{name}-{run}.quantize.log")
        row["quantize"] = {**q, "resumed": resume}
        if q["exit_code"] != 0:
            # a failed run measures nothing: keep the table's earlier row of this shape and run, if any
            tail = Path(q["log"]).read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
            sys.exit(f"{name} {run}: sqllm quantize exited with {q['exit_code']} ({q['log']}): {tail[0]}")
        summary = _json.loads(qjson.read_text())
        row["bits_per_weight"] = summary["bits_per_weight"]["total"]
        row["stages"] = summary["stages"]
        test_text = WIKI.parent / "wikitext-2-raw" / "wiki.test.raw"
        e = measured([*cli, "eval", str(out), "--ppl", str(test_text),
                      "--seqlen", str(EVAL["seqlen"]), "--windows", str(EVAL["windows"]), "--json", str(ejson)],
                     out_root / f"{name}-{run}.eval.log")
        row["eval"] = {**EVAL, **e}
        if e["exit_code"] == 0:
            row["perplexity"] = _json.loads(ejson.read_text())["perplexity"]
        row["packed_mib"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
        rows.append(row)
        _save_row(row)
    return rows


def _save_row(row: dict) -> None:
    """Append ``row`` to results/scale.jsonl (one line per run; a rerun of the same shape and run
    replaces the older line) and rewrite results/scale.{json,md}."""
    import json as _json

    from sqllm.output import write_file
    from sqllm.report import machine_info, markdown_table

    def put(path: Path, text: str) -> None:  # a kill mid-write leaves the earlier file whole
        write_file(path, lambda tmp: tmp.write_text(text))

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "scale.jsonl"
    rows = [_json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rows = [r for r in rows if (r["shape"], r["run"]) != (row["shape"], row["run"])] + [row]
    put(path, "".join(_json.dumps(r) + "\n" for r in rows))
    doc = {"machine": machine_info(), "protocol": {"calibration": CALIB, "eval": EVAL,
                                                  "weights": f"random N(0, {INIT_STD}^2) bf16, norms 1"},
           "rows": rows}
    put(RESULTS / "scale.json", _json.dumps(doc, indent=2) + "\n")
    gib = 1 / 1024
    table = markdown_table(
        ["shape", "params", "run", "bits/weight", "quantize s", "quantize peak RSS GiB", "eval s", "eval peak RSS GiB",
         "stages (s)", "threads", "load avg", "CPU"],
        [[r["shape"], f"{r['params'] / 1e9:.2f}B", r["run"], f"{r.get('bits_per_weight', float('nan')):.3f}",
          f"{r['quantize']['seconds']:.0f}" + (" (resumed)" if r["quantize"].get("resumed") else ""),
          f"{r['quantize']['peak_rss_mib'] * gib:.2f}",
          f"{r['eval'].get('seconds', float('nan')):.0f}", f"{r['eval'].get('peak_rss_mib', float('nan')) * gib:.2f}",
          ", ".join(f"{k} {v:.0f}" for k, v in r.get("stages", {}).items()), r.get("threads", "-"),
          f"{r['load_average']:.1f}",
          r.get("cpu", "-")]
         for r in rows])
    m = doc["machine"]
    md = (f"# Large models: random LLaMA-shaped bf16 checkpoints quantized from disk\n\n{table}\n\n"
          f"Calibration: {CALIB['nsamples']} windows x {CALIB['calib_seqlen']} tokens of wiki.valid.tokens; "
          f"evaluation: {EVAL['windows']} window(s) x {EVAL['seqlen']} tokens of wiki.test.raw (perplexity of random "
          f"weights is meaningless; the runs measure memory and time). Peak RSS is each child process's own "
          f"(wait4). Vocabulary 49152 (SmolLM2's tokenizer). Machines: {m['cores']} cores, torch {m['torch']}, "
          f"the CPU of each run in the table (the machine under this project changes between sessions), "
          f"shared with other jobs (load average at each run's start in the table); threads: torch's intra-op threads in the "
          f"quantize and eval processes ('-': not recorded). A run marked '(resumed)' was "
          f"killed and continued with `--resume`: its seconds count only the resumed part.\n")
    put(RESULTS / "scale.md", md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write random checkpoints")
    b.add_argument("shapes", nargs="+", choices=list(SHAPES))
    b.add_argument("--dest", type=Path, default=BIG)
    r = sub.add_parser("run", help="quantize and evaluate built checkpoints, one child process per step")
    r.add_argument("shape", choices=list(SHAPES))
    r.add_argument("--runs", nargs="+", choices=list(RUNS), default=DEFAULT_RUNS)
    r.add_argument("--out", type=Path, default=BIG / "out")
    r.add_argument("--resume", action="store_true", help="continue killed runs from their work folders")
    a = p.parse_args(argv)
    if a.cmd == "build":
        for name in a.shapes:
            build_checkpoint(name, a.dest / f"llama-{name}-random")
    else:
        a.out.mkdir(parents=True, exist_ok=True)
        for row in run_shape(a.shape, a.runs, a.out, a.resume):
            print({k: row.get(k) for k in ("shape", "run", "bits_per_weight", "stages")},
                  row["quantize"]["peak_rss_mib"])


if __name__ == "__main__":
    main()
