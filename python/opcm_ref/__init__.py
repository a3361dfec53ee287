"""Pure-torch reference (oracle) for docs/algorithm.md: whole models, plain code.

Imported by tests and benchmarks (after `sys.path.insert(0, "<repo>/python")`);
the product `opcm_ext` never imports it.
"""

from .baselines import (
    AverageRef,
    TaskArithmeticRef,
    TiesRef,
    average_merge,
    task_arithmetic_merge,
    ties_combine,
    ties_merge,
)
from .fusionbench import FusionBenchOPCMRef, fb_norm
from .classify import AVERAGED, CARRIED, PROJECTED, classify, classify_by_module, nonleaf_parameter_keys
from .metrics import acc, bwt
from .opcm import COMPAT_MODES, OPCMRef, drop_tolerance, opcm_merge, project, split_rank
from .tensors import flat_norm, task_vector

__all__ = [
    "PROJECTED",
    "AVERAGED",
    "CARRIED",
    "classify",
    "classify_by_module",
    "nonleaf_parameter_keys",
    "COMPAT_MODES",
    "split_rank",
    "drop_tolerance",
    "project",
    "OPCMRef",
    "FusionBenchOPCMRef",
    "fb_norm",
    "opcm_merge",
    "TaskArithmeticRef",
    "task_arithmetic_merge",
    "TiesRef",
    "ties_merge",
    "ties_combine",
    "AverageRef",
    "average_merge",
    "acc",
    "bwt",
    "flat_norm",
    "task_vector",
]
