"""Set rules for ATen ops, one module per op family. Importing this package registers them."""

from pipeline.maps.propagate.rules import (  # noqa: F401
    conv,
    embedding,
    indexing,
    linalg,
    movement,
    norm,
    pointwise,
    reduce,
)
