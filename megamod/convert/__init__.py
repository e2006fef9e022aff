"""Hugging Face <-> megamod checkpoints: `megamod.convert.hf` holds the pure state-dict
adapters; `megamod convert` (`megamod.cli.convert`) does the files and the model around them.
"""
