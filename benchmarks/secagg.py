"""Bytes and time SecAgg+ adds to a round, all sites simulated in this process.

    python benchmarks/secagg.py --sites 4,16,64 --length 80000 --bits 32 [--degree K] [--json out.json]

For each number of sites, two rounds: every site stays, and one site drops mid-round (after
sharing its keys, before its masked vector), so the coordinator rebuilds its mask key and
removes its pairwise masks. The complete neighbour graph unless ``--degree``; threshold
t = holders // 2 + 1, the least the protocol allows (holders: a site's neighbours and itself).

Bytes are the payload of the protocol's messages as their ``to_dict`` gives them (bytes by
length, ints as 8 bytes; key names and Flower's framing not counted), per site per round:
``up`` what a site sends (its keys, its encrypted shares, its masked vector, its unmask
shares), ``down`` what it receives (config, key directory, its shares, the unmask request).
``plain`` is the vector a site would send without secure aggregation (length x b/8 bytes);
the ratios are SecAgg+'s bytes over that.

Time is CPU work measured around each call, one party at a time (the sites run one after
another here; in a deployment they run in parallel): ``site`` the mean and the largest of one
site's total over the round (the sites that stayed), ``coordinator`` the coordinator's total,
``path`` the round's critical path (the slowest site of each stage, plus the coordinator),
which is what the protocol adds to a round's wall time before network round trips (four more
than a plain round). ``plain sum`` is what the coordinator spends adding the plain vectors;
``wall`` the whole simulated round in this process.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from privatune.common.secure_aggregation import SecAggSite
from privatune.common.secure_aggregation_messages import SecAggConfig, harary_graph
from privatune.common.secure_aggregation_coordinator import SecAggCoordinator


def payload_bytes(message: Any) -> int:
    """Bytes of a message's values: bytes by length, ints as 8 bytes."""
    total = 0
    for value in message.to_dict().values():
        for item in value if isinstance(value, list) else [value]:
            total += len(item) if isinstance(item, bytes) else 8
    return total


class Meter:
    """Per-party time per stage and bytes up and down."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[Any, float]] = defaultdict(lambda: defaultdict(float))
        self.up: dict[int, int] = defaultdict(int)
        self.down: dict[int, int] = defaultdict(int)

    def timed(self, stage: str, party: Any, call: Callable[[], Any]) -> Any:
        start = time.process_time()
        out = call()
        self.seconds[stage][party] += time.process_time() - start
        return out


def one_round(n: int, length: int, bits: int, degree: int | None, drop: bool, seed: int = 0) -> dict[str, float]:
    """Run one round and return its bytes per site and its times; checks the sum is exact."""
    ids = list(range(1, n + 1))
    graph = harary_graph(ids, degree, seed) if degree else None
    holders = n if not degree else min(n, degree + 1)
    config = SecAggConfig.create(round_id=1, site_ids=ids, threshold=holders // 2 + 1, modulus_bits=bits,
                                 vector_length=length, graph=graph)
    rng = np.random.default_rng(seed)
    xs = {i: rng.integers(0, 2**bits, length, dtype=np.uint64) for i in ids}
    dropped = {ids[n // 2]} if drop else set()
    meter = Meter()
    coordinator = SecAggCoordinator(config)
    for i in ids:
        meter.down[i] += payload_bytes(config)
    sites = {i: meter.timed("0 setup", i, lambda i=i: SecAggSite(i, config)) for i in ids}
    keys = [sites[i].public_keys() for i in ids]
    for msg in keys:
        meter.up[msg.site_id] += payload_bytes(msg)
    directory = meter.timed("1 keys", "coordinator", lambda: coordinator.receive_public_keys(keys))
    shares = [meter.timed("2 shares", i, lambda i=i: sites[i].share_keys(directory)) for i in ids]
    for i, msg in zip(ids, shares, strict=True):
        meter.down[i] += payload_bytes(directory)
        meter.up[i] += payload_bytes(msg)
    deliveries = meter.timed("2 shares", "coordinator", lambda: coordinator.receive_encrypted_shares(shares))
    masked = []
    for i in ids:
        meter.down[i] += payload_bytes(deliveries[i])
        if i not in dropped:
            masked.append(meter.timed("3 masked", i, lambda i=i: sites[i].masked_input(deliveries[i], xs[i])))
            meter.up[i] += payload_bytes(masked[-1])
    request = meter.timed("3 masked", "coordinator", lambda: coordinator.receive_masked_inputs(masked))
    replies = []
    for i in request.survivors:
        meter.down[i] += payload_bytes(request)
        replies.append(meter.timed("4 unmask", i, lambda i=i: sites[i].unmask(request)))
        meter.up[i] += payload_bytes(replies[-1])
    result = meter.timed("4 unmask", "coordinator", lambda: coordinator.receive_unmask_shares(replies))
    survivors = [i for i in ids if i not in dropped]
    expected = np.zeros(length, dtype=np.uint64)
    start = time.process_time()
    for i in survivors:
        expected = (expected + xs[i]) & np.uint64(2**bits - 1)
    plain_sum = time.process_time() - start
    if not np.array_equal(result.total, expected):
        raise SystemExit(f"{n} sites: the unmasked sum is wrong")

    per_site = {i: sum(stage.get(i, 0.0) for stage in meter.seconds.values()) for i in survivors}
    path = sum(max((t for p, t in stage.items() if p != "coordinator"), default=0.0)
               for stage in meter.seconds.values())
    coordinator_s = sum(stage.get("coordinator", 0.0) for stage in meter.seconds.values())
    plain = length * ((bits + 7) // 8)
    up = float(np.mean([meter.up[i] for i in survivors]))
    down = float(np.mean([meter.down[i] for i in survivors]))
    return {
        "sites": n, "dropped": len(dropped), "threshold": config.threshold,
        "up_bytes": up, "down_bytes": down, "plain_bytes": plain,
        "up_ratio": up / plain, "total_ratio": (up + down) / plain,
        "site_mean_s": float(np.mean(list(per_site.values()))), "site_max_s": max(per_site.values()),
        "coordinator_s": coordinator_s, "path_s": path + coordinator_s, "plain_sum_s": plain_sum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="4,16,64", help="comma-separated site counts")
    parser.add_argument("--length", type=int, default=80_000, help="values per vector")
    parser.add_argument("--bits", type=int, default=32, help="modulus 2^bits")
    parser.add_argument("--degree", type=int, default=None, help="neighbours per site (default: all)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    print(f"vector {args.length} values at {args.bits} bits; bytes per site per round (a site that stayed); "
          "times in CPU seconds")
    print(f"{'sites':>5} {'drop':>4} {'t':>3} {'up B':>9} {'down B':>9} {'plain B':>9} {'up/plain':>8} "
          f"{'all/plain':>9} {'site mean':>9} {'site max':>8} {'coord':>7} {'path':>7} {'plain sum':>9} {'wall':>6}")
    for n in (int(s) for s in args.sites.split(",")):
        for drop in (False, True):
            wall = time.perf_counter()
            row = one_round(n, args.length, args.bits, args.degree, drop)
            row["wall_s"] = time.perf_counter() - wall
            rows.append(row)
            print(f"{n:>5} {row['dropped']:>4} {row['threshold']:>3} {row['up_bytes']:>9.0f} "
                  f"{row['down_bytes']:>9.0f} {row['plain_bytes']:>9} {row['up_ratio']:>8.3f} "
                  f"{row['total_ratio']:>9.3f} {row['site_mean_s']:>9.3f} {row['site_max_s']:>8.3f} "
                  f"{row['coordinator_s']:>7.2f} {row['path_s']:>7.2f} {row['plain_sum_s']:>9.4f} {row['wall_s']:>6.1f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
