"""Process helpers for jobs started by torchrun (tools/dist.sh, evaluation/dist_test.sh)."""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Under torchrun, have the kernel SIGKILL this worker when the launcher dies.

    torchrun starts every worker in its own session (``start_new_session=True``), so ``kill -9`` of the
    launcher or of its process group leaves the workers running as orphans: they keep training, writing
    checkpoints into a work dir that a rerun then also writes to. Linux only (``prctl(PR_SET_PDEATHSIG)``);
    a no-op elsewhere or outside torchrun. Returns whether the signal was armed.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as exc:
        logger.warning("could not tie this worker's life to the launcher (%s); kill the workers too when "
                       "you kill the launcher", exc)
        return False
    if os.getppid() == 1:  # the launcher died before the signal was armed
        os._exit(1)
    return True
