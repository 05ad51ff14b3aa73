"""Pure parts of the export stage: codecs (fp8 error bound), .npy without pickle, names, shard plans."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipelines.export import (
    decode_bf16,
    decode_fp8,
    decode_sample,
    encode_array,
    encode_bf16,
    encode_fp8,
    encode_sample,
    fp8_error_bound,
    npy_bytes,
    npy_from_bytes,
    parse_size,
    plan_shards,
    relative_l2,
    sample_key,
    split_member,
    tar_sample_bytes,
)


def gaussian(shape, seed=0, dtype=np.float16):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# fp8 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, make", [
    ("gaussian", lambda: gaussian((2, 16, 16, 2560))),
    ("heavy-tailed, uneven channels", lambda: (np.random.default_rng(1).standard_t(3, (4, 8, 8, 256))
                                               * np.random.default_rng(2).lognormal(0, 2, 256)).astype(np.float16)),
    ("tiny magnitudes", lambda: gaussian((3, 5, 7)) * np.float16(1e-4)),
])
def test_fp8_round_trip_within_the_documented_bound(name, make):
    values = make()
    bits, scale = encode_fp8(values)
    assert bits.dtype == np.uint8 and bits.shape == values.shape and scale.shape == (values.shape[-1],)
    for dtype in (np.float16, np.float32):
        decoded = decode_fp8(bits, scale, dtype)
        assert decoded.dtype == dtype and decoded.shape == values.shape
        error = np.abs(decoded.astype(np.float64) - values.astype(np.float64))
        assert (error <= fp8_error_bound(values, scale)).all(), name
        assert relative_l2(decoded, values) < 0.03, name  # documented: 2.4-2.7% on such features


def test_fp8_matches_torch_e4m3_and_keeps_zero_channels_exact():
    values = gaussian((6, 5), seed=3, dtype=np.float32)
    values[:, 2] = 0.0
    bits, scale = encode_fp8(values)
    reference = torch.from_numpy(bits).view(torch.float8_e4m3fn).float() * torch.from_numpy(scale)
    np.testing.assert_array_equal(decode_fp8(bits, scale, np.float32), reference.numpy())
    assert scale[2] == 1.0 and (decode_fp8(bits, scale)[:, 2] == 0).all()
    assert np.abs(values).max(axis=0)[0] == pytest.approx(scale[0] * 448)


def test_fp8_channel_maxima_survive_exactly_up_to_scale_rounding():
    values = gaussian((64, 32), seed=4, dtype=np.float32)
    bits, scale = encode_fp8(values)
    decoded = decode_fp8(bits, scale, np.float32)
    np.testing.assert_allclose(np.abs(decoded).max(0), np.abs(values).max(0), rtol=1e-6)


# bf16 / f16 ------------------------------------------------------------------------------------
def test_bf16_round_trip_matches_torch_rounding():
    values = gaussian((7, 9), seed=5, dtype=np.float32) * 1e3
    decoded = decode_bf16(encode_bf16(values))
    np.testing.assert_array_equal(decoded, torch.from_numpy(values).bfloat16().float().numpy())
    assert relative_l2(decoded, values) < 2 ** -8


def test_bad_float_values_are_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_array(np.array([1.0, np.nan], dtype=np.float32), "fp8", "clip 3, field 'onestep'")
    with pytest.raises(ValueError, match="float16 range.*bf16"):
        encode_array(np.array([1e6], dtype=np.float32), "f16", "clip 3, field 'onestep'")


# .npy without pickle ---------------------------------------------------------------------------
def test_npy_round_trip_is_zero_copy_and_keeps_shape():
    for array in (gaussian((3, 4)), np.int64(7) * np.ones((), dtype=np.int64), np.zeros((2, 0, 3), np.uint8),
                  np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))):
        payload = bytearray(npy_bytes(array))
        decoded = npy_from_bytes(payload, "test")
        np.testing.assert_array_equal(decoded, array)
        assert decoded.shape == array.shape and decoded.dtype == array.dtype
    decoded = npy_from_bytes(bytearray(npy_bytes(np.arange(4, dtype=np.int32))), "test")
    assert decoded.flags.writeable and not decoded.flags.owndata


def test_pickled_npy_is_never_loaded():
    with pytest.raises(ValueError, match="object arrays need pickle"):
        npy_bytes(np.array([{"a": 1}], dtype=object))
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        npy_from_bytes(buffer.getvalue(), "shard-000001.tar, member c000000001.onestep.npy")
    with pytest.raises(ValueError, match="data bytes, expected"):
        npy_from_bytes(npy_bytes(np.arange(10))[:-8], "test")


# names and samples -----------------------------------------------------------------------------
def test_member_names_and_keys():
    assert sample_key(42) == "c000000042"
    assert split_member("c000000042.dinov2.target.fp8scale.npy", "t") == ("c000000042", "dinov2.target", "fp8scale")
    assert split_member("c000000042.onestep.bf16.npy", "t") == ("c000000042", "onestep", "bf16")
    assert split_member("c000000042.json", "t") == ("c000000042", "", "json")
    for bad in ("c000000042.onestep.pyd", "c000000042.onestep.pickle", "../c000000042.onestep.npy",
                "x.onestep.npy", "c000000042.a.b.c.npy"):
        with pytest.raises(ValueError):
            split_member(bad, "shard-000000.tar")


def test_sample_encode_decode_round_trip_for_every_codec():
    arrays = {"onestep": gaussian((2, 4, 4, 8)), "frames": np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3),
              "actions": gaussian((10, 7), dtype=np.float32), "seed": np.array(5, dtype=np.int64)}
    for codec in ("f16", "bf16", "fp8"):
        members, codecs = encode_sample("c000000001", {"clip_index": 1}, arrays, codec, raw_fields=("actions",))
        assert codecs == {"onestep": codec, "frames": "raw", "actions": "raw", "seed": "raw"}
        assert members[0][0] == "c000000001.json"
        sample = decode_sample([(n, bytearray(p)) for n, p in members], None, "test")
        assert sample["meta"]["codecs"] == codecs and sample["__key__"] == "c000000001"
        np.testing.assert_array_equal(sample["frames"], arrays["frames"])
        np.testing.assert_array_equal(sample["actions"], arrays["actions"])
        assert sample["seed"].shape == () and int(sample["seed"]) == 5
        assert relative_l2(sample["onestep"], arrays["onestep"]) < (0.03 if codec == "fp8" else 4e-3)
        assert tar_sample_bytes(members) % 512 == 0


def test_interleaved_samples_are_refused():
    first, _ = encode_sample("c000000001", {}, {"x": np.zeros(2, np.float16)}, "f16")
    second, _ = encode_sample("c000000002", {}, {"x": np.zeros(2, np.float16)}, "f16")
    with pytest.raises(ValueError, match="interleaved"):
        decode_sample([first[0], second[1]], None, "shard-000003.tar")


# shard planning --------------------------------------------------------------------------------
def test_parse_size_and_plan_shards():
    assert parse_size("1GB") == 10 ** 9 and parse_size("256MiB") == 256 * 2 ** 20 and parse_size("4096") == 4096
    assert parse_size("1.5 kb") == 1500
    with pytest.raises(ValueError, match="expected a number"):
        parse_size("lots")
    ranges = plan_shards(10, 300, 1000)
    assert [len(r) for r in ranges] == [3, 3, 3, 1] and ranges[-1].stop == 10
    assert [len(r) for r in plan_shards(3, 5000, 1000)] == [1, 1, 1]
    assert plan_shards(0, 10, 100) == []
