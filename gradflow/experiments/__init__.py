"""The papers' experiments as named, runnable recipes (`gradflow run NAME`)."""

from . import tf_incremental

EXPERIMENTS = {m.NAME: m for m in (tf_incremental,)}
