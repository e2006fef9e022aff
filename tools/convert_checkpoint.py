"""Convert Hugging Face LLaVA checkpoints to megamod checkpoints and back: the same as
`megamod convert`.

    python tools/convert_checkpoint.py --from hf --to megamod \
        --input llava-1.5-7b-hf --output runs/llava15/init --tp 2
"""

import sys

from megamod.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
