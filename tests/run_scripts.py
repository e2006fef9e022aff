"""Runs several worker scripts one after another in this one process, each as `__main__`
with its own argv, for tests.launcher.launch_scripts: one start of megatron-core (~10 s a
rank on 2 cores) for all of them. `python tests/run_scripts.py JOB...`, each JOB a JSON
list `[SCRIPT, ARG...]`. The scripts share the rank's process group (whichever made it
first); each starts without megatron-core's parallel state, as in a launch of its own.
"""

from __future__ import annotations

import json
import runpy
import sys

from megatron.core import parallel_state

if __name__ == "__main__":
    for job in sys.argv[1:]:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        sys.argv = json.loads(job)
        runpy.run_path(sys.argv[0], run_name="__main__")
