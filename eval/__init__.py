"""WeatherBench2-compatible evaluation (installed as ``fcn3_lightning.eval``)."""
