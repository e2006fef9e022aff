"""Runs several `megamod` commands one after another in this one process, for
tests.launcher.megamod_commands: `python tests/megamod_commands.py COMMANDS.json RESULTS.json`.

COMMANDS.json is a list of argv lists (each without the leading `megamod`); RESULTS.json
gets, for each, {"returncode", "stdout", "stderr"}: `megamod.__main__.main(argv)`'s exit
code (a SystemExit's, as argparse raises) and what it printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def run_one(argv: list[str]) -> dict:
    from megamod.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors and --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    commands_file, results_file = sys.argv[1:]
    with open(commands_file) as f:
        commands = json.load(f)
    results = [run_one(argv) for argv in commands]
    with open(results_file, "w") as f:
        json.dump(results, f)
