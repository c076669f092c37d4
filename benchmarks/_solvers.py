"""Competitor solvers that gradflow does not ship, written for the benchmarks only.

- `time_changed_solve`: an explicit Diffrax solver (Tsit5) on the time-changed flow
  $d\\theta/d\\tau=-\\nabla\\phi/s$, $dt/d\\tau=1/s$ with $s=\\|\\nabla\\phi\\|$
  (docs: Concepts › The flow, "Float64 time resolution"), observed at given *physical* times by a
  bisection on each step's dense output. Its own adaptive loop (Diffrax's step and
  PID controller), because Diffrax saves at solver times (here: tau), not at values of a
  state component.
- `newton_krylov_solve`: Diffrax Kvaerno5 (ESDIRK, L-stable) whose stage equations are
  solved by a chord iteration with matrix-free GMRES on Hessian-vector products,
  optionally left-preconditioned by $(I-c W)^{-1}$ with $W$ a gradflow stiffness
  (e.g. gradflow's default, the Gauss-Newton block of the largest components), rebuilt
  once per step.
  Gradient evaluations, Hessian-vector products and rebuilds are counted by host
  callbacks.
"""

import collections

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jax import lax

import gradflow as gf

# --- explicit with the time change ------------------------------------------------------


def _speed_field(tau, state, objective):
    model, _ = state
    grad = eqx.filter_grad(objective)(model)
    speed = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))
    speed = jnp.maximum(speed, jnp.finfo(speed.dtype).tiny)
    return jax.tree.map(lambda g: -g / speed, grad), 1.0 / speed


@eqx.filter_jit
def _time_changed(model, objective, save_ts, rtol, atol, *, solver, observer, max_steps):
    term = dfx.ODETerm(_speed_field)
    y0 = (model, jnp.zeros((), save_ts.dtype))
    controller = dfx.PIDController(rtol=rtol, atol=atol)
    tau_max = jnp.asarray(1e12, save_ts.dtype)
    tau0 = jnp.zeros((), save_ts.dtype)
    error_order = solver.error_order(term)
    tau1, cstate = controller.init(term, tau0, tau_max, y0, None, objective, solver.func,
                                   error_order)
    sstate = solver.init(term, tau0, tau1, y0, objective)
    obs_shape = jax.eval_shape(lambda: observer(model))
    saved = jnp.zeros((save_ts.shape[0],) + obs_shape.shape, obs_shape.dtype)
    T = save_ts[-1]

    def save_inside(carry, interp, tau_a, tau_b, t_b):
        def cond(c):
            j, _ = c
            return (j < save_ts.shape[0]) & (save_ts[jnp.minimum(j, save_ts.shape[0] - 1)] <= t_b)

        def body(c):
            j, saved = c
            target = save_ts[j]

            def bisect(_, ab):
                a, b = ab
                mid = 0.5 * (a + b)
                below = interp.evaluate(mid)[1] < target
                return jnp.where(below, mid, a), jnp.where(below, b, mid)

            a, b = lax.fori_loop(0, 64, bisect, (tau_a, tau_b))
            theta = interp.evaluate(0.5 * (a + b))[0]
            return j + 1, saved.at[j].set(observer(theta))

        return lax.while_loop(cond, body, carry)

    def cond(c):
        y, *_, k, j, saved, status = c
        return (y[1] < T) & (k < max_steps) & (status == 0)

    def body(c):
        y, tau, tau1, sstate, cstate, k, j, saved, status = c
        y1, err, dense, sstate1, res = solver.step(term, tau, tau1, y, objective, sstate, False)
        keep, ntau0, ntau1, _, cstate, res2 = controller.adapt_step_size(
            tau, tau1, y, y1, objective, err, error_order, cstate)
        interp = solver.interpolation_cls(t0=tau, t1=tau1, **dense)
        j, saved = lax.cond(keep, lambda: save_inside((j, saved), interp, tau, tau1, y1[1]),
                            lambda: (j, saved))
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)
        y = pick(y1, y)
        sstate = pick(sstate1, sstate)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(y)]))
        status = jnp.where(finite, 0, 2)
        return y, ntau0, ntau1, sstate, cstate, k + 1, j, saved, status

    init = (y0, tau0, tau1, sstate, cstate, jnp.asarray(0), jnp.asarray(0), saved,
            jnp.asarray(0))
    y, tau, _, _, _, k, j, saved, status = lax.while_loop(cond, body, init)
    status = jnp.where(status != 0, status, jnp.where(y[1] >= T, 0, 1))
    return saved, j, k, status, y[1]


def time_changed_solve(model, objective, save_ts, *, rtol, atol, solver=None,
                       observer=lambda m: m.component_norms(), max_steps=100_000):
    """Solve to `save_ts[-1]`; returns (observations at save_ts, info dict).

    `info`: steps (attempts), gradients (6 per attempt + 1 for Tsit5's FSAL), status
    ("t1" or "max_steps"/"non_finite"), t_final.
    """
    solver = dfx.Tsit5() if solver is None else solver
    save_ts = jnp.asarray(save_ts)
    saved, j, k, status, t = _time_changed(
        model, objective, save_ts, jnp.asarray(rtol, save_ts.dtype),
        jnp.asarray(atol, save_ts.dtype), solver=solver, observer=observer,
        max_steps=max_steps)
    saved = jax.block_until_ready(saved)
    steps = int(k)
    return saved[: int(j)], dict(steps=steps, gradients=6 * steps + 1,
                                 status=("t1", "max_steps", "non_finite")[int(status)],
                                 t_final=float(t))


# --- implicit Kvaerno with matrix-free Newton-Krylov ------------------------------------

COUNTS = collections.Counter()


def _tick(name):
    def tick():
        COUNTS[name] += 1

    return tick


def counted_vector_field(t, model, objective):
    jax.debug.callback(_tick("gradients"))
    return gf.vector_field(t, model, objective)


class PreconditionedGMRES(lx.AbstractLinearSolver):
    """lineax GMRES with a preconditioner carried in the solver state, and a
    callback counting its operator applications (Hessian-vector products)."""

    gmres: lx.GMRES

    def init(self, operator, options):
        return self.gmres.init(operator, {}), None

    def compute(self, state, vector, options):
        operator, preconditioner = state

        def mv(x):
            jax.debug.callback(_tick("hvps"))
            return operator.mv(x)

        counted = lx.FunctionLinearOperator(mv, operator.in_structure())
        opts = {}
        if preconditioner is not None:
            lin, c = preconditioner
            # one factorization of I - cW per linear solve, not per GMRES iteration
            opts["preconditioner"] = lx.FunctionLinearOperator(
                lin.shifted(c), operator.in_structure())
        solution, _, stats = self.gmres.compute(counted, vector, opts)
        # a fixed number of iterations (inexact Newton): the chord iteration's own
        # convergence test decides whether the stage is solved
        return solution, lx.RESULTS.successful, stats

    def transpose(self, state, options):
        raise NotImplementedError

    def conj(self, state, options):
        raise NotImplementedError

    def assume_full_rank(self):
        return True


def _stop_gradient_arrays(tree):
    return jax.tree.map(lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x, tree)


class KrylovChord(dfx.VeryChord):
    """Diffrax's chord iteration; the Newton matrix $I - c\\,\\partial f$ is applied by
    Hessian-vector products and solved by GMRES, preconditioned (if `stiffness` is
    given) by $(I-cW)^{-1}$ with $W$ = `stiffness.linearise` at the stage's base point."""

    stiffness: object = None

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        if "init_state" in options:
            return options["init_state"]
        state = super().init(fn, y, args, {}, f_struct, aux_struct, tags)
        if self.stiffness is None:
            return state
        _, diagonal, _, _, _, base, objective, control = args

        def rebuild():
            jax.debug.callback(_tick("rebuilds"))
            return self.stiffness.linearise(base, objective)

        # Diffrax also asks for a placeholder Newton matrix with diagonal 0 (identity)
        # at the start of every step: no rebuild for that one.
        shape = jax.eval_shape(rebuild)
        lin = lax.cond(diagonal == 0,
                       lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape),
                       rebuild)
        jac, (gmres_state, _) = state.linear_state
        pre = (lin, diagonal * control)
        return eqx.tree_at(lambda s: s.linear_state, state, (jac, (gmres_state, pre)))

    def step(self, fn, y, args, options, state, tags):
        # `VeryChord.step`, except that only the arrays of the linear-solver state go
        # through `stop_gradient` (GMRES keeps a linearised operator, a jaxpr, there).
        fx, aux = fn(y, args)
        jac, linear_state = state.linear_state
        linear_state = _stop_gradient_arrays(linear_state)
        sol = lx.linear_solve(jac, fx, self.linear_solver, state=linear_state, throw=False)
        diff = sol.value
        new_y = jax.tree.map(lambda a, b: a - b, y, diff)
        scale = jax.tree.map(lambda a: self.atol + self.rtol * jnp.abs(a), new_y)
        diffsize = self.norm(jax.tree.map(lambda a, b: a / b, diff, scale))
        new_state = type(state)(
            linear_state=state.linear_state, diff=diff, diffsize=diffsize,
            diffsize_prev=state.diffsize, result=optx.RESULTS.promote(sol.result),
            step=state.step + 1)
        return new_y, new_state, aux


def newton_krylov_solve(model, objective, save_ts, *, rtol, atol, stiffness=None,
                        gmres_steps=20, max_steps=20_000,
                        observer=lambda m: m.component_norms()):
    """Kvaerno5 + chord/GMRES from 0 to `save_ts[-1]`; (observations, info with counts)."""
    root = KrylovChord(rtol=rtol, atol=atol, stiffness=stiffness,
                       linear_solver=PreconditionedGMRES(
                           lx.GMRES(rtol=0.0, atol=0.0, max_steps=gmres_steps,
                                    restart=gmres_steps)))
    solver = dfx.Kvaerno5(root_finder=root)
    COUNTS.clear()
    sol = _nk(model, objective, jnp.asarray(save_ts), rtol, atol, solver=solver,
              observer=observer, max_steps=max_steps)
    obs = jax.block_until_ready(sol.ys)
    jax.effects_barrier()
    ok = sol.result == dfx.RESULTS.successful
    info = dict(steps=int(sol.stats["num_steps"]), status="t1" if bool(ok) else "max_steps",
                gradients=COUNTS["gradients"], hvps=COUNTS["hvps"],
                rebuilds=COUNTS["rebuilds"])
    keep = jnp.isfinite(sol.ts)
    return obs[keep], info


@eqx.filter_jit
def _nk(model, objective, save_ts, rtol, atol, *, solver, observer, max_steps):
    return dfx.diffeqsolve(
        dfx.ODETerm(counted_vector_field), solver, 0.0, save_ts[-1], None, model, objective,
        saveat=dfx.SaveAt(ts=save_ts, fn=lambda t, y, args: observer(y)),
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps, throw=False)
