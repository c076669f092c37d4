"""`gradflow verify`: every built-in check passes on a few instances, its solves are
batched (one compilation per shape), a false statement fails and names its instance."""

import itertools
import json
import threading

import diffrax as dfx
import jax.random as jr
import numpy as np
import pytest

import gradflow as gf
from gradflow.analysis import closed_forms
from gradflow.cli import main
from gradflow.verify import CHECKS, Case, Check, checks, register, registry, run_check, run_checks

BUILT_IN = list(CHECKS)
INSTANCES = (0, 6, 12)
"""Three instances per check, all in bucket 0 of every family (6 is a multiple of its
1, 2 or 3 buckets): three cases per check for the compilations of one."""

FALSE = "corollary-without-balance"


@pytest.fixture(scope="module")
def built_in():
    """Every built-in check, and one false statement on the CP solves, in one batched run."""
    law = CHECKS["cp-corollary1"]
    # Corollary 1's law on *unbalanced* inits is false: the same residual must fail there.
    register(Check(FALSE, "Corollary 1 for ε > 0 (false)", "Gaussian init",
                   CHECKS["cp-theorem1"].draw, law.residual,  # Gaussian (unbalanced) inits
                   law.tolerance, checks.CP_BUCKETS))
    try:
        programs, before = set(registry._PROGRAMS), registry.compiled_programs()
        results = run_checks(BUILT_IN + [FALSE], seed=1, case=INSTANCES)
        after = registry.compiled_programs()
        new_programs = [name for name in registry._PROGRAMS if name not in programs]
    finally:
        CHECKS.pop(FALSE, None)
    return {r.name: r for r in results}, after["batched"] - before["batched"], new_programs


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_check_passes(built_in, name):
    result = built_in[0][name]
    assert result.error is None, result.error
    assert result.passed, (result.worst, result.tolerance, result.worst_case)
    assert result.cases == len(INSTANCES) and result.instances == INSTANCES
    assert len(result.residuals) == len(INSTANCES) and result.failed_index is None
    assert result.rerun() is None
    if CHECKS[name].buckets:  # its three instances share one bucket: one batched solve
        assert result.shapes == 1


def test_solves_are_batched(built_in):
    results, built, new_programs = built_in
    # Each program (a solve shape's solve, and its observers) is built once...
    assert built == len(new_programs)
    solves = [name for name in new_programs if name[0] == "solve"]
    observers = [name for name in new_programs if name[0] == "observe"]
    assert len(observers) >= len(solves) and {o[1] for o in observers} == {s[1] for s in solves}
    # ... and the CP family (7 checks, 21 instances, one bucket) shares one solve.
    cp = ["cp-lemma1", "cp-identity", "cp-theorem1", "cp-corollary1", "closed-form-product",
          "closed-form-odeco-cp", FALSE]
    assert all(results[n].shapes == 1 for n in cp)
    instances = sum(r.cases for r in results.values())
    assert len(solves) <= len(results) - len(cp) + 1 < instances / 3


def test_a_false_statement_fails_and_names_its_instance(built_in):
    result = built_in[0][FALSE]
    assert not result.passed and result.error is None and result.worst > 1e-3
    assert result.failed_index == INSTANCES[0] and result.failed_case.startswith("case 0: ")
    assert result.rerun() == f"gradflow verify --only {FALSE} --case 0 --seed 1"
    assert "--import mine.py" in result.rerun(["mine.py"])


def test_flow_times_match_the_oracle():
    w = np.array([0.02, 0.3, 0.8, 1.2])
    expected = [closed_forms.product_flow_time(0.01, v, 1.3, 4) for v in w]
    np.testing.assert_allclose(checks._flow_times(0.01, w, 1.3, 4), expected, rtol=1e-13)


def _bucketed(key, bucket):
    """A tiny completion problem of the given order."""
    dims = (2,) * bucket["order"]
    model = gf.CP.gaussian(key, dims, rank=2, std=float(jr.uniform(key, (), minval=0.2,
                                                                     maxval=0.5)))
    objective = gf.Completion.from_tensor(gf.random_cp_tensor(key, dims, 1),
                                          gf.sample_indices(key, dims, 4))
    return Case(model, objective, dict(t1=5.0, save_times=np.linspace(0, 5.0, 6),
                                       observers=["loss"], solver=dfx.Tsit5()),
                f"order {bucket['order']}")


def test_one_compilation_per_bucket_and_case_reruns():
    check = Check("bucketed-loss-test", "the loss ends below where it starts", "tiny CP",
                  _bucketed, lambda tr, case: float(tr["loss"][-1] / tr["loss"][0]), 1.0,
                  ({"order": 2}, {"order": 3}))
    before = registry.compiled_programs()["batched"]
    first = run_check(check, cases=4, seed=3)
    assert first.passed and first.shapes == 2 and first.compiles == 2
    assert registry.compiled_programs()["batched"] - before == 4  # 2 shapes x (solve, observe)
    again = run_check(check, cases=4, seed=4)  # new values, same shapes: nothing compiled
    assert again.passed and again.compiles == 0
    assert registry.compiled_programs()["batched"] - before == 4
    assert again.residuals != first.residuals
    alone = run_check(check, seed=3, case=3)  # instance 3 of the first run, by itself
    assert alone.instances == (3,) and alone.worst_case == "case 3: order 3"
    np.testing.assert_allclose(alone.residuals[0], first.residuals[3], rtol=1e-12, atol=1e-300)
    with pytest.raises(ValueError, match="case"):
        run_check(check, case=-1)
    with pytest.raises(ValueError, match="case"):
        run_check(check, case=[])


def _draw(key):  # the shapes of `_bucketed`'s second bucket: its compiled solves serve
    return _bucketed(key, {"order": 3})


def test_registration_and_errors():
    check = Check("loss-decreases-test", "the loss never increases", "any", _draw,
                  lambda tr, case: float(max(0.0, np.max(np.diff(tr["loss"])))), 1e-12)
    try:
        register(check)
        with pytest.raises(ValueError, match="already registered"):
            register(check)
        assert run_check(check, cases=2).passed
    finally:
        CHECKS.pop("loss-decreases-test", None)
    with pytest.raises(TypeError, match="Check"):
        register("not a check")
    with pytest.raises(ValueError, match="cases"):
        run_check(check, cases=0)
    crashing = Check("crash", "s", "p", lambda key: 1 / 0, lambda tr, c: 0.0, 1.0)
    result = run_check(crashing, cases=1)
    assert not result.passed and "ZeroDivisionError" in result.error
    assert result.failed_index == 0 and result.rerun() == "gradflow verify --only crash --case 0"


def test_cli_user_check_file_json_and_exit_status(tmp_path, capsys):
    plugin = tmp_path / "mychecks.py"
    plugin.write_text(
        "import diffrax as dfx\n"
        "import jax.random as jr\n"
        "import numpy as np\n"
        "import gradflow as gf\n"
        "from gradflow.verify import Case, Check, register\n"
        "def draw(key):\n"
        "    model = gf.CP.gaussian(key, (2, 2, 2), rank=2, std=0.3)\n"
        "    objective = gf.Completion.from_tensor(gf.random_cp_tensor(key, (2, 2, 2), 1),\n"
        "                                          gf.sample_indices(key, (2, 2, 2), 4))\n"
        "    odd = int(jr.randint(jr.fold_in(key, 7), (), 0, 2))\n"
        "    flow = dict(t1=5.0, save_times=np.linspace(0, 5.0, 6), observers=['loss'],\n"
        "                solver=dfx.Tsit5())\n"
        "    return Case(model, objective, flow, '2x2x2', dict(odd=odd))\n"
        "register(Check('user-false', 'the loss is constant (false)', 'any', draw,\n"
        "               lambda tr, case: case.extra['odd'] * float(abs(tr['loss'][-1]\n"
        "                                                          - tr['loss'][0])), 1e-12))\n")
    out = tmp_path / "v.json"
    try:
        status = main(["verify", "--import", str(plugin), "--only", "user-false",
                       "--cases", "4", "--json", str(out)])
        odd = [CHECKS["user-false"].instance(k).extra["odd"] for k in range(4)]
    finally:
        CHECKS.pop("user-false", None)
    assert 1 in odd, "the plugin's draw should make some instance false"
    failed = odd.index(1)
    assert status == 1
    printed = capsys.readouterr().out
    assert "user-false" in printed and "FAIL" in printed and "0/1 checks passed" in printed
    rerun = f"gradflow verify --import {plugin} --only user-false --case {failed}"
    assert f"failed case {failed}: 2x2x2" in printed and f"re-run: {rerun}" in printed
    saved = json.loads(out.read_text())
    first = saved["results"][0]
    assert first["name"] == "user-false" and not first["passed"]
    assert first["failed_index"] == failed and first["rerun"] == rerun and first["cases"] == 4
    try:  # the re-run command reproduces the failing instance
        status = main(["verify", "--import", str(plugin), "--only", "user-false",
                       "--case", str(failed), "--json", str(out)])
    finally:
        CHECKS.pop("user-false", None)
    again = json.loads(out.read_text())["results"][0]
    assert status == 1 and again["instances"] == [failed]
    np.testing.assert_allclose(again["worst"], first["residuals"][failed], rtol=1e-10)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["verify", "--only", "no-such-check"])
    assert "unknown check(s) ['no-such-check']" in capsys.readouterr().err


def test_cli_list_describes_the_draw(capsys):
    assert main(["verify", "--list"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in BUILT_IN)
    assert "shapes (instance k in bucket k mod 3): [0] order 3, dims 3, rank 4" in printed
    assert "init scale 0.2–0.6" in printed


def _forget(names):
    """Drop programs from this process, as a new process would start without them."""
    for name in names:
        registry._PROGRAMS.pop(name, None)


def _tiny(key, bucket):
    """`_bucketed`'s problem, observed by gradflow's loss and a local function."""
    case = _bucketed(key, bucket)
    case.flow["observers"] = {"loss": gf.observers.loss, "double": _double_loss}
    return case


def _double_loss(t, model, objective):  # defined outside gradflow: not kept on disk
    return 2.0 * objective(model)


def test_programs_are_kept_on_disk_and_loaded_instead_of_traced(tmp_path, monkeypatch):
    from gradflow.verify import _cache

    monkeypatch.setattr(_cache, "DIRECTORY", str(tmp_path))
    check = Check("disk-test", "the loss ends below where it starts", "tiny CP", _bucketed,
                  lambda tr, case: float(tr["loss"][-1] / tr["loss"][0]), 1.0,
                  ({"order": 4},))  # a shape no other test solves
    before, known = registry.compiled_programs(), set(registry._PROGRAMS)
    first = run_check(check, cases=2, seed=11)
    new = [name for name in registry._PROGRAMS if name not in known]
    counts = registry.compiled_programs()
    assert first.passed and len(new) == 2  # the solve and its observers
    assert counts["traced"] - before["traced"] == 2 and counts["loaded"] == before["loaded"]
    entries = sorted(tmp_path.iterdir())
    assert all(e.read_bytes().startswith(_cache.MAGIC) for e in entries)
    # Both are kept; under a type-checking import hook (the test suite's), gradflow's
    # observers are wrapped functions that cannot be keyed for sure: only the solve.
    assert len(entries) == 2 or (len(entries) == 1 and hasattr(gf.observers.loss, "__wrapped__"))

    _forget(new)  # a later run: loaded, not traced, and the same numbers
    again = run_check(check, cases=2, seed=11)
    after = registry.compiled_programs()
    assert after["loaded"] - counts["loaded"] == len(entries)
    assert after["traced"] - counts["traced"] == 2 - len(entries)
    assert again.residuals == first.residuals and again.compiles == 1

    _forget(new)  # unreadable entries are traced again (and rewritten), never trusted
    entries[0].write_bytes(b"not a program")
    for entry in entries[1:]:
        entry.write_bytes(entry.read_bytes()[:-100])
    third = run_check(check, cases=2, seed=11)
    assert third.residuals == first.residuals
    assert registry.compiled_programs()["traced"] - after["traced"] == 2
    assert all(_cache.decode(e.read_bytes()) is not None for e in entries)

    # An observer defined outside gradflow cannot be keyed for sure: its program is
    # traced in every run; the solve it observes is still shared and kept.
    mine = Check("disk-test-local", "the doubled loss is twice the loss", "tiny CP", _tiny,
                 lambda tr, case: float(np.max(np.abs(tr["double"] - 2 * tr["loss"]))),
                 1e-12, ({"order": 4},))
    known = set(registry._PROGRAMS)
    assert run_check(mine, cases=2, seed=11).passed
    assert [name[0] for name in registry._PROGRAMS if name not in known] == ["observe"]
    assert len(list(tmp_path.iterdir())) == len(entries)


def test_program_keys_hold_every_dependency(monkeypatch):
    from gradflow.verify import _cache

    description = ["solve", _cache.render(dfx.Tsit5()), [[[2, 3], "float64"]]]
    key = _cache.key(description)
    assert key == _cache.key(description)
    assert key != _cache.key(["solve", _cache.render(dfx.Dopri8()), [[[2, 3], "float64"]]])
    assert key != _cache.key(["solve", _cache.render(dfx.Tsit5()), [[[2, 4], "float64"]]])
    static = _cache._environment_static()
    monkeypatch.setattr(_cache, "_environment_static", lambda: (static[0], "edited", static[2]))
    assert _cache.key(description) != key  # another source of gradflow: another key
    with pytest.raises(_cache.Uncacheable):
        _cache.render(_double_loss)
    with pytest.raises(_cache.Uncacheable):
        _cache.render(object())
    assert _cache.render(np.arange(3)) != _cache.render(np.arange(3) + 1)


def _overflowing(key, bucket):
    """A draw whose initial loss overflows: a runtime check of the solve fails."""
    case = _bucketed(key, bucket)
    return Case(_scaled(case.model, 1e200), case.objective, case.flow, "huge init")


def _scaled(model, factor):
    return gf.CP(tuple(f * factor for f in model.factors))


def test_a_failed_runtime_check_in_a_batch_names_its_error():
    """Inside batched programs Equinox's checks turn values into NaN (no host callback);
    the member is then solved alone, whose check raises with its message."""
    check = Check("overflow-test", "s", "p", _overflowing, lambda tr, case: 0.0, 1.0,
                  ({"order": 3},))
    result = run_check(check, cases=1)
    assert not result.passed and "loss at the initial model is not finite" in result.error
    assert registry.compiled_programs()["alone"] >= 1


def _stiff_bucketed(key, bucket):
    """`_bucketed`'s problem, solved by the default solver (AutoStiff)."""
    case = _bucketed(key, bucket)
    case.flow["solver"] = gf.AutoStiff(gf.RosenbrockW(gf.LargestComponents(2)))
    return case


def test_autostiff_groups_are_solved_one_at_a_time():
    """Batched, every member of an AutoStiff solve takes a W step once one member is
    stiff: such groups are solved member by member by one compiled program of one
    member, so that an instance's residual is the same in a run and alone."""
    check = Check("autostiff-test", "the loss ends below where it starts", "tiny CP",
                  _stiff_bucketed, lambda tr, case: float(tr["loss"][-1] / tr["loss"][0]),
                  1.0, ({"order": 3},))
    known = set(registry._PROGRAMS)
    first = run_check(check, cases=3, seed=5)
    new = [name for name in registry._PROGRAMS if name not in known]
    assert first.passed and sorted(name[0] for name in new) == ["observe", "solve"]
    assert all(name[-2:] == (1, False) for name in new)  # one member, XLA's quick options
    alone = run_check(check, seed=5, case=2)
    assert alone.residuals[0] == first.residuals[2]


def test_a_long_group_is_compiled_optimized_and_observed_unoptimized(monkeypatch):
    """A group of more than LONG_GROUP solves gets a solve program compiled with XLA's
    default options; its observers keep the quick options (residuals computed by the
    same code in every run)."""
    monkeypatch.setattr(registry, "LONG_GROUP", 2)
    check = Check("long-group-test", "the loss ends below where it starts", "tiny CP",
                  _bucketed, lambda tr, case: float(tr["loss"][-1] / tr["loss"][0]), 1.0,
                  ({"order": 2},))
    known = set(registry._PROGRAMS)
    long = run_check(check, cases=3, seed=6)
    new = {name[0]: name for name in registry._PROGRAMS if name not in known}
    assert long.passed and new["solve"][-1] is True and new["observe"][-1] is False
    monkeypatch.setattr(registry, "LONG_GROUP", registry.CHUNK)
    quick = run_check(check, cases=3, seed=6)
    np.testing.assert_allclose(quick.residuals, long.residuals, rtol=1e-9)


def test_a_group_is_solved_in_order_of_cost_then_final_time(monkeypatch):
    """Chunks run until their longest member is done: a group is sorted by `Case.cost`,
    then by t1, before it is cut into chunks."""
    solved = []
    monkeypatch.setattr(registry, "CHUNK", 2)
    original = registry._solve_chunk

    def record(signature, members, long=False):
        solved.append([m.owner.k for m in members])
        return original(signature, members, long)

    monkeypatch.setattr(registry, "_solve_chunk", record)

    costs, t1s, drawn = (1.0, 0.0, 1.0, 0.0), (5.0, 6.0, 4.0, 5.0), itertools.count()

    def ordered(key, bucket):  # instances are drawn in order: 0, 1, 2, 3
        k = next(drawn)
        case = _bucketed(key, bucket)
        case.flow["t1"] = t1s[k]
        case.flow["save_times"] = np.linspace(0, t1s[k], 6)
        case.cost = costs[k]
        return case

    check = Check("order-test", "the loss ends below where it starts", "tiny CP", ordered,
                  lambda tr, case: float(tr["loss"][-1] / tr["loss"][0]), 1.0,
                  ({"order": 3},))
    assert run_check(check, cases=4, seed=7).passed
    assert solved == [[3, 1], [2, 0]]  # cost 0 (t1 5, 6), then cost 1 (t1 4, 5)


def test_the_gate_lets_one_run_at_a_time_in_order_of_priority():
    gate, order = registry._Gate(), []

    def run(priority):
        registry._WAITED.priority = priority
        with gate.enter("run"):
            order.append(priority)

    with gate.enter("run"):  # the main thread (priority -1) runs; the others queue up
        threads = [threading.Thread(target=run, args=(p,)) for p in (3, 1, 2)]
        for thread in threads:
            thread.start()
        while len(gate.queues["run"]) < 3:
            threading.Event().wait(0.01)
        assert gate.at_work == 1 and gate.running
    for thread in threads:
        thread.join()
    assert order == [1, 2, 3] and gate.at_work == 0 and not gate.running
