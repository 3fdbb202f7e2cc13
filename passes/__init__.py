"""Graph passes: the pass API, pattern rewriting, the built-in passes, the memory planner and the
equivalence checker that tests a pass in one line.

    from minitorch_infer.passes import P, PassResult, check_pass, register_pass, rewrite
"""

from collections.abc import Iterable

from ..errors import MinitorchError
# Importing the built-in passes registers them.
from . import dce, fuse_gate_up, fuse_qkv, fuse_residual, prune_rows, quantization, tabulate_rope  # noqa: F401
from .equivalence import check_equivalent, check_kernels, check_pass, random_weights
from .manager import PASSES, PassContext, PassManager, PassReport, PassResult, PassStats, register_pass
from .memory_plan import MemoryPlan, plan_memory
from .packing import derive_param, pack_params
from .quantization import quantize_weights
from .pattern import Match, P, Pattern, rewrite

# The pipeline Model.compile runs when no passes are named.
DEFAULT_PASSES: list[str] = ["fuse_qkv", "fuse_gate_up", "fuse_residual", "prune_rows", "tabulate_rope", "dce"]


def default_passes(disable: Iterable[str] = ()) -> list[str]:
    """The default pipeline without the passes named in `disable`, e.g. for `Model.compile(passes=...)`."""
    disable = list(disable)
    unknown = [name for name in disable if name not in DEFAULT_PASSES]
    if unknown:
        raise MinitorchError(f"cannot disable {', '.join(unknown)}: not a default pass; "
                             f"defaults: {', '.join(DEFAULT_PASSES)}")
    return [name for name in DEFAULT_PASSES if name not in disable]


__all__ = ["PASSES", "PassContext", "PassManager", "PassReport", "PassResult", "PassStats", "register_pass",
           "DEFAULT_PASSES", "default_passes", "Pattern", "P", "Match", "rewrite", "pack_params", "derive_param",
           "check_equivalent", "check_pass", "check_kernels", "random_weights", "MemoryPlan", "plan_memory",
           "quantize_weights"]
