"""Benchmark metrics: text similarity (text.py), task answers (tasks.py), HumanEval execution (code.py)."""
