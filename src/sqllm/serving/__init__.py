"""Serving-engine integrations (optional extras).

``sqllm.serving.vllm_plugin`` is loaded by vLLM through the ``vllm.general_plugins`` entry point
(``pip install 'sqllm[vllm]'``); nothing else in sqllm imports it, so sqllm never needs vLLM.
"""
