"""Compressor speed: the batched HICom compressor against a straightforward per-clip implementation.

Both run the paper's default (local (4, 3, 3) with direct injection, 32 global queries with coarse injection,
or with `--local-guide` the local branch of an ablation)
with the same parameters on the same inputs, so the outputs must agree; the script checks that first.
The baseline is `hicom.modules.compressors.reference`: one clip at a time, a Python loop over the local cells,
every key and value of the global attention projected.

    .venv/bin/python bench/compressor.py                          # 32 frames of 27 x 27 x 1152 -> 3584, fp32, CPU
    .venv/bin/python bench/compressor.py --device cuda --dtype bf16 --batch 1 8
    .venv/bin/python bench/compressor.py --local-guide coarse     # an ablation's local branch

Prints milliseconds per video for forward and forward + backward and the ratio baseline / batched (on CUDA also the
forward replayed as a CUDA graph, both sides captured alike); then, in the
GFLOP rows, each pass's matrix-product work per video on each side (torch's FlopCounterMode) and its ratio:
where both sides run their products at the same rate, that ratio bounds the speed-up.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from hicom.modules.compressors import GlobalCompressor, Guide, HICom, LocalCompressor
from hicom.modules.compressors.base import PackedLayout
from hicom.modules.compressors.reference import hicom_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(dim: int, out_dim: int, device: str, dtype: torch.dtype, local_guide: Guide = Guide.DIRECT) -> HICom:
    torch.manual_seed(0)
    module = HICom(
        in_dim=dim,
        out_dim=out_dim,
        guide_dim=dim,
        local=partial(LocalCompressor, kernel=(4, 3, 3), guide=local_guide),
        global_=partial(GlobalCompressor, num_queries=32, guide=Guide.COARSE),
    )
    with torch.no_grad():  # released queries start at zero; random ones make the 32 global tokens differ
        module.global_compressor.query.normal_()
    return module.to(device=device, dtype=dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """`fn`'s forward captured once as a CUDA graph (after warm-up calls on a side stream, as capture needs), and
    replayed: what the forward costs on the GPU itself, without Python's and the driver's cost of launching each
    kernel, which at batch 1 exceeds the kernels' own time."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--grid", type=int, default=27, help="patches per side (27 for so400m at 384 px)")
    parser.add_argument("--dim", type=int, default=1152, help="vision width")
    parser.add_argument("--out-dim", type=int, default=3584, help="LLM width (3584 for Qwen2.5-7B)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--local-guide",
        choices=[g.value for g in (Guide.DIRECT, Guide.COARSE, Guide.OFF)],
        default=Guide.DIRECT.value,
        help="the local branch's injection: the paper's direct, or an ablation's coarse or none",
    )
    args = parser.parse_args()
    module = build(args.dim, args.out_dim, args.device, DTYPES[args.dtype], Guide(args.local_guide))
    print(
        f"HICom local (4, 3, 3) {args.local_guide} + 32 global coarse | {args.frames} x {args.grid} x {args.grid} x {args.dim}"
        f" -> {module.num_tokens(args.frames, args.grid, args.grid)} x {args.out_dim} | {args.dtype} on {args.device}"
        f" | torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'batch':>5} {'pass':>13} {'baseline ms/video':>18} {'ours ms/video':>17} {'speed-up':>9}")
    for batch in args.batch:
        bench_batch(module, batch, args)


def bench_batch(module: HICom, batch: int, args: argparse.Namespace) -> None:
    """Check that both implementations agree on one batch, then time them and print one row per pass."""
    dtype = DTYPES[args.dtype]
    shape = (batch, args.frames, args.grid, args.grid, args.dim)
    features = torch.randn(shape, device=args.device, dtype=dtype)
    embeds = torch.randn(shape, device=args.device, dtype=dtype)
    guide = torch.randn(batch, args.dim, device=args.device, dtype=dtype)

    # The packed call that training makes: clips along the frame axis, with their layout.
    layout = PackedLayout((args.frames,) * batch, ("video",) * batch, args.grid, args.grid)
    packed_features, packed_embeds = features.flatten(0, 1), embeds.flatten(0, 1)

    def batched() -> torch.Tensor:
        return module.forward_packed(packed_features, packed_embeds, guide, layout).reshape(batch, -1, args.out_dim)

    def baseline() -> torch.Tensor:
        return torch.stack([hicom_reference(module, features[i], embeds[i], guide[i]) for i in range(batch)])

    with torch.no_grad():
        fast, slow = batched(), baseline()
    error = ((fast - slow).abs().max() / slow.abs().max()).item()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not math.isfinite(error) or error > tolerance:  # NaN compares false: a broken side must not be timed
        raise SystemExit(f"batched and baseline outputs differ: max relative error {error:.2e} > {tolerance}")

    def forward(fn: Callable[[], torch.Tensor]) -> None:
        with torch.no_grad():
            fn()

    def forward_backward(fn: Callable[[], torch.Tensor]) -> None:
        module.zero_grad(set_to_none=True)
        fn().float().square().mean().backward()

    def gflop(run: Callable[[Callable[[], torch.Tensor]], None], fn: Callable[[], torch.Tensor]) -> float:
        with FlopCounterMode(display=False) as counter:  # it hooks autograd: a forward is counted with grad on
            (fn if run is forward else partial(run, fn))()
        return counter.get_total_flops() / batch / 1e9

    passes = [("forward", partial(forward, fn)) for fn in (baseline, batched)]
    passes += [("fwd+backward", partial(forward_backward, fn)) for fn in (baseline, batched)]
    if args.device.startswith("cuda"):  # the forward replayed as one CUDA graph: no per-kernel launch cost
        try:
            passes += [("graph forward", graphed(fn)) for fn in (baseline, batched)]
        except RuntimeError as err:  # a side that syncs with the host cannot be captured
            print(f"{batch:>5} graph forward: not captured ({str(err).splitlines()[0]})")
            passes = passes[:4]
    for (name, base_fn), (_, ours_fn) in zip(passes[::2], passes[1::2], strict=True):
        base = timed(base_fn, args.device, args.repeats) / batch
        ours = timed(ours_fn, args.device, args.repeats) / batch
        print(f"{batch:>5} {name:>13} {base * 1e3:>18.2f} {ours * 1e3:>17.2f} {base / ours:>8.1f}x")
    for name, run in (("fwd GFLOP", forward), ("fwd+bwd GFLOP", forward_backward)):
        base, ours = gflop(run, baseline), gflop(run, batched)
        small = base < 1  # a small --frames / --dim run's GFLOP: in figures that are not zeros
        print(f"{batch:>5} {name:>13} {base:>18.{'2e' if small else '1f'}} {ours:>17.{'2e' if small else '1f'}} "
              f"{base / ours:>8.1f}x")  # fmt: skip
    print(f"{batch:>5} {'outputs':>13} max relative difference {error:.1e}")


if __name__ == "__main__":
    main()
