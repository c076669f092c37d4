"""Hierarchical tensor factorization against the docs' §4 theory pages (checks H1–H4)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gradflow as gf
from gradflow.analysis import htf as ah
from gradflow.models.htf import HTF, ModeTree

TIGHT = dict(rtol=1e-11, atol=1e-14)


def completion(shape, m, seed=0):
    k1, k2 = jr.split(jr.key(seed))
    idx = gf.sample_indices(k1, shape, m)
    return gf.Completion(shape, idx, jr.normal(k2, (m,)))


# --- the mode tree ---------------------------------------------------------------


def test_tree_constructors_follow_code_htf_pooling():  # §4.1, §4.7
    assert ModeTree.binary(4) == ModeTree(((0, 1), (2, 3)))
    assert ModeTree.binary(3).structure == ((0, 1), (2,))  # unfilled window: one child
    assert ModeTree.binary(5).structure == (((0, 1), (2, 3)), ((4,),))
    assert ModeTree.interleaved(4).structure == ((0, 2), (1, 3))
    assert ModeTree.interleaved(8).structure == (((0, 4), (2, 6)), ((1, 5), (3, 7)))
    # CODE-HTF "half" with an odd level: the middle node is pooled last
    assert ModeTree.interleaved(6).structure == (((0, 3), (2, 5)), ((1, 4),))
    assert ModeTree.adjacent(6, 3).structure == ((0, 1, 2), (3, 4, 5))
    assert ModeTree.pooling(8, [4, 2]).structure == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert ModeTree.flat(3).structure == (0, 1, 2)
    assert ModeTree([[0, 1], [2, 3]]) == ModeTree.binary(4)  # lists are normalized

    tree = ModeTree.binary(4)
    assert hash(tree) == hash(ModeTree(((0, 1), (2, 3))))
    assert tree.interior == (4, 5, 6) and tree.root == 6 and tree.num_nodes == 7
    assert tree.children[6] == (4, 5) and tree.parent[0] == 4 and tree.parent[6] is None
    assert tree.modes[5] == (2, 3) and tree.find((1, 0)) == 4 and tree.find(range(4)) == 6
    assert [tree.num_axes(v) for v in tree.interior] == [3, 3, 3]
    assert tree.layer_widths([5, 7]) == (5, 5, 7)
    chain = ModeTree.binary(3)
    assert chain.find((2,)) == 4  # the topmost node of the chain {2} -> {2}
    assert chain.num_axes(4) == 2
    assert ModeTree.interleaved(4).modes[4] == (0, 2)


@pytest.mark.parametrize(
    "structure, match",
    [
        (((0, 1), (3,)), r"mode\(s\) \[2\] missing"),
        (((0, 1), (1, 2)), r"mode\(s\) \[1\] repeated"),
        (((0, 1), ()), "must have children"),
        (((0, 1.5), (2,)), "nested tuples of modes"),
        (((0, -1),), "ints >= 0"),
        (3, "root must be an interior node"),
        ((0,), "at least 2 modes"),
    ],
)
def test_invalid_trees_are_rejected(structure, match):
    with pytest.raises(ValueError, match=match):
        ModeTree(structure)


def test_invalid_arguments_are_named():
    tree, key = ModeTree.binary(4), jr.key(0)
    cases = [
        (lambda: ModeTree.pooling(1), "`num_modes`"),
        (lambda: ModeTree.pooling(4, 1), "`windows`"),
        (lambda: ModeTree.pooling(4, [2]), "`windows`.*leaves 2 nodes"),
        (lambda: ModeTree.pooling(4, [4, 2]), "`windows` has 2 levels"),
        (lambda: ModeTree.pooling(4, 2, "spiral"), "`pattern`"),
        (lambda: tree.layer_widths([3]), "`widths`"),
        (lambda: tree.find((0, 2)), "`modes`"),
        (lambda: HTF.gaussian(key, (3, 3, 3), tree, 2, 0.1), "`dims` has 3 entries"),
        (lambda: HTF.gaussian(key, (3, 3, 0, 3), tree, 2, 0.1), "`dims`"),
        (lambda: HTF.gaussian(key, (3,) * 4, tree, 0, 0.1), "`widths` must be ints >= 1"),
        (lambda: HTF.gaussian(key, (3,) * 4, tree, (2, 0, 2), 0.1), "`widths` must be ints"),
        (lambda: HTF.gaussian(key, (3,) * 4, tree, (2, 2), 0.1), "one width per interior"),
        (lambda: HTF.gaussian(key, (3,) * 4, tree, 2, -1.0), "`std`"),
        (lambda: HTF.balanced(key, (3,) * 4, tree, 2, np.nan), "`scale`"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError, match="`tree` must be a gradflow ModeTree"):
        HTF.gaussian(key, (3,) * 4, ((0, 1), (2, 3)), 2, 0.1)
    good = HTF.gaussian(key, (3,) * 4, tree, 2, 0.1)
    bad = list(good.weights)
    bad[4] = jnp.ones((2, 3))  # node {0,1} must have R_root = 2 columns
    with pytest.raises(ValueError, match=r"`weights\[4\]` has shape \(2, 3\).*parent node 6"):
        HTF(tree, bad)
    with pytest.raises(ValueError, match="one matrix per node"):
        HTF(tree, good.weights[:-1])
    with pytest.raises(ValueError, match="root needs 1 column"):
        HTF(tree, good.weights[:-1] + (jnp.ones((2, 2)),))
    with pytest.raises(ValueError, match="`modes`"):
        ah.matricization(good.full(), (0, 1, 2, 3))
    with pytest.raises(ValueError, match="`modes`"):
        ah.matricization(good.full(), (0, 0))
    # dims not matching the objective
    with pytest.raises(ValueError, match=r"`model` has shape \(3, 3, 3, 3\)"):
        gf.flow(good, completion((3, 3, 3, 4), 5), t1=1.0)


# --- the model ----------------------------------------------------------------------


def test_end_tensor_matches_written_out_sums():  # §4.1 for the two pairings of order 4
    dims = (2, 3, 4, 3)
    for tree, pairs in [(ModeTree.binary(4), "ia,jb"), (ModeTree.interleaved(4), "ia,kb")]:
        model = HTF.gaussian(jr.key(1), dims, tree, (2, 3, 4), 1.0)
        w0, w1, w2, w3, wa, wb, root = map(np.asarray, model.weights)
        if pairs == "ia,jb":  # {0,1} share index a, {2,3} share b
            expected = np.einsum("ia,ja,kb,lb,ac,bc,c->ijkl", w0, w1, w2, w3, wa, wb, root[:, 0])
        else:  # {0,2} share a, {1,3} share b
            expected = np.einsum("ia,ka,jb,lb,ac,bc,c->ijkl", w0, w2, w1, w3, wa, wb, root[:, 0])
        np.testing.assert_allclose(model.full(), expected, rtol=1e-13, atol=1e-15)
        idx = gf.sample_indices(jr.key(2), dims, 30)
        np.testing.assert_allclose(model.entries(idx), expected[tuple(np.asarray(idx).T)],
                                   rtol=1e-13, atol=1e-15)
        assert float(model.norm()) == pytest.approx(np.linalg.norm(expected), rel=1e-13)
        # P_{(0,1) or (0,2), r} = |W0[:, r]| |W1 or W2[:, r]| |Wa[r, :]|
        second = w1 if pairs == "ia,jb" else w2
        p = np.linalg.norm(w0, axis=0) * np.linalg.norm(second, axis=0) * np.linalg.norm(wa, axis=1)
        np.testing.assert_allclose(model.local_component_norms()[4], p, rtol=1e-14)
        np.testing.assert_allclose(model.component_norms()[:2], p, rtol=1e-14)
        assert model.component_norms().shape == (2 + 3 + 4,)


def test_gamma_is_the_normalized_component_inner_product():  # §4.5's definition of γ
    dims, tree = (3, 2, 3, 2, 2), ModeTree.binary(5)  # includes a chain {4} -> {4}
    model = HTF.gaussian(jr.key(3), dims, tree, (2, 3, 2, 2, 3, 2), 0.9)
    obj = completion(dims, 25, seed=4)
    # ∇L of the objective's *mean* squared loss, written out by hand
    idx, y = np.asarray(obj.indices), np.asarray(obj.values)
    full = np.asarray(model.full())
    grad_l = np.zeros(dims)
    grad_l[tuple(idx.T)] = (full[tuple(idx.T)] - y) / len(y)
    expected = []
    for v in tree.interior:
        for r in range(model.weights[v].shape[0]):
            ws = [np.array(w) for w in model.weights]
            keep = ws[v][r] / np.linalg.norm(ws[v][r])
            ws[v][:] = 0.0
            ws[v][r] = keep
            for c in tree.children[v]:
                ws[c][:, r] /= np.linalg.norm(ws[c][:, r])
            h_hat = np.asarray(HTF(tree, ws).full())
            expected.append(np.sum(-grad_l * h_hat))
    np.testing.assert_allclose(ah.gammas(model, obj), expected, rtol=1e-11, atol=1e-15)


def test_depth_one_tree_with_unit_root_is_cp():  # §4.5 "Relations"
    dims, rank = (3, 4, 2), 4
    tree = ModeTree.flat(3)
    model = HTF.gaussian(jr.key(5), dims, tree, rank, 0.8)
    obj = completion(dims, 12, seed=6)
    unit = HTF(tree, model.weights[:3] + (jnp.ones((rank, 1)),))
    cp = gf.CP(unit.weights[:3])
    np.testing.assert_allclose(unit.full(), cp.full(), rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(unit.entries(obj.indices), cp.entries(obj.indices), rtol=1e-14)
    # same loss and same leaf gradients: with the root held at ones, the HTF flow is CP's
    assert float(obj(unit)) == pytest.approx(float(obj(cp)), rel=1e-14)
    g_htf, g_cp = jax.grad(obj)(unit), jax.grad(obj)(cp)
    for a, b in zip(g_htf.weights[:3], g_cp.factors):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-16)
    # trainable root weights: exactly CP of order N+1 with a trailing singleton mode (K = N+1)
    cp4 = gf.CP(model.weights[:3] + (model.weights[3].T,))
    idx4 = jnp.concatenate([obj.indices, jnp.zeros((12, 1), obj.indices.dtype)], axis=1)
    obj4 = gf.Completion(dims + (1,), idx4, obj.values)
    v_htf, v_cp = gf.vector_field(0.0, model, obj), gf.vector_field(0.0, cp4, obj4)
    for a, b in zip(v_htf.weights, v_cp.factors[:3] + (v_cp.factors[3].T,)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(model.component_norms(), cp4.component_norms(), rtol=1e-14)
    assert ah.num_axes(model).tolist() == [4.0] * rank


# --- along gradient flow ------------------------------------------------------------


def zero_component(weights, tree, v, r):
    """Zero every vector of local component (v, r): row r of W^v and column r of each child."""
    weights[v] = weights[v].at[r].set(0.0)
    for c in tree.children[v]:
        weights[c] = weights[c].at[:, r].set(0.0)


# Both flows share the problem's structure and these observers, so they compile once.
FLOW_DIMS, FLOW_TREE, FLOW_WIDTHS, FLOW_M = (4, 4, 4, 4), ModeTree.binary(4), 3, 60
FLOW_OBSERVERS = {
    "gaps": lambda t, m, o: ah.squared_norm_gaps(m),
    "scale": lambda t, m, o: ah.vector_scale(m),
    "eps": lambda t, m, o: ah.unbalancedness(m),
    "identity": lambda t, m, o: ah.identity_residual(m, o),
    "law": lambda t, m, o: ah.corollary_residual(m, o),
    "excess": lambda t, m, o: ah.rank_bound_excess(m),
    "p": lambda t, m, o: m.component_norms(),
}


def flow_htf(model, seed, t1):
    obj = completion(FLOW_DIMS, FLOW_M, seed)
    ts = np.linspace(0.0, t1, 25)
    return gf.flow(model, obj, t1=t1, save_times=ts, observers=FLOW_OBSERVERS, **TIGHT), obj


def test_unbalanced_flow_conservation_identity_and_rank_bound():  # H1, H2, H4
    tree = FLOW_TREE
    model = HTF.gaussian(jr.key(7), FLOW_DIMS, tree, FLOW_WIDTHS, 0.7)
    ws = list(model.weights)
    zero_component(ws, tree, 4, 0)  # ({0,1}, 0)
    zero_component(ws, tree, 6, 2)  # (root, 2)
    model = HTF(tree, ws)
    # counts of nonzero components: {0,1}: 2, {2,3}: 3, root: 2
    bounds = {v: int(b) for v, b in ah.rank_bounds(model).items()}
    assert bounds == {0: 2, 1: 2, 2: 3, 3: 3, 4: 2, 5: 2}
    tr, obj = flow_htf(model, 8, 100.0)
    assert tr["loss"][-1] < 0.5 * tr["loss"][0]
    assert tr["eps"][0] > 0.3
    assert tr["law"][0] > 1e-2  # the law needs balance; unbalanced, it visibly fails
    verdict = ah.conservation_verdict(tr["gaps"], tr["scale"], 1e-10)
    assert verdict, verdict
    assert np.abs(tr["scale"] - tr["scale"][0]).max() > 0.1  # the weights did move
    assert np.max(tr["identity"]) <= 1e-8
    # zero components stay exactly zero; the rank bound holds all along and is attained
    assert np.all(tr["p"][:, [0, 3 + 3 + 2]] == 0.0)
    assert ah.rank_bound_verdict(tr["excess"])
    ranks = {v: int(r.rank) for v, r in ah.hierarchical_ranks(tr.model).items()}
    assert ranks == bounds


def test_balanced_flow_follows_the_local_norm_law():  # H3 (and H2)
    model = HTF.balanced(jr.key(9), FLOW_DIMS, FLOW_TREE, FLOW_WIDTHS, 0.8)
    scale = float(ah.vector_scale(model))
    assert float(ah.unbalancedness(model)) <= 1e-15 * scale
    tr, obj = flow_htf(model, 10, 150.0)
    assert tr["loss"][-1] < 0.3 * tr["loss"][0]
    assert np.max(np.abs(np.log(tr["p"][-1] / tr["p"][0]))) > 0.5  # norms moved
    assert np.max(tr["law"]) <= 1e-8
    assert np.max(tr["identity"]) <= 1e-8
    assert np.max(tr["eps"]) <= 1e-10 * np.max(tr["scale"])  # ε_H stays 0 (§4.4)


def test_hierarchical_ranks_against_numpy():  # §4.3
    dims = (2, 3, 4, 3)
    truth = np.asarray(gf.random_cp_tensor(jr.key(11), dims, 2))
    for modes in [(0,), (0, 1), (2, 3), (0, 2), (1, 3, 0)]:
        rows = sorted(modes)
        cols = [n for n in range(4) if n not in rows]
        mat = np.transpose(truth, rows + cols).reshape(int(np.prod([dims[n] for n in rows])), -1)
        np.testing.assert_array_equal(ah.matricization(truth, modes), mat)
        result = ah.matricization_rank(truth, modes)
        np.testing.assert_allclose(result.singular_values, np.linalg.svd(mat, compute_uv=False),
                                   rtol=1e-12, atol=1e-15)
        assert int(result.rank) == 2  # CP rank 2 bounds every matricization rank
        assert 1.0 < float(result.effective_rank) < 2.0
    assert int(ah.matricization_rank(np.zeros(dims), (0, 1)).rank) == 0
    model = HTF.gaussian(jr.key(12), dims, ModeTree.binary(4), (2, 2, 3), 1.0)
    ranks = ah.hierarchical_ranks(model)
    assert sorted(ranks) == [0, 1, 2, 3, 4, 5]  # every node but the root
    assert [int(ranks[v].rank) for v in range(6)] == [2, 2, 2, 2, 2, 2]
    alt = ah.matricization_rank(model, (0, 2))  # {0,2} vs {1,3}: rank up to 4 = 2 * 2
    assert int(alt.rank) == 4
    # the verdicts can fail
    assert not ah.rank_bound_verdict(np.array([0.0, 1.0, -2.0]))
    gaps = np.array([[1.0, -2.0], [1.0, -2.0 + 1e-8]])
    assert not ah.conservation_verdict(gaps, np.array([3.0, 3.0]), 1e-10)
    assert ah.conservation_verdict(gaps, np.array([3.0, 3.0]), 1e-8)


# --- properties over trees and widths (hypothesis) -----------------------------------


@st.composite
def problems(draw):
    n = draw(st.integers(2, 4))
    modes = draw(st.permutations(range(n)))

    def build(ms):
        if len(ms) == 1:
            return (ms[0],) if draw(st.integers(0, 3)) == 0 else ms[0]
        k = draw(st.integers(2, len(ms)))
        cuts = sorted(draw(st.sets(st.integers(1, len(ms) - 1), min_size=k - 1, max_size=k - 1)))
        return tuple(build(ms[i:j]) for i, j in zip([0, *cuts], [*cuts, len(ms)]))

    tree = ModeTree(build(list(modes)))
    dims = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    widths = tuple(draw(st.lists(st.integers(1, 3), min_size=len(tree.interior),
                                 max_size=len(tree.interior))))
    return tree, dims, widths, draw(st.integers(0, 2**16))


def numpy_weights(rng, dims, tree, widths, std):
    """Gaussian weights drawn with NumPy (no per-shape JAX compilation in property tests)."""
    rows = list(dims) + list(widths)
    cols = [1 if p is None else rows[p] for p in tree.parent]
    return [std * rng.standard_normal((r, c)) for r, c in zip(rows, cols)]


@eqx.filter_jit
def point_quantities(model, obj):
    """Everything the property test compares, in one compilation per problem."""
    velocity = gf.vector_field(0.0, model, obj)
    squares = lambda m: jnp.concatenate([n.ravel() ** 2 for n in m.local_vector_norms().values()])
    return dict(
        full=model.full(),
        entries=model.entries(obj.indices),
        norm=model.norm(),
        num_components=model.component_norms().shape[0],
        rate=ah.local_norm_rates(model, obj),
        identity=ah.identity_rate(model, obj),
        gap_rate=jax.jvp(ah.squared_norm_gaps, (model,), (velocity,))[1],
        square_rate=jax.jvp(squares, (model,), (velocity,))[1],
    )


@settings(max_examples=10, deadline=None)
@given(problems())
def test_identities_at_random_points_over_trees(problem):  # §4.1, §4.4, §4.5
    tree, dims, widths, seed = problem
    rng = np.random.default_rng(seed)
    model = HTF(tree, numpy_weights(rng, dims, tree, widths, 0.9))
    size = int(np.prod(dims))
    m = max(1, size // 2)
    idx = np.stack(np.unravel_index(rng.choice(size, m, replace=False), dims), axis=1)
    obj = gf.Completion(dims, idx, rng.standard_normal(m), dense=False)
    q = point_quantities(model, obj)
    full = np.asarray(q["full"])
    assert q["num_components"] == sum(widths)
    np.testing.assert_allclose(q["entries"], full[tuple(idx.T)],
                               rtol=1e-12, atol=1e-14 * np.abs(full).max())
    assert float(q["norm"]) == pytest.approx(np.linalg.norm(full), rel=1e-12, abs=1e-300)
    # §4.5: the exact identity Ṗ = γ Σ_k Π_{k'≠k} |a_k'|², from any init
    scale = max(float(jnp.max(jnp.abs(q["rate"]))), 1e-300)
    np.testing.assert_allclose(q["identity"], q["rate"], atol=1e-12 * scale)
    # §4.4: every gap is constant along the flow: d|a_k|²/dt = 2γP is the same for all k
    square_scale = float(jnp.max(jnp.abs(q["square_rate"])))
    assert float(jnp.max(jnp.abs(q["gap_rate"]))) <= 1e-12 * square_scale + 1e-300
    # §4.5's balanced init: the K vectors of every local component have one norm, so
    # ε_H = 0 and (with the identity above) Ṗ = K γ P^(2 − 2/K) holds exactly
    balanced = [np.asarray(w) for w in HTF.balanced(jr.key(seed), dims, tree, widths, 0.7).weights]
    for v in tree.interior:
        norms = [np.linalg.norm(balanced[c], axis=0) for c in tree.children[v]]
        norms = np.stack(norms + [np.linalg.norm(balanced[v], axis=1)])
        np.testing.assert_allclose(norms, np.broadcast_to(norms[-1], norms.shape), rtol=1e-14)


@eqx.filter_jit
def rank_quantities(model):
    ranks = {v: r.rank for v, r in ah.hierarchical_ranks(model).items()}
    return ranks, ah.rank_bounds(model), ah.rank_bound_excess(model)


@settings(max_examples=12, deadline=None)
@given(problems(), st.data())
def test_rank_bound_with_zeroed_components(problem, data):  # H4 (§4.3)
    tree, dims, widths, seed = problem
    ws = numpy_weights(np.random.default_rng(seed), dims, tree, widths, 1.0)
    for v in tree.interior:  # zero the rows of some local components
        dead = data.draw(st.sets(st.integers(0, ws[v].shape[0] - 1)))
        ws[v][sorted(dead)] = 0.0
    ranks, bounds, excess = rank_quantities(HTF(tree, ws))
    for v in ranks:
        assert int(ranks[v]) <= int(bounds[v]), (v, tree.structure)
    assert ah.rank_bound_verdict([excess])  # one save
