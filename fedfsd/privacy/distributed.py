"""Vehicle-level DP-SGD over several worker processes of one region, with one worker's guarantee.

Why: one process trains with one thread; a region with more cores (or GPUs) should use them
without changing the mechanism the accountant describes. Each step:

1. rank 0 Poisson-samples vehicles over the WHOLE fleet and draws their frame rows, with the
   same generator and the same calls as one worker (`VehicleDPSGD.sample_vehicles`,
   `VehicleFrames.sample_rows`), and broadcasts the vehicle indices and rows;
2. vehicle v belongs to worker v mod N: each worker reads only its own sampled vehicles' rows
   from the loaded arrays (no dataset copy: CPU workers are forked and share the arrays
   copy-on-write) and computes their clipped per-vehicle gradient sum (each vehicle clipped once,
   by its owner);
3. one all-reduce SUM of the clipped sums; rank 0 alone adds the noise (Opacus' optimizer with
   the same torch.Generator as one worker: one draw per parameter per step), scales by the
   expected batch, steps, and broadcasts the new parameters, so every worker holds the same model;
4. rank 0's accountant records the step exactly as one worker's would; only the calling process
   (which holds the ledger lock) records and releases, after every worker has finished.

So N workers compute what one worker computes, up to float summation order. A worker that fails
stops the others; the round then raises and nothing is recorded or released.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfsd.config import DPParams
from fedfsd.errors import EnvironmentFault
from fedfsd.privacy.device import check_device
from fedfsd.privacy.ledger import fault_point

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedfsd.data.frames import VehicleFramesLike

History = list[tuple[float, float, int]]
# A collective that waits longer than this means a peer is gone (the parent watches the workers
# and stops them at once; this bounds only a worker whose parent and peers vanished together).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class WorkerFailed(EnvironmentFault, RuntimeError):
    """A training worker died or raised: the round failed, nothing was recorded or released."""

    border_reason = "region training failed"


@dataclass
class DistributedResult:
    """What rank 0 trained (weights on the CPU) and the accountant history it recorded."""

    weights: dict[str, np.ndarray]
    history: History
    method: str
    losses: list[float]
    seconds: float
    trace: list[dict[str, Any]] = field(default_factory=list)
    # CPU seconds of each worker's training loop, by rank (benchmarks: the critical path)
    worker_cpu_s: list[float] = field(default_factory=list)


@dataclass
class _Job:
    """Everything a worker needs (inherited by fork; pickled for spawn)."""

    frames: Any
    model_name: str
    global_weights: dict[str, np.ndarray]
    params: DPParams
    history: History
    accounted: int
    method: str
    seed: int | None
    device: str
    workers: int
    store: str  # file:// rendezvous path (no port to race for)
    trace: bool


# Test hook: while `tracing()` is active, workers record what each one clipped and how many
# noise draws each made per step. Counting wrappers around the real functions, off by default.
_TRACING = False


@contextlib.contextmanager
def tracing() -> Iterator[list[dict[str, Any]]]:
    """Collect the workers' per-step records (vehicles clipped, rows clipped, noise draws)."""
    global _TRACING
    events: list[dict[str, Any]] = []
    _TRACING = True
    _SINKS.append(events)
    try:
        yield events
    finally:
        _TRACING = False
        _SINKS.remove(events)


_SINKS: list[list[dict[str, Any]]] = []


def train_distributed(
    frames: VehicleFramesLike,
    model_name: str,
    global_weights: dict[str, np.ndarray],
    params: DPParams,
    history: History,
    accounted: int,
    *,
    workers: int,
    method: str = "auto",
    seed: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> DistributedResult:
    """params.steps private steps over `workers` processes (see module doc); raises WorkerFailed.

    CPU workers are forked (gloo on loopback); CUDA workers are spawned, one GPU each (NCCL).
    """
    import torch.multiprocessing as tmp

    device = check_device(device, workers)
    cuda = device.startswith("cuda")
    method_ctx = "spawn" if cuda else "fork"  # CUDA cannot be forked; fork shares the arrays
    mp = tmp.get_context(method_ctx)
    if not cuda:
        _import_before_fork()
    results: Any = mp.Queue()
    with tempfile.TemporaryDirectory(prefix="fedfsd-workers-") as tmpdir:
        job = _Job(
            frames=frames,
            model_name=model_name,
            global_weights=global_weights,
            params=params,
            history=[tuple(h) for h in history],  # type: ignore[misc]
            accounted=accounted,
            method=method,
            seed=seed,
            device=device,
            workers=workers,
            store=f"file://{os.path.join(tmpdir, 'store')}",
            trace=_TRACING,
        )
        ctx = tmp.start_processes(
            _worker, args=(job, results), nprocs=workers, join=False, daemon=True,
            start_method=method_ctx,
        )  # fmt: skip
        try:
            out = _collect(ctx, results, params.steps, progress)
        except WorkerFailed:
            raise
        except Exception as err:  # a worker's exception arrives as ProcessRaisedException
            raise WorkerFailed(f"training worker failed: {_last_line(err)}") from err
        finally:
            _stop(ctx.processes)
            with contextlib.suppress(Exception):
                results.close()
    for sink in _SINKS:
        sink.extend(out.trace)
    return out


def _import_before_fork() -> None:
    """Import what every worker uses once, here: forked workers inherit the modules instead of
    each importing torch.distributed and Opacus (about a CPU-second each) at every round."""
    import opacus.accountants  # noqa: F401
    import opacus.optimizers  # noqa: F401
    import torch.distributed  # noqa: F401

    import fedfsd.models  # noqa: F401
    import fedfsd.privacy.dpsgd  # noqa: F401
    import fedfsd.privacy.objective  # noqa: F401
    import fedfsd.privacy.pervehicle  # noqa: F401


def _collect(
    ctx: Any, results: Any, steps: int, progress: Callable[[int, int], None] | None
) -> DistributedResult:
    """Relay rank 0's progress; return its result once every worker has exited cleanly."""
    got: dict[str, Any] = {"done": None, "trace": [], "cpu": {}}

    def handle(kind: str, payload: Any) -> None:
        if kind == "progress":
            if progress is not None:
                progress(payload, steps)
            if payload == steps // 2 + 1:
                fault_point("train")
        elif kind == "trace":
            got["trace"].extend(payload)
        elif kind == "cpu":
            got["cpu"][payload[0]] = payload[1]
        elif kind == "done":
            got["done"] = payload

    finished = False
    while not finished:
        try:
            handle(*results.get(timeout=0.2))
        except queue.Empty:
            finished = ctx.join(timeout=0, grace_period=1.0)  # raises when a worker failed
    with contextlib.suppress(queue.Empty):  # what was written just before the last exit
        while True:
            handle(*results.get(timeout=0.05))
    done: DistributedResult | None = got["done"]
    if done is None:
        raise WorkerFailed("training workers exited without a result")
    done.trace = got["trace"] + done.trace
    done.worker_cpu_s = [got["cpu"][r] for r in sorted(got["cpu"])]
    return done


def _stop(procs: list[Any]) -> None:
    """Terminate, then kill, every worker still alive: none outlives the round."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# -- inside a worker process ---------------------------------------------------------------------


def _worker(rank: int, job: _Job, results: Any) -> None:
    """One rank: join the group, train its share of every step, rank 0 returns the result."""
    import torch
    import torch.distributed as dist

    # The parent's handlers (the executor stops its loop on SIGTERM) are not ours: die on signals.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _watch_parent()
    torch.set_num_threads(1)
    cuda = job.device.startswith("cuda")
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=job.store,
        rank=rank,
        world_size=job.workers,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        _train_rank(rank, job, device, results)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _watch_parent() -> None:
    """SIGTERM this worker once the process that started it is gone (no orphans)."""
    from fedfsd.deploy.watchdog import PARENT_ENV, start_parent_watchdog

    os.environ[PARENT_ENV] = str(os.getppid())
    start_parent_watchdog(interval=0.5)


class _Counters:
    """Counting wrappers around the real clip-factor and noise functions (tracing only)."""

    def __init__(self) -> None:
        import opacus.optimizers.optimizer as opt
        import opacus.optimizers.optimizer_fast_gradient_clipping as fast

        from fedfsd.privacy import pervehicle

        self.clipped = 0
        self.noise = 0
        clip, noise = pervehicle.clip_factors, opt._generate_noise

        def counted_clip(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
            self.clipped += int(norms.shape[0])
            return clip(norms, clip_norm)

        def counted_noise(*a: Any, **k: Any) -> Any:
            self.noise += 1
            return noise(*a, **k)

        pervehicle.clip_factors = counted_clip
        opt._generate_noise = counted_noise
        fast._generate_noise = counted_noise

    def take(self) -> tuple[int, int]:
        out = (self.clipped, self.noise)
        self.clipped = self.noise = 0
        return out


def _train_rank(rank: int, job: _Job, device: str, results: Any) -> None:
    import torch

    from fedfsd.models import build_model, get_weights, set_weights
    from fedfsd.privacy.dpsgd import VehicleDPSGD
    from fedfsd.privacy.objective import model_kwargs

    frames, params = job.frames, job.params
    kw = model_kwargs(frames, job.model_name)
    model = build_model(job.model_name, frames.features.shape[1], frames.labels.shape[1], **kw)
    set_weights(model, job.global_weights)
    modality = "bev" if job.model_name == "bev_cnn" else "objects"
    # Rank 0's trainer is the one worker's trainer (sampler, generator, optimizer, accountant);
    # the others only use its model, loss and method choice.
    trainer = VehicleDPSGD(
        model, params, frames.n_vehicles, private=rank == 0, method=job.method,  # type: ignore[arg-type]
        history=job.history, modality=modality, seed=job.seed, device=device,
        accounted_vehicles=job.accounted, presummed=True,
    )  # fmt: skip
    if trainer.method not in ("ghost", "vmap"):
        raise ValueError(f"--workers > 1 supports methods ghost and vmap, not {trainer.method!r}")
    counters = _Counters() if job.trace else None
    trace: list[dict[str, Any]] = []
    plist = [p for p in trainer.model.parameters() if p.requires_grad]
    losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for s in range(params.steps):
        fault_point("worker-step", rank=rank, step=s)
        idx, rows = _broadcast_sample(rank, trainer, frames, params.frames_per_vehicle, device)
        mine = idx % job.workers == rank
        loss_sum = _clipped_sum(trainer, frames, rows[mine], modality, plist)
        flat = torch.cat([p.grad.reshape(-1) for p in plist] + [loss_sum.reshape(1)])  # type: ignore[union-attr]
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        if rank == 0:
            _unflatten_grads(flat[:-1], plist)
            trainer.optimizer.step()  # noise once, scale by the expected batch, account
            trainer.optimizer.zero_grad(set_to_none=True)
            if len(idx):
                losses.append(float(flat[-1]) / len(idx))
        _broadcast_params(plist)
        if counters is not None:
            clipped, noise = counters.take()
            trace.append(
                {"rank": rank, "step": s, "vehicles": idx[mine].tolist(), "clipped": clipped,
                 "noise_draws": noise, "sampled": idx.tolist() if rank == 0 else None}
            )  # fmt: skip
        if rank == 0:
            results.put(("progress", s + 1))
    seconds = time.perf_counter() - started
    results.put(("cpu", (rank, time.process_time() - cpu_started)))
    if trace:
        results.put(("trace", trace))
    if rank != 0:
        return
    trainer.check_sample_rate()
    with torch.no_grad():
        weights = get_weights(trainer.model.cpu())
    results.put(
        ("done", DistributedResult(weights, trainer.history, trainer.method, losses, seconds))
    )


def _broadcast_sample(
    rank: int, trainer: Any, frames: Any, k: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Rank 0 draws (vehicles, frame rows) exactly as one worker would; everyone receives them."""
    import torch
    import torch.distributed as dist

    if rank == 0:
        idx = trainer.sample_vehicles()
        rows = frames.sample_rows(idx, k, trainer.rng)
        payload = torch.as_tensor(np.concatenate([idx[:, None], rows], axis=1), device=device)
        size = torch.tensor([payload.shape[0]], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if rank != 0:
        payload = torch.zeros((int(size), k + 1), dtype=torch.int64, device=device)
    if int(size):
        dist.broadcast(payload, src=0)
    arr = payload.cpu().numpy()
    return arr[:, 0], arr[:, 1:]


def _clipped_sum(
    trainer: Any, frames: Any, rows: np.ndarray, modality: str, plist: list[nn.Parameter]
) -> torch.Tensor:
    """Write Σ clip(∇L_v) over this worker's sampled vehicles into p.grad; return Σ L_v."""
    import torch

    from fedfsd.privacy.pervehicle import ghost_clipped_sum, vmap_clipped_sum

    x, y, mask = (torch.as_tensor(a).to(trainer.device) for a in frames.gather_rows(rows, modality))
    model, clip = trainer.model, trainer.params.clip_norm
    model.train()
    model.zero_grad(set_to_none=True)
    if len(rows) == 0:
        for p in plist:
            p.grad = torch.zeros_like(p)
        return torch.zeros((), device=trainer.device)
    if trainer.method == "ghost":
        losses, _ = ghost_clipped_sum(model, x, y, mask, clip, trainer._loss)
    else:
        summed, losses, _ = vmap_clipped_sum(model, x, y, mask, clip, trainer._loss)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.grad = summed[n].detach()
    return losses.detach().sum()


def _unflatten_grads(flat: torch.Tensor, plist: list[nn.Parameter]) -> None:
    at = 0
    for p in plist:
        n = p.numel()
        p.grad = flat[at : at + n].view_as(p).clone()
        at += n


def _broadcast_params(plist: list[nn.Parameter]) -> None:
    """Every worker takes rank 0's stepped parameters (one broadcast of the flat vector)."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in plist])
        dist.broadcast(flat, src=0)
        at = 0
        for p in plist:
            n = p.numel()
            p.copy_(flat[at : at + n].view_as(p))
            at += n
