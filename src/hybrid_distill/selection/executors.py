"""Executors for independent jobs (layer-scoring candidates): in-process, local worker processes
(one per GPU), Ray, or Slurm through submitit.

Every executor has ``map(fn, jobs) -> list[JobOutcome]`` in job order. Failures fall in three kinds:

* transient (out of memory, a worker or node that died, I/O, a cluster time-out): retried ``retries`` times,
  then reported as the job's failure;
* the job's own failure (`CandidateFailure`, e.g. a candidate whose training diverged): reported at once, not
  retried (it would fail the same way);
* anything else (a bug, a bad setting): raised as `JobError` with the job's traceback — never counted as a
  failed candidate. Other jobs of the same batch still finish first. A job stopped at its deadline
  (`TimeLimitReached`) is raised as itself.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..cuda_allocator import configured_allocator_env
from ..errors import HybridDistillError, TimeLimitReached

logger = logging.getLogger(__name__)


class CandidateFailure(HybridDistillError):
    """A job failed in a way that retrying would repeat (e.g. its training diverged); selection goes on without it."""


class JobError(RuntimeError):
    """A job raised an error that is neither transient nor its own failure (a bug or a bad setting)."""


# Exception class names (also read off remote tracebacks) of failures worth a retry.
TRANSIENT_ERRORS = ("OutOfMemoryError", "BrokenProcessPool", "TimeoutError", "ConnectionError", "ConnectionResetError",
                    "BrokenPipeError", "WorkerCrashedError", "NodeDiedError", "RaySystemError", "ObjectLostError",
                    "UncompletedJobError", "ChildProcessError")


def _root_cause(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError wraps the job's exception
    return cause if isinstance(cause, BaseException) else err


def classify(err: BaseException) -> str:
    """``"transient"``, ``"failed"`` (the job's own failure) or ``"error"`` (see the module docstring)."""
    err = _root_cause(err)
    names = {c.__name__ for c in type(err).__mro__}
    text = str(err)
    last = text.strip().splitlines()[-1] if text.strip() else ""  # submitit: the remote traceback's last line
    if isinstance(err, CandidateFailure) or "CandidateFailure" in names or last.startswith("CandidateFailure"):
        return "failed"
    if names & set(TRANSIENT_ERRORS) or any(last.startswith(n) for n in TRANSIENT_ERRORS):
        return "transient"
    if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, PermissionError, NotADirectoryError,
                                                         IsADirectoryError)):
        return "transient"  # I/O on a shared filesystem
    if "CUDA error" in text or "NCCL" in text:
        return "transient"
    return "error"


@dataclass
class JobOutcome:
    """Result of one job: ``value`` on success, else ``error`` (message + traceback) of ``kind`` (see `classify`);
    ``attempts`` tries."""

    value: Any = None
    error: str | None = None
    attempts: int = 1
    kind: str = "ok"
    exception: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(cls, err: BaseException) -> JobOutcome:
        return cls(error=_describe(err), kind=classify(err), exception=err)


def _describe(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))[-4000:]


class Executor:
    """Runs ``fn(job)`` for each job; subclasses implement `_run_batch` (one attempt of many jobs)."""

    name = "base"

    def __init__(self, retries: int = 1, progress: bool = True):
        self.retries = retries
        self.progress = progress
        self._allocator_env: dict[str, str] = {}

    def _run_batch(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list[JobOutcome]:
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list[JobOutcome]:
        """``fn(job)`` for every job: transient failures retried, the job's own failures reported, other errors
        raised (a `HybridDistillError` or `TimeLimitReached` as itself, so that the user sees its message; anything
        else as `JobError`)."""
        self._allocator_env = configured_allocator_env()  # what _call applies in worker processes
        outcomes: list[JobOutcome | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        for attempt in range(1, self.retries + 2):
            if not pending:
                break
            results = self._run_batch(fn, [jobs[i] for i in pending])
            still = []
            for i, out in zip(pending, results):
                out.attempts = attempt
                outcomes[i] = out
                if out.ok:
                    continue
                if out.kind == "error":
                    cause = _root_cause(out.exception) if out.exception is not None else None
                    if isinstance(cause, (HybridDistillError, TimeLimitReached)):
                        raise cause
                    raise JobError(f"job {i} raised an error that is not a candidate failure:\n{out.error}")
                first_line = out.error.strip().splitlines()[-1] if out.error else "?"
                logger.warning("job %d failed (%s, attempt %d/%d): %s", i, out.kind, attempt, self.retries + 1, first_line)
                if out.kind == "transient":
                    still.append(i)
            pending = still
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        pass


class InlineExecutor(Executor):
    """Runs jobs one after another in this process (CPU runs, tests, debugging)."""

    name = "inline"

    def _run_batch(self, fn, jobs):
        out = []
        for job in _progress(jobs, self.progress, "candidates"):
            try:
                out.append(JobOutcome(value=fn(job)))
            except Exception as err:  # noqa: BLE001 - reported per job
                out.append(JobOutcome.failure(err))
        return out


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="job", dynamic_ncols=True)


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() != ""]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return []


_WORKER_GPU: str | None = None


def _init_worker(gpu_queue, threads: int | None) -> None:
    global _WORKER_GPU
    gpu = gpu_queue.get() if gpu_queue is not None else None
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch initialises CUDA in this process
        _WORKER_GPU = gpu
    if threads:
        import torch

        torch.set_num_threads(threads)


def _call(fn, job, allocator_env: dict[str, str] | None = None):
    """``fn(job)`` in a worker process, with the driver's CUDA allocator settings (expandable segments)
    unless the worker's environment configures the allocator itself: Ray and Slurm workers on other
    nodes do not inherit the driver's environment."""
    if allocator_env and not configured_allocator_env():
        os.environ.update(allocator_env)  # read when the job first uses CUDA
    return fn(job)


class LocalExecutor(Executor):
    """A pool of worker processes (spawned): one per visible GPU, each pinned to its GPU with
    ``CUDA_VISIBLE_DEVICES``; on CPU ``workers`` processes (default 1). Workers keep models cached
    between jobs."""

    name = "local"

    def __init__(self, workers: int | None = None, retries: int = 1, progress: bool = True, threads_per_worker: int | None = None):
        super().__init__(retries, progress)
        self.gpus = _visible_gpus()
        self.workers = workers or max(1, len(self.gpus))
        if self.gpus and self.workers > len(self.gpus):
            raise ConfigError(f"{self.workers} workers but only {len(self.gpus)} visible GPUs; one worker per GPU")
        self.threads = threads_per_worker
        self._pool = None

    def _pool_or_new(self):
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            ctx = mp.get_context("spawn")
            queue = None
            if self.gpus:
                queue = ctx.Manager().Queue()
                for gpu in self.gpus[: self.workers]:
                    queue.put(gpu)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(queue, self.threads))
        return self._pool

    def _run_batch(self, fn, jobs):
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        pool = self._pool_or_new()
        futures = {pool.submit(_call, fn, job, self._allocator_env): i for i, job in enumerate(jobs)}
        out: list[JobOutcome | None] = [None] * len(jobs)
        broken = False
        for fut in _progress(as_completed(futures), self.progress, "candidates"):
            i = futures[fut]
            try:
                out[i] = JobOutcome(value=fut.result())
            except BrokenProcessPool as err:  # a worker died (OOM, kill): rebuild the pool for retries
                out[i] = JobOutcome.failure(err)
                broken = True
            except Exception as err:  # noqa: BLE001
                out[i] = JobOutcome.failure(err)
        if broken:
            self.close()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Jobs as Ray tasks (``pip install hybrid-distill[ray]``); joins ``address`` (default: the
    ``RAY_ADDRESS`` cluster, or a local one). ``num_gpus`` per task defaults to 1 when the cluster
    has GPUs; more options go to ``ray.remote`` via ``remote_options``."""

    name = "ray"

    def __init__(self, retries: int = 1, progress: bool = True, address: str | None = None, num_gpus: float | None = None,
                 num_cpus: float = 1, remote_options: dict | None = None, init_options: dict | None = None):
        super().__init__(retries, progress)
        try:
            import ray
        except ImportError as err:
            raise ImportError("executor 'ray' needs Ray: pip install 'hybrid-distill[ray]' (or pip install ray)") from err
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), **(init_options or {}))
        gpus = ray.cluster_resources().get("GPU", 0)
        self.options = {"num_cpus": num_cpus, "num_gpus": (1 if gpus else 0) if num_gpus is None else num_gpus,
                        "max_retries": 0, **(remote_options or {})}

    def _run_batch(self, fn, jobs):
        remote = self.ray.remote(**self.options)(_call)
        refs = [remote.remote(fn, job, self._allocator_env) for job in jobs]
        out = []
        for ref in _progress(refs, self.progress, "candidates"):
            try:
                out.append(JobOutcome(value=self.ray.get(ref)))
            except Exception as err:  # noqa: BLE001 - RayTaskError wraps the job's exception
                out.append(JobOutcome.failure(err))
        return out


class SlurmExecutor(Executor):
    """Jobs as Slurm jobs through submitit (``pip install hybrid-distill[slurm]``), logs in ``folder``.
    ``options`` are submitit ``update_parameters`` values (e.g. ``slurm_partition``, ``gpus_per_node``,
    ``timeout_min``); ``cluster="local"`` runs them as local processes (for testing)."""

    name = "slurm"

    def __init__(self, folder: str | Path, retries: int = 1, progress: bool = True, cluster: str | None = None, **options):
        super().__init__(retries, progress)
        try:
            import submitit
        except ImportError as err:
            raise ImportError("executor 'slurm' needs submitit: pip install 'hybrid-distill[slurm]' (or pip install submitit)") from err
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        defaults = {"timeout_min": 24 * 60}
        if cluster != "local" and cluster != "debug":
            defaults.update({"gpus_per_node": 1, "tasks_per_node": 1, "nodes": 1})
        self.executor.update_parameters(**{**defaults, **options})

    def _run_batch(self, fn, jobs):
        submitted = [self.executor.submit(_call, fn, job, self._allocator_env) for job in jobs]
        out = []
        for job in _progress(submitted, self.progress, "candidates"):
            try:
                out.append(JobOutcome(value=job.result()))
            except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure
                out.append(JobOutcome.failure(err))
        return out


def make_executor(name: str, workers: int | None = None, retries: int = 1, options: dict | None = None,
                  folder: str | Path | None = None, progress: bool = True) -> Executor:
    """The executor called ``name`` ("inline", "local", "ray", "slurm") with its options."""
    options = dict(options or {})
    if name == "inline":
        return InlineExecutor(retries, progress)
    if name == "local":
        return LocalExecutor(workers, retries, progress, options.pop("threads_per_worker", None))
    if name == "ray":
        return RayExecutor(retries, progress, **options)
    if name == "slurm":
        return SlurmExecutor(options.pop("folder", folder or "slurm-logs"), retries, progress, **options)
    raise ConfigError(f"unknown executor {name!r}; choose from inline, local, ray, slurm")
