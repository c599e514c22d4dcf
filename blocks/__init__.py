"""fitnas blocks: efficient CNN blocks, the architecture spec, builder, cost model and
exports. Depends on torch and pydantic only."""

from blocks.builder import build_model
from blocks.load import SpecLoadError, load_spec, parse_spec
from blocks.presets import PRESETS, preset
from blocks.shapes import SpecError, resolve
from blocks.spec import SCHEMA_VERSION, ArchSpec

__all__ = [
    "PRESETS",
    "SCHEMA_VERSION",
    "ArchSpec",
    "SpecError",
    "SpecLoadError",
    "build_model",
    "load_spec",
    "parse_spec",
    "preset",
    "resolve",
]
