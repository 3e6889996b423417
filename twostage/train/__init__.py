"""Fine-tuning both stages: dataset builders over the store (examples.py) and the trainers."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def keep_stdout_clean(trainer: Any) -> None:
    """Route the trainer's per-step log dicts to logging instead of stdout.

    transformers prints them with ``print`` (PrinterCallback, tqdm off) or ``tqdm.write`` to stdout
    (ProgressCallback, tqdm on), which would corrupt ``--json`` output. The progress bar itself stays.
    """
    from transformers import PrinterCallback, ProgressCallback

    class _QuietProgress(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if state.is_world_process_zero and logs:
                logger.info("%s", {k: v for k, v in logs.items() if k != "total_flos"})

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_QuietProgress())
