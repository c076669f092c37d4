"""The papers' experiments as named, runnable recipes (`gradflow run NAME`)."""

from . import (
    compare_factorizations,
    diagonal_bias,
    gd_vs_flow,
    htf_incremental,
    mf_incremental,
    rank_one_trajectory,
    rc_norms,
    tensor_completion,
    tensor_rank_complexity,
    tf_incremental,
)

EXPERIMENTS = {
    m.NAME: m
    for m in (
        tf_incremental,
        mf_incremental,
        rc_norms,
        htf_incremental,
        compare_factorizations,
        gd_vs_flow,
        rank_one_trajectory,
        tensor_rank_complexity,
        tensor_completion,
        diagonal_bias,
    )
}
