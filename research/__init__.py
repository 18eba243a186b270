"""The research harness: the studies behind the defaults and the claims (Table 1 and `dmd-benchmark`'s runs,
the arms over training seeds, the cost and speed benchmarks, the fine-tune and CA-share studies, the run pool)
and the scripts that retrain the demo's shipped teachers and classifiers.

Not installed (pyproject's `packages` leaves it out): it runs from a checkout, where an editable install maps
`decoupled_dmd` to the checkout, e.g. `python -m decoupled_dmd.research.arms run ...`. The product never imports
it (tests/test_lint.py checks).
"""
