"""Parameters of the reference models: fixed when a tensor is given, else a ``pyro.param``."""

import pyro
import pyro.distributions as dist


def param_or_fixed(name, value, init):
    """A fixed tensor if one is given, else a ``pyro.param`` initialised lazily by ``init``."""
    if value is not None:
        return value
    return pyro.param(name, init)


def positive_param_or_fixed(name, value, init):
    if value is not None:
        return value
    return pyro.param(name, init, constraint=dist.constraints.positive)
