"""Which device and how many worker processes a region trains with (checked before any spend).

Why a module of its own: the CLI checks `--device` / `--workers` before it loads a dataset, and
`run_local_round` checks them again before it takes the ledger lock, without importing the
distributed trainer.
"""

from __future__ import annotations

from fedfsd.errors import InputError

DEVICES = ("cpu", "cuda")


class DeviceUnavailable(InputError, ValueError):
    """The requested device does not exist here, or cannot hold the requested workers."""


class WorkersRefused(InputError, ValueError):
    """A worker count the trainer cannot run with (bad number or unsupported combination)."""


def check_device(device: str, workers: int = 1, *, private: bool = True) -> str:
    """The device to train on ("cpu", "cuda" or "cuda:N"); refuse what cannot run here.

    `cuda` needs torch.cuda.is_available(); several workers on CUDA need one GPU each (NCCL
    does not share one GPU between ranks). Several workers need private training: the
    non-private baseline is one process.
    """
    if workers < 1:
        raise WorkersRefused(f"--workers must be >= 1, not {workers}")
    if workers > 1 and not private:
        raise WorkersRefused("--workers > 1 trains privately only (the baseline is one process)")
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceUnavailable(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    if kind == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"--device {device}: no CUDA device is available here (torch.cuda.is_available() "
            "is false); train with --device cpu"
        )
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise DeviceUnavailable(f"--device {device}: only {count} CUDA device(s) here")
    if workers > 1 and (index or workers > count):
        raise DeviceUnavailable(
            f"--workers {workers} on CUDA needs {workers} GPUs (one per worker, device 'cuda'); "
            f"{count} here"
        )
    return device
