"""Reads a CTranslate2 `model.bin`, or its parts `model.bin.part1`, `model.bin.part2`, ... read in order as one
stream, with numpy/struct: ctranslate2 itself is not needed.

The binary layout is the one written by `ctranslate2/specs/model_spec.py` (`ModelSpec._serialize`); the variables
are returned as stored, without conversion. Its siblings: `whisper_mla.ctranslate2_weights` turns them into a
transformers Whisper state dict, and `whisper_mla.ctranslate2` is the import around both.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


# Binary versions whose variable records are `name, rank, dims, dtype id (uint8), num_bytes (uint32), data`
# followed by an alias table (`ctranslate2/specs/model_spec.py`, CURRENT_BINARY_VERSION = 6). Versions 1-3
# store an item size instead of a dtype id and are not read.
SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
# Order of the DataType enum in ctranslate2 (`model_spec._dtype_to_type_id`).
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


@dataclass
class Ct2Variable:
    dtype: str  # one of CT2_DTYPES
    array: np.ndarray  # raw stored values; bfloat16 is kept as uint16 bit patterns


@dataclass
class Ct2ModelBin:
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, Ct2Variable]
    aliases: dict[str, str]  # alias name -> name of the variable it shares


class _ChainedReader:
    """Reads several files as one byte stream, so a model.bin split into parts is never reassembled."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self.position = 0
        self._index = 0
        self._file = open(self.paths[0], "rb")

    def read(self, num_bytes: int) -> bytearray:
        out = bytearray(num_bytes)
        view, filled = memoryview(out), 0
        while filled < num_bytes:
            got = self._file.readinto(view[filled:])
            if got:
                filled += got
                continue
            if self._index + 1 == len(self.paths):
                raise ValueError(
                    f"model.bin ended after {self.position + filled} bytes but the next record needs "
                    f"{num_bytes - filled} more; read {[str(p) for p in self.paths]}. The file is truncated or a "
                    "part is missing: make sure all model.bin.partN files are present."
                )
            self._file.close()
            self._index += 1
            self._file = open(self.paths[self._index], "rb")
        self.position += num_bytes
        return out

    def at_end(self) -> bool:
        if self._file.peek(1):
            return False
        return all(p.stat().st_size == 0 for p in self.paths[self._index + 1 :])

    def close(self):
        self._file.close()


def read_ct2_model_bin(paths: list[Path]) -> Ct2ModelBin:
    """Parses a CTranslate2 `model.bin`, possibly split into parts read in the given order.

    Args:
        paths: `[model.bin]` or `[model.bin.part1, model.bin.part2, ...]`.

    Returns:
        The header, every stored variable (raw values, no conversion) and the alias table.
    """
    reader = _ChainedReader(paths)

    def unpack(fmt):
        return struct.unpack("<" + fmt, reader.read(struct.calcsize("<" + fmt)))

    def read_string():
        (length,) = unpack("H")  # includes the trailing NUL
        raw = reader.read(length)
        if length == 0 or raw[-1] != 0:
            raise ValueError(f"Corrupt model.bin: a string record at byte {reader.position} is not NUL-terminated.")
        return raw[:-1].decode("utf-8")

    try:
        (binary_version,) = unpack("I")
        if binary_version not in SUPPORTED_BINARY_VERSIONS:
            raise ValueError(
                f"Expected a CTranslate2 model.bin of binary version {SUPPORTED_BINARY_VERSIONS}, but found version "
                f"{binary_version} in {paths[0]}; reconvert the model with ctranslate2 4.x "
                "(`ct2-transformers-converter`)."
            )
        spec_name = read_string()
        (spec_revision,) = unpack("I")
        (num_variables,) = unpack("I")
        variables = {}
        for _ in range(num_variables):
            name = read_string()
            (rank,) = unpack("B")
            shape = unpack(f"{rank}I") if rank else ()
            type_id, num_bytes = unpack("B")[0], unpack("I")[0]
            if type_id >= len(CT2_DTYPES):
                raise ValueError(f"Variable {name!r} has unknown CTranslate2 dtype id {type_id}; expected 0..5.")
            dtype = CT2_DTYPES[type_id]
            np_dtype = np.dtype("uint16" if dtype == "bfloat16" else dtype)
            expected_bytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
            if num_bytes != expected_bytes:
                raise ValueError(
                    f"Variable {name!r} of shape {tuple(shape)} and dtype {dtype} should take {expected_bytes} "
                    f"bytes, but the record says {num_bytes}; the model.bin is corrupt."
                )
            array = np.frombuffer(reader.read(num_bytes), dtype=np_dtype).reshape(shape)
            variables[name] = Ct2Variable(dtype, array)
        (num_aliases,) = unpack("I")
        aliases = {}
        for _ in range(num_aliases):
            alias = read_string()
            aliases[alias] = read_string()
        if not reader.at_end():
            raise ValueError(
                f"Expected model.bin to end after its alias table (byte {reader.position}), but more data follows; "
                "check that the model.bin parts are given in order and that no unrelated file was appended."
            )
    finally:
        reader.close()
    return Ct2ModelBin(binary_version, spec_name, spec_revision, variables, aliases)
