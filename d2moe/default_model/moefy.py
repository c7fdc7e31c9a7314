"""MoEfication math (pure functions over tensors): split a SwiGLU FFN into experts, fit a router, refit.

For one layer with FFN input x [N, H] (after ffn_norm) and neuron activations a = silu(x W1^T) * (x W3^T)
[N, I] (I = 1536 for SmolLM2), the dense output is y = a W2^T.

1. `cluster_neurons`: balanced k-means over the neurons' |activation| patterns on calibration tokens gives
   E groups of I/E neurons; the permutation puts expert 0's neurons first.
2. `fit_router`: ridge regression from x to log of each expert's output deviation from its mean output
   (how much the token loses if the expert is replaced by its mean); the top-k of x @ router.T choose.
3. `refit_down`: given the routing mask m [N, E], solve in closed form
       min_{W2', v} || (a * m_expanded) W2'^T + (1 - m) v - y ||^2 + lam * ||W2' - W2||^2
   i.e. the chosen experts' down projections compensate for the dropped ones, and each dropped expert adds a
   learned vector v_e (`absent_bias`). The ridge pulls toward the original weights, not toward zero.
"""

from __future__ import annotations

import torch

def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy balanced assignment: rows in order of decreasing confidence take their best non-full cluster.

    sim [n, k] -> labels [n] with at most `capacity` rows per cluster (n <= k * capacity).
    """
    n, k = sim.shape
    top2 = sim.topk(2, dim=1).values
    order = torch.argsort(top2[:, 0] - top2[:, 1], descending=True, stable=True).tolist()
    prefs = torch.argsort(sim, dim=1, descending=True, stable=True).tolist()
    counts = [0] * k
    labels = [0] * n
    for i in order:
        for c in prefs[i]:
            if counts[c] < capacity:
                labels[i] = c
                counts[c] += 1
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(features: torch.Tensor, k: int, *, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Spherical k-means with equal cluster sizes. features [n, d] -> labels [n] (n divisible by k)."""
    n = features.shape[0]
    if n % k:
        raise ValueError(f"{n} items do not split into {k} equal clusters")
    f = torch.nn.functional.normalize(features, dim=1)
    gen = torch.Generator().manual_seed(seed)
    centers = f[torch.randperm(n, generator=gen)[:k]].clone()  # [k, d]
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = balanced_assign(f @ centers.T, n // k)
        if torch.equal(new, labels):
            break
        labels = new
        onehot = torch.nn.functional.one_hot(labels, k).to(f.dtype)  # [n, k]
        centers = torch.nn.functional.normalize(onehot.T @ f, dim=1)  # [k, d]
    return labels


def cluster_neurons(act: torch.Tensor, num_experts: int, *, max_tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """Neuron permutation [I] grouping co-activated neurons: expert e owns perm[e*I/E:(e+1)*I/E].

    act [N, I]: neuron activations on calibration tokens; features are |act| on up to `max_tokens` tokens.
    """
    rows = torch.linspace(0, act.shape[0] - 1, min(max_tokens, act.shape[0])).long()
    labels = balanced_kmeans(act[rows].abs().T, num_experts, seed=seed)  # [I]
    return torch.argsort(labels * act.shape[1] + torch.arange(act.shape[1]))  # stable within a group


def expand_mask(mask: torch.Tensor, expert_size: int) -> torch.Tensor:
    """[N, E] bool -> [N, E*I] float: each expert's flag repeated over its neurons."""
    return mask.to(torch.float32).repeat_interleave(expert_size, dim=1)


def mask_activations_(act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the activations of the experts a token did not choose. act [N, E*I], mask [N, E]."""
    n, i = act.shape
    act.view(n, mask.shape[1], i // mask.shape[1]).mul_(mask.to(act.dtype).unsqueeze(-1))
    return act


def expert_deviation(act: torch.Tensor, w2: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, E]: || expert_e(x) - mean_tokens expert_e || per token. act [N, I] (expert-ordered), w2 [H, I]."""
    size = act.shape[1] // num_experts
    out = torch.empty(act.shape[0], num_experts)
    for e in range(num_experts):
        cols = slice(e * size, (e + 1) * size)
        y = act[:, cols] @ w2[:, cols].T  # [N, H]
        out[:, e] = (y - y.mean(0)).norm(dim=1)
    return out


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W ||x W - y||^2 + lam * mean(diag(x^T x)) * ||W||^2. x [N, d], y [N, m] -> [d, m]."""
    g = (x.T @ x).double()
    g.diagonal().add_(lam * g.diagonal().mean())
    return torch.linalg.solve(g, (x.T @ y).double()).float()


def fit_router(x: torch.Tensor, act: torch.Tensor, w2: torch.Tensor, num_experts: int, lam: float = 1e-2) -> torch.Tensor:
    """Linear router [E, H] (no bias): ridge regression from x [N, H] to the log expert deviation."""
    target = expert_deviation(act, w2, num_experts).clamp_min(1e-6).log()  # [N, E]
    return ridge(x, target, lam).T.contiguous()


def refit_down(
    masked: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, w2: torch.Tensor, lam: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form refit of the down projection given the routing; returns (w2' [H, I], absent_bias [E, H]).

    masked [N, I]: expert-ordered activations with the unchosen experts zeroed (`mask_activations_`);
    mask [N, E] chosen experts; target [N, H] wanted FFN output; w2 [H, I] the original down projection
    (the ridge prior). With z = [masked, 1 - mask] this minimises
        ||z [w2'^T; v] - target||^2 + r * (||w2' - w2||^2 + ||v||^2),   r = lam * mean(diag(z^T z)).
    """
    i, e = masked.shape[1], mask.shape[1]
    absent = (~mask).to(torch.float32)  # [N, E]
    g = torch.empty(i + e, i + e, dtype=torch.float64)
    g[:i, :i] = masked.T @ masked
    g[:i, i:] = masked.T @ absent
    g[i:, :i] = g[:i, i:].T
    g[i:, i:] = absent.T @ absent
    rhs = torch.cat([masked.T @ target, absent.T @ target]).double()  # [I+E, H]
    reg = lam * g.diagonal().mean()
    g.diagonal().add_(reg)
    prior = torch.cat([w2.T.double(), torch.zeros(e, w2.shape[0], dtype=torch.float64)])  # [I+E, H]
    sol = torch.linalg.solve(g, rhs + reg * prior).float()
    return sol[:i].T.contiguous(), sol[i:].contiguous()


def moe_output(masked: torch.Tensor, mask: torch.Tensor, w2: torch.Tensor, absent_bias: torch.Tensor) -> torch.Tensor:
    """Masked-dense form of the MoE FFN (equals reference.moe_ffn). masked [N, I], mask [N, E] -> [N, H]."""
    return torch.addmm((~mask).to(torch.float32) @ absent_bias, masked, w2.T)
