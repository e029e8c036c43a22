"""Dataset of the ``sqllm_tiny_mc`` lm-eval task: the JSONL file beside this module, as a ``test`` split.

lm-eval calls :func:`load` with the task's metadata and ``dataset_kwargs`` as keyword arguments.
"""

from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("sqllm_tiny_mc.jsonl")


def load(**_: Any) -> Any:
    """``DatasetDict`` with one ``test`` split of {question, choices, answer} rows."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA)})
