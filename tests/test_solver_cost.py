"""Tests of benchmarks/solver_cost.py: the sequential operation count."""

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import solver_cost

# A hand-written module whose count follows from the rules: the entry has
# 2 counted operations (copy, fusion) besides free ones, a call of a
# computation with a while (known trip count 3) and a conditional whose
# larger branch has 2 operations. The loop's condition has 1 operation, its
# body 2 plus a nested while with no known count (condition 1, body 1).
_MODULE = """\
HloModule m, is_scheduled=true

%fused (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  %c = f32[] constant(1)
  %b = f32[2]{0} broadcast(%c), dimensions={}
  ROOT %a = f32[2]{0} add(%p, %b)
}

%inner_cond (t: (s32[], f32[2])) -> pred[] {
  %t = (s32[], f32[2]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %k = s32[] constant(9)
  ROOT %lt = pred[] compare(%i, %k), direction=LT
}

%inner_body (t.1: (s32[], f32[2])) -> (s32[], f32[2]) {
  %t.1 = (s32[], f32[2]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %x.1 = f32[2]{0} get-tuple-element(%t.1), index=1
  %y.1 = f32[2]{0} fusion(%x.1), kind=kLoop, calls=%fused
  ROOT %r.1 = (s32[], f32[2]{0}) tuple(%i.1, %y.1)
}

%outer_cond (t.2: (s32[], f32[2])) -> pred[] {
  %t.2 = (s32[], f32[2]{0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%t.2), index=0
  %k.2 = s32[] constant(3)
  ROOT %lt.2 = pred[] compare(%i.2, %k.2), direction=LT
}

%outer_body (t.3: (s32[], f32[2])) -> (s32[], f32[2]) {
  %t.3 = (s32[], f32[2]{0}) parameter(0)
  %i.3 = s32[] get-tuple-element(%t.3), index=0
  %x.3 = f32[2]{0} get-tuple-element(%t.3), index=1
  %n.3 = s32[] add(%i.3, %i.3)
  %y.3 = f32[2]{0} sine(%x.3)
  %s.3 = (s32[], f32[2]{0}) tuple(%n.3, %y.3)
  ROOT %inner = (s32[], f32[2]{0}) while(%s.3), condition=%inner_cond, body=%inner_body
}

%loop_call (t.4: (s32[], f32[2])) -> (s32[], f32[2]) {
  %t.4 = (s32[], f32[2]{0}) parameter(0)
  ROOT %outer = (s32[], f32[2]{0}) while(%t.4), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
}

%small (x.5: f32[2]) -> f32[2] {
  %x.5 = f32[2]{0} parameter(0)
  ROOT %n.5 = f32[2]{0} negate(%x.5)
}

%large (x.6: f32[2]) -> f32[2] {
  %x.6 = f32[2]{0} parameter(0)
  %n.6 = f32[2]{0} negate(%x.6)
  ROOT %e.6 = f32[2]{0} exponential(%n.6)
}

ENTRY %main (x: f32[2], q: pred[]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  %q = pred[] parameter(1)
  %z = s32[] constant(0)
  %cx = f32[2]{0} copy(%x)
  %tup = (s32[], f32[2]{0}) tuple(%z, %cx)
  %call = (s32[], f32[2]{0}) call(%tup), to_apply=%loop_call
  %out = f32[2]{0} get-tuple-element(%call), index=1
  %f = f32[2]{0} fusion(%out), kind=kLoop, calls=%fused
  %bc = f32[2]{0} bitcast(%f)
  ROOT %cond = f32[2]{0} conditional(%q, %bc, %bc), true_computation=%small, false_computation=%large
}
"""


def _inner_total(trips):
  return trips * (1 + 1) + 1  # trips · (condition + body) + condition


def test_hand_written_module_counts_by_the_rules():
  for trips, inner_trips, source in ((None, 1, "assumed_once"),
                                     (4, 4, "given"),
                                     ({"inner": 6}, 6, "given")):
    ops = solver_cost.count_hlo(_MODULE, trips=trips)
    outer_per_trip = 1 + (2 + _inner_total(inner_trips))
    assert ops["outside_loops"] == 2 + 2  # copy, fusion; the larger branch
    assert ops["total"] == 4 + 3 * outer_per_trip + 1
    assert ops["per_trip"] == {"outer": outer_per_trip, "inner": 2}
    loops = {loop["name"]: loop for loop in ops["loops"]}
    assert loops["outer"]["trip_source"] == "known"
    assert loops["outer"]["trips"] == 3
    assert loops["inner"]["trips"] == inner_trips
    assert loops["inner"]["trip_source"] == source
    assert loops["inner"]["depth"] == 1
    assert ops["assumed_once"] == (["inner"] if trips is None else [])


def test_tuple_shaped_instruction_opcodes_are_read():
  assert solver_cost._opcode(
      " ((s32[], f32[2]{0}), pred[]) while(%t), condition=%c") == "while"
  assert solver_cost._opcode(" f32[3,3]{1,0} custom-call(%a)") == "custom-call"
  with pytest.raises(ValueError, match="opcode"):
    solver_cost._opcode(" f32[2] ")


def test_module_without_entry_is_refused():
  with pytest.raises(ValueError, match="ENTRY"):
    solver_cost.count_hlo("HloModule m\n")


def _fori(n):
  def f(x):
    return jax.lax.fori_loop(0, n, lambda i, y: jnp.sin(y) @ y, x)
  return f


def test_fori_loop_known_trip_count_scales_the_body():
  x = jnp.ones((3, 3))
  five = solver_cost.sequential_ops(_fori(5), x)
  eight = solver_cost.sequential_ops(_fori(8), x)
  (loop,) = five["loops"]
  assert loop["trip_source"] == "known" and loop["trips"] == 5
  # sin and dot at least, in the body; the compare in the condition.
  assert loop["body"] >= 2 and loop["condition"] >= 1
  assert eight["total"] - five["total"] == 3 * loop["per_trip"]
  assert five["outside_loops"] == eight["outside_loops"]
  assert five["total"] == five["outside_loops"] + loop["total"]
  assert not five["assumed_once"]


def _while(x, n):
  def body(carry):
    i, y = carry
    return i + 1, jnp.cos(y) @ y
  return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]


def test_while_loop_uses_the_given_trips_or_counts_once():
  args = (jnp.ones((3, 3)), 4)
  once = solver_cost.sequential_ops(_while, *args)
  given = solver_cost.sequential_ops(_while, *args, trips=4)
  (loop,) = once["loops"]
  assert once["assumed_once"] == [loop["name"]]
  assert loop["trips"] == 1
  assert given["loops"][0]["trip_source"] == "given"
  assert given["total"] - once["total"] == 3 * loop["per_trip"]
  by_name = solver_cost.sequential_ops(_while, *args,
                                       trips={loop["name"]: 4})
  assert by_name["total"] == given["total"]


def test_nested_loops_multiply():
  def f(x):
    def outer(i, y):
      return jax.lax.fori_loop(0, 4, lambda j, z: jnp.sin(z) @ z, y) * 2.0
    return jax.lax.fori_loop(0, 3, outer, x)

  ops = solver_cost.sequential_ops(f, jnp.ones((3, 3)))
  loops = sorted(ops["loops"], key=lambda loop: loop["depth"])
  assert [loop["trips"] for loop in loops] == [3, 4]
  outer, inner = loops
  assert inner["depth"] == 1
  assert inner["total"] == 4 * inner["per_trip"] + inner["condition"]
  # The outer body holds the inner loop's whole run, three times.
  assert outer["body"] >= inner["total"] + 1
  assert outer["total"] == 3 * outer["per_trip"] + outer["condition"]
  assert ops["total"] == ops["outside_loops"] + outer["total"]


def test_loops_inside_a_loop_that_runs_no_trip_are_not_run():
  def f(x, n):
    def body(carry):
      inner = jax.lax.while_loop(lambda c: c[0] < n,
                                 lambda c: (c[0] + 1, jnp.sin(c[1])),
                                 (0, carry[1]))[1]
      return False, inner
    return jax.lax.while_loop(lambda c: c[0], body, (n > 5, x))[1]

  ops = solver_cost.sequential_ops(f, jnp.ones(3), 3, trips="measured")
  outer, inner = sorted(ops["loops"], key=lambda loop: loop["depth"])
  assert (outer["trips"], outer["trip_source"]) == (0, "measured")
  assert (inner["trips"], inner["trip_source"]) == (0, "not run")
  assert ops["assumed_once"] == []
  assert ops["total"] == ops["outside_loops"] + outer["condition"]


def test_conditional_counts_its_larger_branch():
  def f(x, q):
    return jax.lax.cond(q, lambda y: -y,
                        lambda y: jnp.exp(jnp.sin(y) @ y) @ y, x)

  ops = solver_cost.sequential_ops(f, jnp.ones((3, 3)), True)
  cheap = solver_cost.sequential_ops(lambda x: -x, jnp.ones((3, 3)))
  assert ops["total"] >= cheap["total"] + 2  # two dots at least


# A model small enough to compile and train in a few seconds.
_TINY_MODEL = {"input_dim": 4, "hidden": 8, "depth": 1, "batch_size": 8}


def test_trips_per_step_cold_and_warm_agree_on_the_first_step():
  out = solver_cost.trips_per_step(
      "mgda", 3, {"steps": 3, "first_step": 1, "model_config": _TINY_MODEL})
  gramian, losses, _ = out["median_step"]["inputs"]["warm"]
  assert gramian.shape == (3, 3) and losses.shape == (3,)
  for key in ("warm", "cold"):
    index = out["median_step"]["index"][key]
    assert index in (1, 2)
    assert abs(out[key][index] - out[f"{key}_stats"]["median"]) == min(
        abs(trips - out[f"{key}_stats"]["median"]) for trips in out[key][1:])
  assert len(out["warm"]) == len(out["cold"]) == 3
  # The first step starts from init: warm and cold are the same solve.
  assert out["warm"][0] == out["cold"][0] >= 1
  assert all(isinstance(trips, int) and trips >= 0
             for trips in out["warm"] + out["cold"])
  assert out["warm_stats"]["max"] == max(out["warm"][1:])


def test_loop_trips_are_measured_and_matched_to_the_program():
  def f(x, n):
    inner = jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1,
                                                              c[1] * 2.0),
                               (0, x))[1]
    return jax.lax.while_loop(lambda c: c[0] < 2 * n,
                              lambda c: (c[0] + 1, jnp.sin(c[1])),
                              (0, inner))[1]

  records = solver_cost.loop_trips(f, jnp.ones(3), 3)
  assert [record["trips"] for record in records] == [3, 6]
  assert records[0]["stack"][0][0] == "test_solver_cost.py"
  ops = solver_cost.sequential_ops(f, jnp.ones(3), 3, trips="measured")
  assert sorted(loop["trips"] for loop in ops["loops"]) == [3, 6]
  assert {loop["trip_source"] for loop in ops["loops"]} == {"measured"}
  given = solver_cost.sequential_ops(f, jnp.ones(3), 3, trips={
      loop["name"]: loop["trips"] for loop in ops["loops"]})
  assert given["total"] == ops["total"]
  with pytest.raises(ValueError, match="trips"):
    solver_cost.sequential_ops(f, jnp.ones(3), 3, trips="median")


def test_solver_ops_of_a_strategy_count_its_loop_trips():
  strategy = solver_cost.strategies_lib.make("mgda", 3)
  gramian = jnp.array([[2.0, -1.0, 0.5], [-1.0, 3.0, 0.0], [0.5, 0.0, 1.0]])
  state = strategy.init(solver_cost._PARAMS)
  ops = solver_cost.solver_ops("mgda", 3, {
      "cold": (gramian, jnp.ones(3), state)})
  (loop,) = ops["loops"]
  assert ops["unmatched_loops"] == 0
  assert loop["trips_cold"] >= 1
  assert ops["total_cold"] > ops["outside_loops"] + loop["trips_cold"]


def _entry(warm, ops):
  return {"warm": {"median": warm, "p95": warm}, "cold": {"median": 5,
                                                          "p95": 6},
          "ops": {"outside_loops": 10, "total_warm": ops, "total_cold": 90,
                  "loops": [{"trips_warm": warm, "trips_cold": 5}],
                  "unmatched_loops": 0, "step": {"warm": 20, "cold": 21}}}


def test_table_and_compare_show_before_after_and_ratio():
  before = {"strategies": {"upgrad": {"40": _entry(4, 400)}}}
  after = {"strategies": {"upgrad": {"40": _entry(1, 80)},
                          "mgda": {"40": _entry(1, 50)}}}
  assert ("| upgrad | 40 | 5 / 6 | 4 / 4 | 10 | 400 (4; step 20) | "
          "90 (5; step 21) |") in (
      solver_cost.table(before))
  text = solver_cost.compare(before, after)
  assert "400 / 80 (0.20)" in text and "4 / 1 (0.25)" in text
  assert "| mgda | 40 | – / 1 |" in text


def test_command_line_writes_json_and_compares(tmp_path, monkeypatch,
                                               capsys):
  result = {"config": {}, "strategies": {"upgrad": {"40": _entry(2, 200)}}}
  monkeypatch.setattr(solver_cost, "run", lambda *args, **kwargs: result)
  before = tmp_path / "before.json"
  before.write_text(json.dumps(
      {"strategies": {"upgrad": {"40": _entry(4, 400)}}}))
  out = tmp_path / "after.json"
  assert solver_cost.main(["--tasks", "40", "--out", str(out),
                           "--compare", str(before)]) == 0
  assert json.loads(out.read_text())["strategies"]["upgrad"]["40"]["ops"][
      "total_warm"] == 200
  assert "400 / 200 (0.50)" in capsys.readouterr().out


def test_device_check_refuses_without_an_accelerator(tmp_path, monkeypatch):
  from benchmarks import __main__ as cli  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(solver_cost, "has_accelerator", lambda: False)
  with pytest.raises(SystemExit, match="no GPU or TPU found"):
    cli.main(["--device-check", str(tmp_path / "device")])
  assert not (tmp_path / "device").exists()


def test_device_check_skips_what_does_not_fit(tmp_path, monkeypatch):
  monkeypatch.setitem(solver_cost.DEVICE_CHECK, "budget_seconds", 0.0)
  summary = solver_cost.device_check(str(tmp_path), allow_cpu=True)
  assert [part["part"] for part in summary["parts"]] == [
      "speed mlp T=2", "speed mlp T=10", "speed mlp T=40", "speed conv T=2",
      "speed conv T=10", "trips and op counts", "device tests"]
  assert all("skipped" in part for part in summary["parts"])
  device = json.loads((tmp_path / "device.json").read_text())
  assert device["backend"] == "cpu" and device["device_kind"]
  assert json.loads((tmp_path / "summary.json").read_text())["parts"]


def test_device_check_dry_run_on_cpu(tmp_path, monkeypatch):
  from benchmarks import __main__ as cli  # pylint: disable=import-outside-toplevel
  tiny = dict(_TINY_MODEL, num_batches=2, rounds=1, target_seconds=0.001)
  monkeypatch.setattr(solver_cost, "gramian_strategies", lambda t: ["mgda"])
  for key, value in (("speed", (("mlp", 2),)), ("speed_config", tiny),
                     ("trips_tasks", (3,)), ("trips_strategies", ("mgda",)),
                     ("trips_config", {"steps": 2, "first_step": 1,
                                       "model_config": _TINY_MODEL}),
                     ("tests", ())):
    monkeypatch.setitem(solver_cost.DEVICE_CHECK, key, value)
  assert cli.main(["--device-check", str(tmp_path), "--allow-cpu"]) == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [part["part"] for part in summary["parts"]] == [
      "speed mlp T=2", "trips and op counts"]
  speed = json.loads((tmp_path / "results.json").read_text())["speed"]
  assert "mgda" in speed["mlp"]["strategies"]
  assert "jacobian" in speed["mlp"]["baselines"]["2"]
  trips = json.loads((tmp_path / "solver_cost.json").read_text())
  assert trips["strategies"]["mgda"]["3"]["ops"]["total_warm"] > 0
  assert (tmp_path / "report.md").exists()
