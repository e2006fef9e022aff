"""Benchmark evaluation: tasks (prompt suffixes, ground truth), question/annotation/answer
files in LLaVA's formats, and the benchmarks' official scoring as pure functions.

`megamod eval` (`megamod.cli.eval`) generates the answers and calls these; nothing here
loads a model.
"""
