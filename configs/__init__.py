"""The configs shipped with fcn3_lightning: this folder is installed as the package ``fcn3_lightning.configs``
(pyproject.toml), so that ``fit`` finds ``base.yaml`` after any install. Read and copy the YAML files here."""
