"""posconstr benchmarks: run them all with ``python -m benchmarks [--quick]``.

* ``projection_overhead``: projection inside the optimizer vs plain Adam.
* ``reparam_overhead``: a reparameterized Dense kernel vs a plain one.
* ``lbfgsb``: ``posconstr.minimize`` vs scipy and jaxopt on NNLS problems.
* ``nnls_batch``: ``posconstr.nnls`` vs loops of scipy's nnls and
  ``optax.nnls`` on batches and on unmixing (many right-hand sides).
* ``run_all``: runs them in turn, writes ``results/all.json``.
* ``_timing``, ``_xla_cost``: shared timing, reporting and XLA cost helpers.
"""
