"""The on-disk schema of a run: Arrow types for the sample and step tables, and the manifest's version."""

from __future__ import annotations

import numpy as np

try:
    import pyarrow as pa
except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
    raise ImportError("the gradient-statistics cache needs pyarrow: pip install pyarrow") from exc

# Bump when a column changes meaning or type; readers refuse newer versions and migrate older ones.
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = "writer.lock"

_TASK = pa.dictionary(pa.int8(), pa.string())  # a handful of task names repeated on every row
SAMPLE_TYPES = {
    "epoch": pa.int32(), "step": pa.int32(), "task": _TASK, "sample_id": pa.int64(),
    "label": pa.float32(), "clean_label": pa.float32(), "noisy": pa.bool_(), "present": pa.bool_(),
    "pred": pa.float32(), "p_label": pa.float32(), "margin": pa.float32(), "loss": pa.float32(),
    "sgs": pa.float32(), "sgs_batch": pa.float32(), "sgs_class": pa.float32(), "grad_norm": pa.float32(),
    "weight": pa.float32(), "conflict": pa.float32(),
}  # fmt: skip
STEP_TYPES = {
    "epoch": pa.int32(), "step": pa.int32(), "task": _TASK, "task_weight": pa.float32(), "loss": pa.float32(),
    "consistency": pa.float32(),
}  # fmt: skip
# Statistics that may be stored as float16 (labels, predictions and ids keep their exact types).
STATISTICS = ("p_label", "margin", "loss", "sgs", "sgs_batch", "sgs_class", "grad_norm", "weight", "conflict")
TABLES = {"samples": SAMPLE_TYPES, "steps": STEP_TYPES}


def table_schema(kind: str, float16: bool = False) -> pa.Schema:
    types = dict(TABLES[kind])
    if float16 and kind == "samples":
        types.update({name: pa.float16() for name in STATISTICS})
    return pa.schema([pa.field(name, kind_) for name, kind_ in types.items()])


def to_table(columns: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Arrow table of ``columns`` cast to ``schema``; extra columns are kept with their own types."""
    missing = [name for name in schema.names if name not in columns]
    if missing:
        raise ValueError(f"records lack the column(s) {missing}; a run stores at least {schema.names}")
    arrays, fields = [], []
    for field in schema:
        values = columns[field.name]
        if pa.types.is_dictionary(field.type):
            array = pa.array(np.asarray(values, dtype=object), type=pa.string()).dictionary_encode()
            array = array.cast(field.type)
        else:
            # floats narrow freely (that is the point of float32/float16); integers must fit exactly
            safe = not pa.types.is_floating(field.type)
            array = pa.array(np.asarray(values), from_pandas=True).cast(field.type, safe=safe)
        arrays.append(array)
        fields.append(field)
    for name in columns.keys() - set(schema.names):  # extra columns a caller records
        array = pa.array(np.asarray(columns[name]))
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
