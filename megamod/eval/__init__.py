"""Benchmark evaluation: tasks (prompt suffixes, ground truth), question/annotation/answer
files in LLaVA's formats (MMBench's TSV in `mmbench`), and the benchmarks' official
scoring as pure functions; `answer` generates the answers, in one process or split over
data-parallel ranks; `lmms_model` is the lmms-eval model (imported by lmms-eval only).

`megamod eval` (`megamod.cli.eval`) ties them together.
"""
