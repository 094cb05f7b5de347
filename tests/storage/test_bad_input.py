"""Malformed, hostile and empty inputs: each error's text is pinned, and a failed copy leaves nothing."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pipeline.storage import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    EmptyCheckpointError,
    IntegrityError,
    InvalidNameError,
    ShardedWriter,
    UnsafeCheckpointError,
    copy_checkpoint,
    open_checkpoint,
    plan_shards,
    validate_shard_file,
    validate_tensor_name,
)
from pipeline.storage.dtypes import SAFETENSORS_TO_TORCH

from tests.storage.builders import raw_safetensors, safetensors_bytes, sample_state, write_sharded


class TouchMarker:
    """A pickle payload that creates a marker file when unpickled without restriction."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _copy_fails(tmp_path: Path, url: str, error: type[BaseException], **open_kwargs: Any) -> str:
    """Open and copy ``url``; return the error text and check that the output stays empty."""
    destination = tmp_path / "copy-out"
    with pytest.raises(error) as raised:
        copy_checkpoint(open_checkpoint(url, **open_kwargs), ShardedWriter(str(destination)), block_bytes=64)
    leftovers = sorted(p.name for p in destination.iterdir()) if destination.exists() else []
    assert leftovers == []
    return str(raised.value)


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _f32(name_offsets: dict[str, tuple[int, int]], shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    return {
        name: {"dtype": "F32", "shape": (shapes or {}).get(name, [(end - begin) // 4]), "data_offsets": [begin, end]}
        for name, (begin, end) in name_offsets.items()
    }


def _save_dcp(state: dict[str, Any], directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)


# -- safetensors files ------------------------------------------------------------


def test_truncated_file(tmp_path):
    data = safetensors_bytes({"a": torch.arange(16, dtype=torch.float32), "b": torch.ones(4)})
    url = _write(tmp_path, "cut.safetensors", data[:-10])

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: tensor 'b' data_offsets [64, 80] run past the data section, which has 70 bytes; "
        "the file is truncated or its offsets are out of range"
    )


def test_file_shorter_than_length_field(tmp_path):
    url = _write(tmp_path, "tiny.safetensors", b"\x01\x02\x03")

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: truncated safetensors file: it has 3 bytes, but the header length field alone "
        "needs 8; re-download or re-export the file"
    )


def test_header_length_larger_than_file(tmp_path):
    data = raw_safetensors(_f32({"a": (0, 8)}), b"\x00" * 8, length=10**6)
    url = _write(tmp_path, "long.safetensors", data)

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: header length 1000000 is larger than the file ({len(data)} bytes including the "
        "8-byte length field); the file is truncated or not a safetensors file"
    )


def test_invalid_header_json(tmp_path):
    url = _write(tmp_path, "json.safetensors", struct.pack("<Q", 10) + b"{not json}")

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: invalid header JSON (Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)); the file is corrupt or not a safetensors file"
    )


def test_duplicate_name_in_one_header(tmp_path):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    text = f'{{"a":{entry},"a":{entry}}}'.encode()
    url = _write(tmp_path, "dup.safetensors", struct.pack("<Q", len(text)) + text + b"\x00" * 4)

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: duplicate tensor name 'a' in the header; each name may appear once"
    )


def test_overlapping_offsets(tmp_path):
    url = _write(tmp_path, "overlap.safetensors", raw_safetensors(_f32({"a": (0, 8), "b": (4, 12)}), b"\x00" * 12))

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: tensor 'b' data_offsets [4, 12] overlap tensor 'a' [0, 8]; each byte of the data "
        "section belongs to one tensor"
    )


def test_gap_between_offsets(tmp_path):
    url = _write(tmp_path, "gap.safetensors", raw_safetensors(_f32({"a": (0, 8), "b": (12, 20)}), b"\x00" * 20))

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: gap of 4 bytes after tensor 'a', before tensor 'b' [12, 20]; tensors must cover "
        "the data section without gaps"
    )


def test_offsets_out_of_range(tmp_path):
    url = _write(tmp_path, "range.safetensors", raw_safetensors(_f32({"a": (0, 8), "b": (8, 16)}), b"\x00" * 8))

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: tensor 'b' data_offsets [8, 16] run past the data section, which has 8 bytes; "
        "the file is truncated or its offsets are out of range"
    )


def test_trailing_bytes_after_last_tensor(tmp_path):
    url = _write(tmp_path, "trailing.safetensors", raw_safetensors(_f32({"a": (0, 8)}), b"\x00" * 12))

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: 4 bytes after the last tensor 'a' belong to no tensor; the file is corrupt or "
        "has trailing data"
    )


def test_unknown_dtype(tmp_path):
    header = {"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}
    url = _write(tmp_path, "dtype.safetensors", raw_safetensors(header, b"\x00" * 8))

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: tensor 'a': unknown dtype 'F7'; expected one of {', '.join(SAFETENSORS_TO_TORCH)}"
    )


def test_shape_disagrees_with_byte_length(tmp_path):
    url = _write(tmp_path, "shape.safetensors", raw_safetensors(_f32({"a": (0, 8)}, {"a": [3]}), b"\x00" * 8))

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: tensor 'a': shape [3] x dtype F32 (4 bytes per element) needs 12 bytes, but "
        "data_offsets [0, 8] span 8 bytes"
    )


# -- sharded checkpoints ----------------------------------------------------------


def _index(tmp_path: Path, weight_map: dict[str, str]) -> str:
    return _write(tmp_path, "ckpt/model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}).encode())


def test_duplicate_tensor_across_shards(tmp_path):
    _write(tmp_path, "ckpt/a.safetensors", safetensors_bytes({"x": torch.ones(2)}))
    _write(tmp_path, "ckpt/b.safetensors", safetensors_bytes({"x": torch.zeros(2), "y": torch.ones(1)}))
    url = _index(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"})

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: duplicate tensor 'x' in shards 'a.safetensors' and 'b.safetensors'; each tensor "
        "must be stored in exactly one shard"
    )


def test_index_names_missing_shard(tmp_path):
    _write(tmp_path, "ckpt/a.safetensors", safetensors_bytes({"x": torch.ones(2)}))
    url = _index(tmp_path, {"x": "a.safetensors", "y": "missing.safetensors"})

    assert _copy_fails(tmp_path, url, CheckpointNotFoundError) == (
        f"{url}: the index names shard 'missing.safetensors' (for tensor 'y'), which does not "
        f"exist at {tmp_path}/ckpt/missing.safetensors; copy the missing shard or fix the index"
    )


def test_index_disagrees_with_shard(tmp_path):
    _write(tmp_path, "ckpt/a.safetensors", safetensors_bytes({"x": torch.ones(2)}))
    _write(tmp_path, "ckpt/b.safetensors", safetensors_bytes({"y": torch.ones(2)}))
    url = _index(tmp_path, {"x": "b.safetensors", "y": "a.safetensors"})

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: the index maps tensor 'x' to shard 'b.safetensors', but it is stored in shard "
        "'a.safetensors'; regenerate the index"
    )


@pytest.mark.parametrize(
    ("shard", "reason"),
    [
        ("../outside.safetensors", "contains '/', but it is used as a file name and must be a single path component"),
        ("..outside.safetensors", "contains '..' or is '.', but it is used as a file name and could leave its directory"),
        ("sub\\x.safetensors", "contains '\\\\', but it is used as a file name and must be a single path component"),
    ],
    ids=["parent", "dots", "backslash"],
)
def test_index_shard_name_that_leaves_directory(tmp_path, shard, reason):
    url = _index(tmp_path, {"layer/0.weight": shard})

    assert _copy_fails(tmp_path, url, InvalidNameError) == (
        f"{url}: shard file {shard!r} (for tensor 'layer/0.weight') {reason}; rename it"
    )


def test_index_of_torch_pickle_shards(tmp_path):
    url = _index(tmp_path, {"w": "pytorch_model-00001-of-00002.bin"})

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: the index maps tensor 'w' to 'pytorch_model-00001-of-00002.bin', which is not a "
        ".safetensors file; sharded torch pickles are not supported, so convert the shards to "
        "safetensors or open each shard file on its own"
    )


def test_empty_index(tmp_path):
    url = _index(tmp_path, {})

    assert _copy_fails(tmp_path, url, EmptyCheckpointError) == (
        f"{url}: the index lists no tensors; expected at least one"
    )


def test_digest_mismatch_mid_copy_removes_written_shards(tmp_path):
    state = sample_state()
    source = tmp_path / "source"
    _, plan, records = write_sharded(str(source), state)
    digests = {record.file: record.to_json() for record in records}
    wrong = "0" * 64
    digests[plan[1].file] = {"sha256": wrong, "size": records[1].size}
    actual = records[1].sha256

    # The first input shard is copied to an output shard before the second one fails.
    message = _copy_fails(tmp_path, str(source), IntegrityError, digests=digests)
    assert message == (
        f"shard {plan[1].file} ({source}/{plan[1].file}) failed verification: expected sha256 "
        f"{wrong}, actual {actual}; the shard is corrupt or the manifest is stale. Copy the shard "
        "again or regenerate the manifest"
    )


def test_size_mismatch_detected_at_open(tmp_path):
    source = tmp_path / "source"
    _, plan, records = write_sharded(str(source), sample_state())
    digests = {records[0].file: {"sha256": records[0].sha256, "size": records[0].size + 1}}

    assert _copy_fails(tmp_path, str(source), IntegrityError, digests=digests) == (
        f"shard {plan[0].file} ({source}/{plan[0].file}) failed verification: expected size "
        f"{records[0].size + 1} bytes, actual {records[0].size} bytes; the shard is truncated, "
        "replaced or the manifest is stale. Copy the shard again or regenerate the manifest"
    )


def test_shard_truncated_after_open(tmp_path):
    source = tmp_path / "source"
    _, plan, records = write_sharded(str(source), sample_state())
    reader = open_checkpoint(str(source))
    victim = source / plan[2].file
    os.truncate(victim, records[2].size - 4)
    last = plan[2].tensors[-1]
    while last.nbytes == 0:
        last = plan[2].tensors[plan[2].tensors.index(last) - 1]

    destination = tmp_path / "copy-out"
    with pytest.raises(CheckpointFormatError) as raised:
        copy_checkpoint(reader, ShardedWriter(str(destination), max_shard_bytes=200))
    assert str(raised.value).startswith(f"file://{victim}: truncated read: expected ")
    assert str(raised.value).endswith(
        "; the file is shorter than its header says or changed while being read"
    )
    assert sorted(p.name for p in destination.iterdir()) == []


# -- names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("..", "tensor name '..' contains '..' or is '.', but it is used as a file name and could leave its directory; rename it"),
        ("a..b", "tensor name 'a..b' contains '..' or is '.', but it is used as a file name and could leave its directory; rename it"),
        ("layer/0", "tensor name 'layer/0' contains '/', but it is used as a file name and must be a single path component; rename it"),
        ("", "tensor name is empty; every tensor needs a name"),
        ("a\x00b", "tensor name 'a\\x00b' contains a NUL character"),
    ],
    ids=["dotdot", "embedded-dotdot", "slash", "empty", "nul"],
)
def test_tensor_name_rejected_as_path(name, message):
    with pytest.raises(InvalidNameError) as raised:
        validate_tensor_name(name, as_path=True, where="registry")
    assert str(raised.value) == f"registry: {message}"


def test_slash_allowed_inside_shard():
    assert validate_tensor_name("encoder/layer.0/weight") == "encoder/layer.0/weight"
    assert validate_shard_file("model-00001-of-00002.safetensors") == "model-00001-of-00002.safetensors"


def test_dcp_chunk_path_that_leaves_directory(tmp_path):
    directory = tmp_path / "dcp"
    _save_dcp({"model": {"weight": torch.ones(2, 2)}}, directory)
    with open(directory / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # written by this test a line above
    for storage in metadata.storage_data.values():
        storage.relative_path = "../outside.distcp"
    with open(directory / ".metadata", "wb") as f:
        pickle.dump(metadata, f)

    assert _copy_fails(tmp_path, str(directory), InvalidNameError) == (
        f"{directory}/.metadata: shard file '../outside.distcp' (for tensor 'model.weight') "
        "contains '/', but it is used as a file name and must be a single path component; rename it"
    )


# -- pickles that need code -------------------------------------------------------


def test_pickle_with_code_payload_is_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    url = str(tmp_path / "evil.pt")
    torch.save({"weight": torch.ones(2), "payload": TouchMarker(marker)}, url)

    assert _copy_fails(tmp_path, url, UnsafeCheckpointError) == (
        f"{url}: rejected: the pickle needs code that weights-only loading does not allow (it "
        "references getattr), and none of it was run. If the file comes from a trusted source, "
        "convert it to safetensors there"
    )
    assert not marker.exists()

    # Control: the payload is live, so the check above could have failed.
    torch.load(url, weights_only=False)
    assert marker.exists()


def test_dcp_metadata_with_code_payload_is_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    directory = tmp_path / "dcp"
    _save_dcp({"weight": torch.ones(2)}, directory)
    (directory / ".metadata").write_bytes(pickle.dumps(TouchMarker(marker)))

    message = _copy_fails(tmp_path, str(directory), UnsafeCheckpointError)
    assert message == (
        f"{directory}/.metadata: rejected: the DCP metadata pickle needs code that this reader "
        "does not allow (global pathlib.Path.touch is not allowed in DCP metadata), and none of it "
        "was run. Re-save the checkpoint with torch.distributed.checkpoint.save"
    )
    assert not marker.exists()


def test_dcp_entry_with_code_payload_is_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    directory = tmp_path / "dcp"
    _save_dcp({"weight": torch.ones(2), "extra": TouchMarker(marker)}, directory)
    assert not marker.exists()

    reader = open_checkpoint(str(directory))
    assert torch.equal(reader.read("weight"), torch.ones(2))
    with pytest.raises(UnsafeCheckpointError) as raised:
        reader.objects()
    assert str(raised.value) == (
        "DCP entry 'extra': rejected: its pickle needs code that weights-only loading does not "
        "allow, and none of it was run"
    )
    assert not marker.exists()


def test_not_a_torch_file(tmp_path):
    url = _write(tmp_path, "noise.pt", b"this is not a zip archive or a pickle")

    # The middle of the message is torch's own error, which varies between torch versions.
    message = _copy_fails(tmp_path, url, CheckpointFormatError)
    assert message.startswith(f"{url}: not a readable torch checkpoint (")
    assert message.endswith("); the file is truncated or in another format")


def test_torch_file_that_is_not_a_mapping(tmp_path):
    url = str(tmp_path / "list.pt")
    torch.save([torch.ones(2)], url)

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: expected a state dict (a mapping of names to tensors), got list"
    )


def test_flattened_names_collide(tmp_path):
    url = str(tmp_path / "collide.pt")
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, url)

    assert _copy_fails(tmp_path, url, CheckpointFormatError) == (
        f"{url}: two entries flatten to the name 'a.b'; rename one of the keys so that the "
        "dotted names are unique"
    )


# -- empty and missing checkpoints ------------------------------------------------


@pytest.mark.parametrize("header", [{}, {"__metadata__": {"format": "pt"}}], ids=["bare", "metadata-only"])
def test_empty_safetensors_file(tmp_path, header):
    url = _write(tmp_path, "empty.safetensors", raw_safetensors(header, b""))

    assert _copy_fails(tmp_path, url, EmptyCheckpointError) == (
        f"{url}: the safetensors file contains no tensors; expected at least one"
    )


def test_empty_torch_state_dict(tmp_path):
    url = str(tmp_path / "empty.pt")
    torch.save({"optimizer": {"state": {}, "param_groups": []}}, url)

    assert _copy_fails(tmp_path, url, EmptyCheckpointError) == (
        f"{url}: the checkpoint contains no tensors; expected a state dict with at least one tensor"
    )


def test_dcp_without_tensors(tmp_path):
    directory = tmp_path / "dcp"
    _save_dcp({"epoch": 3}, directory)

    assert _copy_fails(tmp_path, str(directory), EmptyCheckpointError) == (
        f"{directory}: the DCP checkpoint contains no tensors; expected at least one"
    )


def test_empty_directory(tmp_path):
    (tmp_path / "nothing").mkdir()
    url = str(tmp_path / "nothing")

    assert _copy_fails(tmp_path, url, EmptyCheckpointError) == (
        f"{url}: no checkpoint in this directory; expected one of model.safetensors.index.json, "
        ".metadata, model.safetensors, pytorch_model.bin"
    )


def test_missing_checkpoint(tmp_path):
    url = str(tmp_path / "absent")

    assert _copy_fails(tmp_path, url, CheckpointNotFoundError) == f"{url}: no file or directory at this URL"


def test_plan_without_tensors():
    with pytest.raises(EmptyCheckpointError) as raised:
        plan_shards([])
    assert str(raised.value) == "no tensors to write; a checkpoint needs at least one tensor"


def test_bare_pickle_with_code_payload_is_not_run(tmp_path):
    # A plain pickle (not torch.save's zip archive) goes through torch's legacy loader,
    # which weights_only=True restricts too.
    marker = tmp_path / "payload-ran"
    url = _write(tmp_path, "bare.pt", pickle.dumps({"w": TouchMarker(marker)}, protocol=2))

    assert _copy_fails(tmp_path, url, UnsafeCheckpointError) == (
        f"{url}: rejected: the pickle needs code that weights-only loading does not allow (it "
        "references getattr), and none of it was run. If the file comes from a trusted source, "
        "convert it to safetensors there"
    )
    assert not marker.exists()
