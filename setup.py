from setuptools import find_packages, setup

setup(
    name="megamod",
    version="0.1.0",
    description="Distributed training of LLaVA-style multimodal LLMs (MoE, MoD) on megatron-core",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["megamod", "megamod.*"]),
    package_data={"megamod.data": ["assets/*.json"]},
    install_requires=[
        # torch: install the build for your machine first (CPU: torch==2.13.0); any
        # 2.x that megatron-core accepts works, so pip never swaps the one you chose.
        "torch>=2.6,<3",
        "megatron-core==0.16.1",
        "psutil",  # megatron-core's dist_checkpointing imports it without declaring it
        "numpy",
        "pyyaml",
        "pillow",
        "tensorboard",
        "braceexpand",  # data.train_shards brace patterns
        "tokenizers",
        "transformers",
        # Llama/Vicuna tokenizer.model folders (no tokenizer.json), as lmsys ships them. Below
        # 0.2.3, whose generated protobuf code refuses protobuf < 7, which lmms-eval's wandb
        # pin (protobuf < 7) installs: transformers then fails over to tiktoken and dies.
        "sentencepiece<0.2.3",
        "protobuf",  # transformers reads tokenizer.model through it when converting to a fast tokenizer
        "safetensors",  # megamod convert reads and writes Hugging Face checkpoints
        "scikit-image",  # the bundled tiny data set's real images
        "tqdm",
        "einops",
    ],
    extras_require={
        # webdataset: tests check that its reader takes our shards.
        "test": ["pytest", "nvidia-dali-cuda120", "webdataset"],
        "gpu": ["nvidia-dali-cuda120", "transformer-engine[pytorch]"],
        # `lmms-eval --model megamod` (megamod/eval/lmms_model.py); lmms-eval 0.7.3 imports
        # filelock._api, which filelock 4.3 removed.
        "lmms": ["lmms-eval>=0.7,<0.8", "filelock<4.3"],
    },
    entry_points={
        "console_scripts": ["megamod=megamod.__main__:main"],
        "lmms_eval.models": ["megamod=megamod.eval.lmms_model:manifest"],
    },
)
