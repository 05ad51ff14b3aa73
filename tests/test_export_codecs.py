"""Pure parts of the export stage: codecs (fp8 error bound), gzip'd raw fields, .npy without pickle, names,
shard plans."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
import torch

from foresight.pipelines.export import (
    E8M0_BIAS,
    E8M0_TABLE,
    FP8_MAX,
    FP8_POWER,
    decode_bf16,
    decode_fp8,
    decode_sample,
    e8m0_exponents,
    encode_array,
    encode_bf16,
    encode_fp8,
    encode_sample,
    fp8_error_bound,
    fp8_scales,
    fp8_table,
    gunzip_payload,
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
def heavy_tailed(shape, seed=1):
    """Student-t(3) values with channel magnitudes spread over ~6 orders (lognormal, sigma 2)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, shape) * rng.lognormal(0, 2, shape[-1])).astype(np.float16)


@pytest.mark.parametrize("name, make, max_rel_l2", [
    ("gaussian", lambda: gaussian((2, 16, 16, 2560)), 0.02),
    ("heavy-tailed, uneven channels", lambda: heavy_tailed((4, 8, 8, 256)), 0.02),
    ("tiny magnitudes", lambda: gaussian((3, 5, 7)) * np.float16(1e-4), 0.03),
    ("one channel, 1-d", lambda: gaussian((4096,), seed=6), 0.02),
])
def test_fp8_round_trip_within_the_documented_bound(name, make, max_rel_l2):
    values = make()
    codes, scale_bits = encode_fp8(values)
    channels = values.shape[-1] if values.ndim >= 2 else 1
    assert codes.dtype == np.uint8 and codes.shape == values.shape
    assert scale_bits.dtype == np.uint8 and scale_bits.shape == (channels,)
    for dtype in (np.float16, np.float32):
        decoded = decode_fp8(codes, scale_bits, dtype)
        assert decoded.dtype == dtype and decoded.shape == values.shape
        error = np.abs(decoded.astype(np.float64) - values.astype(np.float64))
        assert (error <= fp8_error_bound(values, scale_bits, dtype)).all(), name
        assert relative_l2(decoded, values) < max_rel_l2, name  # documented: 1.7-1.8% on such features


def test_fp8_bound_is_the_derived_one_and_tight():
    # 1 - (1 - 2**-4)**(1/1.5) = 4.21%: the relative part of the bound at p = 1.5, and 2**-4 at p = 1.
    values = np.full((1, 1), 1.0, dtype=np.float64)
    bound = fp8_error_bound(values, np.array([E8M0_BIAS], np.uint8), np.float32)[0, 0]
    assert bound == pytest.approx(1 - (1 - 2 ** -4) ** (2 / 3) + (2 ** -10 / 448) ** (2 / 3), rel=1e-3)
    assert fp8_error_bound(values, np.array([E8M0_BIAS], np.uint8), np.float32, power=1.0)[0, 0] == \
        pytest.approx(2 ** -4 + 2 ** -10 / 448, rel=1e-3)
    # The worst relative error over a dense sweep of one binade comes close to the relative part.
    sweep = np.linspace(0.5, 1.0, 200001)[:, None]
    decoded = decode_fp8(*encode_fp8(sweep), np.float32).astype(np.float64)
    worst = (np.abs(decoded - sweep) / sweep).max()
    bound = fp8_error_bound(sweep, encode_fp8(sweep)[1], np.float32) / sweep
    assert 0.8 * (1 - (1 - 2 ** -4) ** (2 / 3)) < worst and (np.abs(decoded - sweep) / sweep <= bound).all()


def test_fp8_is_companded_e4m3_with_power_of_two_scales():
    values = gaussian((64, 5), seed=3, dtype=np.float32) * np.array([1, 3, 0, 1e-3, 700], np.float32)
    codes, scale_bits = encode_fp8(values)
    scale = np.ldexp(1.0, scale_bits.astype(int) - E8M0_BIAS)
    amax = np.abs(values).max(axis=0)
    assert scale_bits[2] == E8M0_BIAS and (decode_fp8(codes, scale_bits)[:, 2] == 0).all()
    live = amax > 0
    assert ((amax[live] <= scale[live]) & (scale[live] < 2 * amax[live])).all()
    companded = torch.from_numpy(np.copysign(FP8_MAX * (np.abs(values) / scale) ** FP8_POWER, values))
    np.testing.assert_array_equal(codes, companded.float().to(torch.float8_e4m3fn).view(torch.uint8).numpy())
    q = torch.from_numpy(codes).view(torch.float8_e4m3fn).double().numpy()
    expected = np.sign(q) * (np.abs(q) / FP8_MAX) ** (1 / FP8_POWER) * scale
    np.testing.assert_allclose(decode_fp8(codes, scale_bits, np.float32), expected, rtol=2 ** -23)


def test_companding_beats_plain_e4m3():
    for values in (gaussian((256, 64), seed=7), heavy_tailed((256, 64), seed=8)):
        plain = relative_l2(decode_fp8(*encode_fp8(values, power=1.0), power=1.0), values)
        companded = relative_l2(decode_fp8(*encode_fp8(values)), values)
        assert plain > 0.024 and companded < plain / 1.4


def test_e8m0_scale_bytes():
    amax = np.array([1.0, 1.5, 0.5, 0.75, 0.0, 2.0 ** -130, 3.0e38], np.float32)
    assert e8m0_exponents(amax[:6]).tolist() == [127, 128, 126, 127, 127, 0]
    with pytest.raises(ValueError, match="onestep.*2\\*\\*127"):
        e8m0_exponents(amax, "clip 3, field 'onestep'")
    assert E8M0_TABLE[0] == 2.0 ** -127 and E8M0_TABLE[254] == 2.0 ** 127 and np.isnan(E8M0_TABLE[255])
    with pytest.raises(ValueError, match="E8M0 NaN"):
        fp8_scales(np.array([127, 255], np.uint8), "shard-000000.tar, field 'onestep'")


def test_fp8_table_is_odd_monotone_and_ends_at_one():
    table = fp8_table(FP8_POWER, "float64")
    positive = table[:127]  # codes 0x00..0x7E: 0 .. 448 in e4m3fn
    assert positive[0] == 0 and positive[-1] == 1.0 and (np.diff(positive) > 0).all()
    np.testing.assert_array_equal(table[128:255], -positive)
    assert np.isnan(table[127]) and np.isnan(table[255])
    with pytest.raises(ValueError, match="companding exponent"):
        fp8_table(0.5)


def test_scales_of_the_earlier_linear_fp8_format_are_refused():
    codes = np.zeros((2, 3), np.uint8)
    with pytest.raises(ValueError, match="field 'onestep'.*float32.*re-export"):
        decode_fp8(codes, np.ones(3, np.float32), where="shard-000000.tar, field 'onestep'")
    members = [("c000000001.json", json.dumps({"codecs": {"onestep": "fp8"}}).encode()),
               ("c000000001.onestep.fp8.npy", npy_bytes(codes)),
               ("c000000001.onestep.fp8scale.npy", npy_bytes(np.ones(3, np.float32)))]
    for decode_codes in (True, False):
        with pytest.raises(ValueError, match="shard-000002.tar.*'onestep'.*re-export"):
            decode_sample(members, None, "shard-000002.tar", decode_fp8_fields=decode_codes)


# gzip'd raw fields -----------------------------------------------------------------------------
def rendered_frames(shape=(8, 64, 64, 3)) -> np.ndarray:
    """Flat background with a moving square: compresses like rendered frames do."""
    frames = np.full(shape, 96, dtype=np.uint8)
    for t in range(shape[0]):
        frames[t, 10 + t:30 + t, 20:40] = (200, 40, 40)
    return frames


def test_fp8_samples_gzip_raw_fields_only_when_it_pays():
    frames = rendered_frames()
    noise = np.random.default_rng(0).integers(0, 256, frames.shape, dtype=np.uint8)
    arrays = {"frames": frames, "noise": noise, "onestep": gaussian((2, 4, 4, 8)), "seed": np.array(3)}
    members, _ = encode_sample("c000000001", {}, arrays, "fp8")
    names = [name for name, _ in members]
    assert "c000000001.frames.npy.gz" in names and "c000000001.noise.npy" in names
    assert "c000000001.seed.npy" in names and "c000000001.onestep.fp8.npy" in names
    packed = dict(members)["c000000001.frames.npy.gz"]
    assert len(packed) < frames.nbytes / 8
    assert gzip.decompress(packed) == npy_bytes(frames)  # plain gzip: stock tools read it
    sample = decode_sample(members, None, "test")
    np.testing.assert_array_equal(sample["frames"], frames)
    assert sample["frames"].flags.writeable
    np.testing.assert_array_equal(sample["noise"], noise)
    for codec in ("f16", "bf16"):
        members, _ = encode_sample("c000000001", {}, arrays, codec)
        assert not any(name.endswith(".gz") for name, _ in members)


def test_gzip_members_are_inflated_only_when_selected_and_checked():
    members, _ = encode_sample("c000000001", {}, {"frames": rendered_frames(), "x": gaussian((4, 8))}, "fp8")
    name, packed = members[1]
    assert name == "c000000001.frames.npy.gz"
    corrupt = bytearray(packed)
    corrupt[len(corrupt) // 2] ^= 0xFF
    tampered = [members[0], (name, bytes(corrupt)), *members[2:]]
    assert set(decode_sample(tampered, None, "shard-000004.tar", fields=["x"])) == {"__key__", "meta", "x"}
    with pytest.raises(ValueError, match="shard-000004.tar, member c000000001.frames.npy.gz: (corrupt|truncated)"):
        decode_sample(tampered, None, "shard-000004.tar")
    for broken in (packed[:-9], packed[:10], packed + b"\0", packed[:-4] + (10 ** 9).to_bytes(4, "little")):
        with pytest.raises(ValueError, match="gzip member"):
            gunzip_payload(broken, "shard-000004.tar")
    with pytest.raises(ValueError, match="second 'npy' member"):
        decode_sample([*members, ("c000000001.frames.npy", npy_bytes(rendered_frames()))], None, "t")


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
    assert split_member("c000000042.frames.npy.gz", "t") == ("c000000042", "frames", "npy.gz")
    for bad in ("c000000042.onestep.pyd", "c000000042.onestep.pickle", "../c000000042.onestep.npy",
                "x.onestep.npy", "c000000042.a.b.c.npy", "c000000042.onestep.fp8.npy.gz", "c000000042.x.json.gz"):
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
        assert relative_l2(sample["onestep"], arrays["onestep"]) < (0.025 if codec == "fp8" else 4e-3)
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


@pytest.mark.gpu
def test_fp8_to_float_on_the_gpu_matches_the_cpu():
    from foresight.trainers.data import fp8_to_float

    values = np.random.default_rng(3).standard_normal((2, 4, 4, 64)).astype(np.float32)
    coded = [encode_fp8(v) for v in values]
    codes = torch.from_numpy(np.stack([c for c, _ in coded]))
    scales = torch.from_numpy(np.stack([s for _, s in coded]))
    on_cpu = fp8_to_float(codes, scales, torch.float32)
    on_gpu = fp8_to_float(codes.cuda(), scales.cuda(), torch.float32)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=0)
    torch.testing.assert_close(on_cpu[0], torch.from_numpy(decode_fp8(*coded[0], dtype=np.float32)), rtol=0, atol=0)
