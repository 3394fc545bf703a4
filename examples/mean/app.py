"""mean: the arithmetic mean of a list of numbers, taking and returning Python values via serdio.

``cape_serdio.py`` is a copy of Cape's ``cape.serdio`` module (``cape function create --serdio``
makes the same copy); it needs ``msgpack``, which ``cape deploy`` vendors from
``requirements.txt``. Call it with ``cape.run(fn, None, [1.0, 2.0, 4.5], use_serdio=True)``.
"""

import math

from cape_serdio import lift_io


@lift_io
def mean(values: list[float]) -> float:
    """The mean of ``values``, summed exactly (``math.fsum``) so that order does not matter."""
    if not isinstance(values, list | tuple):
        raise TypeError(f"mean takes a list of numbers, not {type(values).__name__}")
    if not values:
        raise ValueError("mean of an empty list")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"mean takes a list of numbers; {value!r} is not a number")
    return math.fsum(values) / len(values)


cape_handler = mean.as_cape_handler()
