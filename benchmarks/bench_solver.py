"""Benchmark: our exact low-rank solver against MosaicML Composer's published implementation.

What it measures
----------------
Composer's ``composer/algorithms/factorize/factorize_core.py`` (alternating least squares with
float32 ``torch.linalg.lstsq`` on the whole data, ``n_iters=3``) is loaded *by file* from the
``mosaicml`` wheel (downloaded into ``benchmarks/.cache/`` with ``pip download`` if missing; the
composer package is never installed nor imported, and none of its code is copied here). Against it:

1. Linear layer, D = M = 512, int ranks 128 (all N) and 64 (small N), N samples of float32
   activation-like inputs (correlated: ``Z @ diag(0.99**i) @ Q`` plus a per-feature offset),
   targets ``Y = X @ W + b``. For every N, both ``factorize_matrix`` functions (same signature,
   same args) and our streaming path (``MomentAccumulator(D).update`` + ``decompose(stats, W, b)
   .factors(rank)``) are run in the same process, interleaved, best-of-k wall time
   (``time.perf_counter``). Reported per solution: the nmse the function reports and the
   *measured* nmse recomputed in float64 from the returned factors on the data,
   ``sum (Y - Y_hat)^2 / sum (Y - mean_n Y)^2`` (Composer's own figure is not comparable: it
   divides by the global ``Y.var()`` and, when a bias is passed, compares ``Y - bias`` against a
   prediction that includes the bias), the peak RSS growth during the call (``VmHWM`` after
   resetting it via ``/proc/self/clear_refs``), and the time ratio. Composer runs are skipped,
   with the reason and a memory estimate, when they would not fit in the available memory
   (or would exceed ``--composer-max-s``). Each row also counts the directions of X that
   Composer's ``torch.linalg.lstsq`` keeps at torch's default rcond = eps(float32) * max(N, D):
   on CPU (gelsy) that cutoff grows with N and truncates X, which is why Composer's accuracy
   collapses at large N; a diagnostic reruns Composer at one N with a fixed rcond (an in-memory
   replacement of its ``_lstsq`` in a second module instance, the file is untouched).
2. Peak memory of our streaming path vs N: one subprocess per N generates X chunk by chunk
   (the data is never held whole) into ``MomentAccumulator(D)``, then ``decompose`` / ``factors``;
   the peak RSS growth over the warmed-up process is recorded. Composer needs X and Y whole plus
   its lstsq copies: measured in-process in (1), extrapolated where skipped.
3. A 3x3 conv 64 -> 64 channels, padding 1, stride 1, dilation 1 (Composer ignores stride and
   rejects dilation != 1), inputs [n, 64, 16, 16] (smoothed, channel-correlated, ReLU'd), rank 16:
   measured nmse (float64 convolutions) and time ratio at a few n.
4. A profile of where our time goes at N = 1e5 (torch.profiler self time by op, plus replicated
   steps: float64 conversion/centering, the two float64 Gram products, eigh, svd) and of a
   float32-Gram alternative (time, and nmse / Cxx error cost).

Goals (from the issue): measured NMSE never above Composer's; >= 20x faster at N >= 1e5;
memory flat in N (Composer needs ~12 GB at 1e6 samples x 512 features).

Output: ``<out>/solver.json`` (environment, per-case rows, goal verdicts) and ``<out>/solver.png``.

Usage: ``python benchmarks/bench_solver.py [--quick] [--out benchmarks/results] [--threads 1]``
(``--quick``: small N, about 1 min; full: about 12 min on 2 shared cores, most of it Composer at
N = 1e6; ``--replot`` redraws the PNG from the JSON). Threads default to 1 so that ratios are stable on a shared
machine; pass ``--threads 0`` for torch's default.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import zipfile
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
COMPOSER_MEMBER = "composer/algorithms/factorize/factorize_core.py"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from factorize_plugin import MomentAccumulator, decompose, factorize_conv2d, factorize_matrix  # noqa: E402

sys.path.insert(0, str(HERE))
from _common import package_version  # noqa: E402

GIB = 1024**3
MIB = 1024**2


# ----------------------------------------------------------------------------- Composer loading
def _wheel_version(path: Path) -> tuple:
    m = re.match(r"mosaicml-([0-9.]+)", path.name)
    return tuple(int(p) for p in m.group(1).strip(".").split(".")) if m else ()


def load_composer():
    """Composer's factorize_core module, loaded by file from the mosaicml wheel; (module, version)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("mosaicml-*.whl"), key=_wheel_version)
    if not wheels:
        print(f"[bench] no mosaicml wheel in {CACHE}: running pip download mosaicml --no-deps ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "mosaicml", "--no-deps", "-d", str(CACHE)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(CACHE.glob("mosaicml-*.whl"), key=_wheel_version)
        if proc.returncode != 0 or not wheels:
            sys.exit(
                "[bench] could not download the mosaicml wheel (offline, or PyPI unreachable?).\n"
                f"  command: {' '.join(cmd)}\n  pip said: {(proc.stderr or proc.stdout).strip()[-600:]}\n"
                f"  Fix: put a mosaicml-*.whl file in {CACHE} (e.g. run that command on a machine with "
                "network access and copy the wheel over), then rerun."
            )
    wheel = wheels[-1]
    target = CACHE / wheel.stem / COMPOSER_MEMBER
    if not target.exists():
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(COMPOSER_MEMBER, CACHE / wheel.stem)
    return _load_module(target), ".".join(map(str, _wheel_version(wheel))), wheel.name


def _load_module(path: Path, name: str = "composer_factorize_core"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- memory helpers
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
    return int(m.group(1)) if m else -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", fh.read(), re.M)
    return int(m.group(1)) * 1024


def measured_call(fn):
    """Runs fn(); returns (result, seconds, peak RSS growth in bytes during the call)."""
    gc.collect()
    _reset_peak()
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = max(_status_kib("VmHWM") - rss0, 0) * 1024
    return out, dt, peak


# ----------------------------------------------------------------------------- data
class ActivationSource:
    """Reproducible activation-like float32 rows [n, d]: Z @ diag(decay**i) @ Q + offset, generated
    chunk by chunk (chunk i always has the same content, so whole and streamed data agree)."""

    def __init__(self, d: int, seed: int, decay: float = 0.99, chunk: int = 16384) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.mix = ((decay ** torch.arange(d, dtype=torch.float64))[:, None] * q).float()
        self.offset = (1.0 + 0.5 * torch.randn(d, generator=g, dtype=torch.float64)).float()
        self.d, self.seed, self.chunk = d, seed, chunk

    def block(self, i: int, rows: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (i + 1))
        return torch.randn(rows, self.d, generator=g) @ self.mix + self.offset

    def chunks(self, n: int):
        for i, start in enumerate(range(0, n, self.chunk)):
            yield self.block(i, min(self.chunk, n - start))

    def full(self, n: int) -> torch.Tensor:
        x = torch.empty(n, self.d)
        for i, start in enumerate(range(0, n, self.chunk)):
            x[start : start + self.chunk] = self.block(i, min(self.chunk, n - start))
        return x


def make_layer(d: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(d, m, generator=g) / math.sqrt(d), 0.1 * torch.randn(m, generator=g)


def measured_nmse_linear(x, weight, bias, solutions: dict, chunk: int = 32768) -> dict:
    """Float64 sum (Y - Y_hat)^2 / sum (Y - mean Y)^2 for each solution {name: (Wa, Wb, bias)}."""
    w, b = weight.double(), bias.double()
    sols = {k: tuple(t.double() for t in v) for k, v in solutions.items()}
    err = {k: 0.0 for k in sols}
    shift = None
    s1 = torch.zeros(w.shape[1], dtype=torch.float64)
    s2 = torch.zeros((), dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        xd = x[start : start + chunk].double()
        y = torch.addmm(b, xd, w)
        if shift is None:
            shift = y.mean(0)
        yc = y - shift
        s1 += yc.sum(0)
        s2 += yc.square().sum()
        for k, (wa, wb, bb) in sols.items():
            err[k] += float((y - ((xd @ wa) @ wb + bb)).square().sum())
    denom = float(s2 - s1.square().sum() / x.shape[0])
    return {k: e / denom for k, e in err.items()}


def conv_images(n: int, c: int, hw: int, seed: int) -> torch.Tensor:
    """Smooth, channel-correlated, nonnegative feature maps [n, c, hw, hw] (float32)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g))
    mix = (0.9 ** torch.arange(c, dtype=torch.float32))[:, None] * q
    z = F.avg_pool2d(torch.randn(n, c, hw + 2, hw + 2, generator=g), 3, stride=1)
    z = torch.einsum("nchw,cd->ndhw", z, mix * 3.0)
    return torch.relu(z + 0.3).contiguous()


def measured_nmse_conv(x, weight, bias, solutions: dict, padding: int, chunk: int = 128) -> dict:
    w, b = weight.double(), bias.double()
    err = {k: 0.0 for k in solutions}
    s1, s2, count, shift = 0.0, 0.0, 0, None
    for start in range(0, x.shape[0], chunk):
        xd = x[start : start + chunk].double()
        y = F.conv2d(xd, w, b, padding=padding)
        if shift is None:
            shift = y.mean((0, 2, 3), keepdim=True)
        yc = y - shift
        s1 = s1 + yc.sum((0, 2, 3))
        s2 += float(yc.square().sum())
        count += y.shape[0] * y.shape[2] * y.shape[3]
        for k, (wa, wb, bb) in solutions.items():
            y_hat = F.conv2d(F.conv2d(xd, wa.double(), padding=padding), wb.double(), bb.double())
            err[k] += float((y - y_hat).square().sum())
    denom = s2 - float(s1.square().sum()) / count
    return {k: e / denom for k, e in err.items()}


# ----------------------------------------------------------------------------- case 1: linear
def composer_bytes_estimate(n: int, d: int, m: int, rank: int, slope: float | None = None) -> int:
    """Peak bytes Composer's factorize_matrix needs beyond its inputs; from a measured
    bytes-per-sample slope when available, else an analytic count of its float32 [N, *] temporaries
    (Y - bias, lstsq's copies of X and Y, X @ Wa, Y_hat, the residual and its square)."""
    if slope is not None:
        return int(slope * n)
    return 4 * n * (d + 4 * m + rank)


def bench_linear(cmp, args, ns, rank, d=512, m=512, seed=0, repeats_fn=None, verbose=True):
    src = ActivationSource(d, seed)
    weight, bias = make_layer(d, m, seed)
    rows = []
    slope = None  # Composer's measured peak bytes per sample, beyond its inputs
    sec_per_sample = None  # Composer's measured seconds per sample at the previous N
    for n in ns:
        gc.collect()
        x = src.full(n)
        y = torch.addmm(bias, x, weight)
        in_bytes = x.numel() * 4 + y.numel() * 4
        row = dict(case="linear", N=n, D=d, M=m, rank=rank, n_iters=3, input_bytes=in_bytes)
        reps = repeats_fn(n)
        est = composer_bytes_estimate(n, d, m, rank, slope)
        avail = mem_available()
        run_cmp = True
        if n > args.composer_max_n:
            run_cmp, reason = False, f"N > --composer-max-n={args.composer_max_n}"
        elif est > 0.8 * avail:  # (X and Y are already allocated, so not part of `avail`)
            run_cmp, reason = False, f"estimated {est / GIB:.1f} GiB > 80% of available {avail / GIB:.1f} GiB"
        elif sec_per_sample is not None and sec_per_sample * n * reps > args.composer_max_s:
            run_cmp, reason = False, f"estimated {sec_per_sample * n * reps:.0f}s > --composer-max-s={args.composer_max_s:.0f}"
        if not run_cmp:
            row["composer_skipped"] = reason
        row["composer_extra_bytes_estimate"] = est
        row["mem_available_bytes"] = avail
        row["composer_total_bytes_estimate"] = est + in_bytes

        methods = {
            "ours": partial(factorize_matrix, x, y, weight, bias=bias, rank=rank),
            "ours_stream": partial(_stream_solve, x, weight, bias, rank),
        }
        if run_cmp:
            methods["composer"] = partial(cmp.factorize_matrix, x, y, weight, bias=bias, rank=rank)
        times = {k: [] for k in methods}
        peaks = {k: 0 for k in methods}
        results = {}
        names = list(methods)
        for r in range(reps):  # interleaved; the order alternates between repeats
            for k in names if r % 2 == 0 else names[::-1]:
                out, dt, peak = measured_call(methods[k])
                times[k].append(dt)
                peaks[k] = max(peaks[k], peak)
                results[k] = out
        sols = {}
        for k, out in results.items():
            if k == "ours_stream":
                wa, wb, bb, rep_nmse, stats = out
                kept, rcond, cond = directions_kept_by_default_rcond(stats)
                row.update(composer_lstsq_default_rcond=rcond, x_sigma_min_over_max=cond,
                           x_directions_kept_at_default_rcond=kept)
            else:
                wa, wb, bb, rep_nmse = out.Wa, out.Wb, out.bias, out.nmse
                assert out.rank == rank, (k, out.rank)
            sols[k] = (wa, wb, bb)
            row[f"{k}_nmse_reported"] = float(rep_nmse)
            row[f"{k}_time_s"] = min(times[k])
            row[f"{k}_times_s"] = times[k]
            row[f"{k}_peak_rss_delta_bytes"] = peaks[k]
        meas = measured_nmse_linear(x, weight, bias, sols)
        for k, v in meas.items():
            row[f"{k}_nmse_measured"] = v
        if run_cmp:
            row["time_ratio_composer_over_ours"] = row["composer_time_s"] / row["ours_time_s"]
            row["time_ratio_composer_over_ours_stream"] = row["composer_time_s"] / row["ours_stream_time_s"]
            row["nmse_ratio_composer_over_ours"] = meas["composer"] / meas["ours"]
            if n >= 10_000:
                slope = max(slope or 0.0, peaks["composer"] / n)
            sec_per_sample = row["composer_time_s"] / n
        row["repeats"] = reps
        rows.append(row)
        if verbose:
            _print_linear(row)
        del x, y, results, sols, methods
    return rows


def _stream_solve(x, weight, bias, rank, chunk=65536):
    stats = MomentAccumulator(x.shape[1])
    for start in range(0, x.shape[0], chunk):
        stats.update(x[start : start + chunk])
    dec = decompose(stats, weight, bias)
    wa, wb, bb = dec.factors(rank)
    return wa, wb, bb, float(dec.nmse_curve[rank]), stats


def directions_kept_by_default_rcond(stats: MomentAccumulator) -> tuple[int, float, float]:
    """Composer calls ``torch.linalg.lstsq(X, Y)`` with the default rcond = eps(float32) * max(N, D);
    on CPU (driver gelsy) directions of the *uncentered* X whose singular value is below
    rcond * sigma_max are dropped. Returns (directions kept, rcond, sigma_min / sigma_max), from the
    float64 moments (uncentered Gram = Cxx + N mean mean^T)."""
    n, d = stats.num_samples, stats.in_features
    gram = stats.cxx + n * torch.outer(stats.mean_x, stats.mean_x)
    sig = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    rcond = torch.finfo(torch.float32).eps * max(n, d)
    rel = sig / sig.max()
    return int((rel > rcond).sum()), rcond, float(rel.min())


def _print_linear(r):
    c = r.get("composer_time_s")
    print(
        f"  linear N={r['N']:>8} r={r['rank']:>3}  nmse ours={r['ours_nmse_measured']:.5f} "
        f"stream={r['ours_stream_nmse_measured']:.5f} "
        + (f"composer={r['composer_nmse_measured']:.5f} (reported {r['composer_nmse_reported']:.5f})  " if c else "")
        + f"time ours={r['ours_time_s']:.3f}s stream={r['ours_stream_time_s']:.3f}s "
        + (f"composer={c:.3f}s  ratio={r['time_ratio_composer_over_ours']:.1f}x / {r['time_ratio_composer_over_ours_stream']:.1f}x" if c else f"composer skipped ({r['composer_skipped']})")
        + f"  peak MiB ours={r['ours_peak_rss_delta_bytes'] / MIB:.0f}"
        + (f" composer={r['composer_peak_rss_delta_bytes'] / MIB:.0f}" if c else "")
        + f"  [lstsq default rcond keeps {r['x_directions_kept_at_default_rcond']}/{r['D']} directions of X]",
        flush=True,
    )


# ----------------------------------------------------------------------------- case 2: memory
def stream_memory_child(n: int, d: int, m: int, rank: int, seed: int) -> None:
    """Runs in a subprocess: streaming solve on chunk-generated data; prints one JSON line."""
    src = ActivationSource(d, seed)
    weight, bias = make_layer(d, m, seed)
    warm = MomentAccumulator(d).update(src.block(0, 1024))  # load BLAS/LAPACK, allocator warm-up
    decompose(warm, weight, bias).factors(rank)
    del warm
    gc.collect()
    _reset_peak()
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    stats = MomentAccumulator(d)
    for block in src.chunks(n):
        stats.update(block)
    dec = decompose(stats, weight, bias)
    wa, wb, bb = dec.factors(rank)
    dt = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - rss0) * 1024
    print(json.dumps(dict(N=n, peak_rss_delta_bytes=peak, baseline_rss_bytes=rss0 * 1024, time_s=dt,
                          nmse=float(dec.nmse_curve[rank]), stats_bytes=stats.nbytes(),
                          chunk_rows=src.chunk)))


def bench_stream_memory(args, ns, d=512, m=512, rank=128, seed=0):
    rows = []
    for n in ns:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_stream-mem", str(n), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"stream-memory child failed for N={n}:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(case="stream_memory", D=d, M=m, rank=rank, data_bytes_if_held=n * d * 4)
        rows.append(row)
        print(f"  stream memory N={n:>8}: peak RSS growth {row['peak_rss_delta_bytes'] / MIB:7.1f} MiB "
              f"(X alone would be {n * d * 4 / MIB:8.1f} MiB), {row['time_s']:.2f}s incl. data generation", flush=True)
    return rows


# ----------------------------------------------------------------------------- case 3: conv
def bench_conv(cmp, args, image_counts, c=64, hw=16, rank=16, seed=3, repeats_fn=None):
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(c, c, 3, 3, generator=g) / math.sqrt(c * 9)
    bias = 0.1 * torch.randn(c, generator=g)
    rows = []
    for n in image_counts:
        x = conv_images(n, c, hw, seed)
        methods = {
            "ours": lambda: factorize_conv2d(x, weight, rank=rank, biasA=bias, padding=1),
            "composer": lambda: cmp.factorize_conv2d(x, weight, rank=rank, biasA=bias, padding=1),
        }
        reps = repeats_fn(n * hw * hw)
        times = {k: [] for k in methods}
        results = {}
        names = list(methods)
        for r in range(reps):
            for k in names if r % 2 == 0 else names[::-1]:
                out, dt, _ = measured_call(methods[k])
                times[k].append(dt)
                results[k] = out
        sols = {k: (o.Wa, o.Wb, o.bias) for k, o in results.items()}
        meas = measured_nmse_conv(x, weight, bias, sols, padding=1)
        row = dict(case="conv", images=n, C_in=c, C_out=c, H=hw, W=hw, kernel=3, padding=1, rank=rank,
                   patch_rows=n * hw * hw, D=c * 9, repeats=reps)
        for k, o in results.items():
            row[f"{k}_nmse_reported"] = float(o.nmse)
            row[f"{k}_nmse_measured"] = meas[k]
            row[f"{k}_time_s"] = min(times[k])
            row[f"{k}_times_s"] = times[k]
        row["time_ratio_composer_over_ours"] = row["composer_time_s"] / row["ours_time_s"]
        row["nmse_ratio_composer_over_ours"] = meas["composer"] / meas["ours"]
        rows.append(row)
        print(f"  conv n={n:>5} ({n * hw * hw} patches x {c * 9}) r={rank}: nmse ours={meas['ours']:.5f} "
              f"composer={meas['composer']:.5f}  time ours={row['ours_time_s']:.3f}s composer={row['composer_time_s']:.3f}s "
              f"ratio={row['time_ratio_composer_over_ours']:.1f}x", flush=True)
    return rows


# ----------------------------------------------------------------------------- Composer diagnostic
def composer_rcond_diagnostic(module_path: Path, n: int, d=512, m=512, rank=128, seed=0) -> dict:
    """Why Composer's accuracy collapses as N grows: its ``_lstsq`` uses torch's default rcond
    (eps * max(N, D)), so gelsy truncates X to fewer directions as N grows. A second, in-memory
    instance of its module gets ``_lstsq`` with a fixed rcond = eps(float32) (the file is untouched),
    and is compared with the stock one and ours on the same data."""
    stock = _load_module(module_path, "composer_factorize_core_stock")
    fixed = _load_module(module_path, "composer_factorize_core_rcond")
    eps = torch.finfo(torch.float32).eps
    fixed._lstsq = lambda a, b: torch.linalg.lstsq(a, b, rcond=eps).solution
    src = ActivationSource(d, seed)
    weight, bias = make_layer(d, m, seed)
    x = src.full(n)
    y = torch.addmm(bias, x, weight)
    runs = {
        "ours": lambda: factorize_matrix(x, y, weight, bias=bias, rank=rank),
        "composer_stock": lambda: stock.factorize_matrix(x, y, weight, bias=bias, rank=rank),
        "composer_rcond_eps": lambda: fixed.factorize_matrix(x, y, weight, bias=bias, rank=rank),
    }
    row = dict(N=n, D=d, M=m, rank=rank, fixed_rcond=eps)
    sols = {}
    for k, f in runs.items():
        out, dt, _ = measured_call(f)
        sols[k] = (out.Wa, out.Wb, out.bias)
        row[f"{k}_time_s"] = dt
    for k, v in measured_nmse_linear(x, weight, bias, sols).items():
        row[f"{k}_nmse_measured"] = v
    print(f"  Composer rcond diagnostic N={n}: measured nmse ours={row['ours_nmse_measured']:.5f}, "
          f"Composer stock={row['composer_stock_nmse_measured']:.5f}, Composer with lstsq rcond=eps "
          f"{row['composer_rcond_eps_nmse_measured']:.5f} (time {row['composer_rcond_eps_time_s']:.1f}s vs stock "
          f"{row['composer_stock_time_s']:.1f}s, ours {row['ours_time_s']:.1f}s)", flush=True)
    return row


# ----------------------------------------------------------------------------- case 4: profile
def _op_table(fn, top=8) -> tuple[float, dict]:
    """Wall time of fn() and the self CPU seconds of its top torch ops (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return wall, {e.key: round(e.self_cpu_time_total / 1e6, 4) for e in ops[:top]}


def profile_ours(n: int, d=512, m=512, rank=128, seed=0, chunk=8192) -> dict:
    """Replicates the steps of factorize_matrix / the streaming path with timers around each."""
    src = ActivationSource(d, seed)
    weight, bias = make_layer(d, m, seed)
    x = src.full(n)
    y = torch.addmm(bias, x, weight)
    t = dict(convert_f64=0.0, center=0.0, gram_xx_f64=0.0, gram_xy_f64=0.0, gram_xx_f32_centered=0.0)
    cxx = torch.zeros(d, d, dtype=torch.float64)
    cxy = torch.zeros(d, m, dtype=torch.float64)
    cxx32 = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, chunk):
        t0 = time.perf_counter()
        xc, yc = x[start : start + chunk].double(), y[start : start + chunk].double()
        t1 = time.perf_counter()
        xc = xc - xc.mean(0)
        yc = yc - yc.mean(0)
        t2 = time.perf_counter()
        cxx.addmm_(xc.T, xc)
        t3 = time.perf_counter()
        cxy.addmm_(xc.T, yc)
        t4 = time.perf_counter()
        x32 = x[start : start + chunk]
        x32 = x32 - x32.mean(0)
        cxx32.add_((x32.T @ x32).double())
        t5 = time.perf_counter()
        t["convert_f64"] += t1 - t0
        t["center"] += t2 - t1
        t["gram_xx_f64"] += t3 - t2
        t["gram_xy_f64"] += t4 - t3
        t["gram_xx_f32_centered"] += t5 - t4
    stats = MomentAccumulator(d).update(x)
    wall_fm, ops_fm = _op_table(lambda: factorize_matrix(x, y, weight, bias=bias, rank=rank))
    wall_st, ops_st = _op_table(lambda: decompose(MomentAccumulator(d).update(x), weight, bias).factors(rank))
    _, t_fm, _ = measured_call(lambda: factorize_matrix(x, y, weight, bias=bias, rank=rank))
    _, t_acc_xy, _ = measured_call(lambda: MomentAccumulator(d, m).update(x, y))
    _, t_acc_x, _ = measured_call(lambda: MomentAccumulator(d).update(x))
    dec, t_dec, _ = measured_call(lambda: decompose(stats, weight, bias))
    _, t_eigh, _ = measured_call(lambda: torch.linalg.eigh(stats.cxx))
    lb = torch.randn(d, m, dtype=torch.float64)
    _, t_svd, _ = measured_call(lambda: torch.linalg.svd(lb, full_matrices=False))
    # the float32-Gram alternative: same moments but C from float32 products of centered chunks
    alt = MomentAccumulator(d)
    alt._allocate(torch.device("cpu"))
    alt.count.fill_(stats.count.item())
    alt.mean_x.copy_(stats.mean_x)
    # re-add the between-chunk term that the per-chunk centering removed (exact in float64)
    between = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, chunk):
        mu = x[start : start + chunk].double().mean(0) - stats.mean_x
        between.add_(torch.outer(mu, mu), alpha=min(chunk, n - start))
    alt.cxx.copy_(cxx32 + between)
    dec_alt = decompose(alt, weight, bias)
    wa, wb, bb = dec.factors(rank)
    wa2, wb2, bb2 = dec_alt.factors(rank)
    meas = measured_nmse_linear(x, weight, bias, {"f64": (wa, wb, bb), "f32gram": (wa2, wb2, bb2)})
    out = dict(
        N=n, D=d, M=m, rank=rank, chunk_rows=chunk,
        torch_profiler_factorize_matrix=dict(wall_s=wall_fm, self_cpu_s_by_op=ops_fm),
        torch_profiler_streaming_x_only=dict(wall_s=wall_st, self_cpu_s_by_op=ops_st),
        factorize_matrix_total_s=t_fm,
        accumulate_x_and_y_s=t_acc_xy,
        accumulate_x_only_s=t_acc_x,
        decompose_s=t_dec,
        eigh_DxD_s=t_eigh,
        svd_DxM_s=t_svd,
        steps_replicated_s={k: v for k, v in t.items()},
        nmse_f64_moments=meas["f64"],
        nmse_f32_gram=meas["f32gram"],
        cxx_rel_diff_f32_gram=float((alt.cxx - stats.cxx).norm() / stats.cxx.norm()),
    )
    s = out["steps_replicated_s"]
    print(f"  profiler, factorize_matrix (wall {wall_fm:.2f}s), self CPU s by op: {ops_fm}", flush=True)
    print(f"  profiler, streaming x-only (wall {wall_st:.2f}s), self CPU s by op: {ops_st}", flush=True)
    print(f"  profile N={n}: factorize_matrix {t_fm:.2f}s = accumulate(x,y) {t_acc_xy:.2f}s + decompose {t_dec:.2f}s "
          f"(eigh {t_eigh:.3f}s, svd {t_svd:.3f}s); accumulate(x only) {t_acc_x:.2f}s", flush=True)
    print(f"    per step: to-f64 {s['convert_f64']:.2f}s, center {s['center']:.2f}s, x^T x f64 {s['gram_xx_f64']:.2f}s, "
          f"x^T y f64 {s['gram_xy_f64']:.2f}s | x^T x f32 (centered) {s['gram_xx_f32_centered']:.2f}s; "
          f"nmse f64 {meas['f64']:.6f} vs f32-Gram {meas['f32gram']:.6f} (rel. diff of Cxx "
          f"{out['cxx_rel_diff_f32_gram']:.1e})", flush=True)
    return out


# ----------------------------------------------------------------------------- plot
def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    lin = [r for r in res["linear"]]
    ranks = sorted({r["rank"] for r in lin}, reverse=True)

    ax = axes[0]
    for rk, mk in zip(ranks, "os^"):
        rr = [r for r in lin if r["rank"] == rk and "composer_nmse_measured" in r]
        ax.plot([r["N"] for r in rr], [r["nmse_ratio_composer_over_ours"] for r in rr], mk + "-", label=f"linear 512x512, rank {rk}")
    conv = res.get("conv", [])
    if conv:
        ax.plot([r["patch_rows"] for r in conv], [r["nmse_ratio_composer_over_ours"] for r in conv], "d-",
                label="conv3x3 64->64, rank 16 (x: patches)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ratios = [v for line in ax.get_lines() for v in line.get_ydata()]
    if max(ratios) > 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("N samples")
    ax.set_ylabel("measured NMSE: Composer / ours  (>= 1: ours better)")
    ax.set_title("Accuracy (float64 re-evaluation)\nComposer's lstsq default rcond = eps*N truncates X as N grows", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1]
    rk = ranks[0]
    rr = [r for r in lin if r["rank"] == rk]
    ax.plot([r["N"] for r in rr], [r["ours_time_s"] for r in rr], "o-", label="ours factorize_matrix (X,Y)")
    ax.plot([r["N"] for r in rr], [r["ours_stream_time_s"] for r in rr], "s-", label="ours streaming (X only)")
    rc = [r for r in rr if "composer_time_s" in r]
    ax.plot([r["N"] for r in rc], [r["composer_time_s"] for r in rc], "^-", label="Composer (ALS, n_iters=3)")
    for r in rc:
        ax.annotate(f"{r['time_ratio_composer_over_ours']:.1f}x", (r["N"], r["composer_time_s"]),
                    textcoords="offset points", xytext=(-8, 6), fontsize=8)
    if conv:
        ax.plot([r["patch_rows"] for r in conv], [r["ours_time_s"] for r in conv], "d:", color="C0", alpha=0.6, label="ours conv")
        ax.plot([r["patch_rows"] for r in conv], [r["composer_time_s"] for r in conv], "d:", color="C2", alpha=0.6, label="Composer conv")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N samples (conv: patch rows)")
    ax.set_ylabel("wall time [s]")
    ax.set_title(f"Time, linear 512x512 rank {rk} ({res['environment']['torch_threads']} thread(s))")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[2]
    sm = res.get("stream_memory", [])
    floor = 1.0  # MiB; a peak growth below it (e.g. inside the warmed-up allocator) is drawn at 1 MiB
    ax.plot([r["N"] for r in sm], [max(r["peak_rss_delta_bytes"] / MIB, floor) for r in sm], "s-",
            label="ours streaming: peak RSS growth (data generated by chunks)")
    ax.plot([r["N"] for r in rr], [max(r["ours_peak_rss_delta_bytes"] / MIB, floor) for r in rr], "o-",
            label="ours factorize_matrix: peak growth (X,Y held by caller)")
    ax.plot([r["N"] for r in rc], [(r["composer_peak_rss_delta_bytes"] + r["input_bytes"]) / MIB for r in rc], "^-",
            label="Composer: peak growth + X,Y (measured)")
    ns = [r["N"] for r in rr]
    ax.plot(ns, [r["composer_total_bytes_estimate"] / MIB for r in rr], "^:", color="C2", alpha=0.6, label="Composer: estimate")
    ax.plot(ns, [r["N"] * r["D"] * 4 / MIB for r in rr], "k--", lw=0.8, label="X alone (float32)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N samples")
    ax.set_ylabel("MiB")
    ax.set_title("Peak memory vs N (D = 512)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)

    fig.suptitle(f"factorize_plugin vs Composer {res['environment']['composer_version']} factorize_core "
                 f"({'quick' if res['config']['quick'] else 'full'}, {res['environment']['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- goals
def by_rank_and_n(rows: list, key: str) -> dict:
    """``{rank: {N: round(row[key], 2)}}``: rows of several ranks share an N, so a table keyed by N
    alone would keep only the last rank's value (the rank-64 row once replaced the rank-128 one)."""
    out: dict = {}
    for r in rows:
        table = out.setdefault(str(r["rank"]), {})
        if str(r["N"]) in table:
            raise ValueError(f"two linear rows at rank {r['rank']}, N = {r['N']}")
        table[str(r["N"])] = round(r[key], 2)
    return out


def goals(res: dict) -> dict:
    lin = [r for r in res["linear"] if "composer_nmse_measured" in r]
    conv = res.get("conv", [])
    worst = max([r["ours_nmse_measured"] / r["composer_nmse_measured"] for r in lin + conv] or [float("nan")])
    big = [r for r in lin if r["N"] >= 100_000]
    sm = res.get("stream_memory", [])
    g = {
        "nmse_never_above_composer": dict(
            met=bool(lin) and worst <= 1.0 + 1e-9,
            worst_ours_over_composer=worst,
            note="measured float64 NMSE on the fitted data, linear and conv rows",
        ),
        "speedup_20x_at_N_ge_1e5": dict(
            met=bool(big) and min(r["time_ratio_composer_over_ours"] for r in big) >= 20.0,
            factorize_matrix_ratios_by_rank=by_rank_and_n(big, "time_ratio_composer_over_ours"),
            streaming_ratios_by_rank=by_rank_and_n(big, "time_ratio_composer_over_ours_stream"),
            nmse_composer_over_ours_by_rank=by_rank_and_n(big, "nmse_ratio_composer_over_ours"),
            note=("evaluated only where N >= 1e5 was run (not in --quick)" if not big else
                  "met only if every rank's factorize_matrix ratio is >= 20; tables are {rank: {N: value}}"),
        ),
    }
    if sm:
        peaks = [r["peak_rss_delta_bytes"] for r in sm]
        g["memory_flat_in_N"] = dict(
            met=max(peaks) <= 2 * max(min(peaks), 64 * MIB),
            streaming_peak_MiB={str(r["N"]): round(r["peak_rss_delta_bytes"] / MIB, 1) for r in sm},
            composer_total_GiB={str(r["N"]): round(((r["composer_peak_rss_delta_bytes"] + r["input_bytes"]) if "composer_peak_rss_delta_bytes" in r else r["composer_total_bytes_estimate"]) / GIB, 2)
                                for r in res["linear"] if r["rank"] == max(x["rank"] for x in res["linear"])},
        )
    return g


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, < 1 minute")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (solver.json, solver.png)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--composer-max-n", type=int, default=1_000_000, help="largest N to run Composer at")
    p.add_argument("--composer-max-s", type=float, default=400.0,
                   help="skip a Composer run whose time, extrapolated linearly from the previous N, exceeds this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", action="store_true", help="only redraw <out>/solver.png from <out>/solver.json")
    p.add_argument("--_stream-mem", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args._stream_mem is not None:
        stream_memory_child(args._stream_mem, 512, 512, 128, args.seed)
        return
    if args.replot:
        out = Path(args.out)
        plot(json.loads((out / "solver.json").read_text()), out / "solver.png")
        print(f"[bench] redrew {out / 'solver.png'}")
        return

    t_start = time.perf_counter()
    cmp, cmp_version, wheel = load_composer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        ns, ns64, stream_ns, conv_n, prof_n, diag_n = [1_000, 10_000, 30_000], [10_000], [1_000, 10_000, 50_000], [16, 64], 10_000, 30_000
    else:
        ns, ns64 = [1_000, 10_000, 100_000, 300_000, 1_000_000], [1_000, 10_000, 100_000]
        stream_ns, conv_n, prof_n, diag_n = [1_000, 10_000, 100_000, 1_000_000], [64, 256, 1024], 100_000, 100_000

    def repeats(n):
        return 3 if n <= 10_000 else 1

    res = dict(
        package=package_version(),  # the commit measured, and uncommitted changes to the package
        environment=dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            torch_version=torch.__version__, python=platform.python_version(), platform=platform.platform(),
            cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
            blas=("mkl" if torch.backends.mkl.is_available() else "other"),
            mem_total_GiB=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            mem_available_GiB_at_start=round(mem_available() / GIB, 1),
            load_average_at_start=os.getloadavg(),
            composer_version=cmp_version, composer_wheel=wheel, composer_module=COMPOSER_MEMBER,
        ),
        config=dict(quick=args.quick, seed=args.seed, linear_N=ns, linear_rank64_N=ns64, stream_memory_N=stream_ns,
                    conv_images=conv_n, profile_N=prof_n, composer_max_n=args.composer_max_n,
                    timing="best of k interleaved runs in one process (k=3 for N<=1e4, else 1)", composer_rcond_diagnostic_N=diag_n,
                    data="X = Z @ diag(0.99**i) @ Q + offset (float32), Y = X @ W + b, W ~ N(0, 1/D), b ~ N(0, 0.01)"),
    )
    print(f"[bench] Composer {cmp_version} factorize_core loaded from {wheel}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    print("[bench] 1. linear 512x512, rank 128", flush=True)
    res["linear"] = bench_linear(cmp, args, ns, 128, seed=args.seed, repeats_fn=repeats)
    print("[bench]    linear 512x512, rank 64", flush=True)
    res["linear"] += bench_linear(cmp, args, ns64, 64, seed=args.seed, repeats_fn=repeats)
    print("[bench] 2. streaming peak memory vs N (one subprocess per N)", flush=True)
    res["stream_memory"] = bench_stream_memory(args, stream_ns, seed=args.seed)
    print("[bench] 3. conv3x3 64->64, padding 1, rank 16", flush=True)
    res["conv"] = bench_conv(cmp, args, conv_n, repeats_fn=repeats)
    print("[bench]    Composer lstsq rcond diagnostic", flush=True)
    res["composer_rcond_diagnostic"] = composer_rcond_diagnostic(Path(cmp.__file__), diag_n)
    print("[bench] 4. profile of our solver", flush=True)
    res["profile"] = profile_ours(prof_n)
    res["goals"] = goals(res)
    res["environment"]["load_average_at_end"] = os.getloadavg()
    res["environment"]["benchmark_wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "solver.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "solver.png")
    print(json.dumps(res["goals"], indent=1))
    print(f"[bench] wrote {out / 'solver.json'} and {out / 'solver.png'} in {res['environment']['benchmark_wall_s']}s")


if __name__ == "__main__":
    main()
