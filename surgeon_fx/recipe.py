"""What a user chooses for one compilation: a typed `Recipe`, loadable from TOML, overridable key by key.

A recipe file is flat TOML whose keys are the `Recipe` fields (``-`` and ``_`` are the same), e.g.::

    structure = "structured"
    target = 0.8          # fraction of prunable parameters kept
    method = "surgeon"
    shots = 5
    calib_windows = 32
    calib_length = 256

Precedence: the dataclass defaults, then the recipe file, then options given on the command line
(`Recipe.merged`).  `Recipe.check()` validates every field on its own; the method × structure × options
combination is validated by `surgeon_fx.methods.resolve`, structure and target by `surgeon_fx.structure`.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from surgeon_fx.passes.surgeon import NM_SELECTS, UPDATES
from surgeon_fx.structure import Structure, StructureError

FISHERS = ("empirical", "sampled")


class RecipeError(ValueError):
    """A recipe value (from a file, an option or the Python API) that cannot be used."""


def checked_value(key: str, want: str, value, origin: str):
    """`value` for the field `key` annotated `want` ("float", "int | None", ...): an int where a float is wanted
    becomes a float; a wrong type (bools are not numbers) or a non-finite float is a RecipeError."""
    base = want.split(" |")[0]
    if value is None and "None" in want:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base == "float" and number:
        if not math.isfinite(value):
            raise RecipeError(f"{origin}: {key} must be a finite number, got {value}")
        return float(value)
    if (base == "int" and number and isinstance(value, int)) or (base == "str" and isinstance(value, str)) or \
            (base == "bool" and isinstance(value, bool)):
        return value
    raise RecipeError(f"{origin}: {key} must be {base}, got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """One compilation's choices.  `target` is the fraction of *prunable* parameters kept (N:M: n/m);
    `structure` is given by name and held as a `Structure`."""

    structure: Structure | str = "structured"
    target: float = 0.8
    method: str = "surgeon"
    shots: int = 5
    fisher: str = "empirical"
    fisher_approx: str = "kfac"
    calib_windows: int = 32
    calib_length: int = 256
    calib_file: str | None = None
    eval_windows: int | None = None
    eval_file: str | None = None
    eval_length: int = 2048
    batch_size: int = 1
    seed: int = 0
    device: str = "cpu"
    round_to: int = 1
    update: str = "consumer"
    lora_rank: int = 0
    lora_steps: int = 20
    nm_select: str = "sequential"
    damp_a: float = 0.01
    damp_g: float | None = None
    offload_dir: str | None = None
    offload_model: bool = False
    factor_memory: float | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "structure", Structure.parse(self.structure))
        except StructureError as err:
            raise RecipeError(str(err)) from None
        for f in fields(self):
            if f.name != "structure":
                object.__setattr__(self, f.name, checked_value(f.name, f.type, getattr(self, f.name), "recipe"))

    def to_dict(self) -> dict:
        """The recipe as plain data (the structure by name), as reports and manifests record it."""
        return {**asdict(self), "structure": str(self.structure)}

    @classmethod
    def from_toml(cls, path: str | Path) -> "Recipe":
        """Read a flat TOML recipe; unknown keys and wrong types are errors naming the key."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError(f"recipe {path} does not exist") from None
        except IsADirectoryError:
            raise RecipeError(f"recipe {path} is a folder, not a TOML file") from None
        except UnicodeDecodeError:
            raise RecipeError(f"recipe {path} is not UTF-8 text") from None
        except OSError as err:
            raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}") from None
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"recipe {path} is not valid TOML: {err}") from None
        return cls().merged({k.replace("-", "_"): v for k, v in data.items()}, origin=f"recipe {path}")

    def merged(self, values: dict, origin: str = "option") -> "Recipe":
        """A copy with `values` (field name -> value; None = not given) applied after type checks."""
        types = {f.name: f.type for f in fields(self)}
        given = {k: v for k, v in values.items() if v is not None}
        for key in given:
            if key not in types:
                raise RecipeError(f"{origin}: unknown key {key!r} (known: {', '.join(sorted(types))})")
        return replace(self, **{k: v if k == "structure" else checked_value(k, types[k], v, origin)
                                for k, v in given.items()})

    def check(self) -> None:
        """Validate the recipe on its own (no model needed); raises RecipeError with one clear line."""
        try:
            self.structure.check_target(self.target)
        except StructureError as err:
            raise RecipeError(str(err)) from None
        if self.update not in UPDATES:
            raise RecipeError(f"update must be one of {', '.join(UPDATES)}, not {self.update!r}")
        if self.nm_select not in NM_SELECTS:
            raise RecipeError(f"nm_select must be one of {', '.join(NM_SELECTS)}, not {self.nm_select!r}")
        if self.fisher not in FISHERS:
            raise RecipeError(f"fisher must be one of {', '.join(FISHERS)}, not {self.fisher!r}")
        if self.fisher_approx not in ("kfac", "nearest"):
            raise RecipeError(f"fisher_approx must be kfac or nearest, not {self.fisher_approx!r}")
        positive = {"shots": self.shots, "calib_windows": self.calib_windows, "batch_size": self.batch_size,
                    "round_to": self.round_to, "lora_steps": self.lora_steps}
        for key, value in positive.items():
            if value < 1:
                raise RecipeError(f"{key} must be at least 1, got {value}")
        for key, value in {"calib_length": self.calib_length, "eval_length": self.eval_length}.items():
            if value < 2:
                raise RecipeError(f"{key} must be at least 2 tokens, got {value}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise RecipeError(f"eval_windows must be at least 1 (leave it out to evaluate on every window), "
                              f"got {self.eval_windows}")
        if self.factor_memory is not None and self.factor_memory <= 0:
            raise RecipeError(f"factor_memory must be a positive number of GiB, got {self.factor_memory:g}")
        if self.lora_rank < 0:
            raise RecipeError(f"lora_rank must be 0 (off) or positive, got {self.lora_rank}")
        for key, value in {"damp_a": self.damp_a, "damp_g": self.damp_g}.items():
            if value is not None and value <= 0:
                raise RecipeError(f"{key} (damping) must be positive, got {value:g}")
