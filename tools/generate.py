"""Answer a prompt about images with a trained checkpoint: the same as `megamod generate`.

    python tools/generate.py --checkpoint runs/pmod/checkpoints --image photo.jpg \
        --prompt "What is in the picture?"
"""

import sys

from megamod.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
