"""``python -m fcn3_lightning sweep``: Optuna hyperparameter search over any ``fit`` configuration.

One trial is one ``fit`` (run in the worker's process through the project's LightningCLI) with the sampled values
set in the resolved config; validation every ``report_every_n_steps`` steps reports the objective to Optuna, whose
pruner may stop the trial early. Several workers share one study through its storage (SQLite, a journal file or an
RDB URL); each trial is an MLflow run nested under the study's parent run.

Modules: :mod:`.space` (the search-space file), :mod:`.fitconfig` (fit configs resolved and checked like ``fit``
does), :mod:`.storage` (Optuna storages and the cross-process lock), :mod:`.heartbeat` (dead workers' trials end
as FAIL), :mod:`.folder` (which study a sweep folder belongs to), :mod:`.objective` (one trial = one fit),
:mod:`.tracking` (MLflow), :mod:`.plots`, :mod:`.study` (the worker loop) and :mod:`.cli`.
"""
