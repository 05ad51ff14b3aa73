"""Pure parts of the export stage: field codecs, .npy payloads, sample assembly, shard planning.

A sample is a list of (member name, bytes) pairs that a webdataset tar stores one after another:

    c000000042.json                   clip metadata + every version id (see trainers/data.py)
    c000000042.<field>.npy            raw / "f16" field (stock numpy .npy)
    c000000042.<field>.npy.gz         raw field, gzip'd .npy (only in "fp8" exports, see below)
    c000000042.<field>.bf16.npy       "bf16": uint16 bit patterns of bfloat16 values
    c000000042.<field>.fp8.npy        "fp8":  uint8 float8 e4m3fn codes of companded values ...
    c000000042.<field>.fp8scale.npy   ... and uint8 E8M0 per-channel (last axis) scale exponents

Stock ``webdataset`` decodes every member with numpy (no pickle; its default ``.gz`` handler
gunzips first); ``decode_field`` turns the coded parts back into float arrays.

The fp8 and bf16 codecs themselves (encoding, decoding, the fp8 error bound) live in
pipelines/float_codecs.py, shared with the target store's coded arrays.

Lossless compression. uint8 frames and 1-byte codes are already 25% of float32, so tar headers,
.npy headers and scales would put an fp8 sample over a quarter of S-VAM's float32 .npy files. An
"fp8" export therefore gzips raw (uncoded) fields of at least ``GZIP_MIN_BYTES`` when that
saves at least ``GZIP_MIN_SAVING`` of their bytes (rendered or generated frames do; noise does
not, and then the member stays a plain .npy). Readers decompress only the fields they select.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from foresight.pipelines.float_codecs import (  # noqa: F401 - the export codecs, re-exported for their users
    E8M0_BIAS,
    E8M0_TABLE,
    FP8_MAX,
    FP8_POWER,
    decode_bf16,
    decode_fp8,
    e8m0_exponents,
    encode_bf16,
    encode_fp8,
    fp8_error_bound,
    fp8_scales,
    fp8_table,
    relative_l2,
)

CODECS = ("f16", "bf16", "fp8")
GZIP_MIN_BYTES = 1 << 16
"""Raw fields smaller than this are never gzip'd (the saving would vanish in tar padding)."""
GZIP_MIN_SAVING = 1 / 8
"""A raw field of an fp8 export is stored gzip'd only when that saves at least this share of its bytes."""
GZIP_LEVEL = 6
GZIP_MAX_RATIO = 1100
"""deflate expands at most ~1032x: a gzip member claiming more output than this is corrupt."""
GUNZIP_CHUNK = 1 << 16
"""Compressed bytes fed to the inflater at a time (its output goes straight into the array buffer)."""
KEY_PATTERN = re.compile(r"^c\d{9}$")
FIELD_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)?$")
SUFFIXES = {"fp8scale.npy": "fp8scale", "fp8.npy": "fp8", "bf16.npy": "bf16", "npy.gz": "npy.gz", "npy": "npy"}
TAR_BLOCK = 512
NPY_HEADER_PREFIX = 1 << 16
"""Bytes parsed for a .npy header; numpy writes headers of a few hundred bytes."""


# keys, fields, member names ------------------------------------------------------------------
def sample_key(clip_index: int) -> str:
    """webdataset key of a clip: 'c' + 9-digit plan row (no dots: webdataset splits keys at the first dot)."""
    if not 0 <= clip_index < 10 ** 9:
        raise ValueError(f"clip index {clip_index} does not fit a 9-digit sample key")
    return f"c{clip_index:09d}"


def check_field_name(field: str) -> str:
    """Field names are '<name>' or '<prefix>.<name>' with letters, digits, '_' and '-'."""
    if not FIELD_PATTERN.match(field) or field.endswith((".fp8", ".bf16", ".fp8scale")):
        raise ValueError(f"field name {field!r}: use letters, digits, '_' or '-', at most one '.' "
                         "(and not a codec suffix)")
    return field


def member_names(key: str, field: str, codec: str) -> list[str]:
    """Tar member names of one coded field, in the order they are written."""
    if codec == "fp8":
        return [f"{key}.{field}.fp8.npy", f"{key}.{field}.fp8scale.npy"]
    if codec == "bf16":
        return [f"{key}.{field}.bf16.npy"]
    return [f"{key}.{field}.npy"]


def split_member(name: str, where: str) -> tuple[str, str, str]:
    """Member name -> (key, field, part) with part in {'json', 'npy', 'npy.gz', 'bf16', 'fp8', 'fp8scale'}."""
    key, _, rest = name.partition(".")
    if not KEY_PATTERN.match(key) or "/" in name:
        raise ValueError(f"{where}: unexpected tar member {name!r} (not '<c + 9 digits>.<field>.npy')")
    if rest == "json":
        return key, "", "json"
    for suffix, part in SUFFIXES.items():
        if rest.endswith("." + suffix):
            return key, check_field_name(rest[: -len(suffix) - 1]), part
    raise ValueError(f"{where}: tar member {name!r} has an unsupported type (only .json, .npy and .npy.gz "
                     "are read)")


# .npy payloads ---------------------------------------------------------------------------------
def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise an array as a .npy file (never pickled)."""
    array = np.asarray(array)
    array = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d arrays 0-d
    if array.dtype.hasobject:
        raise ValueError(f"array of dtype {array.dtype} cannot be exported (object arrays need pickle)")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_header(prefix: bytes, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a .npy payload starting with ``prefix``."""
    length = _npy_header_length(prefix)
    try:
        return _parse_npy_header(prefix[:length])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _npy_header_length(prefix: bytes) -> int:
    """Bytes of magic + header (so identical headers hit the parse cache)."""
    if prefix[:6] != b"\x93NUMPY" or len(prefix) < 10:
        return len(prefix)
    if prefix[6] == 1:
        return 10 + int.from_bytes(prefix[8:10], "little")
    return 12 + int.from_bytes(prefix[8:12], "little")


@functools.lru_cache(maxsize=256)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    # Samples of an export repeat the same few headers: parse each once (numpy's parser uses
    # ast.literal_eval and costs about as much as reading a small array).
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except ValueError as err:
        raise ValueError(f"not a valid .npy payload ({err})") from None
    if dtype.hasobject:
        raise ValueError(f".npy holds Python objects (dtype {dtype}); refusing to unpickle")
    return tuple(shape), fortran, dtype, stream.tell()


def npy_from_bytes(data: bytes | bytearray | memoryview, where: str) -> np.ndarray:
    """Parse a .npy payload without copying (writable when ``data`` is writable); never unpickles."""
    shape, fortran, dtype, offset = _npy_header(bytes(data[:NPY_HEADER_PREFIX]), where)
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{where}: .npy payload has {len(data) - offset} data bytes, expected "
                         f"{count * dtype.itemsize} for shape {shape} {dtype}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


# codecs ----------------------------------------------------------------------------------------
def field_codec(array: np.ndarray, codec: str) -> str:
    """The codec actually applied: float arrays take ``codec``, integer/bool arrays stay 'raw'."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r}: expected one of {CODECS}")
    return codec if np.asarray(array).dtype.kind == "f" else "raw"


def encode_array(array: np.ndarray, codec: str, where: str) -> list[np.ndarray]:
    """Coded parts of one field, in ``member_names`` order."""
    array = np.asarray(array)
    if codec == "raw":
        return [array]
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: contains NaN or inf; refusing to export it")
    if codec == "f16":
        if array.size and np.abs(array).max() > np.finfo(np.float16).max:
            raise ValueError(f"{where}: values exceed the float16 range; use --codec bf16")
        return [array.astype(np.float16, copy=False)]
    if codec == "bf16":
        return [encode_bf16(array)]
    if codec == "fp8":
        return list(encode_fp8(array, where=where))
    raise ValueError(f"{where}: unknown codec {codec!r}")


def decode_field(parts: dict[str, np.ndarray], codec: str, float_dtype: Any, where: str) -> np.ndarray:
    """Array of one field from its decoded .npy parts ({'npy'|'bf16'|'fp8'|'fp8scale': array})."""
    try:
        if codec == "fp8":
            return decode_fp8(parts["fp8"], parts["fp8scale"], float_dtype or np.float16, where=where)
        if codec == "bf16":
            values = decode_bf16(parts["bf16"])
            return values if float_dtype is None else values.astype(float_dtype, copy=False)
        values = parts["npy"]
    except KeyError as err:
        raise ValueError(f"{where}: codec '{codec}' needs a '{err.args[0]}' member, which is missing") from None
    # Raw fields (actions, state, frames) keep their stored dtype; float_dtype is for coded features.
    if codec == "f16" and float_dtype is not None:
        return values.astype(float_dtype, copy=False)
    return values


# lossless compression of raw fields ----------------------------------------------------------
def gzip_payload(payload: bytes) -> bytes | None:
    """gzip (fixed mtime) of a member payload when it saves at least ``GZIP_MIN_SAVING``, else None."""
    if len(payload) < GZIP_MIN_BYTES:
        return None
    packed = gzip.compress(payload, compresslevel=GZIP_LEVEL, mtime=0)
    return packed if len(packed) <= len(payload) * (1 - GZIP_MIN_SAVING) else None


def gunzip_payload(payload: bytes | bytearray | memoryview, where: str) -> np.ndarray:
    """Writable uint8 buffer of a gzip member's content; CRC, length and trailing bytes are checked.

    The size comes from the gzip trailer; the inflater's output is copied straight into one buffer
    (no second full-size copy), and a member claiming more than deflate can produce is refused.
    """
    data = memoryview(payload).cast("B")
    size = int.from_bytes(data[-4:], "little") if len(data) >= 18 else -1
    if not 0 <= size <= GZIP_MAX_RATIO * len(data):
        raise ValueError(f"{where}: not a valid gzip member (bad length or trailer)")
    out = np.empty(size, dtype=np.uint8)
    inflater, position = zlib.decompressobj(wbits=31), 0
    try:
        for start in range(0, len(data), GUNZIP_CHUNK):
            chunk = inflater.decompress(data[start:start + GUNZIP_CHUNK])
            if position + len(chunk) > size:
                raise ValueError(f"{where}: gzip member inflates past its recorded size; it is corrupt")
            out[position:position + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            position += len(chunk)
    except zlib.error as err:
        raise ValueError(f"{where}: corrupt gzip member ({err})") from None
    if not inflater.eof or inflater.unused_data or position != size:
        raise ValueError(f"{where}: truncated or padded gzip member ({position} of {size} bytes)")
    return out


# samples ---------------------------------------------------------------------------------------
def gzips_raw_fields(codec: str) -> bool:
    """Whether an export of ``codec`` stores large raw fields gzip'd: only "fp8", the compact codec
    (f16/bf16 exports keep every member a plain memory-mappable .npy, read without any CPU work)."""
    return codec == "fp8"


def encode_sample(key: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], codec: str,
                  raw_fields: Sequence[str] = ()) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """Tar members (name, payload) of one sample and the codec used per field.

    ``raw_fields`` are stored as given whatever ``codec`` says (actions and state stay float32).
    With ``codec`` "fp8", raw fields that gzip well become '<field>.npy.gz' (see the module docstring).
    The .json member comes first so a reader knows the codecs before it meets the arrays.
    """
    codecs = {f: "raw" if f in raw_fields else field_codec(a, codec) for f, a in arrays.items()}
    payloads: list[tuple[str, bytes]] = []
    for field in sorted(arrays):
        where = f"sample {key}, field '{check_field_name(field)}'"
        parts = encode_array(arrays[field], codecs[field], where)
        names = member_names(key, field, codecs[field])
        for name, part in zip(names, parts, strict=True):
            payload = npy_bytes(part)
            packed = gzip_payload(payload) if codecs[field] == "raw" and gzips_raw_fields(codec) else None
            payloads.append((name + ".gz", packed) if packed is not None else (name, payload))
    meta_bytes = json.dumps({**meta, "codecs": codecs}, sort_keys=True, separators=(",", ":")).encode()
    return [(f"{key}.json", meta_bytes), *payloads], codecs


def decode_sample(members: Sequence[tuple[str, bytes | bytearray]], float_dtype: Any, where: str,
                  fields: Sequence[str] | None = None, decode_fp8_fields: bool = True) -> dict[str, Any]:
    """Sample dict (see trainers/data.py) from the tar members of one sample; never unpickles.

    Only the members of ``fields`` (all when None) are parsed, so gzip'd fields that are not asked
    for cost nothing. With ``decode_fp8_fields`` False an fp8 field stays coded: '<field>' holds the
    uint8 e4m3 codes and '<field>.fp8scale' the uint8 E8M0 scale bytes (decode them on the GPU with
    trainers.data.fp8_to_float).
    """
    key, meta, grouped = None, None, {}
    for name, payload in members:
        member_key, field, part = split_member(name, where)
        if key is not None and member_key != key:
            raise ValueError(f"{where}: members of samples '{key}' and '{member_key}' are interleaved")
        key = member_key
        if part == "json":
            meta = json.loads(bytes(payload))
        elif fields is None or field in fields:
            _add_part(grouped.setdefault(field, {}), part, payload, f"{where}, member {name}")
    if meta is None:
        raise ValueError(f"{where}: sample '{key}' has no .json member")
    sample: dict[str, Any] = {"__key__": key, "meta": meta}
    codecs = meta.get("codecs", {})
    for field, parts in grouped.items():
        codec = codecs.get(field, "raw")
        field_where = f"{where}, sample {key}, field '{field}'"
        if codec == "fp8" and not decode_fp8_fields and {"fp8", "fp8scale"} <= set(parts):
            fp8_scales(parts["fp8scale"], field_where)  # refuses scales of another format early
            sample[field], sample[f"{field}.fp8scale"] = parts["fp8"], parts["fp8scale"]
            continue
        sample[field] = decode_field(parts, codec, float_dtype, field_where)
    return sample


def _add_part(parts: dict[str, np.ndarray], part: str, payload: bytes | bytearray | memoryview, where: str) -> None:
    """Parse one member into ``parts`` (a gzip'd .npy is inflated first and counts as the 'npy' part)."""
    if part == "npy.gz":
        part, payload = "npy", gunzip_payload(payload, where)
    if part in parts:
        raise ValueError(f"{where}: a second '{part}' member for the same field")
    parts[part] = npy_from_bytes(payload, where)


def action_chunk(actions_TA: np.ndarray, start: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Actions at frames start .. start+chunk-1 (float32) and a validity mask; past the end the
    last action repeats and the mask is False."""
    length = len(actions_TA)
    if not 0 <= start < length:
        raise ValueError(f"clip start {start} is outside the episode's {length} frames")
    rows = np.minimum(np.arange(start, start + chunk), length - 1)
    mask = np.arange(start, start + chunk) < length
    return actions_TA[rows].astype(np.float32).reshape(chunk, -1), mask


def column_stats(values_NA: np.ndarray) -> dict[str, Any]:
    """Per-dimension normalisation statistics of a (N, ...) array (schemas.dataset.ColumnStats fields)."""
    flat = np.asarray(values_NA, dtype=np.float64).reshape(len(values_NA), -1)
    if not len(flat):
        raise ValueError("cannot compute statistics over zero frames")
    q01, q99 = np.quantile(flat, [0.01, 0.99], axis=0)
    return {"mean": flat.mean(0).tolist(), "std": flat.std(0).tolist(), "min": flat.min(0).tolist(),
            "max": flat.max(0).tolist(), "q01": q01.tolist(), "q99": q99.tolist(), "count": int(len(flat))}


# shard planning --------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """'1GB', '256MiB', '500M', '4096' -> bytes (decimal units for KB/MB/GB, binary for KiB/MiB/GiB)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (e.g. 1GB, 256MiB)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * base ** power)


def tar_sample_bytes(members: Sequence[tuple[str, bytes]]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus its payload padded to 512."""
    return sum(TAR_BLOCK + -(-len(payload) // TAR_BLOCK) * TAR_BLOCK for _, payload in members)


def plan_shards(num_samples: int, sample_bytes: int, shard_bytes: int) -> list[range]:
    """Consecutive sample ranges, each holding as many samples as fit ``shard_bytes`` (at least one)."""
    if num_samples < 0 or sample_bytes <= 0 or shard_bytes <= 0:
        raise ValueError(f"shard plan needs samples >= 0 and positive sizes (got {num_samples}, "
                         f"{sample_bytes} B/sample, {shard_bytes} B/shard)")
    per_shard = max(1, shard_bytes // sample_bytes)
    return [range(i, min(i + per_shard, num_samples)) for i in range(0, num_samples, per_shard)]


# field names -----------------------------------------------------------------------------------
def target_field_names(kind: str, stage: str, arrays: Sequence[str], alias: str | None = None) -> dict[str, str]:
    """Sample field of each array of a target version (the naming documented in trainers/data.py).

    video: '<array>'; teacher: '<teacher>.<array>' (teacher = last part of the stage name, e.g.
    'teachers.dinov2' -> 'dinov2'); text: 'text' for a single array; pi0: 'pi0.<array>'. An alias
    ('name=version' on the command line) replaces the prefix.
    """
    if kind == "text" and len(arrays) == 1:
        return {arrays[0]: check_field_name(alias or "text")}
    prefix = alias or {"video": None, "teacher": stage.rsplit(".", 1)[-1], "text": "text", "pi0": "pi0"}[kind]
    return {array: check_field_name(f"{prefix}.{array}" if prefix else array) for array in arrays}


def decoded_dtype(stored_dtype: str, codec: str) -> str:
    """dtype a reader gets for a field by default (before its float_dtype option)."""
    return {"f16": "float16", "fp8": "float16", "bf16": "float32"}.get(codec, stored_dtype)
