"""Framework-neutral pieces shared by both twins: the config, input checks, precision pinning,
tolerances and a float64 NumPy reference of the block.

Nothing in this package imports torch or jax at module level, so a machine with only one framework
(a TPU VM with JAX only, say) can import it.
"""

from twin_common.config import BlockConfig, GPTConfig
from twin_common.checks import SUPPORTED_DTYPES, check_block_input

__all__ = ["BlockConfig", "GPTConfig", "SUPPORTED_DTYPES", "check_block_input"]
