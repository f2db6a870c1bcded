"""`generate --ray ADDRESS`: the grid's rows spread over Ray actors, each holding the model once.

The driver (the `personas` process) keeps the rows, hands each actor an equal share of them (a
chunk) and receives each sample as its actor finishes it (a Ray streaming generator); it writes
the output exactly as a single process does. Rows are independent — a row's text is a function
of its own seed (sampling.chooser) — so any row can run on any actor, and a chunk can run again
elsewhere.

Faults: an actor that dies (its process killed, out of memory) loses only the rows of its chunk
that had not come back; they go back to the front of the queue for the others, and a row that
did come back is never delivered twice. When every actor is gone the run fails (exit 1), with
the finished rows already written. Ctrl-C ends the run; actors are killed, and a runtime that
personas started (`--ray local`) is shut down.

Imported only when `--ray` is given: `ray` is an optional extra (`personas[ray]`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..errors import InputError, ModelError, PersonasError
from ..model.choice import ModelChoice, resolve_model
from ..model.imports import collector_paused
from ..sampling.grid import Row, Sample, Settings, batch_size

CONNECT_SECONDS = 3.0  # an address that does not answer within this is reported, not waited on
LOCAL_CPU_WORKERS = 2


@ray.remote
class Worker:
    """One actor: the model loaded once on its own device, sampling the chunks it is given."""

    def __init__(self, choice: ModelChoice, load: dict[str, Any]):
        with collector_paused():  # as the CLI's own process imports them (model/imports.py)
            from ..engine.loop import sample_rows
            from ..model.load import load_model

        self.sample_rows = sample_rows
        self.model = load_model(choice, **load)

    def pid(self) -> int:
        return os.getpid()

    def sample(self, settings: Settings, rows: list[Row]) -> Iterator[list[tuple[int, Sample]]]:
        """The rows' samples as they finish, in lists of (position in `rows`, sample): each list
        what finished since the last one.

        sample_rows reports through a callback, and a generator cannot yield from inside one: it
        runs in a thread that hands samples over a queue. A list is one object for Ray to hand
        over, and a decode step often ends many rows at once (a bulk job's rows of one length end
        together): one object per sample made the driver take each of them in a round trip of
        its own, the last step's hundreds of them after the worker had finished.
        """
        position = {id(row): i for i, row in enumerate(rows)}
        handover: queue.Queue = queue.Queue()
        finished = object()

        def work() -> None:
            try:
                self.sample_rows(settings, self.model, rows, lambda s: handover.put((position[id(s.row)], s)))
            except BaseException as e:  # re-raised below, in the actor's task, so the driver sees it
                handover.put(e)
            finally:
                handover.put(finished)

        threading.Thread(target=work, daemon=True).start()
        while True:
            items = [handover.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(handover.get_nowait())
            samples = [item for item in items if isinstance(item, tuple)]
            if samples:  # before an error that came after them: what finished is not lost
                yield samples
            for item in items:
                if isinstance(item, BaseException):
                    raise item
            if any(item is finished for item in items):
                return


def connect(address: str) -> bool:
    """Start or join a Ray runtime; True when personas started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ModelError(f"cannot join the Ray cluster at '{address}': {str(e).strip().splitlines()[0]}",
                         "start one with `ray start --head`, check the address, or use --ray local") from None
    return False


def stop_runtime() -> None:
    """ray.shutdown() of a runtime this process started, less the second it waits on the monitor.

    ray.shutdown asks each of the runtime's processes in turn to end (SIGTERM) and gives each a
    second before killing it. The autoscaler's monitor — which a runtime of one machine, with no
    nodes to add, never uses — answers SIGTERM by reporting its end to the runtime's GCS, which is
    stopped before it, so it takes the whole second every time (docs/performance.md, "How much
    does Ray cost?"). It is killed first, through the node object Ray keeps for the runtime it
    started (not public API: where a Ray version lacks it, the plain shutdown still stops the
    monitor, a second later)."""
    with contextlib.suppress(Exception):  # Ray's internals: another version may not have them
        ray._private.worker._global_node.kill_monitor(check_alive=False)
    ray.shutdown()


def _check_reachable(address: str) -> None:
    """A host:port that refuses or does not answer is reported within CONNECT_SECONDS; Ray
    itself would retry for much longer."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return  # `auto` and other forms are Ray's to resolve
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as e:
        raise ModelError(f"cannot reach the Ray cluster at '{address}': {e.strerror or e}",
                         "start one with `ray start --head`, check the address, or use --ray local") from None


def has_gpu(resources: dict[str, float]) -> bool:
    """Whether the cluster (`resources`: its totals) has a GPU."""
    return resources.get("GPU", 0) >= 1


def on_gpus(load: dict[str, Any], resources: dict[str, float]) -> bool:
    """Whether the workers hold a GPU each: where the cluster has GPUs, unless the model is to
    load on the CPU (`--device cpu`), where a GPU held would only keep other work off it."""
    if str(load.get("device") or "").startswith("cpu"):
        return False
    return has_gpu(resources)


def auto_choice(resources: dict[str, float]) -> ModelChoice:
    """`--model auto` on Ray: the GPU model where the cluster has a GPU, else the embedded one —
    as `auto` asks of one machine. It is the workers' machines that load it, not this one, which
    may lack the cluster's GPUs or have one the cluster does not."""
    gpu = has_gpu(resources)
    choice = resolve_model("auto", has_cuda=lambda: gpu)
    return dataclasses.replace(choice, reason="the Ray cluster has a GPU" if gpu else "no GPU in the Ray cluster")


def worker_count(requested: int | None, on_gpu: bool, resources: dict[str, float]) -> int:
    """--ray-workers, else one per GPU of the cluster (workers on GPUs), else LOCAL_CPU_WORKERS
    (at most one per CPU of the cluster)."""
    if requested is not None:
        if requested < 1:
            raise InputError(f"--ray-workers {requested} is not allowed", "use 1 or more")
        return requested
    if on_gpu:
        return int(resources.get("GPU", 0))
    return max(1, min(LOCAL_CPU_WORKERS, int(resources.get("CPU", 1))))


def check_room(count: int, on_gpu: bool, resources: dict[str, float], started_here: bool,
               on_short: Callable[[int, int, str], None]) -> None:
    """Each worker holds one GPU (or one CPU) for its life, and Ray leaves a worker it has no room
    for waiting, silently, until room appears. A runtime personas started is this machine's
    alone and never grows: more workers than it has room for are refused. A cluster may grow
    (an autoscaler, a machine joining): there `on_short(room, count, unit)` says that the run
    waits for it."""
    unit = "GPU" if on_gpu else "CPU"
    room = int(resources.get(unit, 0))
    if count <= room:
        return
    if started_here:
        raise InputError(f"--ray-workers {count} asks for {count} workers of one {unit} each, but this "
                         f"machine has {room} {unit}{'s' if room != 1 else ''} for Ray",
                         f"use --ray-workers {room} or fewer, or join a bigger cluster with --ray ADDRESS")
    on_short(room, count, unit)


class RayPool:
    """Ray actors, each with the model loaded once, sampling as many lists of rows as asked;
    a context manager: the actors are killed at its end, and a runtime it started shut down.

    Making the pool starts the actors and returns: each imports its libraries and loads the
    model in its own process while the caller goes on (the driver loads its tokenizer and plans
    the rows meanwhile); the first `sample` waits for them. `choice` None is `--model auto`,
    resolved by the cluster's GPUs (auto_choice); `self.choice` is the model the workers load,
    whose tokenizer the driver loads. `on_workers` hears the actors'
    process ids once they are up; `on_lost(actors left, rows requeued)` when one dies;
    `on_short(room, workers, unit)` when a joined cluster has room for fewer workers than asked
    (the first `sample` then waits for it to grow).
    """

    def __init__(self, address: str, workers: int | None, choice: ModelChoice | None, load: dict[str, Any], *,
                 on_workers: Callable[[list[int]], None] = lambda _pids: None,
                 on_lost: Callable[[int, int], None] = lambda _left, _requeued: None,
                 on_short: Callable[[int, int, str], None] = lambda _room, _count, _unit: None):
        self.started_here = connect(address)
        self.actors: list[Any] = []
        self.on_lost, self.on_workers = on_lost, on_workers
        self.pids: list[int] | None = None
        try:
            resources = ray.cluster_resources()  # the cluster's totals, asked of it once
            self.choice = choice or auto_choice(resources)
            self.on_gpu = on_gpus(load, resources)
            count = worker_count(workers, self.on_gpu, resources)
            check_room(count, self.on_gpu, resources, self.started_here, on_short)
            options = {"num_gpus": 1} if self.on_gpu else {"num_cpus": 1}
            self.actors = [Worker.options(**options).remote(self.choice, load) for _ in range(count)]
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> list[int]:
        """The actors' process ids, once every one has loaded the model (at once after the first call)."""
        if self.pids is None:
            try:
                self.pids = ray.get([a.pid.remote() for a in self.actors])
            except RayActorError as e:
                raise ModelError(f"a Ray worker could not load the model: {str(e).strip().splitlines()[-1]}",
                                 "run without --ray to see the loading error") from None
            self.on_workers(self.pids)
        return self.pids

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_here:
            stop_runtime()
            self.started_here = False

    def batch_rows(self, settings: Settings) -> int:
        """Rows one worker decodes at once: --batch-size, else its device's default."""
        return batch_size(settings.max_batch, "cuda" if self.on_gpu else "cpu")

    def sample(self, work: Sequence[tuple[Settings, Sequence[Row]]], on_sample: Callable[[Sample], None]) -> None:
        """Every row of every (settings, rows) pair, all handed out at once; `on_sample` gets each
        sample once, as it arrives, its `row` the very object given here."""
        if not any(rows for _, rows in work):
            return
        self.wait_ready()
        _run(self.actors, work, on_sample, self.on_lost)


def share_rows(rows: int, workers: int) -> int:
    """Rows handed to an actor at a time: an equal share of them each.

    A worker's engine keeps its slots full only while it has rows waiting: every chunk ends with
    its last rows decoding in slots the next chunk cannot use yet, and starts a new engine
    (pages, captured graphs): chunks of one batch each made a one-GPU Ray run's generation much
    slower than one process's (docs/performance.md, "How much does Ray cost?"). A share costs no
    more when its worker is lost: only its rows that had not come back go to the others. The price:
    workers of unequal speed (different GPUs in one cluster) each finish their own share, so the
    run ends with the slowest."""
    return max(1, -(-rows // workers))


def _run(actors: list[Any], work: Sequence[tuple[Settings, Sequence[Row]]],
         on_sample: Callable[[Sample], None], on_lost: Callable[[int, int], None]) -> None:
    """Each (settings, rows)'s rows in shares (share_rows) to idle actors until all are back."""
    # A row is (its work's index, its index there); a chunk's rows share their settings.
    pending: deque[tuple[int, list[int]]] = deque()
    for w, (_, rows) in enumerate(work):
        size = share_rows(len(rows), len(actors))
        pending.extend((w, list(range(start, min(start + size, len(rows))))) for start in range(0, len(rows), size))
    total = sum(len(rows) for _, rows in work)
    delivered: set[tuple[int, int]] = set()
    running: dict[Any, tuple[Any, int, list[int]]] = {}  # generator -> (actor, its work, its chunk's rows)
    idle = list(actors)

    def hand_out() -> None:
        while idle and pending:
            w, indices = pending.popleft()
            chunk = [i for i in indices if (w, i) not in delivered]
            if chunk:
                actor = idle.pop()
                settings, rows = work[w]
                running[actor.sample.remote(settings, [rows[i] for i in chunk])] = (actor, w, chunk)

    hand_out()
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        generator = ready[0]
        actor, w, chunk = running[generator]
        try:
            finished = ray.get(next(generator))
        except StopIteration:
            del running[generator]
            idle.append(actor)
            hand_out()
            continue
        except RayTaskError as e:  # the actor raised: our own errors keep their message and exit status
            cause = getattr(e, "cause", None)
            if isinstance(cause, PersonasError):
                raise cause from None
            raise ModelError(f"a Ray worker failed: {str(cause or e).strip().splitlines()[-1]}",
                             "run without --ray to see the error in full") from None
        except RayActorError:
            del running[generator]
            left = [i for i in chunk if (w, i) not in delivered]
            pending.appendleft((w, left))
            on_lost(len(idle) + len(running), len(left))
            if not idle and not running:
                raise ModelError(f"every Ray worker died; {total - len(delivered)} rows were not sampled",
                                 "the finished rows are written; rerun with --resume to sample the rest") from None
            hand_out()
            continue
        for position, sample in finished:
            index = chunk[position]
            if (w, index) not in delivered:
                delivered.add((w, index))
                # The driver's own row: the actor's copy came back through pickling.
                on_sample(dataclasses.replace(sample, row=work[w][1][index]))
