"""Feature schemas: named inputs, vocabularies, outputs and their atoms."""

from pipeline.schema.features import (
    Atom,
    FeatureSchema,
    InputSpec,
    OutputSpec,
    SchemaError,
    parse_schema,
)

__all__ = ["Atom", "FeatureSchema", "InputSpec", "OutputSpec", "SchemaError", "parse_schema"]
