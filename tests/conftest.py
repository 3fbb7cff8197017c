"""Session setup: an installed torchvision must import before any test imports transformers
(`tests.coverage_archs.import_torchvision` explains why)."""
import tests.coverage_archs  # noqa: F401
