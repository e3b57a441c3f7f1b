"""How a Buffer moves rows: the choice of transport, and the ProcessGroup transport's own state.

Two transports exist. "nvlink": torch_ep's CUDA kernels over peer-mapped memory, possible only
when every rank of the group is a CUDA-IPC peer of every other on one host. "process_group": the
group's own collectives (gloo for CPU tensors, NCCL for CUDA tensors), which works on any group,
across hosts too; its ops are in torch_ep/cpu.py.

The ProcessGroup transport runs its collectives on a group of its own, created with the Buffer's
timeout, so that a rank that never arrives makes the others fail within `timeout_s` and leaves no
half-finished collective in the user's group. Buffers over the same ranks with the same timeout share
that group (see `private_group`). Each op's arrival (call number and op) is recorded
in the c10d store by a writer thread, off the op's path, so that an error names the rank that is
missing.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

TRANSPORTS = ("nvlink", "process_group")
SIMULATE_HOSTS_ENV = "TORCH_EP_SIMULATE_HOSTS"


# -- choosing the transport -----------------------------------------------------------------------

@dataclass(frozen=True)
class PeerInfo:
    """What one rank tells the others at Buffer creation to decide on the transport and host layout."""
    hostname: str
    device_uuid: str                   # "" for CPU buffers
    reachable_uuids: frozenset         # devices this rank's GPU can access as a P2P peer (itself included)


def local_peer_info(device: torch.device) -> PeerInfo:
    if device.type != "cuda":
        return PeerInfo(socket.gethostname(), "", frozenset())
    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    reachable = {uuids[i] for i in range(len(uuids))
                 if i == device.index or torch.cuda.can_device_access_peer(device.index, i)}
    return PeerInfo(socket.gethostname(), uuids[device.index], frozenset(reachable))


def all_ipc_peers(infos: Sequence[PeerInfo]) -> bool:
    """Every rank on one host, and every rank's GPU a P2P peer of every other's."""
    if len({info.hostname for info in infos}) != 1:
        return False
    return all(other.device_uuid in info.reachable_uuids for info in infos for other in infos)


def select_transport(infos: Sequence[PeerInfo], requested: Optional[str], device: torch.device) -> str:
    """The transport a Buffer on `device` uses: `requested`, or the NVLink kernels where they can run."""
    if requested is not None and requested not in TRANSPORTS:
        raise ValueError(f"torch_ep.Buffer: transport must be None, 'nvlink' or 'process_group', got {requested!r}")
    if device.type != "cuda":
        if requested == "nvlink":
            raise ValueError("torch_ep.Buffer: transport='nvlink' needs a CUDA device; CPU tensors always use "
                             "'process_group'")
        return "process_group"
    if requested is not None:
        if requested == "nvlink" and not all_ipc_peers(infos):
            raise ValueError("torch_ep.Buffer: transport='nvlink' needs every rank on one host with P2P access "
                             "between all GPUs; use transport='process_group' (or None to choose)")
        return requested
    return "nvlink" if all_ipc_peers(infos) else "process_group"


# -- host layout (hierarchical forwarding) ----------------------------------------------------------

@dataclass(frozen=True)
class HostLayout:
    """Ranks grouped into hosts of `ranks_per_host` consecutive ranks: rank r = host * L + local."""
    num_hosts: int
    ranks_per_host: int

    @property
    def hierarchical(self) -> bool:
        """Two stages (between hosts, then inside one) only pay off with several hosts of several ranks."""
        return self.num_hosts > 1 and self.ranks_per_host > 1

    def host(self, rank: int) -> int:
        return rank // self.ranks_per_host

    def local(self, rank: int) -> int:
        return rank % self.ranks_per_host


def host_layout(infos: Sequence[PeerInfo], ranks_per_host: Optional[int]) -> HostLayout:
    """`ranks_per_host` if given, else TORCH_EP_SIMULATE_HOSTS (a host count), else the hostnames.

    Real hosts count only if they hold equal, consecutive blocks of ranks; otherwise the layout is
    flat (one "host"), which is always correct, only without the inter-host deduplication."""
    num_ranks = len(infos)
    simulated = os.environ.get(SIMULATE_HOSTS_ENV)
    if ranks_per_host is None and simulated:
        hosts = int(simulated)
        if hosts <= 0 or num_ranks % hosts:
            raise ValueError(f"torch_ep.Buffer: {SIMULATE_HOSTS_ENV}={simulated} must divide the group size "
                             f"{num_ranks}")
        ranks_per_host = num_ranks // hosts
    if ranks_per_host is not None:
        if ranks_per_host <= 0 or num_ranks % ranks_per_host:
            raise ValueError(f"torch_ep.Buffer: ranks_per_host={ranks_per_host} must divide the group size "
                             f"{num_ranks}")
        return HostLayout(num_ranks // ranks_per_host, ranks_per_host)
    names = [info.hostname for info in infos]
    per_host = names.count(names[0])
    blocks = [names[i:i + per_host] for i in range(0, num_ranks, per_host)]
    if all(len(set(b)) == 1 for b in blocks) and len({b[0] for b in blocks}) == len(blocks):
        return HostLayout(len(blocks), per_host)
    return HostLayout(1, num_ranks)


# -- the ProcessGroup transport's state -------------------------------------------------------------

class TransportError(RuntimeError):
    """A collective of the ProcessGroup transport failed or timed out; the Buffer is unusable after it."""


class ArrivalWriter:
    """Writes this rank's latest arrival record to the store from a thread of its own: a store write is a
    TCP round trip to the store's host, which every op would otherwise wait for. Records only matter once
    a collective has failed, seconds later, so a write that lags by one round trip changes nothing; when
    several ops pass before a write, only the latest is written."""

    def __init__(self, store, key: str):
        self._store, self._key = store, key
        self._latest: Optional[str] = None
        self._written: Optional[str] = None
        self._wake = threading.Condition()
        self._stopped = False
        self._thread: Optional[threading.Thread] = None

    def record(self, value: str) -> None:
        with self._wake:
            self._latest = value
            if self._thread is None:  # started on first use: buffers that never run an op cost no thread
                self._thread = threading.Thread(target=self._run, name=f"torch_ep arrivals {self._key}",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def flush(self) -> None:
        """Write the latest record now (before reading the others' records on a failure)."""
        with self._wake:
            latest = self._latest
        if latest is not None and latest != self._written:
            self._store.set(self._key, latest)

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._latest == self._written and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
                latest = self._latest
            try:
                self._store.set(self._key, latest)
            except Exception:  # the store's host is gone: fail() then reports the records unreadable
                return
            self._written = latest


# -- private groups -----------------------------------------------------------------------------------

# (ranks, backend, timeout) -> (generation: groups this key has had, the latest group). Groups live until
# the default group is destroyed, shared by the Buffers made one after another: a communicator takes
# ~0.1-1 s and GPU memory to build, and destroying one is unsafe on torch < 2.14, whose
# new_group(use_local_synchronization=True) names a group by hashing its ranks and the number of live
# groups, so the next group gets the destroyed one's name and finds that group's stale rendezvous keys in
# the store (NCCL's first collective then hangs).
_PRIVATE_GROUPS: dict = {}
# id(group) -> (group, why) for groups a failed collective dropped: no new Buffer gets them, and live Buffers
# on them refuse further ops (holding the group keeps its id from being reused).
_FAILED_GROUPS: dict = {}


def private_group(parent, backend: str, timeout: datetime.timedelta):
    """The transport group over `parent`'s ranks: the cached one where every rank still has it, else a new
    one (collective over `parent`: the ranks agree first, since a failure may have discarded it on some)."""
    ranks = dist.get_process_group_ranks(parent)
    key = (tuple(ranks), backend, timeout)
    generation, group = _PRIVATE_GROUPS.get(key, (0, None))
    usable = (group is not None and group in dist.distributed_c10d._world.pg_map
              and id(group) not in _FAILED_GROUPS)
    states = [None] * len(ranks)
    dist.all_gather_object(states, (generation, usable), group=parent)
    if all(state == (generation, True) for state in states):
        return group
    group = dist.new_group(ranks, timeout=timeout, backend=backend, use_local_synchronization=True)
    _PRIVATE_GROUPS[key] = (max(g for g, _ in states) + 1, group)
    return group


def discard_private_group(group, why: str) -> None:
    """Never use `group` again, in any Buffer: a failed collective may leave messages or an aborted
    communicator in it. It is not destroyed (see _PRIVATE_GROUPS): private_group replaces it on every rank."""
    _FAILED_GROUPS[id(group)] = (group, why)


class ProcessGroupTransport:
    """A private group with the Buffer's timeout, arrival records in the store, the host layout. `key`
    (the Buffer's name, the same on every rank) keeps the arrival records of Buffers sharing a group apart."""

    def __init__(self, group, device: torch.device, timeout_s: float, hosts: HostLayout, key: str):
        self.device = device
        self.hosts = hosts
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        backend = "gloo" if device.type == "cpu" else "nccl"
        # NCCL's watchdog ends the process when a collective outlives the group's timeout: give the host's
        # own check (_wait_on_host) time to name the missing rank first.
        group_timeout = self.timeout if device.type == "cpu" else self.timeout + datetime.timedelta(
            seconds=max(5.0, timeout_s / 2))
        self.group = private_group(group, backend, group_timeout)
        prefix = f"torch_ep/{dist.distributed_c10d._get_process_group_name(self.group)}/{key}/"
        self.store = dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())
        self.calls = 0
        self.failure: Optional[str] = None
        self._arrivals = ArrivalWriter(self.store, str(self.rank))

    def _wait(self, work, op: str) -> None:
        """gloo: wait on the host, at most the timeout. NCCL: make the stream wait (its timeout is the
        group's, enforced by the NCCL watchdog)."""
        try:
            if self.device.type == "cpu":
                work.wait(self.timeout)
            else:
                work.wait()
        except Exception as exc:  # gloo reports timeouts and dead peers as several exception types
            self.fail(op, exc)

    def _wait_on_host(self, work, op: str) -> None:
        """NCCL work whose result the host reads next anyway: poll it, so that a missing rank is named after
        the timeout instead of the host blocking until the watchdog ends the process."""
        start = time.monotonic()
        deadline = start + self.timeout.total_seconds()
        while not work.is_completed():
            now = time.monotonic()
            if now > deadline:
                self.fail(op, TimeoutError("NCCL collective not complete"))
            # A small exchange completes within tens of microseconds, shorter than one sleep lasts
            # (~60-100 us on Linux): poll without sleeping for the first millisecond.
            time.sleep(0 if now - start < 1e-3 else 20e-6)
        self._wait(work, op)

    def arrive(self, op: str) -> None:
        """Record that this rank entered call number `calls` (op `op`); raise if an earlier call failed."""
        if self.failure is None and id(self.group) in _FAILED_GROUPS:
            why = _FAILED_GROUPS[id(self.group)][1]
            self.failure = f"another Buffer's op failed on the group this one shares: {why}"
        if self.failure is not None:
            raise TransportError(f"{op}: this Buffer failed earlier and cannot be used: {self.failure}")
        self.calls += 1
        self._arrivals.record(f"{self.calls} {op}")

    def fail(self, op: str, cause: BaseException) -> None:
        """Raise an error naming the ranks that did not reach this call (from their arrival records)."""
        late = []
        try:
            self._arrivals.flush()
            for r in range(self.num_ranks):
                seen = self.store.get(str(r)).decode().split(" ", 1) if self.store.check([str(r)]) else None
                if seen is None or int(seen[0]) < self.calls:
                    last = f"its last call was #{seen[0]} {seen[1]}" if seen else "it made no call yet"
                    late.append(f"rank {r} ({last})")
        except Exception as exc:  # the store lives in the process of global rank 0, which may be gone too
            late.append(f"(arrival records unreadable: {type(exc).__name__}: {exc})")
        timeout_s = self.timeout.total_seconds()
        if late:
            self.failure = (f"{op} (call #{self.calls}): {', '.join(late)} did not arrive within "
                            f"timeout_s={timeout_s:g}; {type(cause).__name__}: {cause}")
        else:
            self.failure = f"{op} (call #{self.calls}): the collective failed: {type(cause).__name__}: {cause}"
        discard_private_group(self.group, self.failure)
        raise TransportError(self.failure) from cause

    def all_gather(self, row: torch.Tensor, op: str, host_reads: bool = True) -> torch.Tensor:
        """[num_ranks, len(row)]: every rank's `row`. An all-to-all of the row repeated: gloo runs it several
        times faster than its all_gather for rows this small. `host_reads`: the caller reads the result on
        the host next (so waiting for it there costs nothing extra on CUDA)."""
        out = row.new_empty((self.num_ranks, row.shape[0]))
        work = self.start_all_to_all(out, row.repeat(self.num_ranks, 1), None, None)
        if host_reads and self.device.type == "cuda":
            self._wait_on_host(work, op)
        else:
            self._wait(work, op)
        return out

    def start_all_to_all(self, out: torch.Tensor, rows: torch.Tensor, out_splits: Optional[List[int]],
                         in_splits: Optional[List[int]]):
        """Start an all_to_all_single (splits None: equal) and return its work, for `wait`. (gloo's
        point-to-point send/recv took 2-6 times as long as its all-to-all for the same rows.)"""
        return dist.all_to_all_single(out, rows, out_splits, in_splits, group=self.group, async_op=True)

    def wait(self, works, op: str) -> None:
        for work in works:
            self._wait(work, op)

    def all_to_all(self, out: torch.Tensor, rows: torch.Tensor, out_splits: Optional[List[int]],
                   in_splits: Optional[List[int]], op: str) -> None:
        """Rows of `rows` split by `in_splits` go to each rank; `out` receives by `out_splits` (None: equal)."""
        self._wait(self.start_all_to_all(out, rows, out_splits, in_splits), op)

    def destroy(self) -> None:
        """Remove this rank's arrival record (the group stays for the next Buffer: private_group)."""
        self._arrivals.stop()
        if self.calls and dist.is_initialized() and self.group in dist.distributed_c10d._world.pg_map:
            with contextlib.suppress(RuntimeError):  # a store whose host process is gone: nothing to free
                self.store.delete_key(str(self.rank))
