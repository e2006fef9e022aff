"""megamod: distributed training of LLaVA-style multimodal LLMs on megatron-core."""

__version__ = "0.1.0"
