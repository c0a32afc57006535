"""The benchmarks under bench/ still run: each at a tiny size, through the same code as the real run. No timing
is checked here (the figures are the benchmarks' own output, ratios against a baseline measured in the same run)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(
    ("frames", "grid", "local_guide"),
    [("3", "5", "direct"), ("4", "6", "coarse")],  # the second: windows tile the clip, keys scored in place
)
def test_compressor_bench_checks_equal_outputs_and_prints_every_row(frames, grid, local_guide):
    out = run_bench(
        "compressor.py",
        *("--frames", frames, "--grid", grid, "--local-guide", local_guide),
        *("--dim", "64", "--out-dim", "32", "--batch", "1", "2"),
    )
    for batch in ("1", "2"):
        rows = [line.split() for line in out.splitlines() if line.split()[:1] == [batch]]
        assert [" ".join(row[1:-3]) for row in rows[:4]] == ["forward", "fwd+backward", "fwd GFLOP", "fwd+bwd GFLOP"]
        assert all(row[-1].endswith("x") for row in rows[:4])
        assert rows[4][1:4] == ["outputs", "max", "relative"] and float(rows[4][-1]) < 1e-4


def test_data_bench_runs_at_a_small_size():
    out = run_bench(
        "data.py",
        *"--clips 2 --seconds 2 --repeats 1 --frames 4 --size 64 --workers 1 --samples 2000 --reads 1000".split(),
        *"--large-side 256".split(),
    )
    assert "PSS per worker, list / index" in out
    assert out.count("memory whole / as decoded") == 2  # PyAV and decord


def test_compressor_bench_refuses_nan_outputs_before_timing_them():
    """A NaN error compared false with the tolerance: a broken fast path was timed and its speed-up printed."""
    wrapper = (
        "import runpy, sys\n"
        "from hicom.modules.compressors import HICom\n"
        "fast = HICom.forward_packed\n"
        "HICom.forward_packed = lambda self, *a, **k: fast(self, *a, **k) * float('nan')\n"
        "sys.argv = ['compressor.py', '--frames', '2', '--grid', '3', '--dim', '64', '--out-dim', '32', '--batch', '1']\n"
        f"runpy.run_path({str(ROOT / 'bench' / 'compressor.py')!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "batched and baseline outputs differ: max relative error nan" in done.stderr
    assert "speed-up" not in done.stdout.split("\n", 2)[-1]  # no row timed
