"""Shared pieces of the benchmarks: the machine, timing of alternating contenders, tables, the JSON last line."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


def device_info(device: torch.device) -> str:
    """What ran the numbers: GPU name or CPU model and core count, torch version, date."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        what = f"{model}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(contenders: dict[str, Callable[[], None]], device: torch.device, steps: int, rounds: int,
              warmup: int = 1) -> dict[str, dict]:  # fmt: skip
    """Run each contender's step ``steps`` times per round, taking turns (A, B, A, B, ...) for ``rounds`` rounds
    after ``warmup`` untimed steps each. Returns per contender: seconds per round, and on CUDA the peak memory
    above what was allocated when its rounds started (its own transient memory, not the other's weights)."""
    out = {name: {"round_seconds": [], "peak_extra_bytes": 0} for name in contenders}
    for step in contenders.values():
        for _ in range(warmup):
            step()
    sync(device)
    for _ in range(rounds):
        for name, step in contenders.items():
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            out[name]["round_seconds"].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - base
                out[name]["peak_extra_bytes"] = max(out[name]["peak_extra_bytes"], peak)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def tensor_bytes(*groups) -> int:
    """Bytes held by parameters / optimizer state: ``tensor_bytes(model.parameters(), optimizer)``."""
    total = 0
    for g in groups:
        if isinstance(g, torch.optim.Optimizer):
            g = (v for s in g.state.values() for v in s.values())
        total += sum(t.numel() * t.element_size() for t in g if isinstance(t, torch.Tensor))
    return total


def print_table(rows: list[dict], title: str | None = None) -> None:
    """A plain fixed-width table of dicts sharing keys."""
    if title:
        print(title)
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def emit(result: dict) -> dict:
    """Print the result as one JSON line (always the last line of a benchmark's output)."""
    print(json.dumps(result))
    return result


# ------------------------------------------------------------------------ ours vs diffusers training steps
def quiet_diffusers() -> None:
    """diffusers warns on every ``.to(dtype)`` of a model built in code; the table is what matters here."""
    from diffusers.utils import logging

    logging.set_verbosity_error()


def parse(argv: list[str] | None, configs: dict, default: str, doc: str) -> argparse.Namespace:
    """The options shared by the ours-vs-diffusers training-step benchmarks."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--config", choices=sorted(configs), default=default)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="autocast dtype (weights stay fp32, as Lightning's bf16-mixed)")  # fmt: skip
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--fused", action="store_true", help="fused AdamW")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions")
    p.add_argument("--diffusers-eager", action="store_true", help="--compile, --channels-last, --fused: ours only")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender (compilation happens here)")
    p.add_argument("--batch", type=int, default=None, help="default: the config's")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (H100 SXM bf16: 989e12)")
    p.add_argument("--check-tol", type=float, default=1e-3, help="max relative output difference before timing")
    return p.parse_args(argv)


@torch.no_grad()
def check_same_outputs(forwards: dict[str, Callable], inputs: dict, tol: float, n: int = 2) -> float:
    """max |a - b| / max |b| of the two contenders on the first ``n`` samples, in fp32 without TF32; raises above
    ``tol`` (timing two different functions would be meaningless)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        sub = {k: None if v is None else v[:n] for k, v in inputs.items()}
        a, b = (f(sub).float() for f in forwards.values())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    diff = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
    if diff > tol:
        raise RuntimeError(f"{' and '.join(forwards)} disagree before timing: relative difference {diff:.2e} > {tol}")
    return diff


def training_steps(contenders: dict[str, tuple[nn.Module, Callable]], inputs: dict, args, loss=F.mse_loss):
    """For each ``name: (network, make_forward)``, a closure doing one forward + ``loss(out, inputs['target'])`` +
    backward + AdamW step under the options in ``args``; returns ``(steps, optimizers)``."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    steps, opts = {}, {}
    for name, (net, make_forward) in contenders.items():
        tuned = not (name == "diffusers" and args.diffusers_eager)
        own = dict(inputs)
        if args.channels_last and tuned:
            net.to(memory_format=torch.channels_last)
            own["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
        forward = make_forward(torch.compile(net) if args.compile and tuned else net)
        params = list(net.parameters())
        fused = args.fused and tuned
        opts[name] = opt = (
            torch.optim.AdamW(params, lr=1e-5, fused=True) if fused else torch.optim.AdamW(params, lr=1e-5)
        )

        def step(forward=forward, opt=opt, own=own):
            with autocast:
                out = forward(own)
            loss(out.float(), own["target"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    return steps, opts


def count_flops(build: Callable[[], nn.Module], make_forward: Callable, inputs: dict) -> int | None:
    """Model FLOPs of one forward + backward, counted on the meta device (no memory, no time)."""
    from lightning.fabric.utilities.throughput import measure_flops

    try:
        with torch.device("meta"):
            net = build()
        meta = {k: None if v is None else v.to("meta") for k, v in inputs.items()}
        forward = make_forward(net)
        return measure_flops(net, lambda: forward(meta), lambda y: y.sum())
    except Exception as e:  # a FLOP-counter gap must not cost the throughput numbers
        print(f"note: FLOPs not counted ({type(e).__name__}: {e})")
        return None


def peak_flops(args) -> float | None:
    """``--peak-flops``, else Lightning's table for the GPU and autocast dtype; None on CPU."""
    device = torch.device(args.device)
    if args.peak_flops or device.type != "cuda":
        return args.peak_flops
    from lightning.fabric.utilities.throughput import get_available_flops

    try:
        return get_available_flops(device, getattr(torch, args.dtype))
    except Exception:
        return None


def summarize(timing: dict, nets: dict[str, nn.Module], opts: dict, batch: int, args, flops: int | None) -> dict:
    """Per contender: median images/s, ms/step, CUDA peak memory (weights + optimizer state + own peak above them),
    achieved TFLOP/s and MFU; plus the ratio of the first contender to the second and the options."""
    device, peak = torch.device(args.device), peak_flops(args)
    out = {"device": device_info(device), **{k: getattr(args, k) for k in OPTIONS}, "batch": batch,
           "flops_per_step": flops, "peak_flops": peak}  # fmt: skip
    for name, net in nets.items():
        t = median(timing[name]["round_seconds"]) / args.steps
        mem = None
        if device.type == "cuda":
            mem = round((tensor_bytes(net.parameters(), opts[name]) + timing[name]["peak_extra_bytes"]) / 2**20, 1)
        out[name] = {
            "images_per_second": round(batch / t, 2),
            "ms_per_step": round(1000 * t, 2),
            "round_seconds": [round(s, 4) for s in timing[name]["round_seconds"]],
            "peak_memory_mb": mem,
            "tflops_per_second": float(f"{flops / t / 1e12:.4g}") if flops else None,
            "mfu": round(flops / t / peak, 4) if flops and peak else None,
        }
    a, b = nets
    out["ratio"] = round(out[a]["images_per_second"] / out[b]["images_per_second"], 3)
    return out


def compare(nets: dict[str, nn.Module], forwards: dict[str, Callable], inputs: dict, build: Callable[[], nn.Module],
            batch: int, args, loss=F.mse_loss) -> dict:  # fmt: skip
    """The whole protocol for ``{"ours": net, "diffusers": net}``: outputs checked equal, alternating timed training
    steps, FLOPs of ``build()`` (ours, on the meta device); the summary with parameter count and output difference."""
    dev = {k: None if v is None else v.to(args.device) for k, v in inputs.items()}
    diff = check_same_outputs({n: f(nets[n]) for n, f in forwards.items()}, dev, args.check_tol)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    steps, opts = training_steps({n: (nets[n], forwards[n]) for n in nets}, dev, args, loss=loss)
    timing = alternate(steps, torch.device(args.device), args.steps, args.rounds, warmup=args.warmup)
    flops = count_flops(build, forwards["ours"], inputs)
    params = sum(p.numel() for p in nets["ours"].parameters())
    return {**summarize(timing, nets, opts, batch, args, flops), "params": params, "max_rel_diff": diff}


OPTIONS = ("config", "dtype", "channels_last", "compile", "fused", "tf32", "diffusers_eager", "steps", "rounds")


def print_comparison(r: dict, headline: str) -> None:
    print(f"{headline}; {r['device']}")
    print(f"outputs agree before timing: max relative difference {r['max_rel_diff']:.1e}")
    keys = ("images_per_second", "ms_per_step", "peak_memory_mb", "tflops_per_second", "mfu")
    print_table([{"contender": n, **{k: r[n][k] for k in keys}} for n in ("ours", "diffusers")])
    print(f"ratio ours/diffusers: {r['ratio']:.3f}  (median of {r['rounds']} alternating rounds of {r['steps']} steps)")
    for note in r.get("notes", []):
        print(f"note: {note}")
