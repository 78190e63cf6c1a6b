"""What Lightning and torch print that a reader of this framework's runs cannot act on, dropped for the
whole process when ``hstu`` is imported (lightning 2.6.6, torch 2.13):

* every Trainer's tip to install Lightning's cloud logger;
* torch's FutureWarning on ``isinstance(treespec, LeafSpec)``, raised by Lightning's pytree helper and by
  torch itself while exporting the scoring package, not by this code.
"""
from __future__ import annotations

import logging
import warnings


class _LitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


_LITLOGGER_TIP = _LitLoggerTip()


def drop_unactionable_notices() -> None:
    """Install both filters; calling it again adds nothing."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_LITLOGGER_TIP)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
