"""Describe a checkpoint, and where its MoE routers send tokens: the same as `megamod inspect`.

    python tools/inspect_checkpoint.py runs/stage3/checkpoints --routing --data tiny

Not called inspect.py: run as a script, this file's folder comes first on sys.path and
an inspect.py there would shadow the standard library's `inspect` for every import.
"""

import sys

from megamod.cli.inspect import main

if __name__ == "__main__":
    sys.exit(main())
