"""Hierarchical tensor factorization over a mode tree (docs: Theory › The HTF model, §4.1–4.2).

`ModeTree` is the static description of the tree; `HTF` holds its weight matrices.
"""

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._validate import check_dims, check_float_dtype, check_positive
from .base import AbstractBlockFactorization

PATTERNS = ("adjacent", "interleaved")


@dataclasses.dataclass(frozen=True)
class ModeTree:
    r"""A mode tree $\mathcal T$ over the modes $0,\dots,N-1$ (docs: Theory › The HTF model).

    Written as nested tuples: a leaf is a mode (an `int`), an interior node is the
    tuple of its children. `((0, 1), (2, 3))` is the balanced binary tree over four
    modes; `(0, 1, 2)` is the depth-1 tree (a root over three leaves, i.e. CP); a
    one-element tuple such as `(2,)` is an interior node with a single child, which
    the pooling constructors create when a window is not filled (as CODE-HTF does).
    Every mode must appear exactly once. The tree is immutable and hashable, so it
    can be a static field of an Equinox module.

    **Arguments:**

    - `structure`: the nested tuples (lists are accepted and converted). A mode
      missing or repeated, an empty node, a non-int leaf, a leaf as root or fewer
      than two modes raise a `ValueError`.

    **Node ids.** Nodes are numbered `0 .. num_nodes - 1`: leaf `n` is node `n`
    (mode `n`); the interior nodes follow in post-order (every child before its
    parent, siblings in the order written), so the root is the last node. Every
    per-node attribute below is a tuple indexed by node id.

    **Attributes** (besides `structure`, the normalized nested tuples):

    - `num_modes`: $N$.
    - `children[v]`: ids of the children of node `v` (`()` for a leaf).
    - `parent[v]`: id of the parent of `v` (`None` for the root).
    - `modes[v]`: the modes under `v`, sorted (the set $\nu\subseteq[N]$).
    - `height[v]`: 0 for a leaf, else 1 + the largest height of its children.
    - `interior`: ids of the interior nodes, increasing (root last).

    !!! Example

        ```python
        import gradflow as gf

        tree = gf.ModeTree.binary(4)          # ((0, 1), (2, 3))
        tree.interior                         # (4, 5, 6): {0,1}, {2,3}, root
        tree.find((0, 1))                     # 4
        gf.ModeTree.interleaved(4).structure  # ((0, 2), (1, 3))
        ```
    """

    structure: Any
    num_modes: int = dataclasses.field(init=False, compare=False, repr=False)
    children: tuple[tuple[int, ...], ...] = dataclasses.field(
        init=False, compare=False, repr=False
    )
    parent: tuple[int | None, ...] = dataclasses.field(init=False, compare=False, repr=False)
    modes: tuple[tuple[int, ...], ...] = dataclasses.field(
        init=False, compare=False, repr=False
    )
    height: tuple[int, ...] = dataclasses.field(init=False, compare=False, repr=False)
    interior: tuple[int, ...] = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self):
        structure = _normalize(self.structure)
        if not isinstance(structure, tuple):
            raise ValueError(
                f"`structure`: the root must be an interior node (a tuple), got {structure!r}."
            )
        leaves = _leaves(structure)
        count = Counter(leaves)
        repeated = sorted(m for m, c in count.items() if c > 1)
        if repeated:
            raise ValueError(
                f"`structure`: mode(s) {repeated} repeated in {structure!r}; every mode "
                "must appear exactly once."
            )
        num_modes = max(leaves) + 1
        missing = sorted(set(range(num_modes)) - set(leaves))
        if missing:
            raise ValueError(
                f"`structure`: mode(s) {missing} missing from {structure!r}; the modes "
                f"must be 0..N-1, each exactly once."
            )
        if num_modes < 2:
            raise ValueError(f"`structure` must hold at least 2 modes, got {structure!r}.")
        children: list[tuple[int, ...]] = [()] * num_modes
        modes: list[tuple[int, ...]] = [(n,) for n in range(num_modes)]
        height = [0] * num_modes

        def visit(node) -> int:
            if isinstance(node, int):
                return node
            kids = tuple(visit(c) for c in node)
            children.append(kids)
            modes.append(tuple(sorted(m for k in kids for m in modes[k])))
            height.append(1 + max(height[k] for k in kids))
            return len(children) - 1

        visit(structure)
        parent: list[int | None] = [None] * len(children)
        for v, kids in enumerate(children):
            for k in kids:
                parent[k] = v
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("structure", structure)
        set_("num_modes", num_modes)
        set_("children", tuple(children))
        set_("parent", tuple(parent))
        set_("modes", tuple(modes))
        set_("height", tuple(height))
        set_("interior", tuple(range(num_modes, len(children))))

    @property
    def num_nodes(self) -> int:
        return len(self.children)

    @property
    def root(self) -> int:
        """Id of the root (the last node)."""
        return self.num_nodes - 1

    def is_leaf(self, node: int) -> bool:
        return node < self.num_modes

    def num_axes(self, node: int) -> int:
        r"""$K_\nu=|C(\nu)|+1$, the number of weight vectors of a local component at `node` (§4.2)."""
        if self.is_leaf(node):
            raise ValueError(f"`node` {node} is a leaf; local components live at interior nodes.")
        return len(self.children[node]) + 1

    def find(self, modes: Sequence[int]) -> int:
        """Id of the topmost node whose mode set is `modes` (order ignored).

        Only a chain of single-child nodes shares a mode set; the topmost one is
        the interior node for a leaf's chain.
        """
        key = tuple(sorted(int(m) for m in modes))
        hits = [v for v, ms in enumerate(self.modes) if ms == key]
        if not hits:
            raise ValueError(f"`modes` {key} is not a node of the tree {self.structure!r}.")
        return hits[-1]

    def layer_widths(self, widths: Sequence[int]) -> tuple[int, ...]:
        """Per-interior-node widths from one width per layer (CODE-HTF's `ht_layer_widths`).

        Layer `j` (counting from 1) holds the interior nodes of height `j`; the root
        is in the last layer.

        **Arguments:**

        - `widths`: one positive int per layer, `height[root]` of them.

        **Returns:** a tuple of widths, one per node in `interior`, for
        [`gradflow.HTF.gaussian`][] and [`gradflow.HTF.balanced`][].
        """
        widths = tuple(widths)
        layers = self.height[self.root]
        if len(widths) != layers:
            raise ValueError(
                f"`widths` must give one width per layer ({layers} layers), got {widths!r}."
            )
        return tuple(widths[self.height[v] - 1] for v in self.interior)

    @classmethod
    def pooling(
        cls, num_modes: int, windows: int | Sequence[int] = 2, pattern: str = "adjacent"
    ) -> "ModeTree":
        """The tree of a convolutional arithmetic circuit that pools in windows (CODE-HTF).

        Level by level, the current nodes are reordered by `pattern` and grouped into
        consecutive windows; a last, unfilled window makes a smaller node (one child
        if a single node is left over), so every leaf has the same depth.

        **Arguments:**

        - `num_modes`: the order $N\\ge2$.
        - `windows`: the pooling window, an int $\\ge2$ for every level, or one int
          $\\ge2$ per level (the last level must leave a single node).
        - `pattern`: `"adjacent"` pools neighbouring nodes (CODE-HTF's
          `"checkerboard"`); `"interleaved"` pools node $i$ with node $i+n/2$ of the
          $n$ nodes of a level, the middle one last when $n$ is odd (CODE-HTF's
          `"half"`).

        **Returns:** a `ModeTree`.
        """
        if isinstance(num_modes, bool) or not isinstance(num_modes, int) or num_modes < 2:
            raise ValueError(f"`num_modes` must be an int >= 2, got {num_modes!r}.")
        if pattern not in PATTERNS:
            raise ValueError(f"`pattern` must be one of {PATTERNS}, got {pattern!r}.")
        per_level = isinstance(windows, Sequence)
        sizes = tuple(windows) if per_level else (windows,)
        if not sizes or any(isinstance(w, bool) or not isinstance(w, int) or w < 2 for w in sizes):
            raise ValueError(f"`windows` must be ints >= 2, got {windows!r}.")
        nodes = list(range(num_modes))
        level = 0
        while len(nodes) > 1:
            if per_level and level == len(sizes):
                raise ValueError(
                    f"`windows` {sizes} leaves {len(nodes)} nodes after its last level; "
                    "the last level must pool everything into the root."
                )
            w = sizes[level] if per_level else sizes[0]
            if pattern == "interleaved":
                nodes = [nodes[i] for i in _interleaving(len(nodes))]
            nodes = [tuple(nodes[i : i + w]) for i in range(0, len(nodes), w)]
            level += 1
        if per_level and level != len(sizes):
            raise ValueError(
                f"`windows` has {len(sizes)} levels but the tree over {num_modes} modes "
                f"is complete after {level}."
            )
        return cls(nodes[0])

    @classmethod
    def binary(cls, num_modes: int) -> "ModeTree":
        """The balanced binary tree pooling adjacent modes, the default (§4.1)."""
        return cls.pooling(num_modes, 2, "adjacent")

    @classmethod
    def adjacent(cls, num_modes: int, windows: int | Sequence[int] = 2) -> "ModeTree":
        """Pool adjacent modes: `pooling(num_modes, windows, "adjacent")`."""
        return cls.pooling(num_modes, windows, "adjacent")

    @classmethod
    def interleaved(cls, num_modes: int, windows: int | Sequence[int] = 2) -> "ModeTree":
        """Pool "half" modes, $i$ with $i+N/2$: `pooling(num_modes, windows, "interleaved")`."""
        return cls.pooling(num_modes, windows, "interleaved")

    @classmethod
    def flat(cls, num_modes: int) -> "ModeTree":
        """The depth-1 tree: a root over all leaves (CP with root weights, §4.5 "Relations")."""
        if isinstance(num_modes, bool) or not isinstance(num_modes, int) or num_modes < 2:
            raise ValueError(f"`num_modes` must be an int >= 2, got {num_modes!r}.")
        return cls(tuple(range(num_modes)))


class HTF(AbstractBlockFactorization):
    r"""Hierarchical tensor factorization $\mathcal W_H$ over a `ModeTree` (docs: The HTF model).

    `weights[v]` is $W^{(v)}$ for node id `v` (see [`gradflow.ModeTree`][]): a
    leaf's matrix is $d_n\times R_{Pa(n)}$, an interior node's $R_\nu\times
    R_{Pa(\nu)}$, and the root's $R_{[N]}\times1$ (the root vector, stored as a
    column). The end tensor is built bottom-up,
    $\mathcal W^{(\nu),r'}=\sum_rW^{(\nu)}_{r,r'}\bigotimes_{c\in C(\nu)}\mathcal W^{(c),r}$,
    with every child's modes in their positions; the array leaves are exactly these
    trainable matrices and the tree is static.

    The local component $(\nu,r)$ (§4.2) is the $r$-th column of each child's
    matrix and the $r$-th row of $W^{(\nu)}$; its norm is
    $P_{\nu,r}=\prod_{c}\|W^{(c)}_{:,r}\|\cdot\|W^{(\nu)}_{r,:}\|$.

    **Arguments:**

    - `tree`: a [`gradflow.ModeTree`][].
    - `weights`: one matrix per node, in node-id order (leaves first, root last).

    !!! Example

        ```python
        import jax.random as jr
        import gradflow as gf

        tree = gf.ModeTree.binary(4)
        model = gf.HTF.gaussian(jr.key(0), (8, 8, 8, 8), tree, widths=10, std=1e-2)
        model.shape                          # (8, 8, 8, 8)
        model.local_component_norms()[6]     # P_{root, r}, shape (10,)
        model.component_norms().shape        # (30,): nodes {0,1}, {2,3}, root
        ```
    """

    weights: tuple[Float[Array, "_rows _cols"], ...]  # one shape per node
    tree: ModeTree = eqx.field(static=True)

    def __init__(self, tree: ModeTree, weights: Sequence[Float[ArrayLike, "_rows _cols"]]):
        if not isinstance(tree, ModeTree):
            raise TypeError(
                f"`tree` must be a gradflow ModeTree (e.g. ModeTree.binary(4)), got {tree!r}."
            )
        self.tree = tree
        self.weights = tuple(jnp.asarray(w) for w in weights)

    def __check_init__(self):
        tree, ws = self.tree, self.weights
        if len(ws) != tree.num_nodes:
            raise ValueError(
                f"`weights` must hold one matrix per node of the tree ({tree.num_nodes}), "
                f"got {len(ws)}."
            )
        for v, w in enumerate(ws):
            if w.ndim != 2 or min(w.shape) < 1:
                raise ValueError(
                    f"`weights[{v}]` must be a non-empty 2-d array, got shape {tuple(w.shape)}."
                )
            p = tree.parent[v]
            cols = 1 if p is None else ws[p].shape[0]
            if w.shape[1] != cols:
                why = "the root needs 1 column" if p is None else f"parent node {p} has width {cols}"
                raise ValueError(f"`weights[{v}]` has shape {tuple(w.shape)}, but {why}.")

    @property
    def order(self) -> int:
        return self.tree.num_modes

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weights[n].shape[0] for n in range(self.order))

    @property
    def widths(self) -> tuple[int, ...]:
        r"""$R_\nu$ for every interior node, in `tree.interior` order."""
        return tuple(self.weights[v].shape[0] for v in self.tree.interior)

    def full(self) -> Float[Array, "..."]:
        # Labels: mode n is n; the index r of interior node v is v (>= N); the root's
        # output column is num_nodes.
        tree = self.tree
        parts = list(self.weights[: tree.num_modes])
        for v in tree.interior:
            out = tree.num_nodes if tree.parent[v] is None else tree.parent[v]
            operands = []
            for c in tree.children[v]:
                operands += [parts[c], [*tree.modes[c], v]]
            operands += [self.weights[v], [v, out], [*tree.modes[v], out]]
            parts.append(jnp.einsum(*operands))
        return parts[-1][..., 0]

    def entries(self, indices: Int[Array, "m N"]) -> Float[Array, " m"]:
        # Gather leaf rows, then multiply children and apply each node's matrix:
        # O(m * sum_v R_v R_Pa(v)); the full tensor is never formed.
        tree = self.tree
        acts = [self.weights[n][indices[:, n]] for n in range(tree.num_modes)]
        for v in tree.interior:
            prod = acts[tree.children[v][0]]
            for c in tree.children[v][1:]:
                prod = prod * acts[c]
            acts.append(prod @ self.weights[v])
        return acts[-1][:, 0]

    def entries_jacobian(self, indices: Int[Array, "m N"]) -> Float[Array, "m weights"]:
        r"""Closed form (the model is multilinear): with the activations
        $a_\nu$ of every node at the observed entries and their adjoints
        $b_\nu=\partial\,\text{entry}/\partial a_\nu$ (one backward pass),
        $\partial\,\text{entry}/\partial W^{(\nu)}_{r,r'}=\big(\prod_{c}a_c\big)_r\,(b_\nu)_{r'}$
        and, at a leaf, $[i_n=j]\,(b_n)_{r'}$; flattened as `ravel_pytree`."""
        tree, ws = self.tree, self.weights
        acts = [ws[n][indices[:, n]] for n in range(tree.num_modes)]
        pooled = {}
        for v in tree.interior:
            pooled[v] = math.prod(acts[c] for c in tree.children[v])
            acts.append(pooled[v] @ ws[v])
        adjoint = {tree.root: jnp.ones_like(acts[tree.root])}
        for v in reversed(tree.interior):  # parents before children
            up = adjoint[v] @ ws[v].T
            for c in tree.children[v]:
                others = [acts[o] for o in tree.children[v] if o != c]
                adjoint[c] = up * math.prod(others) if others else up
        blocks = []
        for v, w in enumerate(ws):
            left = (jax.nn.one_hot(indices[:, v], w.shape[0], dtype=w.dtype)
                    if tree.is_leaf(v) else pooled[v])
            blocks.append((left[:, :, None] * adjoint[v][:, None, :]).reshape(len(left), -1))
        return jnp.concatenate(blocks, axis=1)

    def select(self, size: int) -> tuple[Int[Array, " _k"], ...]:
        """The `size` largest local components at every interior node (by $P_{\nu,r}$),
        one index array per node of `tree.interior`."""
        norms = self.local_component_norms()
        return tuple(jax.lax.top_k(norms[v], min(int(size), norms[v].shape[0]))[1]
                     for v in self.tree.interior)

    def _block_indices(self, selection):
        """Per node, the (rows, columns) of its matrix in the block of `selection`:
        the node's own selected components (all rows at a leaf) by its parent's."""
        tree = self.tree
        chosen = dict(zip(tree.interior, selection))
        out = []
        for v, w in enumerate(self.weights):
            rows = jnp.arange(w.shape[0]) if tree.is_leaf(v) else chosen[v]
            p = tree.parent[v]
            cols = jnp.zeros(1, rows.dtype) if p is None else chosen[p]
            out.append((rows, cols))
        return out

    def take(self, selection) -> "HTF":
        """The sub-HTF of the selected local components (widths `len(selection[i])`):
        at every node the rows of its selected components and the columns of its
        parent's."""
        blocks = self._block_indices(selection)
        return HTF(self.tree, [w[rows][:, cols] for w, (rows, cols) in zip(self.weights, blocks)])

    def put(self, selection, sub: "HTF") -> "HTF":
        blocks = self._block_indices(selection)
        return HTF(self.tree, [w.at[rows[:, None], cols[None, :]].set(s) for w, s, (rows, cols)
                               in zip(self.weights, sub.weights, blocks)])

    def norm(self) -> Float[Array, ""]:
        r"""Frobenius norm of the end tensor from Gram matrices (no full tensor):
        $G_\nu=W^{(\nu)\top}\big(\odot_cG_c\big)W^{(\nu)}$, $G_{\{n\}}=W^{(\{n\})\top}W^{(\{n\})}$."""
        tree = self.tree
        grams = [w.T @ w for w in self.weights[: tree.num_modes]]
        for v in tree.interior:
            inner = grams[tree.children[v][0]]
            for c in tree.children[v][1:]:
                inner = inner * grams[c]
            grams.append(self.weights[v].T @ inner @ self.weights[v])
        return jnp.sqrt(jnp.maximum(grams[-1][0, 0], 0.0))

    def conserved(self) -> tuple[Float[Array, " n"], Float[Array, ""]]:
        r"""The gaps $\|\mathbf a^{(\nu,r)}_k\|^2-\|W^{(\nu)}_{r,:}\|^2$ between the squared
        norms of each local component's vectors (conserved for every loss), and the
        largest squared vector norm."""
        sq = [n**2 for n in self.local_vector_norms().values()]
        gaps = jnp.concatenate([(s[:-1] - s[-1:]).ravel() for s in sq])
        return gaps, jnp.max(jnp.stack([jnp.max(s) for s in sq]))

    def local_vector_norms(self) -> dict[int, Float[Array, "_K _R"]]:
        r"""The norms of the $K_\nu$ vectors of every local component (§4.2).

        **Returns:** `{v: array (K_v, R_v)}` for every interior node `v`: row `k`
        is $\|W^{(c_k)}_{:,r}\|$ for the `k`-th child $c_k$, and the last row is
        $\|W^{(\nu)}_{r,:}\|$. A zero vector has norm 0 and derivative 0.
        """
        tree, ws = self.tree, self.weights
        return {
            v: jnp.stack(
                [_safe_norm(ws[c], axis=0) for c in tree.children[v]]
                + [_safe_norm(ws[v], axis=1)]
            )
            for v in tree.interior
        }

    def local_component_norms(self) -> dict[int, Float[Array, " _R"]]:
        r"""$P_{\nu,r}$ per interior node: `{v: array (R_v,)}` (§4.2)."""
        return {v: jnp.prod(n, axis=0) for v, n in self.local_vector_norms().items()}

    def component_norms(self) -> Float[Array, " components"]:
        r"""All $P_{\nu,r}$, flat: node by node in `tree.interior` order (root last),
        `r` fastest. Length $\sum_\nu R_\nu$."""
        norms = self.local_component_norms()
        return jnp.concatenate([norms[v] for v in self.tree.interior])

    @classmethod
    def gaussian(
        cls,
        key: PRNGKeyArray,
        dims: Sequence[int],
        tree: ModeTree,
        widths: int | Sequence[int],
        std: float | ArrayLike,
        dtype=jnp.float64,
    ) -> "HTF":
        """I.i.d. $\\mathcal N(0,\\mathrm{std}^2)$ entries in every matrix (CODE-HTF's init).

        **Arguments:**

        - `key`: a JAX PRNG key.
        - `dims`: mode dimensions $(d_0,\\dots,d_{N-1})$, one per mode of `tree`.
        - `tree`: a [`gradflow.ModeTree`][].
        - `widths`: $R_\\nu\\ge1$: one int for every interior node, or one per node of
          `tree.interior` (see [`gradflow.ModeTree.layer_widths`][]).
        - `std`: standard deviation of every entry (may be a traced scalar).
        - `dtype`: float64 by default.

        **Returns:** an `HTF`.
        """
        shapes = _weight_shapes(dims, tree, widths)
        check_float_dtype("dtype", dtype)
        check_positive("std", std, allow_zero=True, scalar=True)
        std = jnp.asarray(std, dtype)
        keys = jr.split(key, len(shapes))
        return cls(tree, [std * jr.normal(k, s, dtype) for k, s in zip(keys, shapes)])

    @classmethod
    def balanced(
        cls,
        key: PRNGKeyArray,
        dims: Sequence[int],
        tree: ModeTree,
        widths: int | Sequence[int],
        scale: float | ArrayLike,
        dtype=jnp.float64,
    ) -> "HTF":
        r"""Exactly balanced init: zero HTF unbalancedness (docs: Theory › HTF conservation, §4.4).

        Sign matrices $W^{(\nu)}=s_\nu\cdot(\pm1)$ with random signs, scaled top-down:
        $s_{[N]}=$ `scale` and $s_c=s_\nu\sqrt{R_{Pa(\nu)}/R_c}$ for each child $c$ of
        $\nu$ (with $R_c\to d_c$ at a leaf, $R_{Pa([N])}=1$). Then every vector of
        local component $(\nu,r)$ has norm $s_\nu\sqrt{R_{Pa(\nu)}}$, so
        $P_{\nu,r}=(s_\nu\sqrt{R_{Pa(\nu)}})^{K_\nu}$; at the root the vectors have
        norm `scale`.

        **Arguments:**

        - `key`: a JAX PRNG key (for the signs).
        - `dims`, `tree`, `widths`, `dtype`: as in [`gradflow.HTF.gaussian`][].
        - `scale`: $s_{[N]}\ge0$ (may be a traced scalar).

        **Returns:** an `HTF` with zero unbalancedness (up to rounding).
        """
        shapes = _weight_shapes(dims, tree, widths)
        check_float_dtype("dtype", dtype)
        check_positive("scale", scale, allow_zero=True, scalar=True)
        factor = [1.0] * tree.num_nodes  # s_v / scale
        for v in reversed(tree.interior):  # parents before children
            for c in tree.children[v]:
                factor[c] = factor[v] * math.sqrt(shapes[v][1] / shapes[c][0])
        scale = jnp.asarray(scale, dtype)
        keys = jr.split(key, len(shapes))
        return cls(
            tree,
            [scale * f * jr.rademacher(k, s, dtype) for k, s, f in zip(keys, shapes, factor)],
        )


def _normalize(node):
    if isinstance(node, (int, np.integer)) and not isinstance(node, bool):
        if node < 0:
            raise ValueError(f"`structure`: modes must be ints >= 0, got {int(node)}.")
        return int(node)
    if isinstance(node, (tuple, list)):
        if not node:
            raise ValueError("`structure`: an interior node (tuple) must have children, got ().")
        return tuple(_normalize(c) for c in node)
    raise ValueError(
        f"`structure` must be nested tuples of modes (ints), got an entry {node!r}."
    )


def _leaves(node) -> list[int]:
    return [node] if isinstance(node, int) else [m for c in node for m in _leaves(c)]


def _interleaving(n: int) -> list[int]:
    """CODE-HTF's "half" order: 0, h, 1, h+1, ... (h = ceil(n/2)), the middle last if n is odd."""
    half = n // 2
    order = [i for pair in zip(range(half), range(n - half, n)) for i in pair]
    return order + [half] if n % 2 else order


def _safe_norm(x, axis):
    sq = jnp.sum(x**2, axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _weight_shapes(dims, tree, widths) -> list[tuple[int, int]]:
    """Shapes of the weight matrices in node order, with the arguments checked."""
    if not isinstance(tree, ModeTree):
        raise TypeError(
            f"`tree` must be a gradflow ModeTree (e.g. ModeTree.binary(4)), got {tree!r}."
        )
    dims = check_dims("dims", dims)
    if len(dims) != tree.num_modes:
        raise ValueError(
            f"`dims` has {len(dims)} entries but `tree` has {tree.num_modes} modes."
        )
    if isinstance(widths, Sequence):
        widths = tuple(widths)
        if len(widths) != len(tree.interior):
            raise ValueError(
                f"`widths` must give one width per interior node ({len(tree.interior)}, "
                f"in `tree.interior` order) or a single int, got {widths!r}."
            )
    else:
        widths = (widths,) * len(tree.interior)
    if any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in widths):
        raise ValueError(f"`widths` must be ints >= 1, got {widths!r}.")
    rows = list(dims) + [int(r) for r in widths]
    return [
        (rows[v], 1 if p is None else rows[p])
        for v, p in enumerate(tree.parent)
    ]
