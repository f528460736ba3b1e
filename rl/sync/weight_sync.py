"""Getting the learner's weights into the rollout engines: one interface, two backends.

- `ObjectStoreSync` (sync.backend=object_store, the fallback): learner rank 0 gathers the full
  state dict, the driver fetches it and puts one copy in Ray's object store, every engine loads it.
- `CollectiveSync` (sync.backend=collective): a torch.distributed group of its own joins learner
  rank 0 (rank 0 of the group) and every engine worker (gloo on CPU, NCCL on GPU). Every learner
  rank walks the parameters one at a time (under ZeRO-3 each is gathered only for its turn),
  rank 0 packs them into buckets of `sync.bucket_mb` and broadcasts each bucket; each engine
  worker unpacks a bucket into (name, tensor) views and hands them to the engine's in-place
  reload as they arrive. Nothing passes through the driver, and neither side holds more than a
  bucket beyond the model. With LoRA only the adapted layers change, so only their merged
  weights W + (alpha/r) B A are sent; everything else is still the base model the engines loaded.
  When the bytes would cross host memory anyway (gloo: CPU, or engines colocated with learners on
  their GPUs) and every engine is on learner rank 0's node, they take a shorter way (`SharedMemorySync`):
  rank 0 writes them once into an anonymous shared-memory file and each engine reloads from views
  of it: one copy on each side, no socket, no group to join (so a replaced engine simply reads too).

A transport owns both ends: its functions run in learner rank 0's actor through a `WeightSource`
(rl.learner.worker: the rank's weights as (name, tensor) pairs, its device, a state dict of the
transport's) and in every engine process through a `WeightWorker` (rollouts.engine: a loader, the
worker's rank and device, a state dict). Neither side knows which transport is in use: the trainer
calls `WeightPusher.push()`.
A bucket travels as three broadcasts: a header [data bytes, metadata bytes], the metadata (JSON:
name, dtype, shape, offset of each tensor) and the data; a header of zeros ends the stream.
"""
from __future__ import annotations

import json
import os
import socket
import time
from abc import ABC, abstractmethod
from datetime import timedelta

import torch

ALIGN = 16  # byte offset of every tensor in a bucket, so that uint8 views can be reinterpreted
GROUP_TIMEOUT = timedelta(minutes=30)


# ---------------------------------------------------------------------------------------------
# The group and the stream (both sides)


def open_port() -> tuple[str, int]:
    """(this node's IP, a free port on it): where the group's store will listen."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def transfer_device(own: torch.device, nccl: bool) -> torch.device:
    """Where a member's buffers live: its GPU with NCCL, else host memory (gloo)."""
    return own if nccl else torch.device("cpu")


def join_group(host: str, port: int, rank: int, world: int, device: torch.device):
    """A process group of its own (not torch.distributed's default one, which DeepSpeed and vLLM
    use): gloo for CPU tensors, NCCL for CUDA ones. Blocks until all `world` ranks have joined."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=GROUP_TIMEOUT)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, GROUP_TIMEOUT)


def _broadcast(group, tensor: torch.Tensor) -> None:
    group.broadcast([tensor], _root0()).wait()


def _root0():
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts


def send_stream(group, named_tensors, bucket_bytes: int, device: torch.device) -> dict[str, float]:
    """Broadcast (name, tensor) pairs from group rank 0 in buckets. Each tensor's bytes are copied
    into one reused bucket buffer before the next is asked for (so a ZeRO-3 gather can be
    released); a tensor larger than a bucket goes alone, straight from its own memory."""
    sent, buckets = 0, 0
    buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device=device)
    meta: list = []
    size = 0

    def flush(data: torch.Tensor, entries: list) -> None:
        nonlocal sent, buckets
        blob = torch.tensor(list(json.dumps(entries).encode()), dtype=torch.uint8, device=device)
        _broadcast(group, torch.tensor([data.numel(), blob.numel()], dtype=torch.int64, device=device))
        _broadcast(group, blob)
        _broadcast(group, data)
        sent, buckets = sent + data.numel(), buckets + 1

    for name, tensor in named_tensors:
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        entry = [name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]
        if flat.numel() > bucket_bytes:
            flush(flat.to(device), [[*entry, 0, flat.numel()]])
            continue
        if size + flat.numel() > bucket_bytes:
            flush(buffer[:size], meta)
            meta, size = [], 0
        buffer[size : size + flat.numel()].copy_(flat)
        meta.append([*entry, size, flat.numel()])
        size += -(-flat.numel() // ALIGN) * ALIGN
    if meta:
        flush(buffer[:size], meta)
    _broadcast(group, torch.zeros(2, dtype=torch.int64, device=device))
    return {"sync_bytes": float(sent), "sync_buckets": float(buckets)}


def receive_stream(group, device: torch.device):
    """The (name, tensor) pairs `send_stream` broadcasts, bucket by bucket, as views into each bucket."""
    while True:
        header = torch.zeros(2, dtype=torch.int64, device=device)
        _broadcast(group, header)
        data_bytes, meta_bytes = header.tolist()
        if meta_bytes == 0:
            return
        blob = torch.empty(meta_bytes, dtype=torch.uint8, device=device)
        _broadcast(group, blob)
        data = torch.empty(data_bytes, dtype=torch.uint8, device=device)
        _broadcast(group, data)
        for name, dtype, shape, offset, nbytes in json.loads(bytes(blob.cpu().tolist()).decode()):
            yield name, data[offset : offset + nbytes].view(getattr(torch, dtype)).view(shape)


# ---------------------------------------------------------------------------------------------
# Through shared memory (one node)


def write_shared(fd: int, named_tensors) -> tuple[list, int]:
    """Write (name, tensor) pairs into the file `fd`, each at a 16-byte-aligned offset; returns the
    manifest [name, dtype, shape, offset, bytes] and the file's length. The file is rewritten in
    place, so a reader's old mapping never points past its end."""
    manifest, offset = [], 0
    for name, tensor in named_tensors:
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
        written = 0
        while written < len(data):  # pwrite may write less than asked (2 GiB at most per call)
            written += os.pwrite(fd, data[written:], offset + written)
        manifest.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, len(data)])
        offset += -(-len(data) // ALIGN) * ALIGN
    os.ftruncate(fd, offset)
    return manifest, offset


def read_shared(path: str, manifest: list, size: int):
    """The (name, tensor) pairs of `write_shared`'s manifest, as views of the mapped file."""
    try:
        data = torch.from_file(path, shared=True, size=size, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    except (OSError, RuntimeError) as e:
        raise RuntimeError(
            f"Cannot map learner rank 0's shared-memory weights at {path} ({e}). Set sync.shared_memory=false "
            "to broadcast them over gloo instead."
        ) from e
    for name, dtype, shape, offset, nbytes in manifest:
        yield name, data[offset : offset + nbytes].view(getattr(torch, dtype)).view(shape)


# ---------------------------------------------------------------------------------------------
# The two ends: the learner side runs in every learner rank's actor (LearnerGroup.submit_weight_work,
# on a WeightSource), the engine side in every engine process (RolloutPool.submit_weight_work, on a
# WeightWorker).


def _learner_write_shared(source) -> dict:
    """Every rank walks the weights (ZeRO-3 gathers are collective); rank 0 writes them into its
    shared-memory file and returns where the engines find it ({} elsewhere)."""
    weights = source.weights()
    if source.rank != 0:
        for _ in weights:
            pass
        return {}
    if "fd" not in source.state:
        # An anonymous file (memfd): its memory goes back to the system when this process ends,
        # however it ends. Processes on this node open it by its /proc path.
        source.state["fd"] = os.memfd_create("rl-engine-weights")
    manifest, size = write_shared(source.state["fd"], weights)
    return {"path": f"/proc/{os.getpid()}/fd/{source.state['fd']}", "manifest": manifest, "size": size}


def _engine_read_shared(worker, path: str, manifest: list, size: int) -> None:
    # Every worker (tensor-parallel rank) maps the file; the engine's loader keeps each one's shard.
    worker.load(read_shared(path, manifest, size))


def _learner_open_port(source) -> tuple[str, int]:
    return open_port()


def _learner_join(source, host: str, port: int, world: int, nccl: bool) -> None:
    if source.rank == 0:
        source.state["device"] = transfer_device(source.device, nccl)
        source.state["group"] = join_group(host, port, 0, world, source.state["device"])


def _engine_join(worker, host: str, port: int, first_rank: int, world: int, nccl: bool) -> None:
    # Engine weight worker i is group rank first_rank + i; each receives the full tensors.
    worker.state["device"] = transfer_device(worker.device, nccl)
    worker.state["group"] = join_group(host, port, first_rank + worker.rank, world, worker.state["device"])


def _learner_send(source, bucket_bytes: int) -> dict[str, float]:
    """Every rank walks the weights (ZeRO-3 gathers are collective); rank 0 sends them."""
    weights = source.weights()
    if source.rank != 0:
        for _ in weights:
            pass
        return {}
    return send_stream(source.state["group"], weights, bucket_bytes, source.state["device"])


def _engine_receive(worker) -> None:
    # The loader consumes the stream bucket by bucket as it arrives. Whatever it leaves (a loader that
    # fails, or skips tensors) is still received: learner rank 0 broadcasts every bucket, and a
    # member that stops taking part would leave the whole group waiting.
    stream = receive_stream(worker.state["group"], worker.state["device"])
    try:
        worker.load(stream)
    finally:
        for _ in stream:
            pass


# ---------------------------------------------------------------------------------------------
# The backends (driver side)


class WeightSync(ABC):
    def __init__(self, pool, learners):
        self.pool, self.learners = pool, learners

    @abstractmethod
    def push(self) -> dict[str, float]:
        """Load the learner's current weights into every engine; returns metrics (seconds, bytes)."""

    def close(self) -> None:
        """Release what the backend holds."""


class ObjectStoreSync(WeightSync):
    """Learner rank 0 -> driver -> object store -> every engine: the full state dict each step."""

    def __str__(self) -> str:
        return "object store (learner rank 0 -> driver -> every engine)"

    def push(self) -> dict[str, float]:
        t0 = time.perf_counter()
        state = self.learners.full_state_dict()
        t1 = time.perf_counter()
        self.pool.load_weights(state)
        return {
            "sync_gather_s": t1 - t0, "sync_load_s": time.perf_counter() - t1,
            "sync_bytes": float(sum(t.numel() * t.element_size() for t in state.values())),
        }


class CollectiveSync(WeightSync):
    """Learner rank 0 broadcasts buckets straight to every engine worker (see the module doc).

    nccl: GPU to GPU. It needs every member on a GPU of its own: NCCL refuses two ranks on one
    device, so colocated engines (which share their GPUs with learner ranks) and CPU clusters use
    gloo through host memory.
    """

    def __init__(self, pool, learners, bucket_mb: float = 256.0, nccl: bool = False):
        super().__init__(pool, learners)
        self.nccl = nccl
        self.bucket_bytes = int(bucket_mb * 2**20)
        ranks = pool.weight_workers()
        firsts = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        world = 1 + sum(ranks)
        host, port = learners.wait(learners.submit_weight_work(_learner_open_port), "open the weight group")[0]
        # Every member blocks in the rendezvous until all have joined: start them all, then wait.
        engine_refs = pool.submit_weight_work(_engine_join, [(host, port, first, world, nccl) for first in firsts])
        learner_refs = learners.submit_weight_work(_learner_join, host, port, world, nccl)
        learners.wait(learner_refs, "join the weight group")
        pool.wait("join the weight group", engine_refs)

    def __str__(self) -> str:
        return f"collective broadcast over {'NCCL' if self.nccl else 'gloo'} in {self.bucket_bytes / 2**20:g} MiB buckets"

    def push(self) -> dict[str, float]:
        t0 = time.perf_counter()
        engine_refs = self.pool.submit_weight_work(_engine_receive)
        sent = self.learners.wait(self.learners.submit_weight_work(_learner_send, self.bucket_bytes), "send weights")[0]
        self.pool.wait("receive weights", engine_refs)
        return {**sent, "sync_stream_s": time.perf_counter() - t0}


class SharedMemorySync(WeightSync):
    """Learner rank 0 writes the weights into a shared-memory file on its node; every engine (all on
    that node) reloads from views of it (see the module doc). The file holds one copy of what the
    engines load, for the run's length, in learner rank 0's host memory."""

    def __str__(self) -> str:
        return "collective through a shared-memory file on learner rank 0's node"

    def push(self) -> dict[str, float]:
        t0 = time.perf_counter()
        shared = self.learners.wait(self.learners.submit_weight_work(_learner_write_shared), "write weights to shared memory")[0]
        t1 = time.perf_counter()
        where = (shared["path"], shared["manifest"], shared["size"])
        self.pool.wait("load weights from shared memory",
                       self.pool.submit_weight_work(_engine_read_shared, [where] * self.pool.num_engines))
        return {"sync_write_s": t1 - t0, "sync_load_s": time.perf_counter() - t1, "sync_bytes": float(shared["size"])}


def build_weight_sync(sync_cfg, pool, learners, plan) -> WeightSync:
    """The configured backend. `plan` (rl.loop.placement) decides how the collective one moves bytes:
    NCCL between disjoint GPUs (split), else host memory: a shared-memory file when every engine is on
    learner rank 0's node (and sync.shared_memory), else gloo."""
    if sync_cfg.backend == "object_store":
        return ObjectStoreSync(pool, learners)
    nccl = plan.on_gpu and plan.mode == "split"
    if not nccl and sync_cfg.shared_memory and plan.engines_on_learner0_node():
        return SharedMemorySync(pool, learners)
    return CollectiveSync(pool, learners, sync_cfg.bucket_mb, nccl=nccl)


class WeightPusher:
    """The run's weight pushes through the configured transport. Engines replaced after a crash
    (rl.loop.guards.EngineRecovery) are not members of the old collective group: the next push
    forms a new one with every engine, so a recovery goes through the configured transport too."""

    def __init__(self, sync_cfg, pool, learners, plan):
        self.args = (sync_cfg, pool, learners, plan)
        self.sync = build_weight_sync(*self.args)
        self.stale = False

    def __str__(self) -> str:
        return str(self.sync)

    def engines_replaced(self) -> None:
        self.stale = True

    def push(self) -> dict[str, float]:
        if self.stale:
            self.sync.close()
            self.sync, self.stale = build_weight_sync(*self.args), False
        return self.sync.push()

    def close(self) -> None:
        self.sync.close()
