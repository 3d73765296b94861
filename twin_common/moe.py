"""The Mixture-of-Experts rules both twins implement, written once in words and once in float64
NumPy (the truth their routing, outputs and losses are checked against).

A MoE MLP (``mlp="moe"``) replaces the block's one SwiGLU by ``n_experts`` SwiGLU experts and a
router. For the N = B * T tokens of a call, flattened row-major (token n = b * T + t):

1. Router logits (N, E) = x @ W_router^T, computed in float32 whatever the compute dtype (float64
   stays float64): a router in bfloat16 picks other experts (docs/guide.md measures how many).
2. Choice: each token takes the ``top_k`` experts of largest logit. Ties go to the lower expert
   index, by an explicit rank: rank(e) = #{j : l_j > l_e} + #{j < e : l_j == l_e}, and choice r is
   the expert of rank r. Neither library's top-k is used: ``jax.lax.top_k`` documents lower index
   first, ``torch.topk`` documents nothing about ties.
3. Weights: softmax over all E logits (Mixtral), the k chosen probabilities kept, renormalised to
   sum 1 when ``norm_topk_prob`` (Mixtral, always) and left as they are otherwise (Qwen-MoE's
   ``norm_topk_prob=False``). Top-k on the logits then a softmax over the k (MaxText) equals the
   renormalised form in exact arithmetic, and differs from the unrenormalised one.
4. Capacity (``capacity_factor`` c, None = dropless): each expert takes at most
   ceil(c * k * N / E) (token, choice) pairs, first come first served in the order (token n, then
   choice rank r); a pair past its expert's capacity is dropped (weight 0: that token gets less
   of the MLP, its residual passes through). The other pairs keep their weights (no renormalising).
5. Output = sum over kept pairs of weight * expert(x). Dispatch is dense-masked: every expert runs
   on every token and the (N, E) combine matrix, zero outside the kept pairs, weights the sum.
   E / k times the FLOPs of a gather dispatch, but static shapes (one jit compilation, one
   torch.compile graph), the same code in both twins, and, on a mesh without an ``expert`` axis,
   an expert-parallel split over ``model`` that is one all-reduce (each device runs its own
   experts on every token, the partial sums add up).

Expert parallelism (a mesh with an ``expert`` axis of size S, twin_common/mesh.py): each device
holds E / S whole experts (experts s * E / S to (s + 1) * E / S - 1 on expert rank s) and its own
share of the tokens, split over (data, expert) like the batch. Routing (router, choice, weights) is
per token, so each device routes its own. Then, per device (``exchange`` in both twins): every
(token, choice) pair is written into a buffer of S blocks of N * k slots, the token's activations in
the slot of block s where s holds its expert (zero in the others), with the one-hot of the expert
among s's; one all-to-all swaps block s with device s; each device runs its experts on what it
received (the same ``expert_mlp`` as one device, on its E / S experts); a second all-to-all sends
the results back to the pairs' own slots, and the pairs' weights combine them. A slot per pair and
block is the dropless worst case (every pair to one device), so shapes are static and no pair is
ever dropped; the price is S times the activations a packed buffer would send when the load is
even. With a capacity factor the drop order (token n, then rank r, over all N tokens of the call)
would need every device's arrivals before its own, so the mesh refuses it: expert parallelism is
dropless. The router losses see every token: JAX computes them on the global arrays, torch pools
their statistics over (data, expert) (router_losses' ``data_mean``).

Training adds two router losses to the cross-entropy, over every MoE layer's tokens pooled (as
transformers' ``load_balancing_loss_func`` pools its layers):

- load balancing (Switch, Fedus et al. 2021, eq. 4; Mixtral's form): E * sum_e f_e * P_e, f_e the
  fraction of (token, choice) pairs routed to e (before capacity drops; sums to k), P_e the mean
  softmax probability of e. One softmax: a second softmax over probabilities flattens P towards
  1/E and the loss towards k (docs/guide.md).
- z-loss (ST-MoE, Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(logits)^2, positive,
  pushing the router logits towards 0.

The N tokens are those of one call: a cached generation step routes only its own tokens, so with a
capacity factor a cached run is not the uncached one (dropless, each token's routing is its own).

``routing_margin`` is the routing twin of generation's ``decision_margin``: how far a token's
choice is from flipping, the k-th minus the (k+1)-th largest router logit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from twin_common.tolerances import tolerance_for


def capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """(token, choice) pairs one expert takes from ``n_tokens`` tokens: ceil(c * k * N / E); None: all."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * top_k * n_tokens / n_experts)


def route(logits: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The routing of router logits (..., E), in float64, written unlike the twins (a stable sort
    and a loop over pairs, where they compute ranks and cumulative sums).

    Returns (choice (N, k) expert ids, weight (N, k), kept (N, k) bool) for the N flattened tokens."""
    z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    N, E = z.shape
    k = cfg.top_k
    choice = np.argsort(-z, axis=-1, kind="stable")[:, :k]  # stable: among equal logits, lower index first
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    weight = np.take_along_axis(p, choice, -1)
    if cfg.norm_topk_prob:
        weight = weight / weight.sum(-1, keepdims=True)
    kept = np.ones((N, k), bool)
    cap = capacity(N, E, k, cfg.capacity_factor)
    if cap is not None:
        load = np.zeros(E, int)
        for n in range(N):  # first come, first served: token order, then choice rank
            for r in range(k):
                e = choice[n, r]
                kept[n, r] = load[e] < cap
                load[e] += kept[n, r]
    return choice, weight, kept


def moe_forward(x: np.ndarray, router: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, cfg) -> dict:
    """The MoE MLP in float64 on x (..., C): router (E, C), gate / up (E, H, C), down (E, C, H), all
    nn.Linear's (out, in) per expert (Mixtral's w1, w3, w2). Gather dispatch: each kept (token,
    choice) pair runs its expert. Returns {"mlp": (..., C), "router_logits": (..., E)}."""
    x = np.asarray(x, np.float64)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ f64(router).T
    choice, weight, kept = route(logits, cfg)
    out = np.zeros_like(flat)
    for n, r in zip(*np.nonzero(kept)):
        e = choice[n, r]
        g = f64(gate[e]) @ flat[n]
        h = g / (1.0 + np.exp(-g)) * (f64(up[e]) @ flat[n])
        out[n] += weight[n, r] * (f64(down[e]) @ h)
    return {"mlp": out.reshape(x.shape), "router_logits": logits.reshape(*x.shape[:-1], -1)}


def router_losses(router_logits: Sequence[np.ndarray], top_k: int) -> tuple[float, float]:
    """(load-balancing loss, z-loss) in float64 of every MoE layer's router logits (..., E), pooled."""
    z = np.concatenate([np.asarray(g, np.float64).reshape(-1, g.shape[-1]) for g in router_logits])
    E = z.shape[-1]
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
    p = np.exp(z - lse[:, None])
    choice = np.argsort(-z, axis=-1, kind="stable")[:, :top_k]
    f = np.bincount(choice.reshape(-1), minlength=E) / z.shape[0]
    return float(E * np.sum(f * p.mean(0))), float(np.mean(lse**2))


def routing_margin(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Per token (flattened), the k-th minus the (k+1)-th largest router logit: how far the choice
    of experts is from flipping (inf when k = E: nothing to choose)."""
    z = np.sort(np.asarray(logits, np.float64).reshape(-1, logits.shape[-1]), axis=-1)[:, ::-1]
    if top_k >= z.shape[-1]:
        return np.full(z.shape[0], np.inf)
    return z[:, top_k - 1] - z[:, top_k]


def routing_tolerance(dtype: str, logits: np.ndarray) -> float:
    """How far two twins' router logits may legitimately differ when the model computes in
    ``dtype``: the tolerance table's bound at the logits' size. A token whose routing margin is
    below it is undecidable: either choice is a correct computation in that dtype."""
    return tolerance_for(dtype).bound(np.asarray(logits, np.float64))


def chosen_experts(logits: np.ndarray, top_k: int) -> np.ndarray:
    """(N, k) the experts each token chooses, as a sorted set, by the tie rule (stable sort)."""
    z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    return np.sort(np.argsort(-z, axis=-1, kind="stable")[:, :top_k], axis=-1)


def compare_routing(a: np.ndarray, b: np.ndarray, top_k: int, dtype: str) -> dict:
    """Two twins' router logits (..., E) of the same tokens: which tokens chose different experts
    (as sets), and which were undecidable: a margin under the dtype's tolerance in either twin,
    except when both twins' logits of the token are bit for bit equal (then even an exact tie is
    decided, by the tie rule, and the twins must agree). Returns counts: {"tokens", "differ",
    "undecidable", "differ_decidable"}; a correct pair of twins has differ_decidable 0."""
    tol = routing_tolerance(dtype, a)
    differ = np.any(chosen_experts(a, top_k) != chosen_experts(b, top_k), axis=-1)
    same_logits = np.all(np.asarray(a).reshape(differ.size, -1) == np.asarray(b).reshape(differ.size, -1), axis=-1)
    undecidable = ((routing_margin(a, top_k) < tol) | (routing_margin(b, top_k) < tol)) & ~same_logits
    return {"tokens": int(differ.size), "differ": int(differ.sum()), "undecidable": int(undecidable.sum()),
            "differ_decidable": int((differ & ~undecidable).sum())}  # fmt: skip


def moe_layer_weights(weights: Mapping[str, np.ndarray], prefix: str) -> tuple[np.ndarray, ...]:
    """(router, gate, up, down) of one twin MoE layer from interchange-layout arrays."""
    return tuple(weights[prefix + k] for k in ("router.weight", "experts.gate_proj", "experts.up_proj", "experts.down_proj"))
