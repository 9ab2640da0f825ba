"""Tests of the strategy discovery shared by the tests (strategy_cases.py)."""

import inspect

import pytest

import optax_mtl
from tests import strategy_cases


def test_finds_the_template_strategies_and_nothing_else():
  names = strategy_cases.names()
  assert "equal" in names and "normalized_gradients" in names
  assert len(set(names)) == len(names)
  for name in ("value_and_grad", "diagnostics", "gramian", "cosine_matrix"):
    assert name not in names


def test_every_public_factory_returning_a_strategy_is_found():
  names = set(strategy_cases.names())
  for name in optax_mtl.__all__:
    function = getattr(optax_mtl, name)
    if (inspect.isfunction(function) and "MultiTaskStrategy" in str(
        inspect.signature(function).return_annotation)
        and "num_tasks" in inspect.signature(function).parameters):
      assert name in names, name


def test_factories_accept_num_tasks_and_overrides():
  for name, factory in strategy_cases.strategy_cases():
    strategy = factory(num_tasks=2)
    assert isinstance(strategy, optax_mtl.MultiTaskStrategy), name
    assert optax_mtl.weighting_of(strategy).num_tasks == 2, name
  equal = strategy_cases.factory_of("equal")
  assert float(equal(mean=True).init(None).weights[0]) == pytest.approx(1 / 3)


def test_a_required_argument_without_a_value_fails_loudly(monkeypatch):

  def needs_mystery(num_tasks, mystery) -> optax_mtl.MultiTaskStrategy:
    del mystery
    return optax_mtl.equal(num_tasks)

  monkeypatch.setattr(optax_mtl, "needs_mystery", needs_mystery, raising=False)
  monkeypatch.setattr(optax_mtl, "__all__",
                      tuple(optax_mtl.__all__) + ("needs_mystery",))
  with pytest.raises(ValueError, match="mystery"):
    list(strategy_cases.strategy_cases())
