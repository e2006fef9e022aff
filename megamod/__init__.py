"""megamod: distributed training of LLaVA-style multimodal LLMs on megatron-core."""

from megamod import cpu_compat as _cpu_compat

__version__ = "0.1.0"

_cpu_compat.compile_nothing()  # before anything imports megatron-core (a no-op with CUDA)
