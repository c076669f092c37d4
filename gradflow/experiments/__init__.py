"""The papers' experiments as named, runnable recipes (`gradflow run NAME`)."""

import importlib

_MODULES = (
    "tf_incremental",
    "mf_incremental",
    "rc_norms",
    "htf_incremental",
    "compare_factorizations",
    "gd_vs_flow",
    "rank_one_trajectory",
    "tensor_rank_complexity",
)
EXPERIMENTS = {}
for _name in _MODULES:
    try:
        _module = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _error:  # not written yet
        if _error.name != f"{__name__}.{_name}":
            raise
        continue
    EXPERIMENTS[_module.NAME] = _module
