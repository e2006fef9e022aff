"""Turn a dense (MoE-LLaVA stage-2) checkpoint into a MoE one: the same as `megamod upcycle`.

    python tools/upcycle.py --input runs/stage2/checkpoints --output runs/stage3/init \
        --num-experts 4 --layer-freq 2
"""

import sys

from megamod.cli.upcycle import main

if __name__ == "__main__":
    sys.exit(main())
