"""`slipstream bench broadcast`: a whole weight update against a plain gloo broadcast of the same bytes.

Two processes on localhost over gloo: this one is learner rank 0 (`WeightSender`), a spawned one is the engine
(`WeightReceiver` loading into an nn.Module). The model has `--tensors` tensors (float32 and bfloat16 mixed, sizes
spread like a transformer's) totalling `--mb` MiB.

- baseline: `dist.broadcast` of one flat uint8 tensor of the same bytes, plus a one-element reply from the engine
  (so both timings end when the engine has everything);
- snapshot: `sender.stage(...)`: the learner's one copy of the weights, into flat buckets (the learner takes it on
  its training thread: it must, since training changes the weights next);
- update: `sender.send_staged()`: announce, bucketed broadcast of the staged buckets with their checksums, the
  engine's verification, its load into the model, its ack.

broadcast_ratio = baseline seconds / update seconds (= update GB/s / baseline GB/s); broadcast_ratio_with_snapshot
counts the snapshot too (= `sender.update`). Medians over `--repeats`.
Prints a table, or exactly one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch
import torch.distributed as dist

from telemetry.logs import configure_logging
from weight_broadcast.config import BroadcastConfig, ReceiverConfig
from weight_broadcast.receiver import WeightReceiver
from weight_broadcast.rendezvous import close_group, connect_store, open_group
from weight_broadcast.sender import WeightSender

BASELINE_GROUP = "bench-baseline"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slipstream bench broadcast", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=128.0, help="model size in MiB (>= 100 for the goal)")
    parser.add_argument("--tensors", type=int, default=256, help="number of tensors (>= 200 for the goal)")
    parser.add_argument("--bucket-mb", type=float, default=None, help="bucket size in MiB (default: the config's)")
    parser.add_argument("--checksum", choices=["sum64", "crc32", "none"], default="sum64", help="bucket checksum")
    parser.add_argument(
        "--copy-load", action="store_true", help="the engine copies into its parameters instead of aliasing them"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per process: on a small host, spinning OpenMP threads starve gloo's own",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case (the median is reported)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    args = parser.parse_args(argv)
    if (
        args.mb <= 0
        or min(args.tensors, args.repeats, args.threads) < 1
        or (args.bucket_mb is not None and args.bucket_mb <= 0)
    ):
        parser.error("--mb, --tensors, --repeats, --threads and --bucket-mb must be positive")
    return args


def model_tensors(total_mb: float, n_tensors: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`n_tensors` named tensors totalling about `total_mb` MiB: every 4th a small float32 norm vector, the others
    matrices of varying size, alternately float32 and bfloat16."""
    generator = torch.Generator().manual_seed(seed)
    weights = [1.0 if i % 4 == 3 else 64.0 * (1 + (i * 7919) % 5) for i in range(n_tensors)]
    scale = total_mb * 2**20 / sum(w * (4 if i % 2 == 0 or i % 4 == 3 else 2) for i, w in enumerate(weights))
    tensors = {}
    for i, w in enumerate(weights):
        numel = max(1, int(w * scale))
        dtype = torch.float32 if i % 2 == 0 or i % 4 == 3 else torch.bfloat16
        rows = 64 if numel >= 4096 else 1
        tensors[f"layers.{i}.weight"] = torch.randn(rows, numel // rows, generator=generator).to(dtype)
    return tensors


def _engine(port: int, args: argparse.Namespace, rounds: int) -> None:
    """The engine process: per round, the baseline broadcast (and its reply), then one weight update."""
    configure_logging("auto", "warning")  # stderr: stdout is the benchmark's
    torch.set_num_threads(args.threads)
    shapes = model_tensors(args.mb, args.tensors)
    model = torch.nn.Module()
    for i, t in enumerate(shapes.values()):
        model.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros_like(t), requires_grad=False))
    params = dict(zip(shapes, model.parameters(), strict=True))

    def load(named: list[tuple[str, torch.Tensor]], version: int) -> None:
        for name, tensor in named:
            if args.copy_load:
                params[name].copy_(tensor)
            else:  # double-buffered receiver: the parameter may alias the received buffer
                params[name].data = tensor

    config = ReceiverConfig(master_port=port, name="bench-engine", timeout_s=60, double_buffer=not args.copy_load)
    receiver = WeightReceiver(config, load)
    receiver.connect()
    pg = open_group(connect_store("127.0.0.1", port, 60), BASELINE_GROUP, 1, 2, "gloo", 60)
    flat = torch.empty(sum(t.numel() * t.element_size() for t in shapes.values()), dtype=torch.uint8)
    reply = torch.zeros(1)
    for version in range(1, rounds + 1):
        dist.broadcast(flat, src=0, group=pg)
        dist.broadcast(reply, src=1, group=pg)
        while receiver.version != version:
            receiver.step(1.0)
    close_group(pg)
    receiver.close()


def main(argv: list[str]) -> int:
    args = _parse(argv)
    configure_logging("auto", "warning")  # stderr: with --json, stdout holds exactly one JSON object
    torch.set_num_threads(args.threads)
    tensors = model_tensors(args.mb, args.tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    config = BroadcastConfig(master_port=0, timeout_s=60, bucket_mb=args.bucket_mb, checksum=args.checksum)
    sender = WeightSender(config)
    rounds = args.repeats + 1  # the first round warms up: page faults, connections, the group's formation
    engine = mp.get_context("spawn").Process(target=_engine, args=(sender.port, args, rounds), daemon=True)
    engine.start()
    baseline_times, snapshot_times, update_times = [], [], []
    try:
        pg = open_group(sender.store, BASELINE_GROUP, 0, 2, "gloo", 60)
        flat = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        reply = torch.zeros(1)
        # Rounds alternate baseline and update, so both see the same (noisy, shared) machine.
        for version in range(1, rounds + 1):
            start = time.perf_counter()
            dist.broadcast(flat, src=0, group=pg)
            dist.broadcast(reply, src=1, group=pg)
            middle = time.perf_counter()
            sender.stage(tensors, version)
            staged = time.perf_counter()
            report = sender.send_staged()
            end = time.perf_counter()
            if report is None or report.delivered != ["bench-engine"]:
                raise RuntimeError(f"update {version} not delivered: {report}")
            if version > 1:
                baseline_times.append(middle - start)
                snapshot_times.append(staged - middle)
                update_times.append(end - staged)
        close_group(pg)
        engine.join(timeout=60)
    finally:
        if engine.is_alive():
            engine.kill()
        sender.close()
    baseline_s, update_s = statistics.median(baseline_times), statistics.median(update_times)
    with_snapshot_s = statistics.median(s + u for s, u in zip(snapshot_times, update_times, strict=True))
    result = {
        "bytes": nbytes,
        "tensors": len(tensors),
        "bucket_mb": config.bucket_bytes / 2**20,
        "checksum": args.checksum,
        "load": "copy" if args.copy_load else "alias",
        "baseline_gbps": nbytes / baseline_s / 1e9,
        "update_gbps": nbytes / update_s / 1e9,
        "baseline_s": baseline_s,
        "update_s": update_s,
        "snapshot_s": statistics.median(snapshot_times),
        "broadcast_ratio": baseline_s / update_s,
        "broadcast_ratio_with_snapshot": baseline_s / with_snapshot_s,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(tensors)} tensors, {nbytes / 2**20:.0f} MiB, buckets {result['bucket_mb']:g} MiB, {args.checksum}")
        print(f"plain gloo broadcast  {result['baseline_gbps']:.2f} GB/s  ({baseline_s * 1e3:.1f} ms)")
        load = result["load"]
        print(f"slipstream update     {result['update_gbps']:.2f} GB/s  ({update_s * 1e3:.1f} ms, {load} load)")
        print(f"learner's snapshot    {result['snapshot_s'] * 1e3:.1f} ms (the copy into the buckets)")
        print(f"broadcast_ratio       {result['broadcast_ratio']:.2f}  (goal >= 0.8)")
        print(f"  with the snapshot   {result['broadcast_ratio_with_snapshot']:.2f}")
    return 0
