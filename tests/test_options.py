"""The papers' options, each against an oracle: losses, weighted and split completions,
sensing operators, inits, observers, the CP-ALS rank estimator and the convex baselines."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import gradflow as gf
from gradflow import observers as obs
from gradflow.analysis import convex
from gradflow.analysis import cp as acp

DIMS = (3, 4, 5)


@pytest.fixture(scope="module")
def problem():
    truth = gf.random_cp_tensor(jr.key(0), DIMS, rank=2)
    indices = gf.sample_indices(jr.key(1), DIMS, 30)
    return truth, gf.Completion.from_tensor(truth, indices)


def dense_gradient(objective, tensor):
    """Hand computation of the end gradient of a squared-loss completion:
    (1/m) (W_i - y_i) at the observed entries, 0 elsewhere."""
    idx = np.asarray(objective.indices)
    residual = np.asarray(tensor)[tuple(idx.T)] - np.asarray(objective.values)
    grad = np.zeros(objective.shape)
    grad[tuple(idx.T)] = residual / len(idx)
    return grad


# --- losses and objectives -------------------------------------------------------------------


def test_absolute_loss_values_and_subgradient():
    z = jnp.array([-2.0, -0.25, 0.0, 0.5, 3.0])
    np.testing.assert_array_equal(gf.AbsoluteLoss()(z), np.abs(np.asarray(z)))
    # the subgradient sign(z): 0 at z = 0 (jnp.abs's derivative there is 1)
    grad = jax.grad(lambda r: jnp.sum(gf.AbsoluteLoss()(r)))(z)
    np.testing.assert_array_equal(grad, [-1.0, -1.0, 0.0, 1.0, 1.0])


def test_absolute_loss_objective_is_the_mean_absolute_residual(problem):
    truth, objective = problem
    l1 = gf.Completion(DIMS, objective.indices, objective.values, gf.AbsoluteLoss())
    model = gf.CP.gaussian(jr.key(2), DIMS, 3, 0.5)
    residual = np.asarray(model.full())[tuple(np.asarray(objective.indices).T)] - np.asarray(
        objective.values)
    np.testing.assert_allclose(float(l1(model)), np.mean(np.abs(residual)), rtol=1e-14)
    with pytest.raises(TypeError, match="AbsoluteLoss"):
        gf.Completion(DIMS, objective.indices, objective.values, loss="l1")


def test_weights_mask_equals_the_subset_objective(problem):
    truth, objective = problem
    k = 17
    mask = jnp.arange(objective.num_observations) < k
    masked = gf.Completion(DIMS, objective.indices, objective.values, weights=mask)
    subset = gf.Completion(DIMS, objective.indices[:k], objective.values[:k])
    model = gf.CP.gaussian(jr.key(3), DIMS, 4, 0.6)
    np.testing.assert_allclose(float(masked(model)), float(subset(model)), rtol=1e-14)
    g_masked = jax.grad(lambda m: masked(m))(model)
    g_subset = jax.grad(lambda m: subset(m))(model)
    for a, b in zip(g_masked.factors, g_subset.factors):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-16)
    # general weights: sum c_i l(z_i) / sum c_i, by hand
    c = jr.uniform(jr.key(4), (objective.num_observations,))
    weighted = gf.Completion(DIMS, objective.indices, objective.values, weights=c)
    z = np.asarray(objective.predict(model) - objective.values)
    expected = np.sum(np.asarray(c) * 0.5 * z**2) / np.sum(np.asarray(c))
    np.testing.assert_allclose(float(weighted(model)), expected, rtol=1e-13)
    # float32: the weights are cast with the rest of the objective
    cast = masked.astype(jnp.float32)
    assert cast.weights.dtype == jnp.float32
    small = jax.tree.map(lambda x: x.astype(jnp.float32), model)
    np.testing.assert_allclose(float(cast(small)), float(subset(model)), rtol=1e-5)


def test_weights_are_checked(problem):
    _, objective = problem
    args = (DIMS, objective.indices, objective.values)
    with pytest.raises(ValueError, match="`weights` must have shape"):
        gf.Completion(*args, weights=jnp.ones(3))
    with pytest.raises(ValueError, match="`weights`"):
        gf.Completion(*args, weights=-jnp.ones(30))
    with pytest.raises(ValueError, match="`weights` must not all be 0"):
        gf.Completion(*args, weights=jnp.zeros(30))


def test_split_partitions_the_observations(problem):
    _, objective = problem
    train, test = objective.split(jr.key(5), 0.2)
    assert (train.num_observations, test.num_observations) == (24, 6)
    rows = lambda o: {tuple(r) for r in np.asarray(o.indices).tolist()}
    assert not rows(train) & rows(test)
    assert rows(train) | rows(test) == rows(objective)
    # values travel with their rows: the summed losses add up
    model = gf.CP.gaussian(jr.key(6), DIMS, 3, 0.5)
    total = 24 * float(train(model)) + 6 * float(test(model))
    np.testing.assert_allclose(total, 30 * float(objective(model)), rtol=1e-13)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="`test_fraction`"):
            objective.split(jr.key(5), bad)
    single = gf.Completion(DIMS, objective.indices[:1], objective.values[:1])
    with pytest.raises(ValueError, match="at least 2 observations"):
        single.split(jr.key(5), 0.5)


def test_tensor_gradient_by_hand(problem):
    truth, objective = problem
    model = gf.CP.gaussian(jr.key(7), DIMS, 3, 0.5)
    np.testing.assert_allclose(objective.tensor_gradient(model.full()),
                               dense_gradient(objective, model.full()), atol=1e-16)
    sensing = gf.Sensing.gaussian(jr.key(8), truth, 40)
    a = np.asarray(sensing.operators).reshape(40, -1)
    z = a @ np.asarray(model.full()).ravel() - np.asarray(sensing.values)
    np.testing.assert_allclose(np.asarray(sensing.tensor_gradient(model.full())).ravel(),
                               a.T @ z / 40, rtol=1e-12)
    with pytest.raises(ValueError, match="`tensor` must have the objective's shape"):
        objective.tensor_gradient(jnp.zeros((3, 4)))


def test_sensing_gaussian_operators(problem):
    truth, _ = problem
    sensing = gf.Sensing.gaussian(jr.key(9), truth, 500, gf.HuberLoss(0.01))
    ops = np.asarray(sensing.operators)
    assert ops.shape == (500,) + DIMS and isinstance(sensing.loss, gf.HuberLoss)
    np.testing.assert_allclose(sensing.values, np.tensordot(ops, np.asarray(truth), axes=3),
                               rtol=1e-12)
    # entries N(0, 1/D): 30000 samples give the std to ~0.4%; 3% is 7 sigma
    assert abs(ops.std() * np.sqrt(np.prod(DIMS)) - 1) < 0.03
    assert abs(ops.mean()) < 7 / np.sqrt(ops.size) / np.sqrt(np.prod(DIMS))
    other = gf.Sensing.gaussian(jr.key(9), truth, 10, std=2.0)
    assert abs(np.asarray(other.operators).std() - 2.0) < 0.2
    with pytest.raises(ValueError, match="`num`"):
        gf.Sensing.gaussian(jr.key(9), truth, 0)
    with pytest.raises(ValueError, match="`std`"):
        gf.Sensing.gaussian(jr.key(9), truth, 5, std=-1.0)


# --- inits -------------------------------------------------------------------------------------


def test_cp_gaussian_mean_and_max_rank():
    ones = gf.CP.gaussian(jr.key(0), DIMS, 2, 0.0, mean=1.0)
    for f in ones.factors:
        np.testing.assert_array_equal(f, np.ones_like(f))
    np.testing.assert_allclose(ones.full(), 2.0 * np.ones(DIMS))
    model = gf.CP.gaussian(jr.key(1), (40, 40), 50, 0.1, mean=1.0)
    entries = np.concatenate([np.asarray(f).ravel() for f in model.factors])
    assert abs(entries.mean() - 1.0) < 5 * 0.1 / np.sqrt(entries.size)
    assert abs(entries.std() - 0.1) < 0.005
    # mean 0 is the old init, draw for draw
    np.testing.assert_array_equal(gf.CP.gaussian(jr.key(2), DIMS, 3, 0.1).factors[0],
                                  gf.CP.gaussian(jr.key(2), DIMS, 3, 0.1, mean=0.0).factors[0])
    with pytest.raises(ValueError, match="`mean`"):
        gf.CP.gaussian(jr.key(0), DIMS, 2, 0.1, mean=float("nan"))
    assert gf.CP.max_rank((8, 8, 8)) == 64
    assert gf.CP.max_rank((10, 10, 10, 10)) == 1000
    assert gf.CP.max_rank((3, 7, 5)) == 15
    with pytest.raises(ValueError, match="`dims`"):
        gf.CP.max_rank((5,))


def test_cp_max_rank_components_express_any_tensor():
    # the bound is constructive: the fibers along the largest mode
    tensor = np.asarray(jr.normal(jr.key(3), (2, 4, 3)))
    r = gf.CP.max_rank(tensor.shape)
    a = np.zeros((2, r))
    c = np.zeros((3, r))
    b = np.zeros((4, r))
    for k, (i, j) in enumerate(np.ndindex(2, 3)):
        a[i, k], c[j, k] = 1.0, 1.0
        b[:, k] = tensor[i, :, j]
    np.testing.assert_allclose(gf.CP((a, b, c)).full(), tensor, atol=1e-15)


def test_deep_matrix_orthogonal_uniform_and_end_scale():
    dims = (3, 5, 5, 2)
    model = gf.DeepMatrix.orthogonal(jr.key(0), dims, 0.7)
    for w in model.layers:
        small = min(w.shape)
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        np.testing.assert_allclose(gram, 0.49 * np.eye(small), atol=1e-14)
    square = gf.DeepMatrix.orthogonal(jr.key(1), (4, 4, 4), 0.5)
    np.testing.assert_allclose(square.component_norms(), 0.25 * np.ones(4), rtol=1e-13)
    uniform = gf.DeepMatrix.uniform(jr.key(2), (60, 60, 60), 0.3)
    entries = np.concatenate([np.asarray(w).ravel() for w in uniform.layers])
    assert np.abs(entries).max() <= 0.3
    assert abs(entries.std() - 0.3 / np.sqrt(3)) < 0.005  # 7200 draws: ~0.001
    # Arora et al.'s scale: ||W||_F / sqrt(n), set exactly, directions kept
    scaled = model.with_end_scale(1e-3)
    n = min(model.shape)
    np.testing.assert_allclose(np.linalg.norm(scaled.full()) / np.sqrt(n), 1e-3, rtol=1e-13)
    np.testing.assert_allclose(float(scaled.end_scale()), 1e-3, rtol=1e-13)
    ratio = np.asarray(scaled.full()) / np.asarray(model.full())
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-10)
    for make in (lambda: gf.DeepMatrix.gaussian(jr.key(3), dims, 0.1, end_scale=0.02),
                 lambda: gf.DeepMatrix.uniform(jr.key(3), dims, 0.1, end_scale=0.02),
                 lambda: gf.DeepMatrix.orthogonal(jr.key(3), dims, end_scale=0.02)):
        np.testing.assert_allclose(float(make().end_scale()), 0.02, rtol=1e-13)
    # without end_scale, gaussian is unchanged: std times the same normal draws
    keys = jr.split(jr.key(3), len(dims) - 1)
    plain = gf.DeepMatrix.gaussian(jr.key(3), dims, 0.1)
    np.testing.assert_array_equal(plain.layers[1], 0.1 * jr.normal(keys[1], (5, 5)))
    with pytest.raises(ValueError, match="cannot be rescaled"):
        gf.DeepMatrix.orthogonal(jr.key(0), dims, 0.0).with_end_scale(1.0)
    with pytest.raises(ValueError, match="`end_scale`"):
        model.with_end_scale(-1.0)
    with pytest.raises(ValueError, match="`scale`"):
        gf.DeepMatrix.orthogonal(jr.key(0), dims, -1.0)
    with pytest.raises(ValueError, match="`bound`"):
        gf.DeepMatrix.uniform(jr.key(0), dims, -1.0)


# --- observers ---------------------------------------------------------------------------------


def test_cp_observers_against_hand_computations(problem):
    truth, objective = problem
    model = gf.CP.gaussian(jr.key(10), DIMS, 4, 0.7)
    model = gf.CP((model.factors[0].at[:, 2].set(0.0),) + model.factors[1:])  # a zero component
    np.testing.assert_allclose(obs.factor_norms(0, model, objective),
                               [np.linalg.norm(f) for f in model.factors], rtol=1e-14)
    # cosines of the components' full rank-one tensors
    tensors = [np.einsum("i,j,k->ijk", *(np.asarray(f[:, r]) for f in model.factors)).ravel()
               for r in range(4)]
    cos = np.zeros((4, 4))
    for r in range(4):
        for s in range(4):
            nr, ns = np.linalg.norm(tensors[r]), np.linalg.norm(tensors[s])
            if nr > 0 and ns > 0:
                cos[r, s] = tensors[r] @ tensors[s] / (nr * ns)
    np.testing.assert_allclose(obs.component_cosines(0, model, objective), cos, atol=1e-14)
    top = np.argsort(-np.asarray(model.component_norms()))[:2]
    np.testing.assert_allclose(obs.top_component_cosines(2)(0, model, objective),
                               cos[np.ix_(top, top)], atol=1e-14)
    norms = np.asarray(model.vector_norms())
    np.testing.assert_allclose(obs.top_column_norms(3)(0, model, objective),
                               -np.sort(-norms, axis=1)[:, :3], rtol=1e-14)
    assert obs.top_column_norms(10)(0, model, objective).shape == (3, 4)
    # cosine with -grad L at the end tensor, the gradient by hand
    grad = dense_gradient(objective, model.full()).ravel()
    expected = [0.0 if np.linalg.norm(t) == 0 else -grad @ t / (np.linalg.norm(grad)
                                                                * np.linalg.norm(t))
                for t in tensors]
    np.testing.assert_allclose(obs.gradient_alignment(0, model, objective), expected,
                               atol=1e-14)
    with pytest.raises(ValueError, match="`k`"):
        obs.top_column_norms(0)
    with pytest.raises(TypeError, match="`test_objective`"):
        obs.held_out_loss("test")
    assert {"factor_norms", "component_cosines", "gradient_alignment",
            "singular_basis_gradient"} <= set(obs.BY_NAME)


def test_singular_basis_gradient():
    # spectrally aligned (docs: theory/closed-forms, §5.2): full observation of a diagonal target with a
    # diagonal end matrix, so the gradient is diagonal in the singular basis
    dims = (3, 3, 3)
    target = np.diag([3.0, 2.0, 1.0])
    everything = np.stack(np.unravel_index(np.arange(9), (3, 3)), axis=1)
    full = gf.Completion.from_tensor(jnp.asarray(target), everything)
    aligned = gf.DeepMatrix([jnp.diag(jnp.array([0.5, 0.3, 0.2])), jnp.diag(jnp.array(
        [0.4, 0.6, 0.1]))])
    stats = obs.singular_basis_gradient(0, aligned, full)
    assert float(stats["off_diagonal"]) < 1e-16 and float(stats["off_diagonal_fraction"]) < 1e-15
    # diag G = sigma_r - target_r (over 9 observations), singular values descending
    sv = np.sort(np.array([0.2, 0.18, 0.02]))[::-1]
    np.testing.assert_allclose(np.abs(stats["diagonal"]), np.abs(sv - [3.0, 2.0, 1.0]) / 9,
                               rtol=1e-12)
    # a generic case against NumPy's SVD
    model = gf.DeepMatrix.gaussian(jr.key(0), (4, 5, 3), 0.5)
    objective = gf.Completion.from_tensor(jr.normal(jr.key(1), (3, 4)),
                                          gf.sample_indices(jr.key(2), (3, 4), 7))
    u, _, vt = np.linalg.svd(np.asarray(model.full()))
    g = u.T @ dense_gradient(objective, model.full()) @ vt.T
    stats = obs.singular_basis_gradient(0, model, objective)
    np.testing.assert_allclose(stats["diagonal"], np.diagonal(g), atol=1e-15)
    off = np.linalg.norm(g - np.eye(3, 4) * g)
    np.testing.assert_allclose(float(stats["off_diagonal"]), off, rtol=1e-12)
    np.testing.assert_allclose(float(stats["off_diagonal_fraction"]), off / np.linalg.norm(g),
                               rtol=1e-12)
    del dims


def test_observers_along_a_flow_and_held_out_loss(problem):
    truth, objective = problem
    train, test = objective.split(jr.key(11), 0.3)
    model = gf.CP.gaussian(jr.key(12), DIMS, 3, 0.3)
    observers = {"test": obs.held_out_loss(test), "align": "gradient_alignment",
                 "factors": "factor_norms", "top": obs.top_column_norms(2)}
    tr = gf.flow(model, train, t1=50.0, save_times=np.linspace(0, 50, 6), observers=observers,
                 solver=dfx.Tsit5(), rtol=1e-9)
    assert tr["test"].shape == (tr.ts.size,) and tr["top"].shape == (tr.ts.size, 3, 2)
    np.testing.assert_allclose(tr["test"][-1], float(test(tr.model)), rtol=1e-12)
    np.testing.assert_allclose(tr["test"][0], float(test(model)), rtol=1e-12)
    np.testing.assert_allclose(tr["factors"][-1], [np.linalg.norm(f) for f in tr.model.factors],
                               rtol=1e-12)
    assert np.all(np.abs(tr["align"]) <= 1 + 1e-12)
    assert tr["loss"][-1] < tr["loss"][0]


# --- the CP-rank estimator ---------------------------------------------------------------------

ALS_DIMS = (5, 5, 5)
ALS_MAX = 4  # one compiled ALS program (padded to 4 components) serves every test below


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_als_tensor_rank_of_known_rank_tensors(rank):
    tensor = gf.random_cp_tensor(jr.key(rank), ALS_DIMS, rank)
    estimate = acp.als_tensor_rank(tensor, 1e-6, ALS_MAX)
    assert estimate.reached and estimate.rank == rank, estimate
    assert len(estimate.errors) == rank and estimate.errors[-1] <= 1e-6
    assert all(e > 1e-3 for e in estimate.errors[:-1])  # the lower ranks cannot fit it
    assert acp.als_tensor_rank(tensor, 1e-6, ALS_MAX, bisect=True).rank == rank
    # scale-free: the tolerance is relative
    assert acp.als_tensor_rank(1e-5 * tensor, 1e-6, ALS_MAX).rank == rank


def test_als_rank_of_perturbed_sparse_and_zero_tensors():
    tensor = gf.random_cp_tensor(jr.key(4), ALS_DIMS, 1)
    noise = gf.random_cp_tensor(jr.key(5), ALS_DIMS, 2, norm=1e-4)
    # a rank-1 tensor plus 1e-4 of rank 2 (the flow's solutions look like this: learned
    # components and small ones) is rank 1 to 1e-3, rank 3 to 1e-6
    assert acp.als_tensor_rank(tensor + noise, 1e-3, ALS_MAX).rank == 1
    assert acp.als_tensor_rank(tensor + noise, 1e-6, ALS_MAX).rank == 3
    # the linear baseline: observations, 0 elsewhere; far from rank 4
    idx = gf.sample_indices(jr.key(6), ALS_DIMS, 40)
    sparse = jnp.zeros(ALS_DIMS).at[tuple(idx.T)].set(tensor[tuple(idx.T)])
    estimate = acp.als_tensor_rank(sparse, 1e-6, ALS_MAX, bisect=True)
    assert not estimate.reached and estimate.rank == ALS_MAX + 1
    assert acp.als_tensor_rank(jnp.zeros(ALS_DIMS)).rank == 0
    fit = acp.cp_als(gf.random_cp_tensor(jr.key(7), ALS_DIMS, 4), ALS_MAX)
    assert fit.relative_error < 1e-8 and fit.model.rank == 4  # stall 1e-10 per sweep
    with pytest.raises(ValueError, match="`rank`"):
        acp.cp_als(tensor, 0)
    with pytest.raises(ValueError, match="`tol`"):
        acp.als_tensor_rank(tensor, 0.0)
    with pytest.raises(ValueError, match="`tensor`"):
        acp.als_tensor_rank(jnp.ones(5))


# --- convex baselines --------------------------------------------------------------------------


def test_min_nuclear_norm_of_the_razin_cohen_problem():
    # observe (0,1) = (1,0) = 1 and (1,1) = 0: X = [[x, 1], [1, 0]] has nuclear norm
    # sqrt(x^2 + 4) (eigenvalues of opposite signs), so the minimizer is x = 0, norm 2
    indices = jnp.array([[0, 1], [1, 0], [1, 1]])
    objective = gf.Completion((2, 2), indices, jnp.array([1.0, 1.0, 0.0]))
    solution = convex.min_nuclear_norm(objective, tol=1e-9)
    assert solution.converged
    np.testing.assert_allclose(solution.matrix, [[0.0, 1.0], [1.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(solution.nuclear_norm, 2.0, rtol=1e-7)
    np.testing.assert_allclose(solution.lower_bound, 2.0, rtol=1e-7)


def test_min_nuclear_norm_recovers_a_low_rank_matrix_with_a_certificate():
    u, v = jr.normal(jr.key(0), (12, 2)), jr.normal(jr.key(1), (12, 2))
    truth = u @ v.T
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(2), (12, 12), 110))
    solution = convex.min_nuclear_norm(objective, tol=1e-9)
    assert solution.converged and solution.feasibility < 1e-7
    np.testing.assert_allclose(solution.matrix, truth, atol=1e-6 * np.abs(truth).max())
    # KKT: the dual is supported on the observations, in the subdifferential of ||.||_*
    dual = np.asarray(solution.dual)
    mask = np.zeros((12, 12), bool)
    mask[tuple(np.asarray(objective.indices).T)] = True
    assert np.all(dual[~mask] == 0)
    assert np.linalg.norm(dual, 2) <= 1 + 1e-6
    np.testing.assert_allclose(np.sum(dual * np.asarray(solution.matrix)),
                               solution.nuclear_norm, rtol=1e-6)
    # weak duality up to the solve's accuracy (X fits to 1e-9, not exactly)
    gap = solution.nuclear_norm - solution.lower_bound
    assert abs(gap) <= 1e-7 * solution.nuclear_norm
    # zero weights are not constraints
    weights = jnp.arange(110) < 60
    partial = gf.Completion(objective.shape, objective.indices, objective.values, weights=weights)
    masked = np.asarray(convex.min_frobenius_norm(partial))
    assert np.count_nonzero(masked) == 60
    with pytest.raises(TypeError, match="Completion"):
        convex.min_nuclear_norm(gf.Sensing(jnp.ones((2, 2, 2)), jnp.ones(2)))
    with pytest.raises(ValueError, match="matrix"):
        convex.min_nuclear_norm(gf.Completion((2, 2, 2), jnp.array([[0, 0, 0]]), jnp.ones(1)))


def test_min_frobenius_norm_fits():
    truth = gf.random_cp_tensor(jr.key(3), DIMS, 2)
    idx = gf.sample_indices(jr.key(4), DIMS, 20)
    fit = np.asarray(convex.min_frobenius_norm(gf.Completion.from_tensor(truth, idx)))
    expected = np.zeros(DIMS)
    expected[tuple(np.asarray(idx).T)] = np.asarray(truth)[tuple(np.asarray(idx).T)]
    np.testing.assert_array_equal(fit, expected)
    sensing = gf.Sensing.gaussian(jr.key(5), truth, 25)
    a = np.asarray(sensing.operators).reshape(25, -1)
    solution = np.asarray(convex.min_frobenius_norm(sensing)).ravel()
    np.testing.assert_allclose(solution, np.linalg.pinv(a) @ np.asarray(sensing.values),
                               rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(a @ solution, sensing.values, atol=1e-12)
