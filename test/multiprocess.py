"""A pool of worker processes joined in one ProcessGroup, kept alive across tests.

`pool.run(fn, *args, **kwargs)` runs the module-level function `fn(*args, **kwargs)` on every rank at once and
returns the per-rank results; a failure on any rank raises with that rank's traceback.
"""
import datetime
import multiprocessing
import os
import queue
import socket
import traceback


class WorkerError(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, use_cuda, tasks, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    if use_cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        if os.environ.get("TORCH_EP_EXPECT_SANITIZER"):
            _report_sanitizer(rank, torch)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    import torch_ep  # noqa: F401
    while (task := tasks.get()) is not None:
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as exc:  # report everything, keep serving
            results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


def _report_sanitizer(rank, torch) -> None:
    """Says whether compute-sanitizer's libraries are loaded in this worker (test/gpu_check.sh counts it)."""
    torch.zeros(1, device="cuda")  # the sanitizer attaches when CUDA initialises
    with open("/proc/self/maps") as f:
        loaded = sorted({os.path.basename(line.split()[-1]) for line in f if "sanitizer" in line.lower()})
    state = f"sanitizer loaded ({', '.join(loaded)})" if loaded else "sanitizer NOT loaded"
    print(f"worker rank {rank} pid {os.getpid()}: {state}", flush=True)


class Pool:
    def __init__(self, world_size: int, backend: str = "gloo", use_cuda: bool = False, task_timeout_s: float = 600.0):
        ctx = multiprocessing.get_context("spawn")
        self.world_size = world_size
        self.task_timeout_s = task_timeout_s  # a run() with no answer by then closes the pool and fails
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, world_size, port, backend, use_cuda, self.tasks[r], self.results))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        timeout = self.task_timeout_s
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out, errors = [None] * self.world_size, []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise WorkerError(f"{fn.__name__}: no answer within {timeout} s (a rank hung); pool closed")
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}: {value}")
        if errors:
            raise WorkerError(f"{fn.__name__} failed:\n" + "\n".join(sorted(errors)))
        return out

    def close(self) -> None:
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
