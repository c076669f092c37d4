"""The papers' experiments as named, runnable recipes (`gradflow run NAME`)."""

from . import mf_incremental, rc_norms, tf_incremental

EXPERIMENTS = {m.NAME: m for m in (tf_incremental, mf_incremental, rc_norms)}
