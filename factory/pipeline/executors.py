"""Model calls on a Ray cluster: `factory build --executor ray [--address ADDR]`, or `run: {executor: ray}`.

`RayExecutor` is the `Executor` (factory.pipeline.calls) that runs a stage's batches on Ray actors. The driver does
everything else exactly as a local build does: it looks up the cache, splits the missing calls into batches
(`CallRunner._batches`: whole prompts for generation), and writes each batch's rows with
`Warehouse.append_calls` as it comes back, so caching, resume and the runs table are the same. Each batch is
one Ray task: the same requests in the same batch as a local build, so every output, sampled ones included, is
the same as a local build's (the transformers backend seeds each batch from its requests).

Ray's own facilities do the work (docs/SCALING.md):

- one actor per worker (`BatchWorker`), holding one backend loaded with the pool's loader on its first batch;
  `num_cpus` = the model's `threads` (default 1), `num_gpus` = 1 for a GPU model, and for vLLM on a GPU
  cluster `num_gpus` = `tensor_parallel_size` × `pipeline_parallel_size` (one engine per actor) or, above
  one GPU, vLLM's own Ray executor in a placement group of one GPU bundle per rank (the pattern of vLLM's
  `examples/offline_inference/distributed.py`);
- each actor has two batches queued (`IN_FLIGHT`), so it starts the next while the driver writes the last
  one's rows; results are taken as they finish (`ray.wait`), and actors that are not scheduled yet (a busy
  or autoscaling cluster) take batches when they become ready;
- `max_restarts` / `max_task_retries`: a worker killed mid-batch (OOM, preemption, SIGKILL) is restarted by
  Ray, which reloads its model and runs the lost batch again; nothing was written for it, so every call is
  written exactly once.

`openai` models are called from the driver as in a local build: their parallelism is their `concurrency`,
and the API key never leaves the driver's environment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.core.errors import FactoryError, MissingExtraError
from factory.core.text import first_line
from factory.models.requests import Call
from factory.pipeline.calls import CallKind, LocalExecutor, ModelPool, call_batch

if TYPE_CHECKING:
    from factory.config.models import ModelSpec
    from factory.config.outcomes import RunOptions
    from factory.models.registry import Backend

MAX_RESTARTS = 3
"""How often Ray restarts a dead worker, and retries the batch it was running, before the build stops."""
DRIVER_BACKENDS = frozenset({"openai"})
"""Backends called from the driver even with `--executor ray` (HTTP clients: nothing to distribute)."""
FOLDER_BACKENDS = frozenset({"transformers", "vllm", "reward-model"})
"""Backends whose `model` may be a local folder: sent to workers as an absolute path."""
LOG = logging.getLogger(__name__)
"""Cleanup failures are logged here (no handler configured: Python prints a warning on stderr)."""
READY_POLL_S = 2.0
"""How often the driver looks for workers that became ready while it waits for results."""
IN_FLIGHT = 2
"""Batches queued on each actor at once, so it never waits for the driver between two batches."""


def require_ray() -> None:
    """Raise MissingExtraError (exit 2, naming the `ray` extra) unless ray is installed; imports nothing."""
    if importlib.util.find_spec("ray") is None:
        raise MissingExtraError("ray", "ray", "--executor ray")


def executor_for(options: RunOptions, executor: str | None = None, address: str | None = None) -> Any:
    """The executor a build runs with: `executor`/`address` (the CLI's flags) over the recipe's `run` options."""
    if (executor or options.executor) == "local":
        return LocalExecutor()
    return RayExecutor(address or options.address, options.workers)


class WorkerError(FactoryError):
    """A FactoryError raised on a worker whose own class cannot be sent back; message and exit code kept."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerError, (str(self), self.exit_code))


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling (Ray sends it to the driver), else a stand-in with the same message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        if isinstance(exc, FactoryError):
            return WorkerError(f"{exc} (on a Ray worker)", exc.exit_code)
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class BatchWorker:
    """A Ray actor's body: one backend, loaded on its first batch (again after a restart), that turns batches
    into call rows with `call_batch`, so transient failures become error rows exactly as in a local build."""

    def __init__(self, spec: ModelSpec, loader: Callable[[ModelSpec], Backend]) -> None:
        self.spec, self.loader = spec, loader
        self.backend: Any = None

    def ready(self) -> int:
        """The worker's process id, once Ray has placed and started it."""
        return os.getpid()

    def run(
        self, index: int, kind: CallKind, model: str, base: dict[str, Any], batch: list[Call]
    ) -> tuple[int, list[dict[str, Any]], int]:
        """(batch index, call rows, process id); a non-transient exception propagates and stops the build."""
        try:
            if self.backend is None:
                self.backend = self.loader(self.spec)
            rows = call_batch(kind, self.backend, model, batch, base)
        except Exception as exc:
            raise _portable(exc) from None
        return index, rows, os.getpid()


@dataclass
class _Workers:
    """One model's actors (and their placement groups), for one spec and loader."""

    spec: ModelSpec
    loader: Callable[[ModelSpec], Backend]
    actors: list[Any] = field(default_factory=list)
    ready: list[Any] = field(default_factory=list)
    """Actors known to be started (their `ready` call returned)."""
    waiting: dict[Any, Any] = field(default_factory=dict)
    """`ready` call -> actor, for actors Ray has not started yet."""
    groups: list[Any] = field(default_factory=list)


class RayExecutor:
    """Runs batches of model calls on Ray actors, one actor pool per model (see the module docstring).

    Ray is joined (`address`: `auto`, `ray://host:10001`, ...) or started (no address: a local cluster with
    this machine's CPUs and GPUs) on the first batch, so an unchanged rebuild never touches Ray. Workers start
    lazily, at most `workers` per model (default: one per CPU, or per GPU for GPU models, of the cluster), never
    more than the stage has batches; only one model's workers live at a time, and `release`/`close` stop them.
    """

    name = "ray"

    def __init__(
        self, address: str | None = None, workers: int | None = None, *, max_restarts: int = MAX_RESTARTS
    ) -> None:
        require_ray()
        self.address, self.workers, self.max_restarts = address, workers, max_restarts
        self.local = LocalExecutor()
        self.models: dict[str, _Workers] = {}
        self.pids: dict[str, list[int]] = {}
        """The worker processes that returned each model's batches, in order (a restarted worker has a new one)."""
        self.started_ray = False

    # ---------------------------------------------------------------------------------------------- ray
    def _ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            # Ray says on every start of a local cluster that it turned on token authentication (its default);
            # the notice is about Ray, not the build, so it is left out of the build's output.
            notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
            level = notice.level
            notice.setLevel(logging.ERROR)
            try:
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    log_to_driver=False,  # worker output would tear the progress display; see the Ray logs
                    logging_level=logging.WARNING,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at '{self.address}'" if self.address else "a local Ray cluster"
                raise FactoryError(f"could not start or join {where}: {first_line(exc)}") from None
            finally:
                notice.setLevel(level)
            self.started_ray = True
        return ray

    def shutdown(self) -> None:
        """Stop every worker and leave Ray: a local cluster this executor started stops, a joined one stays up."""
        self.close()
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False

    # ----------------------------------------------------------------------------------------- workers
    @staticmethod
    def _worker_spec(spec: ModelSpec) -> ModelSpec:
        """The spec a worker loads: a local model folder made absolute (workers may start elsewhere), and
        `cuda:N` made `cuda` (Ray gives each worker its own devices). Neither is part of a cache key."""
        update: dict[str, Any] = {}
        if spec.backend in FOLDER_BACKENDS and not spec.model.startswith("embedded:"):
            path = Path(spec.model).expanduser()
            if path.exists():
                update["model"] = str(path.resolve())
        if spec.device.startswith("cuda:"):
            update["device"] = "cuda"
        return spec.model_copy(update=update) if update else spec

    @staticmethod
    def _ranks(spec: ModelSpec) -> int:
        """GPUs one vLLM engine spans: tensor_parallel_size × pipeline_parallel_size."""
        engine = spec.engine
        return int(engine.get("tensor_parallel_size", 1) or 1) * int(engine.get("pipeline_parallel_size", 1) or 1)

    def _demand(self, spec: ModelSpec, total: dict[str, float]) -> tuple[float, int]:
        """(CPUs, GPUs) one worker of `spec` needs."""
        cpus = float(spec.threads or 1)
        if spec.backend == "vllm" and total.get("GPU", 0) > 0:
            return 1.0, self._ranks(spec)
        if spec.device.startswith("cuda"):
            return cpus, 1
        return cpus, 0

    def _options(self, ray: Any, spec: ModelSpec, model: str, workers: _Workers) -> tuple[dict[str, Any], ModelSpec]:
        total = ray.cluster_resources()
        cpus, gpus = self._demand(spec, total)
        if cpus > total.get("CPU", 0) or gpus > total.get("GPU", 0):
            raise FactoryError(
                f"model '{model}' needs {cpus:g} CPU(s) and {gpus} GPU(s) per Ray worker, but the cluster has "
                f"{total.get('CPU', 0):g} CPU(s) and {total.get('GPU', 0):g} GPU(s)"
            )
        options: dict[str, Any] = {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "max_restarts": self.max_restarts,
            "max_task_retries": self.max_restarts,
        }
        worker_spec = self._worker_spec(spec)
        if spec.backend == "vllm" and gpus > 1:
            # vLLM's own Ray executor runs the ranks; each engine gets a placement group of one GPU bundle per
            # rank that its rank workers are captured into (vLLM's distributed offline inference example).
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = ray.util.placement_group([{"GPU": 1, "CPU": 1}] * gpus, strategy="STRICT_PACK")
            workers.groups.append(group)
            options.update(
                num_gpus=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True),
            )
            engine = {"distributed_executor_backend": "ray", **worker_spec.engine}
            worker_spec = worker_spec.model_copy(update={"engine": engine})
        return options, worker_spec

    def default_workers(self, spec: ModelSpec) -> int:
        """Workers per model: `run.workers`, else one per CPU (CPU models) or per engine's GPUs (GPU models)."""
        if self.workers:
            return self.workers
        total = self._ray().cluster_resources()
        cpus, gpus = self._demand(spec, total)
        return max(1, int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 1) // cpus))

    def _workers(self, model: str, spec: ModelSpec, loader: Callable[[ModelSpec], Backend], batches: int) -> _Workers:
        ray = self._ray()
        for other in [m for m, w in self.models.items() if m != model or w.spec != spec or w.loader is not loader]:
            self.release(other)  # one model's workers at a time: stages run one after another
        workers = self.models.setdefault(model, _Workers(spec, loader))
        want = min(self.default_workers(spec), batches)
        remote = ray.remote(BatchWorker)
        while len(workers.actors) < want:
            options, worker_spec = self._options(ray, spec, model, workers)
            actor = remote.options(**options).remote(worker_spec, loader)
            workers.actors.append(actor)
            workers.waiting[actor.ready.remote()] = actor
        return workers

    def _started(self, ray: Any, model: str, workers: _Workers, *, block: bool = False) -> list[Any]:
        """Actors that have started (moved from waiting to ready); `block` waits for at least one."""
        if not workers.waiting:
            return []
        if block:
            ray.wait(list(workers.waiting), num_returns=1)
        done, _ = ray.wait(list(workers.waiting), num_returns=len(workers.waiting), timeout=0)
        started = []
        for ref in done:
            actor = workers.waiting.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise FactoryError(f"a Ray worker for model '{model}' could not start: {first_line(exc)}") from None
            workers.ready.append(actor)
            started.append(actor)
        return started

    # --------------------------------------------------------------------------------------------- map
    def map(
        self, pool: ModelPool, kind: CallKind, model: str, base: dict[str, Any], batches: list[list[Call]]
    ) -> Iterator[tuple[list[Call], list[dict[str, Any]]]]:
        """Run the batches on the model's actors, one task each; yield (batch, rows) as each comes back."""
        spec = pool.check(model, kind.role)
        if not batches:
            return
        if spec.backend in DRIVER_BACKENDS:
            yield from self.local.map(pool, kind, model, base, batches)
            return
        ray = self._ray()
        workers = self._workers(model, spec, pool.loader, len(batches))
        # Only what a worker needs travels: the key and the request of every call, not the stage's row fields.
        todo = [(i, [Call(c.key, c.request, {}) for c in batch]) for i, batch in reversed(list(enumerate(batches)))]
        flight: dict[Any, Any] = {}  # task -> the actor running it
        load: dict[Any, int] = {}  # actor -> its tasks in flight

        def feed(actor: Any) -> None:
            # Each actor holds IN_FLIGHT tasks: it starts its next batch while the driver writes the last one's rows.
            while todo and load.get(actor, 0) < IN_FLIGHT:
                index, payload = todo.pop()
                flight[actor.run.remote(index, kind, model, base, payload)] = actor
                load[actor] = load.get(actor, 0) + 1

        # Wait for the first worker (it may need a node to start); the others join as they become ready.
        while not workers.ready:
            self._started(ray, model, workers, block=True)
        for actor in workers.ready:
            feed(actor)
        while flight:
            done, _ = ray.wait(list(flight), num_returns=1, timeout=READY_POLL_S if workers.waiting else None)
            if not done:
                for actor in self._started(ray, model, workers):
                    feed(actor)  # an actor that became ready takes waiting batches
                continue
            actor = flight.pop(done[0])
            load[actor] -= 1
            try:
                index, rows, pid = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, Exception) else exc) from None
            except ray.exceptions.RayError as exc:
                raise FactoryError(
                    f"a Ray worker for model '{model}' died and was restarted {self.max_restarts} time(s) without "
                    f"finishing its batch; finished calls are saved, run again to resume: {first_line(exc)}"
                ) from None
            feed(actor)
            self.pids.setdefault(model, []).append(pid)
            yield batches[index], rows

    # ------------------------------------------------------------------------------------------- close
    def release(self, model: str) -> None:
        """Stop a model's workers (Ray frees their CPUs, GPUs and memory)."""
        workers = self.models.pop(model, None)
        if workers is None:
            return
        import ray

        release_workers(ray, model, workers)

    def close(self) -> None:
        """Stop every model's workers; Ray itself stays up for a later pool (see `shutdown`)."""
        for model in list(self.models):
            self.release(model)


def release_workers(ray: Any, model: str, workers: _Workers) -> None:
    """Kill a model's actors and remove their placement groups, each even when another fails. What could not
    be released is named in one warning: a leaked placement group keeps its GPUs until the cluster stops."""
    failed: list[str] = []
    for actor in workers.actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:
            failed.append(f"worker {actor!r} ({first_line(exc)})")
    for group in workers.groups:
        try:
            ray.util.remove_placement_group(group)
        except Exception as exc:
            failed.append(f"placement group {getattr(group, 'id', group)!r} ({first_line(exc)})")
    if failed:
        LOG.warning(
            "warning: could not release %d Ray resource(s) of model '%s'; they keep their CPUs/GPUs until the "
            "Ray cluster stops: %s",
            len(failed),
            model,
            "; ".join(failed),
        )
