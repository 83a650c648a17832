"""The core API against the reference implementation it replaces (Composer 0.32.1's
``composer/algorithms/factorize/factorize_core.py``, loaded by file from the mosaicml wheel that
``setup.sh`` downloads; never downloaded here, and a missing wheel fails these tests).

On every case the reference accepts: the same structure (``Wa`` shape, ``Wb`` None or its shape,
``rank``; ours may return a bias where the reference returns None, never the reverse), a measured
NMSE never above the reference's, and on every path a reported ``nmse`` equal to the measured one.
NMSE is measured on the data by our documented definition: sum (y - y_hat)^2 / sum (y - mean y)^2
with per-feature means (the reference's own figure divides by one global variance).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from factorize_plugin.core import factorize_conv2d, factorize_matrix

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_VERSION = "0.32.1"
# where setup.sh puts it (the solver benchmark's cache, which git ignores)
REFERENCE_WHEEL = ROOT / "benchmarks" / ".cache" / f"mosaicml-{REFERENCE_VERSION}-py3-none-any.whl"
REFERENCE_MEMBER = "composer/algorithms/factorize/factorize_core.py"

# float64 data throughout: the comparisons are about the math, not about rounding
SETTINGS = dict(database=None, deadline=None, derandomize=True)


def load_reference():
    """The reference ``factorize_core`` module, executed from the wheel's file alone (composer's
    package ``__init__`` is never imported)."""
    wheel = Path(os.environ.get("FACTORIZE_REFERENCE_WHEEL", REFERENCE_WHEEL))
    if not wheel.is_file():
        pytest.fail(
            f"the reference implementation's wheel is missing: {wheel}\n"
            f"  setup.sh downloads it; or run: pip download --no-deps mosaicml=={REFERENCE_VERSION} -d {wheel.parent}",
            pytrace=False,
        )
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(REFERENCE_MEMBER)
    name = "reference_factorize_core"
    spec = importlib.util.spec_from_loader(name, loader=None, origin=f"{wheel}/{REFERENCE_MEMBER}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        exec(compile(source, spec.origin, "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


@pytest.fixture(scope="module")
def ref():
    return load_reference()


# --------------------------------------------------------------------------- measuring
def nmse(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    y, y_hat = y.detach().double(), y_hat.detach().double()
    denom = (y - y.mean(0)).square().sum()
    return float((y - y_hat).square().sum() / denom)


def apply_matrix(sol, x: torch.Tensor) -> torch.Tensor:
    out = x @ sol.Wa if sol.Wb is None else (x @ sol.Wa) @ sol.Wb
    return out if sol.bias is None else out + sol.bias


def apply_conv(sol, x: torch.Tensor, padding) -> torch.Tensor:
    out = F.conv2d(x, sol.Wa, padding=padding)
    if sol.Wb is not None:
        out = F.conv2d(out, sol.Wb)
    return out if sol.bias is None else out + sol.bias[:, None, None]


def flat(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N * H * W, C]: one row per output position."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def structure(sol) -> tuple:
    return (
        tuple(sol.Wa.shape),
        None if sol.Wb is None else tuple(sol.Wb.shape),
        int(sol.rank),
    )


def close(reported: float, measured: float, rtol: float = 1e-7, atol: float = 1e-9) -> bool:
    return abs(reported - measured) <= atol + rtol * abs(measured)


def compare(ours, theirs, y, y_ours, y_theirs, what: str) -> list[str]:
    """The differential checks; returns the failures as readable lines."""
    bad = []
    if structure(ours) != structure(theirs):
        bad.append(f"{what}: structure {structure(ours)} != reference {structure(theirs)}")
    if theirs.bias is not None and (ours.bias is None or ours.bias.shape != theirs.bias.shape):
        bad.append(f"{what}: the reference returns a bias {tuple(theirs.bias.shape)}, ours {ours.bias}")
    e_ours, e_ref = nmse(y, y_ours), nmse(y, y_theirs)
    if e_ours > e_ref + 1e-9 + 1e-7 * e_ref:
        bad.append(f"{what}: measured NMSE {e_ours:.3e} above the reference's {e_ref:.3e}")
    if not close(ours.nmse, e_ours):
        bad.append(f"{what}: reported nmse {ours.nmse:.6e} != measured {e_ours:.6e}")
    return bad


def reference_rank(rank, in_features: int, current: int) -> int:
    """The latent size the reference derives from ``rank`` (written out here independently)."""
    return min(int(rank * in_features), current) if rank < 1 else int(rank)


# --------------------------------------------------------------------------- data
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def matrix_case(d, m, n, pair_rank, with_bias, noise, seed):
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) + 1.5
    if pair_rank is None:
        wa, wb = torch.randn(d, m, generator=g, dtype=torch.float64), None
        w = wa
    else:
        wa = torch.randn(d, pair_rank, generator=g, dtype=torch.float64)
        wb = torch.randn(pair_rank, m, generator=g, dtype=torch.float64)
        w = wa @ wb
    bias = torch.randn(m, generator=g, dtype=torch.float64) * 3 if with_bias else None
    y = x @ w + (0 if bias is None else bias)
    if noise:
        y = y + noise * torch.randn(n, m, generator=g, dtype=torch.float64) * y.std()
    return x, y, wa, wb, bias


MATRIX_SIZES = [(16, 8), (8, 16), (12, 12), (24, 10), (6, 20)]
MATRIX_RANKS = [0, 1, 2, 3, 5, 8, 12, 16, 30, 0.01, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0, 2.5]


def matrix_grid():
    for (d, m), pair, with_bias, (n, noise) in itertools.product(
        MATRIX_SIZES, ["dense", "low", "high"], [False, True], [(200, 0.0), (200, 0.2), (10, 0.0)]
    ):
        k_min = min(d, m)
        pair_rank = {"dense": None, "low": max(1, k_min // 3), "high": k_min - 1}[pair]
        yield (d, m, n, pair_rank, with_bias, noise)


def test_differential_matrix_grid(ref):
    failures, ref_failed, cases = [], [], 0
    for i, params in enumerate(matrix_grid()):
        x, y, wa, wb, bias = matrix_case(*params, seed=i)
        for rank in MATRIX_RANKS:
            what = f"matrix (D, M, N, d, bias, noise)={params} rank={rank!r}"
            try:
                theirs = ref.factorize_matrix(x, y, wa, wb, bias=bias, rank=rank)
            except Exception as e:  # noqa: BLE001 - a case the reference does not accept
                ref_failed.append(f"{what}: {type(e).__name__}")
                continue
            ours = factorize_matrix(x, y, wa, wb, bias=bias, rank=rank)
            cases += 1
            failures += compare(ours, theirs, y, apply_matrix(ours, x), apply_matrix(theirs, x), what)
    assert cases >= 1500 and not ref_failed, ref_failed[:5]
    assert not failures, f"{len(failures)} of {cases} cases:\n" + "\n".join(failures[:20])


CONV_SHAPES = [(4, 8, 3), (8, 16, 3), (6, 6, 1), (2, 8, 1), (16, 4, 3), (3, 12, 3), (5, 3, 2)]
CONV_RANKS = [0, 1, 2, 3, 4, 6, 8, 16, 100, 0.05, 0.1, 0.25, 0.5, 0.9]


def conv_case(c_in, c_out, k, pair_rank, bias_a, bias_b, seed):
    g = gen(seed)
    base = torch.randn(3, c_in, 9, 9, generator=g, dtype=torch.float64)
    x = F.avg_pool2d(base, 2, stride=1) + 0.5  # [3, c_in, 8, 8], correlated pixels, an offset
    if pair_rank is None:
        wa, wb = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64), None
        ba = torch.randn(c_out, generator=g, dtype=torch.float64) if bias_a else None
    else:
        wa = torch.randn(pair_rank, c_in, k, k, generator=g, dtype=torch.float64)
        wb = torch.randn(c_out, pair_rank, 1, 1, generator=g, dtype=torch.float64)
        ba = torch.randn(pair_rank, generator=g, dtype=torch.float64) if bias_a else None
    bb = torch.randn(c_out, generator=g, dtype=torch.float64) if bias_b else None
    return x, wa, wb, ba, bb


def original_output(x, wa, wb, ba, bb, padding):
    out = F.conv2d(x, wa, ba, padding=padding)
    return out if wb is None else F.conv2d(out, wb, bb)


def conv_grid():
    for (c_in, c_out, k), padding in itertools.product(CONV_SHAPES, [0, 1]):
        k_min = min(c_in * k * k, c_out)
        for pair_rank in [None] + sorted({max(1, k_min // 3), max(1, k_min - 1)}):
            biases = [(False, False), (True, False)] if pair_rank is None else list(itertools.product([False, True], repeat=2))
            for bias_a, bias_b in biases:
                yield (c_in, c_out, k, pair_rank, bias_a, bias_b, padding)


def test_differential_conv_grid(ref):
    failures, ref_failed, cases = [], [], 0
    for i, params in enumerate(conv_grid()):
        *shape, padding = params
        x, wa, wb, ba, bb = conv_case(*shape, seed=100 + i)
        y = flat(original_output(x, wa, wb, ba, bb, padding))
        for rank in CONV_RANKS:
            what = f"conv (C_in, C_out, k, d, biasA, biasB, padding)={params} rank={rank!r}"
            ours = factorize_conv2d(x, wa, wb, rank=rank, biasA=ba, biasB=bb, padding=padding)
            e_ours = nmse(y, flat(apply_conv(ours, x, padding)))
            if not close(ours.nmse, e_ours):
                failures.append(f"{what}: reported nmse {ours.nmse:.6e} != measured {e_ours:.6e}")
            try:
                theirs = ref.factorize_conv2d(x, wa, wb, rank=rank, biasA=ba, biasB=bb, padding=padding)
            except Exception:  # noqa: BLE001 - a case the reference does not accept
                ref_failed.append((what, reference_rank(rank, x.shape[1] * wa.shape[2] * wa.shape[3], wa.shape[0]), ours))
                continue
            cases += 1
            y_ours, y_theirs = flat(apply_conv(ours, x, padding)), flat(apply_conv(theirs, x, padding))
            failures += compare(ours, theirs, y, y_ours, y_theirs, what)
    # the reference only fails on ranks that resolve to 0 (it cannot reshape a 0-channel kernel);
    # ours takes them as 1 there (reported == measured is checked above)
    assert all(k == 0 for _, k, _ in ref_failed), [w for w, k, _ in ref_failed if k != 0][:5]
    assert all(s.rank == 1 or (s.rank == -1 and (s.Wb is None or s.Wa.shape[0] == 1)) for *_, s in ref_failed)
    assert cases >= 1000, cases
    assert not failures, f"{len(failures)} of {cases} cases:\n" + "\n".join(failures[:20])


# --------------------------------------------------------------------------- the paths, one by one
def test_conv_pair_at_its_rank_keeps_the_combined_bias(ref):
    """Issue 13, point 3: unchanged pair with biasA and biasB computes the original function."""
    x, wa, wb, ba, bb = conv_case(6, 10, 3, 4, True, True, seed=7)
    y = flat(original_output(x, wa, wb, ba, bb, 1))
    for rank in (4, 5, 0.9):  # 0.9 * 54 is capped by the pair's rank 4
        sol = factorize_conv2d(x, wa, wb, rank=rank, biasA=ba, biasB=bb, padding=1)
        assert sol.rank == -1 and sol.Wa is wa and sol.Wb is wb
        torch.testing.assert_close(sol.bias, wb[:, :, 0, 0] @ ba + bb)
        assert nmse(y, flat(apply_conv(sol, x, 1))) < 1e-20 and sol.nmse < 1e-12
        theirs = ref.factorize_conv2d(x, wa, wb, rank=rank, biasA=ba, biasB=bb, padding=1)
        assert theirs.bias is None and nmse(y, flat(apply_conv(theirs, x, 1))) > 0.01  # the reference's bug
    # only one of the two biases
    sol = factorize_conv2d(x, wa, wb, rank=4, biasA=ba, padding=1)
    torch.testing.assert_close(sol.bias, wb[:, :, 0, 0] @ ba)
    sol = factorize_conv2d(x, wa, wb, rank=4, biasB=bb, padding=1)
    torch.testing.assert_close(sol.bias, bb)
    assert factorize_conv2d(x, wa, wb, rank=4, padding=1).bias is None


def test_dense_result_also_from_a_pair(ref):
    """Issue 13, point 2: a rank >= min(D, M) gives one dense map, also for a pair."""
    x, y, wa, wb, bias = matrix_case(16, 8, 100, 4, True, 0.1, seed=3)
    for rank in (8, 9, 100, 0.5):  # 0.5: min(int(0.5 * 16), 4) = 4, the pair's rank: unchanged
        sol = factorize_matrix(x, y, wa, wb, bias=bias, rank=rank)
        theirs = ref.factorize_matrix(x, y, wa, wb, bias=bias, rank=rank)
        assert structure(sol) == structure(theirs)
        assert nmse(y, apply_matrix(sol, x)) <= nmse(y, apply_matrix(theirs, x)) + 1e-12
    sol = factorize_matrix(x, y, wa, wb, bias=bias, rank=8)
    assert sol.Wb is None and sol.Wa.shape == (16, 8) and sol.rank == -1
    # the dense least-squares fit with an intercept: as good as any linear map on these data
    xc = torch.cat([x, torch.ones(100, 1, dtype=torch.float64)], 1)
    best = xc @ torch.linalg.lstsq(xc, y).solution
    assert sol.nmse == pytest.approx(nmse(y, best), rel=1e-8)
    cx, wa_c, wb_c, ba, bb = conv_case(4, 8, 3, 3, True, True, seed=4)
    sol = factorize_conv2d(cx, wa_c, wb_c, rank=8, biasA=ba, biasB=bb)
    assert sol.Wb is None and sol.Wa.shape == (8, 4, 3, 3) and sol.rank == -1
    torch.testing.assert_close(sol.Wa, torch.einsum("orij,rckl->ockl", wb_c, wa_c))
    torch.testing.assert_close(sol.bias, wb_c[:, :, 0, 0] @ ba + bb)
    assert sol.nmse < 1e-12


def test_default_rank_is_dense_for_many_3x3_convs(ref):
    """As documented: 0.25 of C_in * 9 >= C_out gives the dense kernel (as in the reference)."""
    for c_in, c_out in ((8, 16), (16, 32), (4, 9)):
        x, wa, _, ba, _ = conv_case(c_in, c_out, 3, None, True, False, seed=c_in)
        sol = factorize_conv2d(x, wa, biasA=ba, padding=1)
        assert sol.rank == -1 and sol.Wb is None
        assert structure(sol) == structure(ref.factorize_conv2d(x, wa, biasA=ba, padding=1))
    x, wa, _, ba, _ = conv_case(8, 32, 3, None, True, False, seed=5)
    assert factorize_conv2d(x, wa, biasA=ba, padding=1).rank == 18  # int(0.25 * 72) < 32


def test_rank_zero_conv_works_where_the_reference_crashes(ref):
    """A rank that resolves to 0 crashes the reference's conv path; ours gives rank 1."""
    x, wa, _, ba, _ = conv_case(2, 8, 1, None, True, False, seed=6)  # 0.25 * 2 rounds to 0
    with pytest.raises(RuntimeError):
        ref.factorize_conv2d(x, wa, biasA=ba)
    y = flat(original_output(x, wa, None, ba, None, 0))
    for rank in (0.25, 0, 0.0):
        sol = factorize_conv2d(x, wa, biasA=ba, rank=rank)
        assert sol.rank == 1 and sol.Wa.shape == (1, 2, 1, 1) and sol.Wb.shape == (8, 1, 1, 1)
        assert close(sol.nmse, nmse(y, flat(apply_conv(sol, x, 0))))
        assert sol.nmse < 1.0
    x, wa, _, ba, _ = conv_case(1, 8, 1, None, True, False, seed=6)  # rank 1 is already min(D, M)
    sol = factorize_conv2d(x, wa, biasA=ba)
    assert sol.rank == -1 and sol.Wb is None and sol.nmse < 1e-12


def test_reported_nmse_is_measured_beyond_what_the_reference_supports():
    """Stride, dilation, padding modes (the reference raises or fails): reported == measured on
    every path, with float32 weights (the NMSE is that of the returned, rounded tensors)."""
    g = gen(11)
    x = torch.randn(4, 5, 10, 9, generator=g, dtype=torch.float64)
    specs = [
        dict(stride=2, padding=1),
        dict(dilation=2, padding=2, padding_mode="reflect"),
        dict(padding="same", padding_mode="circular"),
        dict(stride=(1, 2), padding=(1, 0), padding_mode="replicate"),
    ]
    for spec in specs:
        conv = torch.nn.Conv2d(5, 7, 3, **spec).double()
        y = flat(conv(x))
        for rank in (0, 1, 2, 4, 6, 7, 0.1):
            sol = factorize_conv2d(x, conv.weight.float(), rank=rank, biasA=conv.bias.float(), **spec)
            assert sol.Wa.dtype == torch.float32
            rebuilt = torch.nn.Conv2d(5, sol.Wa.shape[0], 3, bias=False, **spec).double()
            rebuilt.weight.data.copy_(sol.Wa)
            out = rebuilt(x)
            if sol.Wb is not None:
                out = F.conv2d(out, sol.Wb.double())
            out = out + sol.bias.double()[:, None, None]
            assert close(sol.nmse, nmse(y, flat(out)), rtol=1e-6, atol=1e-9), (spec, rank)


# --------------------------------------------------------------------------- properties
@settings(max_examples=60, **SETTINGS)
@given(
    d=st.integers(1, 12),
    m=st.integers(1, 12),
    n=st.integers(2, 40),
    pair=st.booleans(),
    with_bias=st.booleans(),
    noise=st.sampled_from([0.0, 0.3]),
    rank=st.one_of(st.integers(0, 14), st.floats(0.0, 1.0, exclude_max=True), st.floats(1.0, 15.0)),
    seed=st.integers(0, 2**16),
)
def test_property_matrix_matches_reference(ref, d, m, n, pair, with_bias, noise, rank, seed):
    pair_rank = max(1, min(d, m) - 1) if pair else None
    x, y, wa, wb, bias = matrix_case(d, m, n, pair_rank, with_bias, noise, seed)
    ours = factorize_matrix(x, y, wa, wb, bias=bias, rank=rank)
    theirs = ref.factorize_matrix(x, y, wa, wb, bias=bias, rank=rank)
    denom = (y - y.mean(0)).square().sum()
    if float(denom) < 1e-12 * float(y.square().sum() + 1):  # constant targets: NMSE undefined
        return
    failures = compare(ours, theirs, y, apply_matrix(ours, x), apply_matrix(theirs, x), "")
    assert not failures, failures


@settings(max_examples=40, **SETTINGS)
@given(
    c_in=st.integers(1, 6),
    c_out=st.integers(1, 8),
    k=st.sampled_from([1, 2, 3]),
    pair=st.booleans(),
    biases=st.tuples(st.booleans(), st.booleans()),
    rank=st.one_of(st.integers(1, 20), st.floats(0.0, 1.0, exclude_max=True)),
    padding=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_property_conv_matches_reference(ref, c_in, c_out, k, pair, biases, rank, padding, seed):
    k_min = min(c_in * k * k, c_out)
    pair_rank = max(1, k_min - 1) if pair else None
    bias_a, bias_b = biases if pair else (biases[0], False)
    x, wa, wb, ba, bb = conv_case(c_in, c_out, k, pair_rank, bias_a, bias_b, seed)
    y = flat(original_output(x, wa, wb, ba, bb, padding))
    ours = factorize_conv2d(x, wa, wb, rank=rank, biasA=ba, biasB=bb, padding=padding)
    assert close(ours.nmse, nmse(y, flat(apply_conv(ours, x, padding))))
    try:
        theirs = ref.factorize_conv2d(x, wa, wb, rank=rank, biasA=ba, biasB=bb, padding=padding)
    except RuntimeError:  # the reference cannot reshape a rank-0 kernel; ours takes it as 1
        assert reference_rank(rank, c_in * k * k, wa.shape[0]) == 0 and ours.rank in (1, -1)
        return
    failures = compare(ours, theirs, y, flat(apply_conv(ours, x, padding)), flat(apply_conv(theirs, x, padding)), "")
    assert not failures, failures


@settings(max_examples=25, **SETTINGS)
@given(
    d=st.integers(2, 16),
    m=st.integers(2, 16),
    pair=st.booleans(),
    noise=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_property_more_latent_dims_never_worse(d, m, pair, noise, seed):
    """The reference's own property, over every path (rank 0, pairs, unchanged, dense)."""
    pair_rank = max(1, min(d, m) // 2) if pair else None
    x, y, wa, wb, bias = matrix_case(d, m, 60, pair_rank, True, noise, seed)
    prev = float("inf")
    for rank in range(0, min(d, m) + 2):
        sol = factorize_matrix(x, y, wa, wb, bias=bias, rank=rank)
        err = nmse(y, apply_matrix(sol, x))
        assert close(sol.nmse, err)
        if pair and pair_rank <= rank < min(d, m):
            # the unchanged pair is the pair given, not a better fit of the data
            assert sol.Wa is wa and sol.rank == -1
            continue
        assert err <= prev + 1e-10, (rank, err, prev)
        prev = err


def test_iterations_do_not_matter():
    """``n_iters`` is accepted for compatibility: the solution is exact, so it is the same for
    every count (the reference's "more iterations never worse", with equality)."""
    x, y, wa, wb, bias = matrix_case(16, 12, 80, 6, True, 0.3, seed=9)
    sols = [factorize_matrix(x, y, wa, wb, bias=bias, rank=3, n_iters=i) for i in (0, 1, 2, 4, 50)]
    for s in sols[1:]:
        torch.testing.assert_close(s.Wa @ s.Wb, sols[0].Wa @ sols[0].Wb)
        assert s.nmse == sols[0].nmse


def test_missing_wheel_fails_loudly(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORIZE_REFERENCE_WHEEL", str(tmp_path / "nothing.whl"))
    with pytest.raises(pytest.fail.Exception, match="wheel is missing"):
        load_reference()
