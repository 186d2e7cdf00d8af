"""What a person sees on the console: logging set-up, log lines that do not break a progress bar, quiet libraries.

A leaf module (imports nothing from mmdist). The command layer calls
:func:`configure` once (``mmdist --verbose`` or ``MMDIST_VERBOSE=1`` for the
verbose console). Log records and ``warnings`` go through ``tqdm.write``, so a
warning or a skipped sample prints above the bar instead of cutting it. Model
loaders wrap third-party loading in :func:`quiet_loading`: unless verbose,
transformers' load report, its log lines below ERROR and its bars (GGUF
dequantisation, "Loading weights") are hidden, and the loader logs one line of
its own with :func:`model_summary`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Optional

VERBOSE_ENV = "MMDIST_VERBOSE"
_verbose: Optional[bool] = None  # set by configure(); None: the environment decides


def is_verbose() -> bool:
    """True when third-party output is wanted: configure(verbose=True), else MMDIST_VERBOSE=1."""
    if _verbose is not None:
        return _verbose
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class TqdmLoggingHandler(logging.Handler):
    """Writes each record with ``tqdm.write``: above an open progress bar, which is redrawn below it."""

    def __init__(self, stream: Any = None):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def configure(verbose: Optional[bool] = None, level: int = logging.INFO) -> None:
    """Console logging for a command: one tqdm-safe handler on the root logger, ``warnings`` routed to it.

    ``verbose=None`` reads MMDIST_VERBOSE. Calling it again replaces the handler it added (never others').
    """
    global _verbose
    _verbose = bool(verbose) if verbose is not None else None
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, TqdmLoggingHandler):
            root.removeHandler(handler)
    handler = TqdmLoggingHandler()
    handler.setFormatter(
        logging.Formatter("%(message)s" if not is_verbose() else "%(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    # INFO lines (one per loaded model, ...) from the first rank only; every rank's warnings.
    rank = next(
        (os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID") if os.environ.get(k)), "0"
    )
    root.setLevel(level if rank == "0" or is_verbose() else logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn -> the 'py.warnings' logger -> the handler above
    if not is_verbose():
        # Third-party loggers that speak at INFO/DEBUG about their internals; their warnings still show.
        for name in ("urllib3", "filelock", "PIL", "matplotlib", "fsspec", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Import-time notices about optional kernels a run does not use (torchao: no Triton, no mxfp8/cutlass
        # library on a CPU; bitsandbytes: no 'kernels' package; torch: pytree registration deprecations).
        for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Around a transformers load: unless verbose, its report, INFO/WARNING lines and progress bars are hidden.

    Verbose, transformers' records go to the root logger (the tqdm-safe handler) instead of its own stderr handler.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if any(isinstance(h, TqdmLoggingHandler) for h in logging.getLogger().handlers):  # configure() ran
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    if is_verbose():
        yield
        return
    level, bars, gguf_tqdm = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # transformers' GGUF reader uses tqdm.auto directly (no switch turns it off): a disabled bar for the load.
    gguf_utils.tqdm = _disabled_tqdm
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        gguf_utils.tqdm = gguf_tqdm


def _disabled_tqdm(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    kwargs["disable"] = True
    return tqdm(iterable, *args, **kwargs)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def model_summary(what: str, model: Any, source: str, unused: Iterable[str] = (), why: str = "") -> str:
    """One line for a loaded model: what, from where, parameters,
    dtype, device, and which weights were not used and why.

    ``unused`` are checkpoint keys the model did not take; they are grouped by their first two name parts.
    """
    params = list(model.parameters())
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)  # ZeRO-3: the full count
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params}) or ["-"]
    devices = sorted({str(p.device) for p in params}) or ["-"]
    line = (f"loaded {what}: {type(model).__name__} from {source}, {_count(total)} parameters, "
            f"{'/'.join(dtypes)}, {'/'.join(devices)}")
    unused = sorted(unused)
    if unused:
        groups = sorted({".".join(key.split(".")[:2]) for key in unused})
        shown = ", ".join(groups[:4]) + (", ..." if len(groups) > 4 else "")
        line += f"; {len(unused)} checkpoint weights unused ({shown})" + (f": {why}" if why else "")
    return line
