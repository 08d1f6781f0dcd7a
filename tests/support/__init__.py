"""Plain helpers the test modules share: fakes standing in for a SuT or a keeper, and small
functions that drive them. No tests and no fixtures live here (fixtures go in the conftest.py
of the narrowest folder that uses them); test modules import these as `tests.support.<module>`
(pyproject puts the repository root on sys.path for pytest)."""
