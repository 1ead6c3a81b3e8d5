"""The decoder and everything around it: config, the model, HF folders, tokenizers, chat formats,
generation, LoRA, and where a model comes from (the embedded default, a folder, the hub).

Imports only the floor (clo/*.py); never train, translate or eval.
"""
