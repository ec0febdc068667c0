"""The project's one logger: `from transfusion.log import log`; messages go to stderr.

    log.info("demo: drawing ...")     -> demo: drawing ...
    log.warning("step 7: ...")        -> warning: step 7: ...

Results a command is asked for (a JSON summary, a caption) go to stdout with print; everything about the run
itself (notes, warnings, progress lines) goes through here, so a caller can silence or redirect it in one place
(`logging.getLogger("transfusion")`). Under torchrun the trainer logs from rank 0 only.
"""

from __future__ import annotations

import logging
import sys


class _Prefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


class _StderrNow(logging.Handler):
    """Always the *current* sys.stderr (pytest and tqdm swap it), not the one at import time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed or broken stream must not kill the run
            self.handleError(record)


def _make() -> logging.Logger:
    logger = logging.getLogger("transfusion")
    if not logger.handlers:
        handler = _StderrNow()
        handler.setFormatter(_Prefix("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


log = _make()
