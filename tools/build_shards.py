"""Build WebDataset shards from LLaVA or MIMIC-IT data: the same as `megamod build-shards`.

    python tools/build_shards.py --format llava --annotations llava_v1_5_mix665k.json \
        --images /data/llava --output /data/shards/mix665k
"""

import sys

from megamod.cli.build_shards import main

if __name__ == "__main__":
    sys.exit(main())
