"""sqllm: squeeze large language models to 2-4 bits per weight, and run them."""

__version__ = "0.1.0"
