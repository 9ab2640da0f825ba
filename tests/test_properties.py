"""The properties of tests/properties.py, over the table of tests/strategies.py.

Three properties hold for every strategy; the others run on the strategies
whose case declares them.
"""

import pytest

from tests import properties
from tests import strategies

CASES = [(name, prop) for name in strategies.NAMES
         for prop in properties.EVERY_STRATEGY]
CASES += [(name, prop) for prop in properties.DECLARED
          for name in strategies.names_with(prop)]


@pytest.mark.parametrize("name, prop", sorted(CASES))
def test_property(name, prop):
  checks = {**properties.EVERY_STRATEGY, **properties.DECLARED}
  checks[prop](name)


def test_every_declared_property_has_a_strategy():
  """A property that no strategy declares would silently test nothing."""
  for prop in properties.DECLARED:
    assert strategies.names_with(prop), prop


def test_stochastic_strategies_are_not_declared_permutation_equivariant():
  for name in strategies.names_with("stochastic"):
    assert not strategies.STRATEGIES[name].permutation_equivariant, name
