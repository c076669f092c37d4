"""Figure 4 of Razin, Maman & Cohen (ICML 2021): tensor rank as a measure of complexity.

Binarized images are points of an order-P tensor with mode dimension 2 (P = number of
pixels); a predictor of tensor rank k is a CP factorization with k components,
f(x) = sum_r prod_n w_r^n[x_n], evaluated in log domain (no under/overflow of the long
products: `gradflow.StackedCP`). Each class gives a one-vs-all task (label 1 for the class, 0 otherwise);
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
objective, `gradflow.GroupedFits`, gives each fit exactly its own gradient). Differences from the paper's
code, chosen so a few thousand steps suffice: a rank-k fit starts from k^(-1/order)
times the paper's mean-1 init (every k starts as the same predictor instead of k
times larger), a larger init spread (0.8/sqrt(order)), learning rate 0.64/order
(digits 1e-2; MNIST 8e-4, the paper's 5e-4), float32 with the products in log
domain instead of weight clamping. Test squared errors are clipped at --test-clip
(the paper clips outliers without saying where).
"""

import dataclasses
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.random as jr
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from .. import datasets, plotting
from .._descent import descent
from ..models.stacked import StackedCP
from ..objectives import GroupedFits
from ._config import (check, check_choice, check_int, check_ints, check_number, output, setting,
                      write_summary)

NAME = "tensor-rank-complexity"
VARIANTS = ("original", "rand image", "rand label")
DATA = ("digits", "idx")


@dataclasses.dataclass(frozen=True)
class Config:
    """`gradflow run tensor-rank-complexity`: the data, the ranks and the Adam fits."""

    data: str = setting("digits", "scikit-learn's 8x8 digits, or MNIST/Fashion-MNIST IDX "
                                  "files", choices=DATA)
    idx_dir: Path | None = setting(None, "folder with the four IDX files (for --data idx)")
    max_rank: int = setting(8, "fit tensor ranks 1..K")
    classes: tuple[int, ...] | None = setting(None, "one-vs-all tasks (default: every class)")
    max_train: int | None = setting(None, "subsample the train set")
    max_test: int | None = setting(None, "subsample the test set")
    test_fraction: float = setting(0.3, "digits: fraction held out as the test set")
    steps: int = setting(3000, "Adam steps (full batch)")
    lr: float | None = setting(
        None, "Adam learning rate; default 0.64 / order (1e-2 for digits, 8.2e-4 for MNIST, "
              "near the paper's 5e-4): a step moves every one of the order's factors, so the "
              "product moves order times as much")
    schedule: str = setting("constant", "learning rate: constant, or cosine decay to 0 over "
                                        "--steps", choices=("constant", "cosine"))
    init_mean: float = setting(1.0, "mean of the factor entries of a rank-1 fit (the paper's: "
                                    "1); a rank-k fit's are scaled by k^(-1/order), so that "
                                    "every fit starts as a predictor of the same size")
    init_std: float | None = setting(
        None, "relative std of the Gaussian init; default 0.8 / sqrt(order) (0.1 for digits), "
              "so the log of a component varies by ~0.8 (the paper's: 1e-3)")
    test_clip: float = setting(1.0, "clip each test squared error at this value (outliers)")
    dtype: str = setting("float32", "precision of the fits (the log domain keeps float32 "
                                    "safe)", choices=("float32", "float64"))
    seed: int = setting(0, "seed of the split, the subsamples, the controls and the init")

    def __post_init__(self):
        check_choice(self, "data", DATA)
        if self.data == "idx":
            check(self.idx_dir is not None, "idx_dir", "set with `data` 'idx' (the folder "
                  "holding the four MNIST/Fashion-MNIST IDX files)", self.idx_dir)
            check(self.idx_dir is not None and Path(self.idx_dir).is_dir(), "idx_dir",
                  "an existing folder",
                  str(self.idx_dir))
        else:
            check(self.idx_dir is None, "idx_dir", f"unset: it is read with `data` 'idx' "
                  f"(the data are {self.data!r})", self.idx_dir)
        check_int(self, "max_rank", 1)
        check_ints(self, "classes", 0, distinct=True, optional=True)
        check_int(self, "max_train", 1, optional=True)
        check_int(self, "max_test", 1, optional=True)
        check_number(self, "test_fraction", 0.0, 1.0)
        check_int(self, "steps", 1)
        check_number(self, "lr", optional=True)
        check_choice(self, "schedule", ("constant", "cosine"))
        check_number(self, "init_mean", None)
        check(self.init_mean != 0, "init_mean", "a finite number != 0", self.init_mean)
        check_number(self, "init_std", 0.0, low_open=False, optional=True)
        check_number(self, "test_clip")
        check_choice(self, "dtype", ("float32", "float64"))
        check_int(self, "seed", 0)


def load(config: Config) -> datasets.ImageDataset:
    """The data set of `config` (digits, or IDX files from `config.idx_dir`)."""
    if config.data == "digits":
        data = datasets.load_digits(config.test_fraction, config.seed)
    else:
        data = datasets.load_idx(config.idx_dir)
    return data.subset(config.max_train, config.max_test, config.seed)


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
                  dtype: Any = np.float32) -> StackedCP:
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
    return StackedCP(scale[None, None, :] * (1 + std * jr.normal(key, (order, 2, sizes.size), dtype)))


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


def run(config: Config, out: Path | None = None, progress: bool = False) -> dict:
    """Fit every (variant, class, rank) in one Adam run; return the summary (and, given
    a folder `out`, write the figure, `mse.npz` and `summary.json` there)."""
    say = (lambda line: print(f"[{NAME}] {line}", flush=True)) if progress else (lambda line: None)
    data = load(config)
    classes = np.asarray(config.classes if config.classes is not None else data.classes)
    unknown = sorted(set(classes.tolist()) - set(data.train_labels.tolist()))
    check(not unknown, "classes", f"classes of the {data.name} train labels "
          f"{data.classes.tolist()} ({unknown} do not occur)", config.classes)
    ranks = list(range(1, config.max_rank + 1))
    sets = variants(data, config.seed)
    n_pixels = int(np.prod(data.image_shape))
    groups = layout(len(classes), ranks)
    dtype = np.dtype(config.dtype)
    onehot = lambda y: (y[:, None] == classes[None, :]).astype(dtype)  # (m, tasks)
    expand = lambda y: np.repeat(onehot(y), len(ranks), axis=1)  # (m, tasks * ranks)
    # 0/1 pixels as uint8: a quarter of int32's memory (MNIST: 3 x 60000 x 784)
    train_x = np.stack([sets[v][0] for v in VARIANTS]).astype(np.uint8)
    test_x = np.stack([sets[v][2] for v in VARIANTS]).astype(np.uint8)
    train_y = np.stack([expand(sets[v][1]) for v in VARIANTS])
    test_y = np.stack([expand(sets[v][3]) for v in VARIANTS])
    groups = groups.astype(dtype)
    init_std = config.init_std if config.init_std is not None else 0.8 / np.sqrt(n_pixels)
    objective = GroupedFits((2,) * n_pixels, train_x, train_y, groups)
    components = len(VARIANTS) * groups.shape[0]
    model = initial_model(jr.key(config.seed), n_pixels, ranks, len(classes) * len(VARIANTS),
                          config.init_mean, init_std, dtype)
    say(f"{data.name}: {train_x.shape[1]} train / {test_x.shape[1]} test images of "
        f"{data.image_shape[0]}x{data.image_shape[1]} pixels (order {n_pixels}); "
        f"{len(classes)} one-vs-all tasks x ranks 1..{config.max_rank} x {len(VARIANTS)} data sets "
        f"= {groups.shape[1] * len(VARIANTS)} fits, {components} components, one Adam run")
    start = time.perf_counter()
    lr = config.lr if config.lr is not None else 0.64 / n_pixels
    if config.schedule == "cosine":
        lr = optax.cosine_decay_schedule(lr, config.steps)
    trajectory = descent(model, objective, optax.adam(lr), steps=config.steps,
                         observers=["loss"], progress=progress)
    wall = time.perf_counter() - start
    fitted = trajectory.model
    predict = eqx.filter_jit(lambda o, m: o.predict(m))
    train_pred = np.asarray(predict(objective, fitted))
    test_pred = np.asarray(predict(GroupedFits(objective.shape, test_x, test_y, groups), fitted))
    shape = (len(VARIANTS), len(classes), len(ranks))
    train_mse = np.mean((train_pred - train_y) ** 2, axis=1).reshape(shape)
    test_mse = np.mean(np.minimum((test_pred - test_y) ** 2, config.test_clip), axis=1).reshape(shape)
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
            sets[v][0], onehot(sets[v][1]), sets[v][2], onehot(sets[v][3]), config.test_clip)
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
    summary = {"experiment": NAME, "config": dataclasses.asdict(config), "results": summary}
    if out is not None:
        out = output(out)
        _figure(results, data.name, out / f"{NAME}.png")
        np.savez(out / "mse.npz", train=train_mse, test=test_mse, ranks=np.asarray(ranks),
                 classes=classes, variants=np.asarray(VARIANTS))
        write_summary(out, summary | {"config": summary["config"] | {"out": str(out)}})
    return summary


STYLES: dict[str, dict[str, Any]] = {"original": dict(color="tab:blue", marker="o"),
          "rand image": dict(color="tab:red", marker="^"),
          "rand label": dict(color="tab:purple", marker="d")}


def _figure(results, name, path):
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for v in VARIANTS:
        r = results[v]
        ks = np.asarray(r["ranks"])
        splits: tuple[tuple[str, dict[str, Any]], ...] = (
            ("train", dict(ls="-", alpha=1.0)), ("test", dict(ls="--", alpha=0.55)))
        for split, style in splits:
            ax.errorbar(ks, r[f"{split}_mse_mean"], yerr=r[f"{split}_mse_std"], capsize=3,
                        label=f"{v} {split}", **STYLES[v], **style)
        if "linear_train_mse_mean" in r:
            for split, ls in (("train", "-."), ("test", ":")):
                ax.axhline(r[f"linear_{split}_mse_mean"], color=STYLES[v]["color"], ls=ls,
                           lw=1, alpha=0.8, label=f"{v} {split}, linear least squares")
    var = np.mean([results[v]["label_variance"] for v in VARIANTS])
    ax.axhline(float(var), color="tab:green", alpha=0.5, label="label variance")
    ax.set_yscale("log")
    ax.set_xticks(results[VARIANTS[0]]["ranks"])
    ax.set_xlabel("tensor rank k")
    ax.set_ylabel("mean squared error")
    ax.set_title(f"{name}: one-vs-all fits by CP predictors of tensor rank k")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    plotting.save(fig, path)
