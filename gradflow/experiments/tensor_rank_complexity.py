"""Figure 4 of Razin, Maman & Cohen (ICML 2021): tensor rank as a measure of complexity.

Binarized images are points of an order-P tensor with mode dimension 2 (P = number of
pixels); a predictor of tensor rank k is a CP factorization with k components,
f(x) = sum_r prod_n w_r^n[x_n], evaluated in log domain (no under/overflow of the long
products). Each class gives a one-vs-all task (label 1 for the class, 0 otherwise);
for every k in 1..K the mean squared error of the rank-k fit (Adam on the mean
squared error) is reported on train and test sets, mean +- std over the tasks, for
the original data and two random controls: images replaced by uniform random binary
images ("rand image") and labels shuffled ("rand label"). Expected: the original
data are fit far better than the controls at low rank, and generalize. Beside them,
the linear baseline of the paper's appendix: for each task and data set, the
least-squares linear predictor f(x) = <w, x> + b of the binary pixels
(`linear_baseline`; the minimum-norm solution where pixels are constant or
collinear), with its train and test errors computed the same way.

Data: scikit-learn's 8x8 digits by default (order 64; 1258 train / 539 test images),
or MNIST / Fashion-MNIST from a local folder of the original IDX files (`--data idx
--idx-dir DIR`, order 784; see `gradflow.datasets`; nothing is downloaded). A step
costs about 3 x train size x order x components multiply-adds, so on a CPU subsample
MNIST with --max-train.

All fits run together as one full-batch Adam run (`gradflow.descent`; the summed
objective gives each fit exactly its own gradient). Differences from the paper's
code, chosen so a few thousand steps suffice: a rank-k fit starts from k^(-1/order)
times the paper's mean-1 init (every k starts as the same predictor instead of k
times larger), a larger init spread (0.8/sqrt(order)), learning rate 0.64/order
(digits 1e-2; MNIST 8e-4, the paper's 5e-4), float32 with the products in log
domain instead of weight clamping. Test squared errors are clipped at --test-clip
(the paper clips outliers without saying where).
"""

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from .. import datasets, plotting
from .._descent import descent
from ..models.base import AbstractAdditiveFactorization
from ..models.cp import CP
from ..objectives import AbstractLoss, AbstractObjective, SquaredLoss

NAME = "tensor-rank-complexity"
VARIANTS = ("original", "rand image", "rand label")


# --- the CP predictor on discrete inputs, in log domain ---------------------------------------


class StackedCP(AbstractAdditiveFactorization):
    r"""A CP factorization with its factors in one array, evaluated in log domain.

    `weights[n, :, r]` is $\mathbf w_r^n$, so `weights` has shape `(N, d, R)`: the
    same tensor as `gradflow.CP(tuple(weights))` ([`as_cp`][]), but one array leaf
    instead of $N$. For the order-64 (digits) and order-784 (MNIST) predictors this
    keeps compiled programs small (a 64-leaf `CP` spends most of a short fit in XLA
    compilation) and lets entries be read with matrix products
    ([`component_values`][]).
    """

    weights: Float[Array, "N d R"]

    def __check_init__(self):
        if self.weights.ndim != 3 or self.weights.shape[0] < 2:
            raise ValueError(f"`weights` must have shape (N >= 2, d, R), got {self.weights.shape}.")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.weights.shape[1],) * self.weights.shape[0]

    @property
    def order(self) -> int:
        return self.weights.shape[0]

    @property
    def rank(self) -> int:
        return self.weights.shape[2]

    def as_cp(self) -> CP:
        return CP(tuple(self.weights))

    @classmethod
    def from_cp(cls, model: CP) -> "StackedCP":
        return cls(jnp.stack(model.factors))

    def full(self) -> Float[Array, "..."]:
        return self.as_cp().full()

    def entries(self, indices: Int[Array, "m N"]) -> Float[Array, " m"]:
        return _component_values(self.weights, indices).sum(axis=-1)

    def vector_norms(self) -> Float[Array, "N R"]:
        return jnp.linalg.norm(self.weights, axis=1)

    def component_norms(self) -> Float[Array, " R"]:
        r"""$P_r=\prod_n\|\mathbf w_r^n\|$, summed in log domain."""
        return jnp.exp(jnp.sum(jnp.log(self.vector_norms()), axis=0))

    def norm(self) -> Float[Array, ""]:
        return self.as_cp().norm()

    def take(self, components) -> "StackedCP":
        return StackedCP(self.weights[:, :, components])

    def put(self, components, sub: "StackedCP") -> "StackedCP":
        return StackedCP(self.weights.at[:, :, components].set(sub.weights))


def component_values(model: CP | StackedCP, inputs: Int[Array, "m N"]) -> Float[Array, "m R"]:
    r"""$\prod_n\mathbf w_r^n[x_n]$ for every input $x$ (row) and component $r$ (column).

    Computed in log domain, as $s_r(x)\exp\big(\sum_n\log|\mathbf w_r^n[x_n]|\big)$
    with the sign $s_r(x)$ from the parity of the negative factors, so the product of
    $N$ numbers never under- or overflows in between; only a value that is itself out
    of range does. The sums are matrix products of the inputs' indicator matrices with
    the log-weights, $\sum_b\mathbb 1[x=b]\,\log|W_{:,b,:}|$, the fast form for
    small mode dimensions (2 for binary images).

    A factor entry below the smallest normal float in magnitude (0 included) is read
    as that float, and its gradient is 0; any other entry's gradient is exact.

    **Arguments:**

    - `model`: a `StackedCP`, or a `gradflow.CP` (its factors `(d, R)` are stacked).
    - `inputs`: integer array `(m, N)` with entries in `[0, d)` (e.g. binary images).

    **Returns:** array `(m, R)`; its row sums are `model.entries(inputs)`.
    """
    weights = model.weights if isinstance(model, StackedCP) else jnp.stack(model.factors)
    return _component_values(weights, inputs)


def _component_values(stacked, inputs):
    d = stacked.shape[1]
    dtype = stacked.dtype
    floor = float(np.finfo(dtype).tiny)
    magnitude = jnp.abs(stacked)
    tiny = magnitude < floor  # 0 or subnormal: log and its gradient 1/w are not safe
    logabs = jnp.where(tiny, float(np.log(floor)), jnp.log(jnp.where(tiny, 1.0, magnitude)))
    # Parities are small integers: exact in float32, cheaper than a float64 product.
    negative = (stacked < 0).astype(jnp.float32)
    # sum_n f[n, x_n] = sum_n f[n, 0] + sum_{b >= 1} 1[x = b] @ (f[:, b] - f[:, 0]):
    # d - 1 matrix products (one for binary inputs).
    log_sum = jnp.sum(logabs[:, 0, :], axis=0)
    negatives = jnp.sum(negative[:, 0, :], axis=0)
    for b in range(1, d):
        hit = inputs == b
        log_sum = log_sum + hit.astype(dtype) @ (logabs[:, b, :] - logabs[:, 0, :])
        negatives = negatives + hit.astype(jnp.float32) @ (negative[:, b, :] - negative[:, 0, :])
    if d == 1:
        log_sum = jnp.broadcast_to(log_sum, (inputs.shape[0],) + log_sum.shape)
        negatives = jnp.broadcast_to(negatives, log_sum.shape)
    sign = (1.0 - 2.0 * jnp.mod(negatives, 2.0)).astype(dtype)
    return sign * jnp.exp(log_sum)


class GroupedFits(AbstractObjective):
    r"""Many independent least-squares fits of CP predictors, as one objective.

    The model's $R=B\cdot R_b$ components form $B$ blocks of $R_b$; block $b$ is
    evaluated on its own inputs, and within a block the components are split into
    groups (`groups`, a 0/1 matrix `(R_b, G)`), each group a separate predictor with
    its own targets. The objective is the *sum* over blocks and groups of each fit's
    mean loss, so every fit sees exactly its own gradient: Adam, SGD or any
    per-coordinate optimizer then runs all fits at once exactly as it would run them
    one by one.

    **Arguments:**

    - `shape`: `(d,) * N`, the tensor the inputs index.
    - `inputs`: integer array `(B, m, N)`.
    - `values`: targets `(B, m, G)`.
    - `groups`: 0/1 array `(R_b, G)`; column `g` selects the components of fit `g`.
    - `loss`: per-entry loss, `SquaredLoss()` by default.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    inputs: Int[Array, "B m N"]
    values: Float[Array, "B m G"]
    groups: Float[Array, "Rb G"]
    loss: AbstractLoss

    def __init__(self, shape, inputs, values, groups, loss=None):
        self.shape = tuple(int(s) for s in shape)
        self.inputs = jnp.asarray(inputs)
        self.values = jnp.asarray(values)
        self.groups = jnp.asarray(groups, self.values.dtype)
        self.loss = SquaredLoss() if loss is None else loss
        b, m, n = self.inputs.shape
        if n != len(self.shape):
            raise ValueError(f"`inputs` have {n} modes but `shape` has {len(self.shape)}.")
        if self.values.shape != (b, m, self.groups.shape[1]):
            raise ValueError(
                f"`values` must have shape {(b, m, self.groups.shape[1])}, got {self.values.shape}."
            )

    def predict(self, model: StackedCP) -> Float[Array, "B m G"]:
        stacked = model.weights  # (N, d, B * Rb)
        n, d, _ = stacked.shape
        blocks = self.inputs.shape[0]
        stacked = jnp.moveaxis(stacked.reshape(n, d, blocks, -1), 2, 0)
        values = jax.vmap(_component_values)(stacked, self.inputs)  # (B, m, Rb)
        return values @ self.groups

    def loss_at(self, predictions):
        return jnp.sum(jnp.mean(self.loss(predictions - self.values), axis=1))


# --- the experiment ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=["digits", "idx"], default="digits",
                        help="scikit-learn's 8x8 digits, or MNIST/Fashion-MNIST IDX files")
    parser.add_argument("--idx-dir", type=Path, default=None,
                        help="folder with the four IDX files (for --data idx)")
    parser.add_argument("--max-rank", type=int, default=8, help="fit tensor ranks 1..K")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="one-vs-all tasks (default: every class)")
    parser.add_argument("--max-train", type=int, default=None, help="subsample the train set")
    parser.add_argument("--max-test", type=int, default=None, help="subsample the test set")
    parser.add_argument("--test-fraction", type=float, default=0.3,
                        help="digits: fraction held out as the test set")
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps (full batch)")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate; default 0.64 / order (1e-2 for digits, 8.2e-4 "
                             "for MNIST, near the paper's 5e-4): a step moves every one of the "
                             "order's factors, so the product moves order times as much")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="learning rate: constant, or cosine decay to 0 over --steps")
    parser.add_argument("--init-mean", type=float, default=1.0,
                        help="mean of the factor entries of a rank-1 fit (the paper's: 1); "
                             "a rank-k fit's are scaled by k^(-1/order), so that every fit "
                             "starts as a predictor of the same size")
    parser.add_argument("--init-std", type=float, default=None,
                        help="relative std of the Gaussian init; default 0.8 / sqrt(order) "
                             "(0.1 for digits), so the log of a component varies by ~0.8 "
                             "(the paper's: 1e-3)")
    parser.add_argument("--test-clip", type=float, default=1.0,
                        help="clip each test squared error at this value (outliers)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="precision of the fits (the log domain keeps float32 safe)")
    parser.add_argument("--seed", type=int, default=0)


def load(args) -> datasets.ImageDataset:
    """The data set named by `args` (digits, or IDX files from `args.idx_dir`)."""
    if args.data == "digits":
        data = datasets.load_digits(args.test_fraction, args.seed)
    else:
        if args.idx_dir is None:
            raise ValueError("--data idx needs --idx-dir, the folder holding the four "
                             "MNIST/Fashion-MNIST IDX files.")
        data = datasets.load_idx(args.idx_dir)
    return data.subset(args.max_train, args.max_test, args.seed)


def variants(data: datasets.ImageDataset, seed: int):
    """{variant: (train x, train labels, test x, test labels)} with binary flattened x."""
    rng = np.random.default_rng(seed)
    flat = lambda x: datasets.binarize(x, data.max_value).reshape(len(x), -1)
    xtr, xte = flat(data.train_images), flat(data.test_images)
    ytr, yte = data.train_labels, data.test_labels
    return {
        "original": (xtr, ytr, xte, yte),
        "rand image": (rng.integers(0, 2, xtr.shape, dtype=np.uint8), ytr,
                       rng.integers(0, 2, xte.shape, dtype=np.uint8), yte),
        "rand label": (xtr, rng.permutation(ytr), xte, rng.permutation(yte)),
    }


def layout(num_tasks: int, ranks) -> np.ndarray:
    """0/1 matrix `(R_b, tasks * len(ranks))`: fit (task t, rank k) owns k components."""
    sizes = [k for _ in range(num_tasks) for k in ranks]
    groups = np.zeros((sum(sizes), len(sizes)))
    start = 0
    for g, k in enumerate(sizes):
        groups[start:start + k, g] = 1.0
        start += k
    return groups


def initial_model(key, order: int, ranks, repeats: int, mean: float, std: float,
                  dtype=np.float32) -> StackedCP:
    """Factors `k^(-1/order) * mean * (1 + std * N(0, 1))` for each rank-k fit, `repeats` times.

    Components are laid out as in [`layout`][]: for each repeat (block and task), the
    fits of ranks `ranks` one after the other. With the scale `k^(-1/order)` a rank-k
    predictor starts near k components of size 1/k: the same function, to first order,
    for every k. (The paper's init, mean 1 for every k, starts a rank-k fit at k times
    the labels' scale; with Adam at lr 1e-2 its components then overshoot toward 0 and
    sit on the plateau there for a time growing with k — measured on digits.)
    """
    sizes = np.concatenate([np.full(k, k) for _ in range(repeats) for k in ranks])
    scale = jnp.asarray(mean * sizes ** (-1.0 / order), dtype)
    return StackedCP(scale * (1 + std * jr.normal(key, (order, 2, sizes.size), dtype)))


def linear_baseline(train_x, train_y, test_x, test_y, clip: float):
    """Least-squares linear predictors $f(x)=\\langle w,x\\rangle+b$, one per column
    of the targets: `(train MSE, test MSE)` per column, the test errors clipped at
    `clip` as for the CP fits.

    **Arguments:** `train_x` `(m, P)` inputs (binary pixels), `train_y` `(m, tasks)`
    targets, `test_x`, `test_y` likewise, `clip` the clip of a test squared error.

    **Returns:** two arrays `(tasks,)`. The weights are NumPy's `lstsq` solution
    (float64, minimum norm when the design is rank deficient).
    """
    design = lambda x: np.concatenate([np.asarray(x, float), np.ones((len(x), 1))], axis=1)
    weights = np.linalg.lstsq(design(train_x), np.asarray(train_y, float), rcond=None)[0]
    train = np.mean((design(train_x) @ weights - train_y) ** 2, axis=0)
    test = np.mean(np.minimum((design(test_x) @ weights - test_y) ** 2, clip), axis=0)
    return train, test


def run(args, out: Path, progress: bool = True) -> dict:
    say = (lambda line: print(f"[{NAME}] {line}", flush=True)) if progress else (lambda line: None)
    if args.max_rank < 1:
        raise ValueError(f"--max-rank must be >= 1, got {args.max_rank}.")
    data = load(args)
    classes = np.asarray(args.classes if args.classes is not None else data.classes)
    unknown = sorted(set(classes.tolist()) - set(data.train_labels.tolist()))
    if unknown:
        raise ValueError(f"--classes {unknown} do not occur in the {data.name} train labels "
                         f"(classes: {data.classes.tolist()}).")
    ranks = list(range(1, args.max_rank + 1))
    sets = variants(data, args.seed)
    n_pixels = int(np.prod(data.image_shape))
    groups = layout(len(classes), ranks)
    dtype = np.dtype(args.dtype)
    onehot = lambda y: (y[:, None] == classes[None, :]).astype(dtype)  # (m, tasks)
    expand = lambda y: np.repeat(onehot(y), len(ranks), axis=1)  # (m, tasks * ranks)
    # 0/1 pixels as uint8: a quarter of int32's memory (MNIST: 3 x 60000 x 784)
    train_x = np.stack([sets[v][0] for v in VARIANTS]).astype(np.uint8)
    test_x = np.stack([sets[v][2] for v in VARIANTS]).astype(np.uint8)
    train_y = np.stack([expand(sets[v][1]) for v in VARIANTS])
    test_y = np.stack([expand(sets[v][3]) for v in VARIANTS])
    groups = groups.astype(dtype)
    init_std = args.init_std if args.init_std is not None else 0.8 / np.sqrt(n_pixels)
    objective = GroupedFits((2,) * n_pixels, train_x, train_y, groups)
    components = len(VARIANTS) * groups.shape[0]
    model = initial_model(jr.key(args.seed), n_pixels, ranks, len(classes) * len(VARIANTS),
                          args.init_mean, init_std, dtype)
    say(f"{data.name}: {train_x.shape[1]} train / {test_x.shape[1]} test images of "
        f"{data.image_shape[0]}x{data.image_shape[1]} pixels (order {n_pixels}); "
        f"{len(classes)} one-vs-all tasks x ranks 1..{args.max_rank} x {len(VARIANTS)} data sets "
        f"= {groups.shape[1] * len(VARIANTS)} fits, {components} components, one Adam run")
    start = time.perf_counter()
    lr = args.lr if args.lr is not None else 0.64 / n_pixels
    if args.schedule == "cosine":
        lr = optax.cosine_decay_schedule(lr, args.steps)
    trajectory = descent(model, objective, optax.adam(lr), steps=args.steps,
                         observers=["loss"], progress=progress)
    wall = time.perf_counter() - start
    fitted = trajectory.model
    predict = eqx.filter_jit(lambda o, m: o.predict(m))
    train_pred = np.asarray(predict(objective, fitted))
    test_pred = np.asarray(predict(GroupedFits(objective.shape, test_x, test_y, groups), fitted))
    shape = (len(VARIANTS), len(classes), len(ranks))
    train_mse = np.mean((train_pred - train_y) ** 2, axis=1).reshape(shape)
    test_mse = np.mean(np.minimum((test_pred - test_y) ** 2, args.test_clip), axis=1).reshape(shape)
    variance = {v: float(np.mean([np.var(onehot(sets[v][1])[:, t]) for t in range(len(classes))]))
                for v in VARIANTS}
    results = {}
    for i, v in enumerate(VARIANTS):
        results[v] = {
            "label_variance": variance[v],
            "ranks": ranks,
            "train_mse_mean": train_mse[i].mean(axis=0).tolist(),
            "train_mse_std": train_mse[i].std(axis=0).tolist(),
            "test_mse_mean": test_mse[i].mean(axis=0).tolist(),
            "test_mse_std": test_mse[i].std(axis=0).tolist(),
        }
        linear_train, linear_test = linear_baseline(
            sets[v][0], onehot(sets[v][1]), sets[v][2], onehot(sets[v][3]), args.test_clip)
        results[v] |= {
            "linear_train_mse_mean": float(linear_train.mean()),
            "linear_train_mse_std": float(linear_train.std()),
            "linear_test_mse_mean": float(linear_test.mean()),
            "linear_test_mse_std": float(linear_test.std()),
        }
    say(f"{trajectory.stats['steps']} Adam steps in {wall:.1f}s; final summed loss "
        f"{float(trajectory.final['loss']):.4g}")
    say("mean squared error, mean +- std over tasks (train | test):")
    for v in VARIANTS:
        r = results[v]
        cells = [f"k={k}: {a:.4f}+-{b:.4f} | {c:.4f}+-{d:.4f}" for k, a, b, c, d in zip(
            ranks, r["train_mse_mean"], r["train_mse_std"], r["test_mse_mean"], r["test_mse_std"])]
        say(f"  {v} (label variance {r['label_variance']:.4f}):")
        for c in cells:
            say(f"    {c}")
        say(f"    linear least squares: {r['linear_train_mse_mean']:.4f}+-"
            f"{r['linear_train_mse_std']:.4f} | {r['linear_test_mse_mean']:.4f}+-"
            f"{r['linear_test_mse_std']:.4f}")
    _figure(results, data.name, out / f"{NAME}.png")
    summary = {
        "data": data.name,
        "order": n_pixels,
        "train_size": int(train_x.shape[1]),
        "test_size": int(test_x.shape[1]),
        "classes": classes.tolist(),
        "status": trajectory.status,
        "final_loss": float(trajectory.final["loss"]),
        "wall_time_s": round(wall, 2),
        "results": results,
    }
    np.savez(out / "mse.npz", train=train_mse, test=test_mse, ranks=np.asarray(ranks),
             classes=classes, variants=np.asarray(VARIANTS))
    (out / "summary.json").write_text(json.dumps(
        {"experiment": NAME, "config": vars(args) | {"out": str(out)}, "results": summary},
        indent=2, default=str))
    return summary


STYLES = {"original": dict(color="tab:blue", marker="o"),
          "rand image": dict(color="tab:red", marker="^"),
          "rand label": dict(color="tab:purple", marker="d")}


def _figure(results, name, path):
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for v in VARIANTS:
        r = results[v]
        ks = np.asarray(r["ranks"])
        for split, style in (("train", dict(ls="-", alpha=1.0)), ("test", dict(ls="--", alpha=0.55))):
            ax.errorbar(ks, r[f"{split}_mse_mean"], yerr=r[f"{split}_mse_std"], capsize=3,
                        label=f"{v} {split}", **STYLES[v], **style)
        if "linear_train_mse_mean" in r:
            for split, ls in (("train", "-."), ("test", ":")):
                ax.axhline(r[f"linear_{split}_mse_mean"], color=STYLES[v]["color"], ls=ls,
                           lw=1, alpha=0.8, label=f"{v} {split}, linear least squares")
    var = np.mean([results[v]["label_variance"] for v in VARIANTS])
    ax.axhline(var, color="tab:green", alpha=0.5, label="label variance")
    ax.set_yscale("log")
    ax.set_xticks(results[VARIANTS[0]]["ranks"])
    ax.set_xlabel("tensor rank k")
    ax.set_ylabel("mean squared error")
    ax.set_title(f"{name}: one-vs-all fits by CP predictors of tensor rank k")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    plotting.save(fig, path)
