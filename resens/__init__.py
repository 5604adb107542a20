"""resens: train deep residual networks, then take them apart (Veit et al. 2016)."""

import os
import signal
import threading
import warnings

#: SIGUSR1s that reached this process in a SLURM job before training listened for them
#: (``callbacks.training.SlurmRequeue`` takes them over).
EARLY_SIGNALS: list[int] = []


def _remember(signum: int, frame: object) -> None:
    EARLY_SIGNALS.append(signum)


if "SLURM_JOB_ID" in os.environ:
    # SLURM's time-limit warning may come at any moment, also while torch is being imported; its
    # default action would end the task. Recorded here, it is acted on once training runs.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _remember)
else:
    # Lightning suggests srun wherever the srun command exists, i.e. on every machine with Slurm
    # installed, also outside any allocation; there the hint is noise on stderr. Inside an
    # allocation it stays: there it may point at a real mistake.
    warnings.filterwarnings(
        "ignore", message="The `srun` command is available on your system but is not used"
    )
