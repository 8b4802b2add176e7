"""The ledger's benchmark suite (issue 10): ``python -m benchmarks``, ``make bench``.

Benchmarks, not tests: nothing here runs in ``make test`` (pytest collects ``tests/`` only) and
no timing is asserted anywhere. Each scenario starts its own servers and measures ``ledger
serve`` black-box, beside a baseline measured in the same run (see the README's Performance
section and ``benchmarks/scenarios.py``).
"""
