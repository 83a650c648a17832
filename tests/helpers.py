"""Independent float64 references used by several tests."""

import torch


def correlated_inputs(n: int, d: int, seed: int = 0, offset: float = 2.0, decay: float = 0.85) -> torch.Tensor:
    """[n, d] inputs with a decaying spectrum and an offset, like real activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    scales = decay ** torch.arange(d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    return z @ basis.T + offset * torch.randn(d, generator=g, dtype=torch.float64)


def optimal_nmse_reference(x: torch.Tensor, y: torch.Tensor, rank: int) -> float:
    """Exact optimum of min ||Y - (X P + b)||^2 over rank-r P and b, straight from the data:
    least-squares fitted values, then the best rank-r approximation of them (reduced-rank regression)."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    y = y.detach().reshape(-1, y.shape[-1]).double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    coef = torch.linalg.lstsq(xc, yc, driver="gelsd").solution
    fitted = xc @ coef
    s = torch.linalg.svdvals(fitted)
    err = (yc - fitted).square().sum() + s[rank:].square().sum()
    return float((err / yc.square().sum()).detach())


def measured_nmse(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    y = y.detach().reshape(-1, y.shape[-1]).double()
    y_hat = y_hat.detach().reshape(-1, y_hat.shape[-1]).double()
    return float((y - y_hat).square().sum() / (y - y.mean(0)).square().sum())
