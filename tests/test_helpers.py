"""The shared test helpers behave as the suite relies on."""

import pytest
from tests.conftest import import_optional


def test_a_missing_extra_skips_locally_and_fails_on_ci(monkeypatch):
  monkeypatch.delenv('CI', raising=False)
  with pytest.raises(pytest.skip.Exception):
    import_optional('no_such_module_hvit')
  monkeypatch.setenv('CI', '1')
  with pytest.raises(ModuleNotFoundError):
    import_optional('no_such_module_hvit')
  assert import_optional('json').dumps([1]) == '[1]'
