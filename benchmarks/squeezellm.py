"""SqueezeLLM on SmolLM2-135M: 4/3-bit dense-only and dense-and-sparse (0.05% / 0.45%), against RTN
per channel (the same one-LUT-or-grid-per-row budget).

    python benchmarks/squeezellm.py     # writes results/squeezellm.json and results/squeezellm.md

The Fisher pass runs once and is cached (``sqllm sensitivity`` writes the same file format).
"""

from __future__ import annotations

from common import FISHER_CALIB, MODEL, WIKI_VALID, run, write_report
from sqllm.data import calibration_windows
from sqllm.engine.fisher import compute_fisher, save_fisher
from sqllm.models import cache_dir, linear_names, load_model


def fisher_file() -> str:
    path = cache_dir() / f"fisher-{MODEL}-{FISHER_CALIB['nsamples']}x{FISHER_CALIB['calib_seqlen']}.safetensors"
    if not path.is_file():
        model, tok = load_model(MODEL)
        windows = calibration_windows(tok, str(WIKI_VALID), FISHER_CALIB["nsamples"], FISHER_CALIB["calib_seqlen"],
                                      FISHER_CALIB["seed"])
        fisher = compute_fisher(model, linear_names(model), windows)
        save_fisher(str(path), fisher, {"model": MODEL, **{k: str(v) for k, v in FISHER_CALIB.items()}})
    return str(path)


def configs() -> list[tuple[str, str, dict]]:
    """(label, method, options) of every row; SqueezeLLM rows carry the cached Fisher file."""
    fisher = {"fisher": fisher_file()}
    return [
        ("RTN 4-bit per channel", "rtn", dict(bits=4)),
        ("SqueezeLLM 4-bit dense-only", "squeezellm", dict(bits=4, **fisher)),
        ("SqueezeLLM 4-bit 0.45% sparse", "squeezellm", dict(bits=4, sensitive_pct=0.05, outlier_pct=0.40, **fisher)),
        ("RTN 3-bit per channel", "rtn", dict(bits=3)),
        ("SqueezeLLM 3-bit dense-only", "squeezellm", dict(bits=3, **fisher)),
        ("SqueezeLLM 3-bit 0.05% sparse", "squeezellm", dict(bits=3, sensitive_pct=0.05, **fisher)),
        ("SqueezeLLM 3-bit 0.45% sparse", "squeezellm", dict(bits=3, sensitive_pct=0.05, outlier_pct=0.40, **fisher)),
    ]


if __name__ == "__main__":
    rows = []
    for label, method, options in configs():
        rows.append(run(label, method, **options))
        # rewritten after every row, so that an interrupted run still leaves its finished rows
        write_report("squeezellm", "SqueezeLLM: Fisher-weighted LUTs and dense-and-sparse", rows,
                     "0.45% = 0.05% most Fisher-sensitive values + 0.40% largest-magnitude outliers, per matrix. "
                     "Bits/weight includes the fp16 LUT per row and the CSR sparse part (int32 index + fp32 value).")
