"""Test-session settings: the property tests' nightly seed (see tests/test_properties.py), the result cache
(`surgeon_fx.cache`) in a temporary folder rather than ~/.cache, and an installed torchvision imported before any
test imports transformers (`tests.coverage_archs.import_torchvision` says why)."""
import os
import secrets

import pytest

import tests.coverage_archs  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SURGEON_CACHE", str(tmp_path_factory.mktemp("surgeon-cache")))
        yield


def pytest_configure(config):
    """Resolve ``SURGEON_SEED=random`` to a concrete seed once, before the test modules read it."""
    if os.environ.get("SURGEON_SEED") == "random":
        os.environ["SURGEON_SEED"] = str(secrets.randbelow(2**32))


def _seed_line() -> str | None:
    seed = os.environ.get("SURGEON_SEED")
    return None if seed is None else (f"property tests: SURGEON_SEED={seed} (replay: SURGEON_SEED={seed} "
                                      f"SURGEON_EXAMPLES={os.environ.get('SURGEON_EXAMPLES', '200')} "
                                      f"pytest tests/test_properties.py)")


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter):
    if _seed_line():
        terminalreporter.write_line(_seed_line())
