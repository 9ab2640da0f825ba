"""Old names that keep working for one release, with a ``DeprecationWarning``.

The one mechanism behind every renamed public name, argument and state field
of optax_mtl 0.2 (the table is in ``docs/guides/api_rules.md`` and the
README's migration section):

* :func:`renamed_arguments` lets a factory accept an argument under its old
  name (and an argument that became keyword-only at its old position);
* :func:`module_getattr` serves a renamed public name of a module;
* :func:`renamed_field` serves a renamed NamedTuple state field for reading.

Each warns once per call site with a message that names the new spelling.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, Mapping, Sequence


def warn(old: str, new: str, *, stacklevel: int = 3) -> None:
  """Warns that ``old`` is deprecated in favour of ``new``."""
  warnings.warn(
      f"{old} is deprecated and will be removed in optax_mtl 0.3: use {new}.",
      DeprecationWarning, stacklevel=stacklevel)


def renamed_arguments(
    renames: Mapping[str, str] | None = None,
    *,
    old_positional: Sequence[str] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Lets ``factory`` take its arguments' old names and old positions.

  Args:
    renames: ``{old_name: new_name}``. An old name passed as a keyword is
      read as the new one, with a ``DeprecationWarning``; both at once is a
      ``ValueError``.
    old_positional: the names (new spelling) of the parameters in the order
      the old signature took them positionally. Positional arguments beyond
      what the new signature takes positionally are bound by this order,
      with a ``DeprecationWarning`` that names the keyword to use.

  Returns:
    A decorator; the wrapped factory keeps the new signature
    (``inspect.signature``) and docstring.

  Examples:
    >>> import warnings
    >>> @renamed_arguments({"lamda": "lam"}, old_positional=("lam", "seed"))
    ... def factory(lam=0.3, *, seed=0):
    ...   return lam, seed
    >>> with warnings.catch_warnings():
    ...   warnings.simplefilter("ignore")
    ...   factory(lamda=0.5), factory(0.5, 7)
    ((0.5, 0), (0.5, 7))
  """
  renames = dict(renames or {})

  def decorate(factory):
    signature = inspect.signature(factory)
    name = factory.__name__
    positional = [
        p.name for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for old_name in old_positional:
      if old_name not in signature.parameters:
        raise TypeError(f"{name} has no parameter {old_name!r}.")

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
      if len(args) > len(positional) and old_positional:
        extra = args[len(positional):]
        names = list(old_positional)[len(positional):]
        if len(extra) > len(names):
          raise TypeError(
              f"{name}() takes {len(positional)} positional arguments, got "
              f"{len(args)}.")
        for arg_name, value in zip(names, extra):
          if arg_name in kwargs:
            raise TypeError(
                f"{name}() got multiple values for argument {arg_name!r}.")
          warn(f"passing {arg_name} of optax_mtl.{name} by position",
               f"{arg_name}={value!r}")
          kwargs[arg_name] = value
        args = args[:len(positional)]
      for old_name, new_name in renames.items():
        if old_name in kwargs:
          if new_name in kwargs:
            raise ValueError(
                f"{name}: {old_name} is the deprecated name of {new_name}; "
                f"pass only {new_name}, got both.")
          warn(f"the argument {old_name} of optax_mtl.{name}", new_name)
          kwargs[new_name] = kwargs.pop(old_name)
      return factory(*args, **kwargs)

    wrapper.__signature__ = signature
    return wrapper

  return decorate


def module_getattr(
    module_name: str, renamed: Mapping[str, tuple[str, Any]]
) -> Callable[[str], Any]:
  """A module ``__getattr__`` that serves renamed names with a warning.

  Args:
    module_name: the module's public name, for the message.
    renamed: ``{old_name: (new_name, object)}``.
  """

  def __getattr__(name: str) -> Any:
    if name in renamed:
      new_name, value = renamed[name]
      warn(f"{module_name}.{name}", f"{module_name}.{new_name}")
      return value
    raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

  return __getattr__


class renamed_field:  # pylint: disable=invalid-name
  """A read-only attribute that serves a NamedTuple field's old name.

  Use as a class attribute of the state: ``old_name = renamed_field("new")``.
  Reading ``state.old_name`` warns and returns ``state.new``; the field
  itself (``_fields``, ``_replace``, checkpoints) has only the new name.

  Examples:
    >>> import warnings
    >>> from typing import NamedTuple
    >>> class State(NamedTuple):
    ...   num_steps: int
    ...   num_updates = renamed_field("num_steps")
    >>> with warnings.catch_warnings():
    ...   warnings.simplefilter("ignore")
    ...   State(num_steps=3).num_updates
    3
  """

  def __init__(self, new_name: str):
    self.new_name = new_name
    self.old_name = None

  def __set_name__(self, owner, name):
    self.old_name = name

  def __get__(self, instance, owner=None):
    if instance is None:
      return self
    kind = type(instance).__name__
    warn(f"the state field {kind}.{self._old_name(type(instance))}",
         f"{kind}.{self.new_name}")
    return getattr(instance, self.new_name)

  def _old_name(self, owner):
    # typing.NamedTuple copies a class attribute onto the tuple class
    # without __set_name__ before Python 3.12: find the name it is under.
    if self.old_name is None:
      self.old_name = next(
          name for klass in owner.__mro__
          for name, value in vars(klass).items() if value is self)
    return self.old_name
