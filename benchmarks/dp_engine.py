"""Step time and peak memory of LoRA fine-tuning: non-private, DP with the LoRA engine, DP with
stock Opacus, side by side.

    python benchmarks/dp_engine.py --shapes demo,40m,190m --steps 9 --out bench.json

Each variant runs in its own worker process. On the CPU the workers take their steps in turns,
one step each in a rotating order, so that a slow patch of a shared machine hits every variant
alike; only one worker computes at a time. On a GPU the variants run one after another, each
alone on the GPU (three models with their activations need not fit at once). Reported per
variant: median wall-clock and process CPU time of a step (CPU time is the steadier figure on
a busy machine), tokens/s, minor page faults per step (JSON only) and peak memory:
  rss   CPU: the timing worker's peak RSS (VmHWM, reset through /proc/self/clear_refs once the
        model is built) over its steps, including what glibc keeps for reuse;
        GPU: torch.cuda.max_memory_allocated
  live  CPU only: the peak RSS over two steps of a fresh worker whose allocator returns freed
        memory at once (TIGHT_MALLOC), close to the peak of live tensors
Timing workers run with a steady glibc allocator (STEADY_MALLOC; ``--malloc default`` for
glibc as configured): see STEADY_MALLOC for why.

Variants:
  nonprivate  Adam on the LoRA parameters, the trainer's loss (mean of per_example_loss)
  dp_new      Opacus through LoraPrivacyEngine: per-sample LoRA gradients from autograd
              (client/lora_grad_sampler)
  dp_stock    Opacus as shipped (inside stock_opacus()): lora_A / lora_B hooked as Linear

Every step is the trainer's step (zero_grad, forward, per-example loss in float32, mean,
backward, optimizer step) on a fixed batch of full-length random token sequences; the trainer's
own per-step DP checks are not included. Models are built from a config (random weights, no
pretraining, no download); LoRA is the project's attach_lora (all linear layers of the blocks).
Shapes 1.1b and 8b run on a GPU only. The base weights are in the precision ``site.dtype: auto``
takes on the device (``--dtype`` to choose), with the attention kernel the nodes load it with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from privatune.common.hardware import DTYPES, resolve_hardware

VARIANTS = ("nonprivate", "dp_new", "dp_stock")


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model and the workloads (batch, seq) it is measured at by default."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    lora_r: int = 8
    tie_embeddings: bool = False
    gpu_only: bool = False
    workloads: tuple[tuple[int, int], ...] = ((8, 128),)


def _demo_shape() -> Shape:
    from privatune.common.base_model import BaseModelSpec

    spec = BaseModelSpec()
    return Shape(vocab=spec.vocab_size, hidden=spec.hidden_size, layers=spec.layers,
                 heads=spec.heads, kv_heads=spec.heads, intermediate=spec.intermediate_size,
                 tie_embeddings=True)


SHAPES: dict[str, Shape] = {
    "demo": _demo_shape(),  # the demo's own base model (BaseModelSpec defaults), 1.4 M parameters
    "40m": Shape(vocab=32000, hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376,
                 tie_embeddings=True),  # 41.7 M parameters
    "190m": Shape(vocab=32000, hidden=1024, layers=12, heads=16, kv_heads=16, intermediate=2816,
                  tie_embeddings=True),  # 187 M parameters
    "1.1b": Shape(vocab=32000, hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632,
                  gpu_only=True, workloads=((8, 512), (16, 1024))),
    "8b": Shape(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                lora_r=16, gpu_only=True, workloads=((4, 512),)),
}


@dataclass
class Job:
    shape_name: str
    shape: Shape
    batch: int
    seq: int
    variant: str
    device: str
    dtype: str  # of the frozen base weights; the LoRA factors are float32
    threads: int
    seed: int = 0


# ----------------------------------------------------------------------------- worker side

def vm_kib(field_name: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in KiB; 0 where the system has none."""
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass  # then the peak includes building the model


def _peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return vm_kib("VmHWM") / 1024


def _current_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    return vm_kib("VmRSS") / 1024


def _build(job: Job):
    """The model, an optimizer-step closure and model facts, for one variant."""
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    from privatune.client.lora_grad_sampler import LoraPrivacyEngine, stock_opacus
    from privatune.common.examples import per_example_loss
    from privatune.common.hardware import attention_implementation
    from privatune.common.config import LoraConfig
    from privatune.common.lora import attach_lora

    hf_logging.set_verbosity_error()
    shape = job.shape
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                         intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=max(256, job.seq),
                         tie_word_embeddings=shape.tie_embeddings, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(job.seed)
    dtype = getattr(torch, job.dtype)
    attention = attention_implementation(torch.device(job.device), dtype)  # as the nodes load it
    with torch.device(job.device):
        base = AutoModelForCausalLM.from_config(
            config, dtype=dtype, **({"attn_implementation": attention} if attention else {}))
    model = attach_lora(base, LoraConfig(r=shape.lora_r, alpha=2 * shape.lora_r))
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    facts = {"params": sum(p.numel() for p in model.parameters()),
             "lora_params": sum(p.numel() for p in lora), "lora_tensors": len(lora)}
    generator = torch.Generator().manual_seed(job.seed + 1)
    ids = torch.randint(3, shape.vocab, (job.batch, job.seq), generator=generator)
    mask = torch.ones_like(ids)
    ids, mask = ids.to(job.device), mask.to(job.device)
    optimizer = torch.optim.Adam(lora, lr=1e-4)
    net = model
    if job.variant != "nonprivate":
        data = TensorDataset(ids.cpu().repeat(4, 1), ids.cpu().repeat(4, 1), mask.cpu().repeat(4, 1))
        loader = DataLoader(data, batch_size=job.batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if job.variant == "dp_stock":
                with stock_opacus():
                    net, optimizer, _ = LoraPrivacyEngine(accountant="rdp").make_private(
                        module=model, optimizer=optimizer, data_loader=loader,
                        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
            else:
                net, optimizer, _ = LoraPrivacyEngine(accountant="rdp").make_private(
                    module=model, optimizer=optimizer, data_loader=loader,
                    noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
        facts["engine"] = f"{type(net).__name__} + {type(optimizer).__name__}"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = net(input_ids=ids, attention_mask=mask).logits
        loss = per_example_loss(logits, ids).mean()
        loss.backward()
        optimizer.step()

    return step, facts


def _worker(job: Job, conn) -> None:
    """Serve one variant: build, then one step per request; report times and peak memory."""
    torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    if device.type == "cuda" and device.index is not None:
        # synchronize and the memory counters act on the current device: make it this job's
        # (plain "cuda" is the current device already; set_device refuses it without an index)
        torch.cuda.set_device(device)
    warnings.filterwarnings("ignore", message="Full backward hook")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from privatune.common.process_heap import keep_for_process_lifetime

        step, facts = _build(job)
        keep_for_process_lifetime()  # as a node does once it holds its model
        facts["base_mib"] = _current_mib(job.device)
        facts["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        _reset_peak(job.device)
        conn.send(("ready", facts))
        cuda = job.device.startswith("cuda")
        while True:
            command = conn.recv()
            if command == "step":
                if cuda:
                    torch.cuda.synchronize()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                wall, cpu = time.perf_counter(), time.process_time()
                step()
                if cuda:
                    torch.cuda.synchronize()
                conn.send((time.perf_counter() - wall, time.process_time() - cpu,
                           resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
            elif command == "peak":
                conn.send(_peak_mib(job.device))
            else:
                break
    except Exception as error:  # report to the parent instead of hanging it
        conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


# ----------------------------------------------------------------------------- parent side

# glibc settings for the workers (a spawned process starts with the parent's environment).
# Steady (timing, default): no mmapped blocks and no trimming, so after the first steps every
# allocation reuses heap memory. With glibc's defaults, blocks over its mmap threshold (32 MiB
# at most: the logits, say) are mapped and unmapped every step, and how much a process faults
# in again per step (up to ~0.8 GB a step at 190m here) depends on its heap's history rather
# than on the variant, which made two runs of the same variant differ by several percent.
STEADY_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40),
                 "MALLOC_MMAP_THRESHOLD_": None}
# Tight (the "live" peak): allocations of 128 KiB or more are mapped and unmapped at once, so
# that the peak RSS follows the peak of live tensors instead of what the allocator keeps.
TIGHT_MALLOC = {"MALLOC_MMAP_MAX_": None, "MALLOC_MMAP_THRESHOLD_": "131072",
                "MALLOC_TRIM_THRESHOLD_": "131072"}


@contextlib.contextmanager
def environment_for_children(environment: dict[str, str | None] | None) -> Iterator[None]:
    """Within this block, processes started (spawned) get these variables (None: unset)."""
    saved = {name: os.environ.get(name) for name in environment or {}}
    for name, value in (environment or {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Worker:
    def __init__(self, context, job: Job, environment: dict[str, str | None] | None = None):
        self.job = job
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(job, child), daemon=True)
        with environment_for_children(environment):
            self.process.start()
        child.close()
        kind, self.facts = self._receive()
        if kind != "ready":
            raise RuntimeError(f"{job.shape_name}/{job.variant}: {self.facts}")

    def _receive(self):
        reply = self.conn.recv()
        if isinstance(reply, tuple) and reply and reply[0] == "error":
            raise RuntimeError(f"{self.job.shape_name}/{self.job.variant} failed: {reply[1]}")
        return reply

    def step(self) -> tuple[float, float, int]:
        self.conn.send("step")
        return self._receive()

    def peak(self) -> float:
        self.conn.send("peak")
        return self._receive()

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.terminate()


def _measure(context, jobs: list[Job], warmup: int, steps: int, sequential: bool,
             malloc: dict[str, str | None] | None, progress) -> list[dict]:
    """Run the variants' workers, interleaved (or one after another), and summarise."""
    groups = [[job] for job in jobs] if sequential else [jobs]
    results = []
    for group in groups:
        workers = [_Worker(context, job, malloc) for job in group]
        try:
            times: dict[str, list[tuple[float, float, int]]] = {w.job.variant: [] for w in workers}
            for i in range(warmup + steps):
                shift = i % len(workers)
                for worker in workers[shift:] + workers[:shift]:  # rotate who goes first
                    took = worker.step()
                    if i >= warmup:
                        times[worker.job.variant].append(took)
                progress(f"  step {i + 1}/{warmup + steps}"
                         + (" (warm-up)" if i < warmup else ""))
            for worker in workers:
                walls = [t[0] for t in times[worker.job.variant]]
                cpus = [t[1] for t in times[worker.job.variant]]
                job = worker.job
                results.append({
                    "shape": job.shape_name, "batch": job.batch, "seq": job.seq,
                    "variant": job.variant, "device": job.device, "dtype": job.dtype,
                    "lora_r": job.shape.lora_r, **worker.facts,
                    "step_ms_median": 1000 * statistics.median(walls),
                    "cpu_ms_median": 1000 * statistics.median(cpus),
                    "step_ms": [round(1000 * t, 2) for t in walls],
                    # minor page faults per step: memory the allocator got back from the system
                    "page_faults_median": statistics.median(t[2] for t in times[job.variant]),
                    "tokens_per_s": job.batch * job.seq / statistics.median(walls),
                    "peak_mib": worker.peak(),
                    "live_peak_mib": None,
                })
        finally:
            for worker in workers:
                worker.stop()
    if not jobs[0].device.startswith("cuda"):  # live peak: a fresh worker, a tight allocator
        for job, result in zip(jobs, results):
            worker = _Worker(context, job, TIGHT_MALLOC)
            try:
                for _ in range(2):
                    worker.step()
                result["live_peak_mib"] = worker.peak()
            finally:
                worker.stop()
        progress("  live peaks measured")
    baseline = {(r["shape"], r["batch"], r["seq"]): r for r in results if r["variant"] == "nonprivate"}
    for r in results:
        base = baseline.get((r["shape"], r["batch"], r["seq"]))
        if base:
            r["time_ratio"] = r["step_ms_median"] / base["step_ms_median"]
            r["cpu_ratio"] = r["cpu_ms_median"] / base["cpu_ms_median"]
            r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
            if r["live_peak_mib"] and base["live_peak_mib"]:
                r["live_peak_ratio"] = r["live_peak_mib"] / base["live_peak_mib"]
    return results


def format_table(results: list[dict]) -> str:
    """step/cpu ms: medians of wall-clock and process CPU time per step; rss: peak RSS of the
    timing worker (GPU: max_memory_allocated); live: peak RSS of a worker whose allocator
    returns freed memory at once (CPU only); x: ratio to the non-private step of the shape."""
    header = (f"{'shape':6s} {'params':>7s} {'dtype':8s} {'batch x seq':>11s} {'variant':10s} "
              f"{'step ms':>9s} "
              f"{'cpu ms':>9s} {'tokens/s':>8s} {'rss MiB':>8s} {'live MiB':>8s} {'x step':>6s} "
              f"{'x cpu':>6s} {'x rss':>6s} {'x live':>6s}")
    lines = [header, "-" * len(header)]
    for r in results:
        def ratio(key):
            return f"{r[key]:.3f}" if r.get(key) is not None else "-"
        live = f"{r['live_peak_mib']:8.0f}" if r.get("live_peak_mib") else f"{'-':>8s}"
        lines.append(
            f"{r['shape']:6s} {_millions(r['params']):>7s} {r['dtype']:8s} "
            f"{r['batch']:>5d} x {r['seq']:<5d} "
            f"{r['variant']:10s} {r['step_ms_median']:9.1f} {r['cpu_ms_median']:9.1f} "
            f"{r['tokens_per_s']:8.0f} {r['peak_mib']:8.0f} {live} {ratio('time_ratio'):>6s} "
            f"{ratio('cpu_ratio'):>6s} {ratio('peak_ratio'):>6s} {ratio('live_peak_ratio'):>6s}")
    return "\n".join(lines)


def _millions(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def _environment(device: str, threads: int) -> dict:
    import opacus
    import peft
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "opacus": opacus.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "device": device, "threads": threads,
            "cpu_affinity": sorted(os.sched_getaffinity(0)), "machine": platform.machine()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
            info["cpu"] = model.group(1) if model else platform.processor()
        except OSError:
            info["cpu"] = platform.processor()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/dp_engine.py",
        description="Non-private vs DP (LoRA engine) vs DP (stock Opacus) LoRA step time and "
                    "peak memory, interleaved, one worker process per variant.")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated, of {','.join(SHAPES)} (default: demo,40m,190m on "
                             "CPU; demo,40m,190m,1.1b,8b on GPU)")
    parser.add_argument("--steps", type=int, default=3,
                        help="measured steps per variant (default 3; use 7+ for reporting)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured first steps (default 2)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every shape (default: each shape's workloads)")
    parser.add_argument("--seq", type=int, default=None,
                        help="sequence length for every shape (default: each shape's workloads)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="precision of the frozen base weights (default auto: what a site's "
                             "site.dtype: auto takes on this device; LoRA is always float32)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("--sequential", action="store_true",
                        help="run the variants one after another instead of interleaved (less "
                             "memory at once; always so on a GPU)")
    parser.add_argument("--malloc", choices=("steady", "default"), default="steady",
                        help="glibc allocator of the timing workers: steady (no per-step page "
                             "faults; default) or default (glibc as configured)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device.startswith("cuda")
    dtype = str(resolve_hardware(device, args.dtype).dtype).removeprefix("torch.")
    names = (args.shapes.split(",") if args.shapes
             else ["demo", "40m", "190m"] + (["1.1b", "8b"] if gpu else []))
    unknown = [n for n in names if n not in SHAPES]
    variants = args.variants.split(",")
    bad_variants = [v for v in variants if v not in VARIANTS]
    if unknown or bad_variants or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error(f"unknown shapes {unknown} / variants {bad_variants}, or steps < 1, "
                     "warmup < 0, threads < 1")
    if "nonprivate" in variants:  # the ratios' reference goes first
        variants = ["nonprivate"] + [v for v in variants if v != "nonprivate"]

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    context = multiprocessing.get_context("spawn")
    results: list[dict] = []
    failures: list[str] = []  # a workload that failed (out of memory, say); the others still run

    def report() -> None:
        """The table and JSON so far: written after every workload, so a later failure or a
        time limit loses nothing already measured."""
        if args.out:
            document = {"environment": _environment(device, args.threads),
                        "arguments": vars(args), "shapes": {n: asdict(SHAPES[n]) for n in names},
                        "results": results, "failures": failures,
                        "table": format_table(results).splitlines()}
            with open(args.out, "w") as out:
                json.dump(document, out, indent=1, default=str)

    for name in names:
        shape = SHAPES[name]
        if shape.gpu_only and not gpu:
            progress(f"{name}: skipped (GPU only, running on {device})")
            continue
        workloads = ([(args.batch or shape.workloads[0][0], args.seq or shape.workloads[0][1])]
                     if args.batch or args.seq else list(shape.workloads))
        for batch, seq in workloads:
            progress(f"{name} {batch}x{seq} on {device}: {', '.join(variants)}")
            jobs = [Job(name, shape, batch, seq, v, device, dtype, args.threads) for v in variants]
            try:
                # on a GPU one variant at a time: each peak is its own, and three models with
                # their activations need not fit at once (the GPU is not shared, so nothing
                # is gained by interleaving there)
                results += _measure(context, jobs, args.warmup, args.steps, args.sequential or gpu,
                                    STEADY_MALLOC if args.malloc == "steady" else None, progress)
            except RuntimeError as error:
                failures.append(f"{name} {batch}x{seq}: {error}")
                progress(f"  failed: {error}")
            report()
    print(format_table(results))
    for failure in failures:
        print(f"FAILED {failure}")
    if args.out:
        progress(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
