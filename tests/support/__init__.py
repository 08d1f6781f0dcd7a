"""Plain helpers the test modules share: fakes standing in for a SuT or a keeper, and small
functions that drive them. No tests and no fixtures live here (fixtures go in the conftest.py
of the narrowest folder that uses them); test modules import these as `tests.support.<module>`
(pyproject puts the repository root on sys.path for pytest)."""

import pkgutil

import pytest

# Their asserts explain themselves on failure as a test module's do: pytest rewrites the asserts
# of modules registered before they are imported (each module here, not yet imported now).
pytest.register_assert_rewrite(*(f"{__name__}.{module.name}" for module in pkgutil.iter_modules(__path__)))
