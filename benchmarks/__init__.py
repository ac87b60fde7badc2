"""posconstr benchmarks: run them all with ``python -m benchmarks [--quick]``.

* ``projection_overhead``: projection inside the optimizer vs plain Adam.
* ``reparam_overhead``: a reparameterized Dense kernel vs a plain one.
* ``lbfgsb``: ``posconstr.minimize`` vs scipy and jaxopt on NNLS problems.
* ``nnls_batch``: ``posconstr.nnls`` vs loops of scipy's nnls and
  ``optax.nnls`` on batches and on unmixing (many right-hand sides).
* ``run_all``: runs them in turn, each in its own process.
* ``readme_tables``: the README's tables from the committed summaries.
* ``_timing`` (interleaved timing, machine, command line, raw JSON and
  summaries), ``_xla_cost``, ``_floors``, ``_nnls_*``: shared helpers.

Raw results go outside the checkout (``~/.cache/posconstr/benchmarks/`` or
``$POSCONSTR_BENCH_DIR``); only ``--summary`` writes ``results/NAME.json``.
"""
