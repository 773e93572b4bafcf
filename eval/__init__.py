"""WeatherBench2-compatible evaluation (installed as ``fcn3_lightning.eval``): ``python -m fcn3_lightning evaluate``.

* :mod:`.harness`: the evaluation loop (:func:`~.harness.evaluate`);
* :mod:`.plan`: the run's :class:`~.plan.Options`; opening and checking the forecast and the truth, choosing what is
  scored and laying it out in channel groups and blocks (a :class:`~.plan.Plan`);
* :mod:`.blocks`: the channel groups and blocks; :mod:`.load`: reading the blocks (and finding NaN in them);
* :mod:`.score`: the metric objects of each group and lead range and their updates (the evals);
* :mod:`.collect`: the results as long-form frames, meta.json; :mod:`.memory`: glibc malloc tuning;
* :mod:`.cli`: the ``evaluate`` command (``add_cli``);
* :mod:`.data`: opening the stores lazily, grid checks, reading blocks of channels;
* :mod:`.climatology`: WB2 climatologies from a Zarr store or computed from the truth (WB2's definition);
* :mod:`.baselines`: persistence, climatology and probabilistic-climatology forecasts;
* :mod:`.derived`: wind speed and the wind-vector scores; :mod:`.seeps`: SEEPS as a metric class;
* :mod:`.fast`: fused (optionally compiled) pointwise work fed to the metric classes' ``update_from_means``;
* :mod:`.results`: CSV / netCDF / meta.json writers (atomic).
"""
