"""Reference solutions for the closed-form pruning formulas: random SPD factors and one explicit KKT solve."""
import torch

F64 = torch.float64


def spd(n, gen):
    """A random symmetric positive definite n × n matrix (float64)."""
    Q = torch.randn(n, n, generator=gen, dtype=F64)
    return Q @ Q.t() / n + 0.1 * torch.eye(n, dtype=F64)


def kkt(F, theta, removed_idx):
    """min ½ xᵀ F x  s.t.  x[removed] = −θ[removed], solved as one KKT system → (x, loss)."""
    n, k = F.shape[0], removed_idx.numel()
    E = torch.zeros(k, n, dtype=F64)
    E[torch.arange(k), removed_idx] = 1.0
    K = torch.zeros(n + k, n + k, dtype=F64)
    K[:n, :n], K[:n, n:], K[n:, :n] = F, E.t(), E
    x = torch.linalg.solve(K, torch.cat([torch.zeros(n, dtype=F64), -theta[removed_idx]]))[:n]
    return x, 0.5 * x @ F @ x
