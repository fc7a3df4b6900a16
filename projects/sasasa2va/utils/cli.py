"""argparse pieces shared by the command-line tools."""
from __future__ import annotations

import argparse

from mmengine.config import DictAction


class CfgOptionsAction(DictAction):
    """mmengine's ``--cfg-options key=value ...`` parser, with a usage error (not a traceback) for an
    item without ``=``."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if "=" not in v]
        if bad:
            parser.error(f"{option_string} {bad[0]!r}: expected key=value (e.g. train_cfg.max_epochs=1)")
        try:
            super().__call__(parser, namespace, values, option_string)
        except (ValueError, SyntaxError) as exc:
            raise argparse.ArgumentError(self, f"cannot parse {values}: {exc}") from None
