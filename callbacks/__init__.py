"""Lightning callbacks for weather-model training (installed as ``fcn3_lightning.callbacks``)."""
