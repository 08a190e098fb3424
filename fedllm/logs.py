"""Keep run logs readable: fedllm's own lines, without third-party progress bars and deprecations."""

from __future__ import annotations

import logging
import warnings


def quiet_third_party(handlers: list[logging.Handler] | None = None) -> None:
    """Silence transformers' progress bars and library deprecation noise; route fedllm logs to `handlers`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for module in ("transformers", "peft", "ray", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    ours = logging.getLogger("fedllm")
    if handlers is not None:
        ours.handlers = list(handlers)
        ours.propagate = False
    ours.setLevel(logging.INFO)
