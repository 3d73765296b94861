"""Minimal reproductions behind the CPU training-speed figures: one exact GELU, and one MLP
(Linear d -> 4d, GELU, Linear 4d -> d), forward + backward, in JAX and in torch.

    python -m scripts.repro_gelu                 # (16, 64, 128) activations, as in the small GPT
    python -m scripts.repro_gelu --threads 1     # both frameworks on one core

Rows (each timed as a jitted JAX function / an eager torch call, forward + backward of a sum):
  gelu erfc   jax.nn.gelu(x, approximate=False): 0.5 x erfc(-x / sqrt 2)
  gelu erf    jax_impl.block.exact_gelu:        0.5 x (1 + erf(x / sqrt 2)), torch's formula
  gelu torch  torch.nn.functional.gelu (exact)
  mlp ...     the same three inside the MLP, and the MLP's two matmuls alone (no GELU)
  dW x^T g    the weight-gradient matmul alone: (1024, 128)^T @ (1024, 512)

The calls take turns, --rounds times, and the medians of wall and process CPU time are printed.
Also printed: each GELU's max abs error against a float64 truth, forward and derivative.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(16, 64, 128), metavar=("B", "T", "C"))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, help="run both frameworks on this many cores")
    args = p.parse_args(argv)
    if args.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jax_impl.block import exact_gelu

    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, C = args.shape
    H = 4 * C
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    h = (2 * rng.standard_normal((B, T, H))).astype(np.float32)
    w1 = (0.02 * rng.standard_normal((C, H))).astype(np.float32)
    w2 = (0.02 * rng.standard_normal((H, C))).astype(np.float32)
    g = rng.standard_normal((B * T, H)).astype(np.float32)

    gelus = {
        "erfc": lambda a: jax.nn.gelu(a, approximate=False),
        "erf": exact_gelu,
        "none": lambda a: a,
    }
    calls = {}
    hj, xj, w1j, w2j = map(jnp.asarray, (h, x, w1, w2))
    for name in ("erfc", "erf"):
        grad = jax.jit(jax.grad(lambda a, f=gelus[name]: f(a).sum()))
        calls[f"gelu {name}"] = lambda grad=grad: grad(hj).block_until_ready()
    for name, f in gelus.items():
        grad = jax.jit(jax.grad(lambda a, b, c, f=f: (f(c @ a) @ b).sum(), argnums=(0, 1, 2)))
        label = "mlp matmuls only" if name == "none" else f"mlp gelu {name}"
        calls[f"jax {label}"] = lambda grad=grad: jax.block_until_ready(grad(w1j, w2j, xj))
    xdw, gdw = jnp.asarray(x.reshape(B * T, C)), jnp.asarray(g)
    dw = jax.jit(lambda a, b: a.T @ b)
    calls["jax dW x^T g"] = lambda: dw(xdw, gdw).block_until_ready()

    ht = torch.tensor(h, requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    w1t, w2t = torch.tensor(w1, requires_grad=True), torch.tensor(w2, requires_grad=True)

    def torch_gelu():
        ht.grad = None
        torch.nn.functional.gelu(ht).sum().backward()

    def torch_mlp(act):
        def call():
            for t in (xt, w1t, w2t):
                t.grad = None
            (act(xt @ w1t) @ w2t).sum().backward()

        return call

    calls["gelu torch"] = torch_gelu
    calls["torch mlp gelu"] = torch_mlp(torch.nn.functional.gelu)
    calls["torch mlp matmuls only"] = torch_mlp(lambda a: a)
    xdw_t, gdw_t = torch.tensor(x.reshape(B * T, C)), torch.tensor(g)
    calls["torch dW x^T g"] = lambda: xdw_t.T @ gdw_t

    for call in calls.values():  # compile and warm up
        call()
        call()
    wall = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    for _ in range(args.rounds):
        for k, call in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)

    load = os.getloadavg()[0]
    print(f"activations ({B}, {T}, {C}) -> ({B}, {T}, {H}), float32, forward + backward; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {jax.__version__}; {len(os.sched_getaffinity(0))} cores, "
          f"load average {load:.2f}; medians of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'call':<26}{'wall ms':>9}{'CPU ms':>9}")
    for k in calls:
        print(f"{k:<26}{statistics.median(wall[k]) * 1e3:9.3f}{statistics.median(cpu[k]) * 1e3:9.3f}")

    # accuracy against a float64 truth: forward and derivative
    z = np.linspace(-8, 8, 20001).astype(np.float32)
    z64 = z.astype(np.float64)
    erf64 = np.array([math.erf(v / math.sqrt(2)) for v in z64])
    truth = 0.5 * z64 * (1 + erf64)
    dtruth = 0.5 * (1 + erf64) + z64 * np.exp(-0.5 * z64**2) / math.sqrt(2 * math.pi)
    zt = torch.tensor(z, requires_grad=True)
    torch.nn.functional.gelu(zt).sum().backward()
    results = {"torch": (torch.nn.functional.gelu(zt).detach().numpy(), zt.grad.numpy())}
    for name in ("erfc", "erf"):
        f = gelus[name]
        results[f"jax {name}"] = (np.asarray(f(jnp.asarray(z))), np.asarray(jax.grad(lambda a: f(a).sum())(jnp.asarray(z))))
    print("max abs error against float64 on [-8, 8] (forward, derivative):")
    for k, (y, dy) in results.items():
        print(f"  {k:<10} {np.max(np.abs(y - truth)):.2e}  {np.max(np.abs(dy - dtruth)):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
