"""Test-wide settings: the result cache (`surgeon_fx.cache`) lives in a temporary folder, not ~/.cache."""
import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SURGEON_CACHE", str(tmp_path_factory.mktemp("surgeon-cache")))
        yield
