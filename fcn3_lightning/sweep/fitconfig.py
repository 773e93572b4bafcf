"""Fit configurations resolved and checked exactly as ``python -m fcn3_lightning fit`` would, without running anything."""

from __future__ import annotations

import argparse
import copy
import warnings
from typing import Any

from jsonargparse import Namespace

from fcn3_lightning.cli import BASE_CONFIG, FCN3CLI, MLflowConfig
from fcn3_lightning.data.datamodule import WB2DataModule
from fcn3_lightning.sweep.space import SweepError
from fcn3_lightning.training.module import FCN3Module


class _ParseOnlyCLI(FCN3CLI):
    """FCN3CLI's parser and parsing, and nothing else: no seeding, no MLflow store, nothing instantiated."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


class FitConfig:
    """Parses ``fit`` arguments (``configs/base.yaml`` first, as ``fit`` does) into a plain dict and checks edited
    dicts against the same parser; errors are :class:`SweepError` naming what was parsed."""

    def __init__(self, args: list[str]):
        # args come from the sweep, not sys.argv: Lightning warns about both being present
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            cli = _ParseOnlyCLI(
                FCN3Module,
                WB2DataModule,
                save_config_callback=MLflowConfig,
                parser_kwargs={"default_config_files": [str(BASE_CONFIG)], "exit_on_error": False},
                run=False,
                args=args,
            )
        except argparse.ArgumentError as e:
            raise SweepError(f"fit options {args}: {e}") from e
        self.parser = cli.parser
        self.config = self._plain(cli.config)

    @staticmethod
    def _plain(ns: Namespace) -> dict[str, Any]:
        d = ns.clone().as_dict()
        for key in ("config", "__default_config__", "__path__"):  # where it came from, not what it is
            d.pop(key, None)
        return d

    def resolved(self) -> dict[str, Any]:
        """A copy of the resolved config, to edit."""
        return copy.deepcopy(self.config)

    def check(self, cfg: dict[str, Any], what: str) -> str:
        """Validate ``cfg`` as a complete fit config; returns it as the YAML ``fit --config`` reads."""
        try:
            ns = self.parser.parse_object(cfg)
        except (argparse.ArgumentError, ValueError, TypeError) as e:
            raise SweepError(f"{what}: {e}") from e
        return self.parser.dump(ns, skip_unset=False)
