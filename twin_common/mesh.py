"""The device mesh both sharded twins run on, in framework-neutral terms: ``--mesh data=D,model=M,expert=X``.

Three named axes, the same names in both frameworks (jax.sharding.Mesh / torch init_device_mesh),
each of size 1 unless named:

- ``data``: data parallel. The batch is split across it; parameters are replicated along it and
  their gradients averaged over it.
- ``model``: tensor parallel (Megatron-style). Parameters are split along it as the conversion
  table's ``split`` column says (twin_common/params.py); activations between blocks are whole.
  Without an ``expert`` axis, a MoE layer's stacked experts split along it too, whole experts per
  device (each device runs its experts on every token, one all-reduce adds their outputs;
  twin_common/moe.py).
- ``expert``: expert parallelism for a MoE model. The stacked experts split along it, whole experts
  per device; everything else is replicated along it and the batch is split over (data, expert), so
  outside the MoE layers it is one more data-parallel axis. In a MoE layer each token's top-k
  choices travel to the devices that hold those experts and back, by two all-to-alls over
  ``expert`` (twin_common/moe.py, "Expert parallelism"). Dropless only: a capacity factor's drop
  order runs over every token of the call, which no single device sees.

Every size is checked here, before any model is built or process group touched, and all problems
come back in one ValueError.
"""

from __future__ import annotations

import dataclasses

# mesh axis names, in this order, in both frameworks. `expert` last: a mesh without it (size 1) lays
# its devices out exactly as the two-axis mesh did.
AXES = ("data", "model", "expert")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    model: int = 1
    expert: int = 1

    def __post_init__(self) -> None:
        for name in AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mesh axis {name!r} must be a positive int, got {value!r}")

    @classmethod
    def of(cls, names, sizes) -> "MeshShape":
        """From a framework mesh's axis names and sizes (a mesh built before the expert axis has two)."""
        return cls(**{str(n): int(s) for n, s in zip(names, sizes)})

    @property
    def size(self) -> int:
        return self.data * self.model * self.expert

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.model, self.expert)

    @property
    def batch_split(self) -> int:
        """How many ways the batch is split: over data, and over expert (one more data-parallel axis
        outside the MoE layers)."""
        return self.data * self.expert

    def __str__(self) -> str:
        return f"data={self.data},model={self.model}" + (f",expert={self.expert}" if self.expert > 1 else "")


def parse_mesh(text: str) -> MeshShape:
    """``"data=2,model=4"`` -> MeshShape(2, 4); ``"data=2,expert=2"`` -> MeshShape(2, 1, 2). Any axis
    may be left out (size 1)."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in str(text).split(",")):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(f"--mesh takes 'data=D,model=M,expert=X' (axes {', '.join(AXES)}), got {text!r}")
        if name in sizes:
            raise ValueError(f"--mesh names axis {name!r} twice: {text!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh axis {name!r} needs an integer size, got {value.strip()!r}") from None
    return MeshShape(**sizes)


def mesh_problems(mesh: MeshShape, cfg, *, n_devices: int | None = None, batch_size: int | None = None,
                  exact_devices: bool = False) -> list[str]:  # fmt: skip
    """Every reason ``cfg`` (BlockConfig or GPTConfig) cannot run on ``mesh``; empty when it can.

    ``n_devices``: the devices there are (JAX: visible devices, any surplus unused; torch: the world
    size, which must match exactly, ``exact_devices=True``). ``batch_size``: the global batch, split
    over ``data`` and ``expert``.
    """
    problems = []
    m, x = mesh.model, mesh.expert
    if n_devices is not None:
        if exact_devices and mesh.size != n_devices:
            problems.append(f"mesh {mesh} needs {mesh.size} processes, but the world size is {n_devices} "
                            f"(launch with torchrun --nproc-per-node {mesh.size})")
        elif mesh.size > n_devices:
            problems.append(f"mesh {mesh} needs {mesh.size} devices, but only {n_devices} are visible (on a CPU, "
                            f"simulate them: XLA_FLAGS=--xla_force_host_platform_device_count={mesh.size})")
    if cfg.n_heads % m:  # heads stay whole: each device computes n_heads / model of them
        problems.append(f"n_heads={cfg.n_heads} is not divisible by model={m} (heads cannot be split)")
    if cfg.kv_heads != cfg.n_heads and cfg.kv_heads % m:  # and so do key/value heads, with their group
        problems.append(f"n_kv_heads={cfg.kv_heads} is not divisible by model={m} (key/value heads cannot "
                        f"be split: each device holds whole key/value heads with their query heads)")
    d_hidden = cfg.d_hidden
    if d_hidden % m:
        problems.append(f"MLP hidden width {d_hidden} is not divisible by model={m}")
    n_experts = getattr(cfg, "n_experts", None) if getattr(cfg, "mlp", None) == "moe" else None
    if x > 1 and n_experts is None:
        problems.append(f"expert={x} needs a Mixture-of-Experts model (mlp='moe'); this one is dense "
                        f"(mlp={getattr(cfg, 'mlp', None)!r}): use data={mesh.data * x} instead")
    elif x > 1:  # the experts go over `expert`, whole; dropless only
        if n_experts % x:
            problems.append(f"n_experts={n_experts} is not divisible by expert={x} (experts stay whole: "
                            f"each device holds n_experts / expert of them)")
        if getattr(cfg, "capacity_factor", None) is not None:
            problems.append(f"capacity_factor={cfg.capacity_factor} with expert={x}: the drop order runs over "
                            f"every token of the call (twin_common/moe.py), which no device sees; expert "
                            f"parallelism is dropless (capacity_factor=None)")
    elif n_experts is not None and n_experts % m:  # no expert axis: the experts ride on `model`, whole
        problems.append(f"n_experts={n_experts} is not divisible by model={m} (experts stay whole: each "
                        f"device holds n_experts / model of them)")
    if cfg.d_model % m:
        problems.append(f"d_model={cfg.d_model} is not divisible by model={m}")
    if batch_size is not None and batch_size % mesh.batch_split:
        over = f"data={mesh.data}" + (f" x expert={x}" if x > 1 else "")
        problems.append(f"batch size {batch_size} is not divisible by {over}")
    return problems


def check_mesh(mesh: MeshShape, cfg, **kwargs) -> None:
    """Raise one ValueError naming every size that does not fit (see mesh_problems)."""
    problems = mesh_problems(mesh, cfg, **kwargs)
    if problems:
        raise ValueError(f"cannot shard over mesh {mesh}: " + "; ".join(problems))
