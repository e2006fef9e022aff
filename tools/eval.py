"""Answer and score a benchmark with a trained checkpoint: the same as `megamod eval`.

    python tools/eval.py --checkpoint runs/pmod/checkpoints --task pope \
        --questions llava_pope_test.jsonl --images val2014 --annotations coco_pope_random.json
"""

import sys

from megamod.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
