"""The MoE parallelism references, computed once for the package (a launch costs ~10 s of
imports): tests/moe/parallel_worker.py's variants, each layout's gradients against one
process's."""

from __future__ import annotations

import pytest

from tests.launcher import REPO, parallel_worker_results


@pytest.fixture(scope="package")
def moe_parallel_results(tmp_path_factory) -> dict:
    """`grads_<variant>_<layout>` and `grads_<variant>_ref`, by name (see the worker)."""
    return parallel_worker_results(REPO / "tests" / "moe" / "parallel_worker.py",
                                   ("dropless", "capacity", "deepspeed"),
                                   tmp_path_factory.mktemp("moe_grads"))
