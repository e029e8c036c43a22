"""sqllm: squeeze large language models to 2-4 bits per weight, and run them.

Importing sqllm registers its checkpoint format with transformers, so that
``AutoModelForCausalLM.from_pretrained(folder)`` reads packed sqllm checkpoints.
"""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    try:
        from .hf import register
    except ImportError:  # an older transformers without the quantizer registry
        return
    register()


_register_with_transformers()
