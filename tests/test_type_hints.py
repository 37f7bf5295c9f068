"""Every public callable of the package's user-facing modules has type hints on each of its
parameters and on its return (``autodoc_typehints = "description"`` renders them in the API
docs): functions, classes' ``__init__`` and their public methods and properties.
"""

import importlib
import inspect

import pytest

#: the modules whose ``__all__`` is the public API
MODULES = [
    "pyro_mpt",
    "pyro_mpt.reference",
    "pyro_mpt.export",
    "pyro_mpt.plotting",
    "pyro_mpt.evaluator",
    "pyro_mpt.mlm",
]


def _own_callables(cls):
    """``(name, function)`` for a class's ``__init__`` (if it defines one) and its public
    methods and property getters defined in the class itself (inherited ones belong to the
    base class, e.g. ``torch.nn.Module``)."""
    for name, attr in vars(cls).items():
        if name != "__init__" and name.startswith("_"):
            continue
        if isinstance(attr, property):
            attr = attr.fget
        elif isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if inspect.isfunction(attr):
            yield f"{cls.__name__}.{name}", attr


def _public_callables():
    seen = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                if not obj.__module__.startswith("pyro_mpt"):
                    continue
                items = list(_own_callables(obj))
            elif inspect.isfunction(obj):
                items = [(name, obj)]
            else:  # constants and registries
                continue
            for label, fn in items:
                key = (fn.__module__, fn.__qualname__)
                if key not in seen:
                    seen.add(key)
                    yield f"{fn.__module__}.{fn.__qualname__}", fn


def missing_hints(fn):
    """The parameters of ``fn`` without an annotation, and ``"return"`` if it has none.
    ``self`` and ``cls`` need none; dataclass-generated ``__init__`` are annotated by their
    fields."""
    signature = inspect.signature(fn)
    missing = [
        p.name
        for i, p in enumerate(signature.parameters.values())
        if p.annotation is inspect.Parameter.empty and not (i == 0 and p.name in ("self", "cls"))
    ]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


CALLABLES = dict(_public_callables())


def test_public_api_is_large_enough_to_mean_something():
    # the package's own entry points are among the checked callables
    for name in [
        "pyro_mpt.masked_elbo.MaskedELBO.__init__",
        "pyro_mpt.curve.mpt_curve",
        "pyro_mpt.reference.log_marginal_likelihood",
    ]:
        assert name in CALLABLES, sorted(CALLABLES)
    assert len(CALLABLES) > 50


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_public_callable_has_type_hints(name):
    missing = missing_hints(CALLABLES[name])
    assert not missing, f"{name}: no type hint for {missing}"


def test_missing_hints_detects_an_unannotated_function():
    def f(self, x: int, y, *args, **kwargs: float):
        return x

    def g(x: int, *args: str) -> int:
        return x

    assert missing_hints(f) == ["y", "args", "return"]
    assert missing_hints(g) == []
