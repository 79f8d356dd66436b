"""The package's public API: every advertised name resolves, the docstring's example runs, and
`import umarvel` stays light."""

from __future__ import annotations

import doctest
import subprocess
import sys

import umarvel


def test_every_public_name_resolves_to_an_object_defined_in_umarvel() -> None:
    for name in umarvel.__all__:
        value = getattr(umarvel, name)
        assert name == "__version__" or value.__module__.startswith("umarvel."), name


def test_the_usage_example_in_the_package_docstring_runs() -> None:
    result = doctest.testmod(umarvel, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


def test_importing_the_package_loads_neither_torch_nor_transformers() -> None:
    code = "import sys, umarvel; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
