"""The actor pool: a verifier (holds the frozen DiT) and a drafter, each on its own device.

The work is done by plain classes (:class:`Verifier`, :class:`Drafter`, both :class:`DeviceWorker`); Ray
only wraps them (:func:`remote_class`). A :class:`Pool` is a list of such actors placed together by one
placement group: (verifier, drafter) pairs, member 0 verifying and member 1 drafting, then further pairs
(one actor holding both roles in a pool of one). Every member holds the frozen target, so all of them
serve DRiffusion evaluations and data-parallel training. Each member takes ``num_gpus=1`` when the cluster has
enough GPUs, else ``num_cpus=threads`` (a CPU actor with that many torch threads).

A pool is either private to one engine (created and removed by it) or *named* and detached
(``specdit pool start``): then any process on the cluster attaches to it by name and ``specdit pool stop``
removes it.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from specdit.devices import check_device_name
from workers.local_engine import LocalEngine
from workers.protocol import set_threads

NAMESPACE = "specdit"
MAX_RESTARTS = 5  # restarts of each pool actor by Ray (SPECDIT_RAY_MAX_RESTARTS); then it stays dead


def max_restarts() -> int:
    """How many times Ray restarts a dead pool actor (bounded: ``SPECDIT_RAY_MAX_RESTARTS``, default 5)."""
    raw = os.environ.get("SPECDIT_RAY_MAX_RESTARTS", str(MAX_RESTARTS))
    try:
        n = int(raw)
    except ValueError:
        raise PoolError(f"SPECDIT_RAY_MAX_RESTARTS must be a whole number from 0 to 100, got {raw!r}") from None
    if not 0 <= n <= 100:
        raise PoolError(f"SPECDIT_RAY_MAX_RESTARTS must be a whole number from 0 to 100, got {raw!r}")
    return n


class PoolError(Exception):
    """A pool cannot be started, found or used (one-line message)."""


class BadAddress(PoolError, ValueError):
    """A malformed Ray address (a user mistake: exit code 2 in the CLI)."""


class BadDevice(PoolError, ValueError):
    """A pool device that is not auto, cpu, cuda or cuda:N (a user mistake: exit code 2 in the CLI)."""


# ------------------------------------------------------------------------------------------------------
# Plain classes (no Ray): what runs on each device
# ------------------------------------------------------------------------------------------------------
class DeviceWorker:
    """Holds models on one device and runs the pieces of sampling and training placed on it."""

    role = "device"
    drafts = False  # holds a drafter (speculative sampling's step 1)

    def __init__(self, device: str = "cpu", threads: int = 1, rank: int = 0):
        if threads:
            set_threads(threads)
        self.device, self.threads, self.rank = device, threads, rank
        self.engine = LocalEngine(device=device, threads=threads)  # model cache, model_info, references
        self._setups: dict[tuple[str, str], tuple] = {}
        self.crash_at: str | None = None  # fault hook (tests): see die_in

    # -- bookkeeping ---------------------------------------------------------------------------------
    def info(self) -> dict:
        import torch

        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        name = torch.cuda.get_device_name(0) if self.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
        return {"role": self.role, "rank": self.rank, "host": socket.gethostname(), "ip": _node_ip(),
                "pid": os.getpid(), "device": self.device, "device_name": name, "threads": torch.get_num_threads(),
                "cuda_visible_devices": gpus}

    def die_in(self, method: str) -> None:
        """Fault hook (tests): the next call of ``method`` (``model_info``, ``setup``, ``sample``, ``draft``,
        ``verify``) on this actor ends its process as a crash would. Ray restarts the actor without the hook."""
        self.crash_at = method

    def crash_point(self, method: str) -> None:
        if self.crash_at == method:
            os._exit(1)

    def free_port(self) -> int:
        """A free TCP port on this node (for the torch.distributed rendezvous)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def model_info(self, model: str):
        self.crash_point("model_info")
        return self.engine.model_info(model)

    def reference_stats(self, model: str, labels: str, extractor: str, source: str):
        return self.engine.reference_stats(model, labels, extractor, source)

    def resolve_reference(self, model: str, source: str) -> str:
        return self.engine.resolve_reference(model, source)

    def to_images(self, model: str, samples):
        """Decode one batch on this device: uint8 images (B, H, W, C) numpy (``LocalEngine.to_images``)."""
        return self.engine.to_images(model, samples)

    # -- sampling ------------------------------------------------------------------------------------
    def setup(self, model: str, sampler: dict) -> dict:
        """Load the model and build the (guided) target, the drafter and the schedule for these settings;
        cached by (model, settings). Returns what the coordinator needs to know."""
        import json

        self.crash_point("setup")
        key = (model, json.dumps(sampler, sort_keys=True))
        if key not in self._setups:
            from dataclasses import replace

            from specdit.api import SamplerConfig, build_networks
            from specdit.models.base import training_schedule_of
            from specdit.schedule import Schedule

            base = self.engine.load(model)
            config = SamplerConfig.from_dict(sampler)
            plain = config if self.drafts else replace(config, sampler="ddpm")  # no drafter on a verifier
            target, drafter = build_networks(base, plain, self.device, model)
            schedule = Schedule.create(config.steps, config.eta, training=training_schedule_of(base))
            self._setups[key] = (target, drafter, schedule, config)
        target, drafter, _, _ = self._setups[key]
        return {"draft_cost": 0 if drafter is None else drafter.cost, "dtype": str(target.dtype)}

    def _get(self, model: str, sampler: dict):
        import json

        key = (model, json.dumps(sampler, sort_keys=True))
        if key not in self._setups:
            self.setup(model, sampler)
        return self._setups[key]

    def evaluate(self, model: str, sampler: dict, x, t, y):
        """One target call (a chunk of a DRiffusion batch): (ModelOutput without features, busy interval)."""
        from workers.pipeline import VerifyComputer

        target, _, _, _ = self._get(model, sampler)
        return VerifyComputer(target).evaluate(x, t, y)

    def sample(self, model: str, sampler: dict, seeds, labels):
        """A whole batch sampled here (samplers that need no second device, e.g. DDPM):
        (samples float32, stats arrays, wall seconds)."""
        import torch

        self.crash_point("sample")
        from specdit.api import run_sampler
        from specdit.noise import NoiseStreams

        target, _, _, config = self._get(model, sampler)
        t0 = time.perf_counter()
        with torch.no_grad():
            x, st = run_sampler(target, None, config, NoiseStreams(seeds, device=self.device), labels)
        return x.float().cpu(), st, time.perf_counter() - t0

    # -- training ------------------------------------------------------------------------------------
    def train_drafter(self, model: str, data: str, cfg: dict, out_dir: str, export_dir: str | None,
                      init_method: str, world_size: int, rank: int) -> str:
        """Data-parallel drafter training as rank ``rank`` of ``world_size`` (see ``workers.ray_pool.training``):
        the frozen DiT already held here produces the supervision; rank 0 writes progress into ``out_dir``."""
        from specdit.data import load_training_data
        from specdit.models.base import require_features
        from specdit.training.distributed import TorchWorld
        from specdit.training.drafter import DrafterTrainConfig, train_drafter
        from workers.ray_pool.progress import write_progress

        target = require_features(self.engine.load(model), model)
        out = Path(out_dir)
        world = TorchWorld.init(rank, world_size, init_method, device=self.device)
        try:
            on_log = (lambda row: write_progress(out, row)) if rank == 0 else None
            folder = train_drafter(target, load_training_data(data), DrafterTrainConfig(**cfg), out,
                                   export_dir=export_dir, progress=False, on_log=on_log, world=world)
        finally:
            world.close()
        return str(folder)


class Verifier(DeviceWorker):
    """Holds the frozen target; runs the one batched target call of each speculative round."""

    role = "verifier"

    def verify(self, model: str, sampler: dict, draft, y):
        from workers.pipeline import VerifyComputer

        self.crash_point("verify")
        target, _, schedule, _ = self._get(model, sampler)
        return VerifyComputer(target, schedule, self.device).verify(draft, y)


class Drafter(DeviceWorker):
    """Holds the drafter (and the frozen target, which FREE's drafter needs and training uses)."""

    role = "drafter"
    drafts = True

    def draft(self, model: str, sampler: dict, seeds, ctx, draft_length: int):
        from workers.pipeline import DraftComputer

        self.crash_point("draft")
        _, drafter, schedule, _ = self._get(model, sampler)
        return DraftComputer(drafter, schedule, self.device).draft(seeds, ctx, draft_length)


class VerifierDrafter(Verifier, Drafter):
    """Both roles on one device (a pool of one actor)."""

    role = "verifier+drafter"


def check_pool_device(device: str) -> str:
    """``device`` if it is auto, cpu, cuda or cuda:N, else :class:`BadDevice`. Inside an actor the GPU it
    was given is always cuda:0, so cuda:N only says that the pool uses GPUs."""
    try:
        return check_device_name(device, allow_auto=True)
    except ValueError as e:
        raise BadDevice(str(e)) from None


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"


# ------------------------------------------------------------------------------------------------------
# Ray: connection, the thin actor wrappers, the pool
# ------------------------------------------------------------------------------------------------------
def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray. ``address``: "host:port", "ray://..." or "auto" (whatever cluster this
    machine runs: only when asked for explicitly); None (and no ``SPECDIT_RAY_ADDRESS``) starts a private local
    cluster (``num_cpus``) and never attaches to a cluster that happens to run here (``ray.init(address="local")``
    rather than ``ray.init()``, which would). Returns True when this call started Ray here (the caller shuts it
    down)."""
    address = address or os.environ.get("SPECDIT_RAY_ADDRESS") or None
    if address and address != "auto" and "://" not in address:
        _check_reachable(address)  # ray.init would retry an unreachable address for a long time
    local_mode(address)
    import ray

    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, local, throw-away cluster
            ray.init(address="local", num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False,
                     log_to_driver=False,
                     configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PoolError(f"cannot connect to Ray at {address or 'a new local cluster'}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    return True


LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, every listener on 127.0.0.1


def external_ip() -> str | None:
    """The address this machine reaches other hosts from (no packet is sent), or None without a route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the routing table is consulted
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2.0).close()
        return True
    except OSError:
        return False


def local_mode(address: str | None) -> None:
    """Put this process in Ray's single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray takes
    127.0.0.1 as the node address, and its GCS, raylet, object manager, agents and client server listen on
    127.0.0.1 only) for a private cluster (``address`` None) and for a cluster on 127.0.0.1 that listens there
    only (started in that mode: its GCS does not answer on this machine's external address). Without it Ray
    replaces 127.0.0.1 by the external address and never reaches such a cluster. Must run before Ray is
    imported; raises PoolError if Ray already runs in the other mode."""
    if os.environ.get(LOCAL_ONLY_ENV) == "0":
        return
    if address is None:
        needed = True
    else:
        host, _, port = address.rpartition(":")
        ext = external_ip()
        needed = (host in ("127.0.0.1", "localhost") and port.isdigit() and ext is not None
                  and not _answers(ext, int(port)))
    if not needed:
        return
    if "ray" in sys.modules:  # Ray read its mode when it was imported
        if address is None:
            return  # a private cluster on this machine's address: still reachable
        raise PoolError(f"the Ray cluster at {address} listens on 127.0.0.1 only: set {LOCAL_ONLY_ENV}=0 for this "
                        "process as for 'ray start'")
    os.environ[LOCAL_ONLY_ENV] = "0"


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BadAddress(f"bad Ray address {address!r}: expected host:port, auto or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise PoolError(f"cannot reach a Ray cluster at {address}: {e.strerror or e} (start one with "
                        "'ray start --head --port <port>')") from None


_REMOTE: dict[type, object] = {}


def remote_class(cls):
    """The Ray actor class wrapping a plain class (one wrapper per class, made on first use)."""
    import ray

    if cls not in _REMOTE:
        _REMOTE[cls] = ray.remote(cls)
    return _REMOTE[cls]


@dataclass
class Member:
    handle: object
    role: str
    rank: int
    name: str | None = None


class Pool:
    """``size`` actors ((verifier, drafter) pairs) in one placement group.

    ``device``: "auto" (GPUs when the cluster has ``size`` of them), "cpu" or "cuda"."""

    def __init__(self, members: list[Member], pg, device: str, owned: bool, name: str | None = None):
        self.members, self.pg, self.device, self.owned, self.name = members, pg, device, owned, name

    @property
    def verifier(self):
        return self.members[0].handle

    @property
    def drafter(self):
        return self.members[1].handle if len(self.members) > 1 else self.members[0].handle

    @property
    def handles(self) -> list:
        return [m.handle for m in self.members]

    @staticmethod
    def create(size: int = 2, *, threads: int = 1, device: str = "auto", name: str | None = None,
               strategy: str = "PACK", timeout: float = 60.0) -> "Pool":
        """Start a pool (named and detached when ``name`` is given). Raises PoolError when the cluster
        cannot place it."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if size < 1:
            raise PoolError(f"a pool needs at least 1 actor, got {size}")
        check_pool_device(device)
        if name is not None and _find_pg(name) is not None:
            raise PoolError(f"a pool named {name!r} is already running (stop it with 'specdit pool stop {name}')")
        gpus = ray.cluster_resources().get("GPU", 0)
        if device == "auto":
            device = "cuda" if gpus >= size else "cpu"
        if device.startswith("cuda") and gpus < size:
            raise PoolError(f"the cluster has {gpus:g} GPUs; a pool of {size} GPU actors needs {size}")
        bundle = {"GPU": 1, "CPU": 1} if device.startswith("cuda") else {"CPU": threads}
        pg = placement_group([dict(bundle)] * size, strategy=strategy, name=f"{name}-pg" if name else "",
                             lifetime="detached" if name else None)
        try:
            ray.get(pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            raise PoolError(f"cannot place {size} actors of {bundle} within {timeout:g}s (available: {have}); "
                            "use fewer actors (--actors) or threads") from None
        members = []
        for rank in range(size):
            # (verifier, drafter) pairs: even ranks verify, odd ranks draft; all of them evaluate and train.
            cls = VerifierDrafter if size == 1 else Verifier if rank % 2 == 0 else Drafter
            role = cls.role
            opts = dict(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                        max_restarts=max_restarts(), max_task_retries=0, num_cpus=bundle.get("CPU", 1),
                        num_gpus=bundle.get("GPU", 0), namespace=NAMESPACE)
            aname = f"{name}-{rank}-{role}" if name else None
            if name:
                opts.update(name=aname, lifetime="detached")
            h = remote_class(cls).options(**opts).remote("cuda" if device.startswith("cuda") else "cpu",
                                                          threads, rank)
            members.append(Member(h, role, rank, aname))
        pool = Pool(members, pg, device, owned=name is None, name=name)
        pool.wait_ready(timeout)
        return pool

    @staticmethod
    def attach(name: str) -> "Pool":
        """The named pool started by ``specdit pool start``."""
        import ray

        members = []
        for n in _actor_names():
            pname, rank, role = n.rsplit("-", 2)
            if pname == name and rank.isdigit():
                members.append(Member(ray.get_actor(n, namespace=NAMESPACE), role, int(rank), n))
        if not members:
            raise PoolError(f"no pool named {name!r} on this Ray cluster (start one with 'specdit pool start')")
        members.sort(key=lambda m: m.rank)
        info = ray.get(members[0].handle.info.remote())
        return Pool(members, _find_pg(name), info["device"], owned=False, name=name)

    def wait_ready(self, timeout: float = 60.0) -> list[dict]:
        import ray

        try:
            return ray.get([h.info.remote() for h in self.handles], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise PoolError(f"pool actors did not start within {timeout:g}s") from None

    def describe(self) -> list[dict]:
        return self.wait_ready()

    def restart(self, ranks: list[int] | None = None, timeout: float = 60.0) -> None:
        """Kill (and let Ray restart in place, same bundle) the given members, e.g. ones stuck in a
        collective after another member died. Their models are reloaded on first use."""
        import ray

        for m in self.members:
            if ranks is None or m.rank in ranks:
                try:
                    ray.kill(m.handle, no_restart=False)
                except Exception:  # noqa: BLE001 - already dead: Ray restarts it
                    pass
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise PoolError("pool actors did not come back after a restart") from None
                time.sleep(0.2)

    def shutdown(self) -> None:
        """Kill the actors (no restart) and free the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for m in self.members:
            try:
                ray.kill(m.handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            # Resources come back asynchronously; a pool created right after would otherwise wait on them.
            tag = self.pg.id.hex()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(tag in k for k in ray.available_resources()):
                time.sleep(0.1)


def _actor_names() -> list[str]:
    """Names of the pool actors (``<pool>-<rank>-<role>``) in specdit's namespace."""
    import ray

    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        n, ns = (a["name"], a["namespace"]) if isinstance(a, dict) else (a, NAMESPACE)
        parts = n.rsplit("-", 2)
        if ns == NAMESPACE and len(parts) == 3 and parts[1].isdigit():
            out.append(n)
    return out


def _find_pg(name: str):
    from ray.util.placement_group import get_placement_group

    try:
        return get_placement_group(f"{name}-pg")
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------------
# Cluster commands (called by ``specdit pool ...``)
# ------------------------------------------------------------------------------------------------------
class OnceFilter(logging.Filter):
    """Lets each distinct message through once per process. Ray's ``ray.actor`` logger warns about a
    restartable detached actor in a placement group once per actor, i.e. once per pool member; the pool
    restarts its actors on purpose and removes the group only when it stops them, so once is enough."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def warn_once(logger_name: str = "ray.actor") -> OnceFilter:
    """Install (once) a :class:`OnceFilter` on ``logger_name``; returns it."""
    logger = logging.getLogger(logger_name)
    found = next((f for f in logger.filters if isinstance(f, OnceFilter)), None)
    if found is None:
        found = OnceFilter()
        logger.addFilter(found)
    return found


def _rows(name: str, pool: "Pool") -> list[dict]:
    """One row per actor: pool name, actor name, and the actor's own description (role, device, host...)."""
    return [{"pool": name, "actor": m.name, **info} for m, info in zip(pool.members, pool.describe())]


def start_pool(address: str, name: str, size: int, threads: int, device: str) -> list[dict]:
    """Start a named, detached pool on the cluster at ``address``; returns its rows as :func:`list_pool`'s."""
    check_pool_device(device)
    connect(address)
    warn_once("ray.actor")
    return _rows(name, Pool.create(size, threads=threads, device=device, name=name))


def list_pool(address: str, name: str | None) -> list[dict]:
    """Describe the actors of one pool (or of every specdit pool) on the cluster."""
    connect(address)
    names = sorted({n.rsplit("-", 2)[0] for n in _actor_names()})
    if name is not None:
        if name not in names:
            raise PoolError(f"no pool named {name!r} on this Ray cluster")
        names = [name]
    return [row for pname in names for row in _rows(pname, Pool.attach(pname))]


def stop_pool(address: str, name: str) -> int:
    """Kill a named pool's actors and free its placement group; returns the number of actors stopped."""
    connect(address)
    pool = Pool.attach(name)
    pool.shutdown()
    return len(pool.members)
