"""Graph passes: the pass API, the built-in passes, the memory planner."""

from .manager import PASSES, PassContext, PassManager, PassReport, PassResult, PassStats, register_pass

# The pipeline Model.compile runs when no passes are named.
DEFAULT_PASSES: list[str] = []

__all__ = ["PASSES", "PassContext", "PassManager", "PassReport", "PassResult", "PassStats", "register_pass",
           "DEFAULT_PASSES"]
