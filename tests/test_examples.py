"""Smoke tests of the examples: they run, end to end, in a few steps.

Behind the ``slow`` marker (``python -m pytest -q -n 2 -m slow``): together
they take about two minutes of CPU. The test extra installs what they import.
"""

import importlib.util
import os
import pathlib
import runpy
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow


def _load_example(name):
  """Imports ``examples/<name>.py`` from its path (examples/ is no package)."""
  module_name = f"_posconstr_example_{name}"
  spec = importlib.util.spec_from_file_location(module_name,
                                                EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module  # dataclasses look their module up here.
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[module_name]
    raise
  return module


def _table_rows(text, names):
  """The markdown rows of ``names`` in printed ``text`` (one each)."""
  rows = {name: [line for line in text.splitlines()
                 if line.startswith(f"| {name} |")] for name in names}
  assert all(len(r) == 1 for r in rows.values()), rows
  return {name: r[0] for name, r in rows.items()}


def _assert_figure_saved(results, out_dir, filename):
  """The example reports the figure's path under ``--out`` and wrote it."""
  figure = out_dir / filename
  assert results["figure"] == os.path.join(str(out_dir), filename)
  assert figure.is_file() and figure.stat().st_size > 0


def test_quickstart_smoke(tmp_path, capsys):
  quickstart = _load_example("quickstart")
  results = quickstart.main(["--steps", "5", "--out", str(tmp_path),
                             "--no-progress"])

  _assert_figure_saved(results, tmp_path, "quickstart.png")

  variants = results["variants"]
  names = ("adam", "adam+project", "adam+softplus", "adam+softplus+revive",
           "adam+relu", "adam+relu+revive")
  assert set(variants) == set(names)
  rows = _table_rows(capsys.readouterr().out, names)
  for name, metrics in variants.items():
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert np.isfinite(metrics["final_train_loss"])
    assert len(metrics["losses"]) == 5
    assert metrics["losses"][-1] < metrics["losses"][0], name
    assert f"| {metrics['test_accuracy']:.4f} |" in rows[name]
  # Projection: every applied kernel in the set, some exactly on the bound.
  projected = variants["adam+project"]
  assert np.all(projected["kernels"] >= 0.0)
  assert projected["bound_or_dead"] == np.mean(projected["kernels"] == 0.0)
  assert projected["bound_or_dead"] > 0.0
  # Softplus: applied kernels are softplus(latent) > 0, never exactly 0.
  softplus = variants["adam+softplus"]
  assert np.all(softplus["kernels"] > 0.0)
  latents = np.concatenate([np.ravel(softplus["params"][layer]["kernel"])
                            for layer in ("hidden", "logits")])
  np.testing.assert_allclose(np.sort(softplus["kernels"]),
                             np.sort(np.logaddexp(0.0, latents)), rtol=1e-5)
  assert softplus["bound_or_dead"] == pytest.approx(
      np.mean(1 / (1 + np.exp(-latents)) < quickstart.DEAD_TOL))
  # The reference is free: it has negative weights and no bound share.
  assert variants["adam"]["min_kernel"] < 0.0
  assert variants["adam"]["bound_or_dead"] is None
  # revive_dead counts its moves (none within 5 steps: patience 100); ReLU
  # latents: relu(latent) >= 0, dead where the latent is <= 0.
  for name, metrics in variants.items():
    revives = name.endswith("+revive")
    assert (metrics["revivals"] == 0) if revives else (
        metrics["revivals"] is None), name
  relu = variants["adam+relu"]
  latents = np.concatenate([np.ravel(relu["params"][layer]["kernel"])
                            for layer in ("hidden", "logits")])
  assert np.all(relu["kernels"] >= 0.0)
  assert relu["bound_or_dead"] == pytest.approx(np.mean(latents <= 0.0))


def test_lbfgs_network_smoke(tmp_path, capsys):
  lbfgs = _load_example("lbfgs_network")
  # Each L-BFGS step compiles for seconds: the two that make the point (the
  # softplus model's weights > 0 are checked by the quickstart test).
  names = ("lbfgsb", "lbfgs+clip")
  results = lbfgs.main(["--steps", "20", "--out", str(tmp_path),
                        "--no-progress", "--methods", *names])

  assert (tmp_path / "lbfgs_network.png").stat().st_size > 0
  out = capsys.readouterr().out
  assert "for mini-batches see stochastic_lbfgs.py" in out
  rows = _table_rows(out, names)
  methods = results["methods"]
  assert set(methods) == set(names)
  start = methods["lbfgsb"]["objectives"][0]
  for name, r in methods.items():
    assert r["iterations"] == 20 and len(r["objectives"]) == 21
    assert r["objectives"][0] == pytest.approx(start, rel=1e-5), name
    assert r["objective"] < 0.5 * start, name
    # At least one evaluation per iteration, plus the first one.
    assert r["fun_evals"] >= r["iterations"] + 1, name
    assert f"| {r['fun_evals']} |" in rows[name]
  bounded, clipped = methods["lbfgsb"], methods["lbfgs+clip"]
  assert np.all(bounded["kernels"] >= 0.0) and bounded["bound_or_dead"] > 0
  assert np.all(clipped["kernels"] >= 0.0)
  # The point of the example: real bounds beat clipping after optax.lbfgs.
  assert bounded["objective"] < clipped["objective"]
  # The biases are free: lbfgsb's bounds hold the kernels only.
  biases = np.concatenate([np.ravel(bounded["params"][layer]["bias"])
                           for layer in ("hidden", "logits")])
  assert biases.min() < 0.0


def test_examples_run_as_scripts(monkeypatch, capsys):
  """``python examples/<name>.py`` finds ``_common`` beside it.

  ``runpy`` runs the file as ``__main__``, as ``python`` does, in this
  process (no second import of jax), with examples/ off ``sys.path`` and
  ``_common`` unimported: the script must put its own folder on the path.
  """
  monkeypatch.setattr(sys, "path", [p for p in sys.path
                                    if pathlib.Path(p or ".").resolve()
                                    != EXAMPLES])
  monkeypatch.delitem(sys.modules, "_common", raising=False)
  script = EXAMPLES / "lbfgs_network.py"
  monkeypatch.setattr(sys, "argv", [str(script), "--help"])
  with pytest.raises(SystemExit) as done:
    runpy.run_path(str(script), run_name="__main__")
  assert done.value.code == 0
  assert "--methods" in capsys.readouterr().out
  assert sys.modules["_common"].__file__ == str(EXAMPLES / "_common.py")


def test_markdown_table_and_bad_columns():
  common = _load_example("_common")
  table = common.markdown_table(["a", "b"], [[1, "x"], [2, "y"]], "lc")
  assert table.splitlines() == ["| a | b |", "|---|:---:|", "| 1 | x |",
                                "| 2 | y |"]
  with pytest.raises(ValueError, match="2 columns"):
    common.markdown_table(["a", "b"], [[1]])


def test_icnn_smoke(tmp_path):
  icnn = _load_example("icnn")
  results = icnn.main(["--steps", "5", "--depths", "3", "--out", str(tmp_path),
                       "--no-progress"])

  _assert_figure_saved(results, tmp_path, "icnn.png")

  runs = results["runs"]
  assert {r["method"] for r in runs.values()} == {"he+proj", "icnn+proj",
                                                  "exp"}
  for r in runs.values():
    assert r["depth"] == 3 and len(r["losses"]) == 5
    assert np.isfinite(r["final_train_loss"])
    assert 0.0 <= r["test_accuracy"] <= 1.0
    # Every constrained model is an ICNN: Wz >= 0 and convex energies.
    assert r["min_wz"] >= 0.0
    assert r["convex"], (r["method"], r["convexity_gap"])
    assert r["convexity_gap"] <= icnn.CONVEXITY_TOL
  assert runs["depth 3 exp"]["min_wz"] > 0.0  # exp(latent) > 0
  # The check has teeth: the same network with free Wz is not convex.
  assert results["free_wz_gaps"][3] > 1e-2


def test_monotone_smoke(tmp_path):
  monotone = _load_example("monotone")
  results = monotone.main(["--steps", "10", "--out", str(tmp_path),
                           "--no-progress"])

  _assert_figure_saved(results, tmp_path, "monotone.png")

  variants = results["variants"]
  assert set(variants) == {"mlp", "monotone-abs", "monotone-proj"}
  for metrics in variants.values():
    assert np.isfinite(metrics["test_rmse"])
    assert len(metrics["train_losses"]) == 10
    assert metrics["grads_test"].shape[1] == 2  # bmi, bp
  for name in ("monotone-abs", "monotone-proj"):
    metrics = variants[name]
    assert metrics["constrained"]
    # Non-decreasing in bmi and bp at every test point and on the ICE grids.
    assert np.all(metrics["grads_test"] >= 0.0)
    assert metrics["neg_grad_frac_test"] == 0.0
    assert metrics["neg_grad_frac_ice"] == 0.0
    assert metrics["min_mono_kernel"] >= 0.0
    for grid, curves in metrics["ice"].values():
      assert np.all(np.diff(grid) > 0)
      assert np.all(np.diff(curves, axis=1) >= -1e-4 * np.abs(curves).max())
  assert variants["monotone-abs"]["min_mono_kernel"] > 0.0  # |W|
  assert variants["mlp"]["min_mono_kernel"] < 0.0  # Free weights.


def test_run_steps_without_tqdm(monkeypatch, capsys):
  common = _load_example("_common")
  monkeypatch.setattr(common, "_tqdm", None)  # The plain bar stands in.

  def step(total, i):
    return total + i, (float(i), 2.0 * i)

  total, metrics, seconds = common.run_steps(step, 0, 20, desc="count")
  assert total == sum(range(20)) and seconds >= 0.0
  np.testing.assert_array_equal(metrics, [[i, 2 * i] for i in range(20)])
  printed = capsys.readouterr().err.splitlines()
  assert printed[0].startswith("count: 1/20") and printed[-1].startswith(
      "count: 20/20 loss=19")


def test_nmf_smoke(tmp_path):
  nmf = _load_example("nmf")
  results = nmf.main(["--steps", "20", "--sweeps", "2", "--inner", "5",
                      "--iters", "10", "--out", str(tmp_path),
                      "--no-progress"])

  _assert_figure_saved(results, tmp_path, "nmf.png")

  methods = results["methods"]
  assert set(methods) == {"projected-adam", "anls-minimize", "anls-box_qp",
                          "sklearn-cd", "sklearn-mu"}
  x = nmf.load_data()
  start = methods["sklearn-cd"]["history"]["objectives"][0]
  for name, metrics in methods.items():
    w, h = metrics["W"], metrics["H"]
    assert w.shape == (x.shape[0], nmf.RANK) and h.shape == (nmf.RANK, 64)
    assert np.all(w >= 0.0) and np.all(h >= 0.0), name
    assert np.isfinite(metrics["objective"])
    assert np.isfinite(metrics["kkt_W"]) and np.isfinite(metrics["kkt_H"])
    # Every method descends from the same NNDSVDa start.
    objectives = metrics["history"]["objectives"]
    assert objectives[0] == start
    assert metrics["objective"] == pytest.approx(objectives[-1])
    assert objectives[-1] < objectives[0], name
  # The projections land exactly on the bound: exact zeros, no negatives.
  assert methods["projected-adam"]["zeros_H"] > 0.0
  assert methods["anls-minimize"]["zeros_H"] > 0.0
  # Exact ANLS: each H solve is a KKT point of its subproblem.
  assert methods["anls-box_qp"]["kkt_H"] <= 1e-8


def test_nmf_start_is_scikit_learns_nndsvda():
  nmf = _load_example("nmf")
  try:  # Private, but the only way to see scikit-learn's start.
    from sklearn.decomposition._nmf import _initialize_nmf
  except ImportError:
    pytest.skip("sklearn.decomposition._nmf._initialize_nmf is gone")
  x = nmf.load_data()
  w0, h0 = nmf.nndsvda(x, nmf.RANK, seed=3)
  w_ref, h_ref = _initialize_nmf(x, nmf.RANK, init="nndsvda", random_state=3)
  np.testing.assert_allclose(w0, w_ref, rtol=1e-12, atol=0)
  np.testing.assert_allclose(h0, h_ref, rtol=1e-12, atol=0)


def test_nmf_sklearn_curve_ends_at_the_tol_stopped_fit():
  """The warm-started curve ends where one ``NMF(tol=...)`` fit stops."""
  from sklearn import decomposition
  nmf = _load_example("nmf")
  x = nmf.load_data()
  w0, h0 = nmf.nndsvda(x, nmf.RANK, seed=0)
  result = nmf.run_sklearn(x, w0, h0, "cd", 2000, 1e-2, seed=0,
                           progress=False)
  model = decomposition.NMF(nmf.RANK, init="nndsvda", solver="cd",
                            beta_loss="frobenius", tol=1e-2, max_iter=2000,
                            random_state=0)
  w = model.fit_transform(x)
  assert 1 < model.n_iter_ < 2000  # Stopped by tol, not by max_iter.
  assert result["iterations"] == model.n_iter_
  ends = [n for n in (1, 2, 5, 10, 20, 50) if n < model.n_iter_]
  assert list(result["history"]["iterations"]) == [0, *ends, model.n_iter_]
  np.testing.assert_array_equal(result["W"], w)
  np.testing.assert_array_equal(result["H"], model.components_)


def test_coding_layer_smoke(tmp_path, capsys):
  coding = _load_example("coding_layer")
  results = coding.main(["--steps", "3", "--atoms", "6", "--out",
                         str(tmp_path), "--no-progress"])
  _assert_figure_saved(results, tmp_path, "coding_layer.png")
  runs = results["runs"]
  rows = _table_rows(capsys.readouterr().out, list(runs))
  assert set(runs) == {"nmf (fixed)", "task-driven"}
  for name, run in runs.items():
    d = run["dictionary"]
    assert d.shape == (64, 6) and np.all(d > 0), name
    np.testing.assert_allclose(np.linalg.norm(d, axis=0), 1.0, rtol=1e-5)
    assert 0.0 <= run["test_accuracy"] <= 1.0
    assert f"{run['test_accuracy']:.4f}" in rows[name]
  # Only the task-driven run moved its dictionary (the gradient reached it
  # through posconstr.nnls); the fixed one kept NMF's.
  fixed, learned = runs["nmf (fixed)"], runs["task-driven"]
  assert np.abs(learned["dictionary"] - fixed["dictionary"]).max() > 1e-4


def test_stochastic_lbfgs_smoke(tmp_path, capsys):
  stochastic = _load_example("stochastic_lbfgs")
  # Compilation dominates: on the MLP every variant but naive-lbfgsb (the
  # optimizer of multibatch-lbfgsb, the step of adam+projected), on the
  # ICNN the one whose step differs most.
  flags = ["--steps", "2", "--seeds", "2", "--out", str(tmp_path),
           "--no-progress"]
  mlp_variants = [v for v in stochastic.VARIANTS if v != "naive-lbfgsb"]
  icnn_variants = ["multibatch-lbfgsb"]
  runs = stochastic.main(flags + ["--problems", "icnn", "--variants",
                                  *icnn_variants])["runs"]
  results = stochastic.main(flags + ["--problems", "mlp", "--variants",
                                     *mlp_variants])

  _assert_figure_saved(results, tmp_path, "stochastic_lbfgs.png")
  assert (tmp_path / "stochastic_lbfgs.md").stat().st_size > 0
  runs.update(results["runs"])
  assert set(runs) == ({("mlp", v) for v in mlp_variants}
                       | {("icnn", v) for v in icnn_variants})
  out = capsys.readouterr().out
  for (problem, variant), seeds in runs.items():
    assert len(seeds) == 2
    for r in seeds:
      # The budget is met, and each curve starts at the same loss.
      assert r["epochs"][-1] >= 2.0 and r["epochs"][0] == 0.0
      assert r["loss"][0] == pytest.approx(seeds[0]["loss"][0], rel=0.5)
      assert np.all(np.diff(r["seconds"]) >= 0.0)
      assert 0.0 <= r["accuracy"][-1] <= 1.0
      # Feasible at every iterate; softplus weights are > 0.
      assert r["min_weight"] >= 0.0, (problem, variant)
      if variant == "lbfgs+softplus":
        assert r["min_weight"] > 0.0
    assert f"| {problem} | {variant} |" in out
  # The seeds differ (init and batches), the start is shared by variants.
  mlp = runs[("mlp", "adam+projected")]
  assert mlp[0]["loss"][0] != mlp[1]["loss"][0]
  assert mlp[0]["loss"][0] == pytest.approx(
      runs[("mlp", "multibatch-lbfgsb")][0]["loss"][0], rel=1e-6)
  # The stable variants made progress within two epochs.
  for key in (("mlp", "minibatch-lbfgsb"), ("mlp", "multibatch-lbfgsb"),
              ("mlp", "fullbatch-lbfgsb"), ("icnn", "multibatch-lbfgsb")):
    assert all(r["loss"][-1] < r["loss"][0] for r in runs[key]), key
