"""Frame codecs of the episode store: source-jpeg, video (pass-through and encoded), raw and raw-lz4.

Every codec reads back through the same ``EpisodeStore.read_frames`` as uint8 (T, H, W, 3):
exactly the source's own decode for pass-through, exactly the frames for lossless encodes, within
a PSNR bound for lossy ones; a clip read decodes only the chunks it covers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import av
import cv2
import h5py
import numpy as np
import pytest
import zarr

import fixtures_sources as fx
from foresight.flows.ingest_sources import ingest_calvin, ingest_lerobot, ingest_teleop
from foresight.pipelines.ingest import calvin, lerobot, teleop
from foresight.storage import frame_codecs
from foresight.storage.episodes import EpisodeStore

REPO = Path(__file__).resolve().parents[1]


def _ingest(tmp_path, src, **options):
    root = str(tmp_path / "root")
    summary = ingest_teleop(root, "tel", str(src), teleop.TeleopOptions(**options))
    return summary, EpisodeStore(root, "tel")


def _source_jpegs(path: Path, cam: str) -> list[bytes]:
    with h5py.File(path) as h5:
        buffers = h5[f"observations/images/{cam}"][()]
    lengths = teleop.jpeg_lengths(buffers)
    return [buffers[t, :lengths[t]].tobytes() for t in range(len(buffers))]


def _cv2_decode(jpegs: list[bytes]) -> np.ndarray:
    return np.stack([cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture()
def jpeg_episode(tmp_path):
    return fx.make_teleop_episode(tmp_path / "src" / "episode_0.hdf5", length=70, cameras=("cam_high", "cam_low"),
                                  compress=True)


def test_source_jpeg_keeps_the_recorders_bytes_and_reads_as_their_cv2_decode(tmp_path, jpeg_episode):
    summary, store = _ingest(tmp_path, tmp_path / "src")
    assert summary.written == ["episode_0"]
    info = store.info()
    assert {cam: s.codec for cam, s in info.frame_storage.items()} == {"cam_high": "source-jpeg",
                                                                        "cam_low": "source-jpeg"}
    assert info.frame_storage["cam_high"].pass_through
    for cam in ("cam_high", "cam_low"):
        jpegs = _source_jpegs(jpeg_episode, cam)
        np.testing.assert_array_equal(store.read_frames("episode_0", cam), _cv2_decode(jpegs))
        assert store.frame_storage("episode_0", cam).codec == "source-jpeg"
        array = store.frames_array("episode_0", cam)
        assert array.metadata.codecs[0].codecs[0].to_dict()["name"] == frame_codecs.SOURCE_JPEG
    stored = store.total_bytes()
    assert info.source_bytes == jpeg_episode.stat().st_size
    jpeg_total = sum(len(j) for cam in ("cam_high", "cam_low") for j in _source_jpegs(jpeg_episode, cam))
    frames_bytes = sum(p.stat().st_size for p in (tmp_path / "root/datasets/tel").rglob("frames.zarr/**/c/*/*/*/*"))
    assert jpeg_total <= frames_bytes <= jpeg_total + 2 * 2 * (64 * 16 + 4)  # the JPEGs, 2 shard indexes per camera
    assert stored < info.source_bytes * 1.1


def test_plain_zarr_reads_source_jpeg_frames_once_the_package_is_imported(tmp_path, jpeg_episode):
    _ingest(tmp_path, tmp_path / "src")
    array_path = next((tmp_path / "root/datasets/tel/episodes/episode_0").glob("frames.zarr/cam_low"))
    expected = tmp_path / "expected.npy"
    np.save(expected, _cv2_decode(_source_jpegs(jpeg_episode, "cam_low"))[5:21])
    script = ("import numpy, zarr, storage.frame_codecs; "
              f"frames = zarr.open_array({str(array_path)!r}, mode='r')[5:21]; "
              f"assert frames.dtype == numpy.uint8 and frames.shape[1:] == (48, 64, 3); "
              f"numpy.testing.assert_array_equal(frames, numpy.load({str(expected)!r})); print('ok')")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_clip_read_decodes_only_its_frames(tmp_path, jpeg_episode, monkeypatch):
    _, store = _ingest(tmp_path, tmp_path / "src")
    calls = []
    decode = frame_codecs.decode_jpeg
    monkeypatch.setattr(frame_codecs, "decode_jpeg", lambda data, swap_rb=False: calls.append(1) or
                        decode(data, swap_rb))
    clip = store.read_frames("episode_0", "cam_high", slice(50, 66))
    assert clip.shape == (16, 48, 64, 3) and len(calls) == 16
    calls.clear()
    store.read_frames("episode_0", "cam_high", [3, 69])
    assert len(calls) == 2


def test_corrupt_jpeg_names_file_episode_camera_and_frame_and_the_rest_lands(tmp_path):
    for index in range(3):
        fx.make_teleop_episode(tmp_path / "src" / f"episode_{index}.hdf5", length=6, compress=True)
    with h5py.File(tmp_path / "src/episode_1.hdf5", "r+") as h5:
        data = h5["observations/images/cam_high"]
        frame = data[4]
        frame[len(_source_jpegs(tmp_path / "src/episode_1.hdf5", "cam_high")[4]) - 2:] = 0  # EOI cut off
        data[4] = frame
    summary, store = _ingest(tmp_path, tmp_path / "src")
    assert store.episode_ids() == ["episode_0", "episode_2"]
    [line] = summary.quarantined
    assert "episode_1.hdf5" in line and "episode 'episode_1'" in line
    assert "field 'observations/images/cam_high'" in line and "frame 4: corrupt JPEG" in line


def test_teleop_file_without_effort_ingests_and_is_recorded_absent(tmp_path):
    for index in range(3):
        fx.make_teleop_episode(tmp_path / "src" / f"episode_{index}.hdf5", length=5, effort=index != 1,
                               base_action=index == 2)
    summary, store = _ingest(tmp_path, tmp_path / "src")
    assert summary.written == ["episode_0", "episode_1", "episode_2"] and not summary.partial
    info = store.info()
    assert set(info.features) == {"state", "qvel", "effort", "action", "base_action"}
    assert info.absent_fields == {"base_action": ["episode_0", "episode_1"], "effort": ["episode_1"]}
    assert store.record("episode_1").extra["absent_fields"] == ["base_action", "effort"]
    np.testing.assert_array_equal(store.read_column("episode_0", "effort"), fx.teleop_vectors(5, 14, 2))
    with pytest.raises(ValueError, match="episode 'episode_1', field 'effort': absent"):
        store.read_column("episode_1", "effort")
    assert info.stats["effort"].count == 10 and info.stats["base_action"].count == 5
    assert info.stats["state"].count == 15


def test_a_file_without_action_is_still_quarantined(tmp_path):
    for index in range(2):
        fx.make_teleop_episode(tmp_path / "src" / f"episode_{index}.hdf5", length=5)
    with h5py.File(tmp_path / "src/episode_1.hdf5", "r+") as h5:
        del h5["action"]
    summary, store = _ingest(tmp_path, tmp_path / "src")
    assert store.episode_ids() == ["episode_0"]
    assert "field 'action': dataset missing" in summary.quarantined[0]


@pytest.mark.parametrize("codec, options", [("raw", {"zstd_level": 9}), ("raw-lz4", {}), ("video", {})])
def test_lossless_codecs_store_raw_frames_exactly(tmp_path, codec, options):
    fx.make_teleop_episode(tmp_path / "src" / "episode_0.hdf5", length=20, cameras=("cam_high",), size=(32, 48))
    summary, store = _ingest(tmp_path, tmp_path / "src", frame_codec=codec, **options)
    expected = np.stack([fx.teleop_frame(0, t, (32, 48)) for t in range(20)])
    np.testing.assert_array_equal(store.read_frames("episode_0", "cam_high"), expected)
    np.testing.assert_array_equal(store.read_frames("episode_0", "cam_high", [19, 3]), expected[[19, 3]])
    storage = store.info().frame_storage["cam_high"]
    assert storage.codec == codec and not storage.pass_through
    if codec == "raw":
        assert storage.zstd_level == 9
    if codec == "video":
        assert storage.crf is None and store.frames_array("episode_0", "cam_high").chunks[0] == storage.segment_frames


def test_lossy_video_encode_stays_within_its_psnr_bound_and_decodes_only_its_segments(tmp_path, monkeypatch):
    fx.make_teleop_episode(tmp_path / "src" / "episode_0.hdf5", length=40, cameras=("cam_high",), size=(32, 48))
    _, store = _ingest(tmp_path, tmp_path / "src", frame_codec="video", crf=18)
    expected = np.stack([fx.teleop_frame(0, t, (32, 48)) for t in range(40)])
    assert _psnr(store.read_frames("episode_0", "cam_high"), expected) > 26  # yuv420p on per-pixel noise
    assert store.info().frame_storage["cam_high"].crf == 18
    segments = []
    decode = frame_codecs.decode_segment
    monkeypatch.setattr(frame_codecs, "decode_segment",
                        lambda packets, *args, **kw: segments.append(len(packets)) or decode(packets, *args, **kw))
    clip = store.read_frames("episode_0", "cam_high", slice(8, 24))
    assert clip.shape == (16, 32, 48, 3) and segments == [8, 8]  # two 8-frame segments, nothing else


def test_jpeg_source_can_be_decoded_into_raw(tmp_path, jpeg_episode):
    _, store = _ingest(tmp_path, tmp_path / "src", frame_codec="raw-lz4")
    assert store.info().frame_storage["cam_low"].codec == "raw-lz4"
    np.testing.assert_array_equal(store.read_frames("episode_0", "cam_low"),
                                  _cv2_decode(_source_jpegs(jpeg_episode, "cam_low")))


def test_source_jpeg_of_raw_frames_is_refused_with_the_camera_named(tmp_path):
    fx.make_teleop_episode(tmp_path / "src" / "episode_0.hdf5", length=4, cameras=("cam_high",))
    with pytest.raises(ValueError, match="camera 'cam_high': --frame-codec source-jpeg needs JPEG source frames"):
        _ingest(tmp_path, tmp_path / "src", frame_codec="source-jpeg")


def test_a_changed_frame_codec_is_a_new_dataset_version(tmp_path, jpeg_episode):
    _, store = _ingest(tmp_path, tmp_path / "src")
    before = store.info().source_fingerprint
    summary, store = _ingest(tmp_path, tmp_path / "src", frame_codec="raw")
    assert summary.written == ["episode_0"] and store.info().source_fingerprint != before


def test_shard_bytes_read_by_plain_zarr(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 24, 3), dtype=np.uint8)
    jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    array = group.create_array("cam", shape=(5, 16, 24, 3), dtype="uint8", chunks=(1, 16, 24, 3),
                               shards=(4, 16, 24, 3), serializer=frame_codecs.SourceJpegCodec(), compressors=None,
                               fill_value=0)
    for shard in range(2):
        key = array.metadata.encode_chunk_key((shard, 0, 0, 0))
        (tmp_path / "g.zarr/cam" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "g.zarr/cam" / key).write_bytes(frame_codecs.shard_bytes(jpegs[4 * shard:4 * shard + 4], 4))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "g.zarr/cam"), mode="r")[:], _cv2_decode(jpegs))


# LeRobot v3.0 video kept as its packets --------------------------------------------------------
def _lerobot(tmp_path, src, **options):
    root = str(tmp_path / "root")
    summary = ingest_lerobot(root, "lr", str(src), lerobot.LeRobotOptions(**options))
    return summary, EpisodeStore(root, "lr")


def _pyav_decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


@pytest.fixture(scope="module")
def lerobot_v3(tmp_path_factory):
    return fx.make_lerobot_v3(tmp_path_factory.mktemp("lr") / "v3", lengths=(12, 9))


def _mp4(src: Path) -> Path:
    return src / f"videos/{fx.LEROBOT_CAMERA}/chunk-000/file-000.mp4"


def test_lerobot_video_is_kept_as_its_packets_and_reads_as_its_pyav_decode(tmp_path, lerobot_v3):
    summary, store = _lerobot(tmp_path, lerobot_v3)
    assert summary.written == ["episode_000000", "episode_000001"]
    storage = store.info().frame_storage["top"]
    assert storage.codec == "video" and storage.pass_through and storage.stream_codec == "h264"
    source = _pyav_decode(_mp4(lerobot_v3))
    np.testing.assert_array_equal(store.read_frames("episode_000000", "top"), source[:12])
    np.testing.assert_array_equal(store.read_frames("episode_000001", "top"), source[12:])
    np.testing.assert_array_equal(store.read_frames("episode_000001", "top", [8, 0, 5]), source[[20, 12, 17]])
    assert store.frame_storage("episode_000001", "top").segment_frames == 2  # the fixture encodes with g=2
    decoded_first = _lerobot(tmp_path / "raw", lerobot_v3, frame_codec="raw")[1]
    np.testing.assert_array_equal(decoded_first.read_frames("episode_000000", "top"), source[:12])
    assert decoded_first.info().frame_storage["top"].codec == "raw"


def test_a_lerobot_clip_read_decodes_only_its_segments(tmp_path, lerobot_v3, monkeypatch):
    _, store = _lerobot(tmp_path, lerobot_v3)
    segments = []
    decode = frame_codecs.decode_segment
    monkeypatch.setattr(frame_codecs, "decode_segment",
                        lambda packets, *args, **kw: segments.append(len(packets)) or decode(packets, *args, **kw))
    clip = store.read_frames("episode_000000", "top", slice(3, 7))
    assert clip.shape == (4, *fx.LEROBOT_SIZE, 3) and segments == [2, 2, 2]  # frames 2-3, 4-5, 6-7
    segments.clear()
    store.read_frames("episode_000001", "top", [8])
    assert segments == [1]  # the 9-frame episode's last segment holds one frame


def test_a_corrupt_video_segment_quarantines_its_episode_only(tmp_path, lerobot_v3):
    src = shutil.copytree(lerobot_v3, tmp_path / "src")
    with av.open(str(_mp4(src))) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    pos, size = packets[16]  # episode 1 (frames 12-20), its frame 4
    data = bytearray(_mp4(src).read_bytes())
    data[pos + size // 3:pos + size - 2] = bytes((b * 7 + 13) % 256 for b in data[pos + size // 3:pos + size - 2])
    _mp4(src).write_bytes(bytes(data))
    summary, store = _lerobot(tmp_path, src)
    assert store.episode_ids() == ["episode_000000"]
    [line] = summary.quarantined
    assert "file-000.mp4" in line and "episode 'episode_000001'" in line
    assert f"field '{fx.LEROBOT_CAMERA}'" in line and "frame 4: corrupt video segment" in line


def test_info_shows_store_bytes_against_source_bytes(tmp_path, jpeg_episode):
    from typer.testing import CliRunner

    from foresight.flows.cli import app

    _, store = _ingest(tmp_path, tmp_path / "src")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "root")])
    assert result.exit_code == 0, result.output
    ratio = store.total_bytes() / jpeg_episode.stat().st_size
    assert f"vs source {jpeg_episode.stat().st_size / 1e6:.2f} MB: {ratio:.2f}x" in result.output
    assert "cam_high source-jpeg" in result.output and ratio < 1.1


def test_a_recording_written_by_lerobot_keeps_its_av1_packets(tmp_path):
    """bench/data holds a LeRobot v3.0 dataset written by lerobot 0.4.4 itself (libsvtav1, g=2)."""
    src = REPO / "bench/data/lerobot_v30_av1_96x128"
    summary, store = _lerobot(tmp_path, src)
    assert summary.written == ["episode_000000", "episode_000001", "episode_000002"]
    source = _pyav_decode(_mp4_of(src))
    stored = np.concatenate([store.read_frames(e, "top") for e in store.episode_ids()])
    np.testing.assert_array_equal(stored, source)
    assert store.frame_storage("episode_000002", "top").stream_codec == "av1"
    frames_bytes = sum(p.stat().st_size for p in (tmp_path / "root").rglob("frames.zarr/top/c/*/*/*/*"))
    assert frames_bytes <= 1.1 * _mp4_of(src).stat().st_size
    assert store.total_bytes() <= 1.1 * store.info().source_bytes


def _mp4_of(src: Path) -> Path:
    [path] = sorted(src.glob("videos/*/chunk-*/file-*.mp4"))
    return path


def test_calvin_frames_encoded_as_lossless_video_read_back_exactly(tmp_path):
    src = tmp_path / "calvin"
    fx.make_calvin_dataset(src, lengths=(42, 6))  # its first language window ends at frame 40
    stores = {}
    for codec in ("raw", "video"):
        root = str(tmp_path / codec)
        options = calvin.CalvinOptions(splits=["training"], cameras=["rgb_gripper"], depth=True, frame_codec=codec)
        summary = ingest_calvin(root, "cal", str(src), options)
        assert not summary.partial
        stores[codec] = EpisodeStore(root, "cal")
    raw, video = stores["raw"], stores["video"]
    assert {c: s.codec for c, s in video.info().frame_storage.items()} == dict.fromkeys(raw.info().cameras, "video")
    for episode in raw.episode_ids():
        for camera in raw.info().cameras:  # colour and packed depth, both exact
            np.testing.assert_array_equal(video.read_frames(episode, camera), raw.read_frames(episode, camera))


def test_a_damaged_stored_chunk_reads_as_one_line_naming_episode_and_camera(tmp_path, jpeg_episode):
    _, store = _ingest(tmp_path, tmp_path / "src")
    [shard] = (tmp_path / "root/datasets/tel/episodes/episode_0").glob("frames.zarr/cam_low/c/1/0/0/0")
    data = bytearray(shard.read_bytes())
    data[:64] = b"\0" * 64  # the first JPEG of the shard (frame 64) loses its headers
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"dataset 'tel', episode 'episode_0', camera 'cam_low': corrupt JPEG"):
        EpisodeStore(str(tmp_path / "root"), "tel").read_frames("episode_0", "cam_low", [64])
    np.testing.assert_array_equal(store.read_frames("episode_0", "cam_low", [63]),
                                  _cv2_decode(_source_jpegs(jpeg_episode, "cam_low")[63:64]))


def test_pass_through_shards_on_an_fsspec_root(tmp_path, jpeg_episode, lerobot_v3):
    root = f"memory://frame-codecs-{tmp_path.name}"
    ingest_teleop(root, "tel", str(tmp_path / "src"), teleop.TeleopOptions())
    np.testing.assert_array_equal(EpisodeStore(root, "tel").read_frames("episode_0", "cam_low", slice(60, 70)),
                                  _cv2_decode(_source_jpegs(jpeg_episode, "cam_low")[60:70]))
    ingest_lerobot(root, "lr", str(lerobot_v3), lerobot.LeRobotOptions())
    np.testing.assert_array_equal(EpisodeStore(root, "lr").read_frames("episode_000001", "top"),
                                  _pyav_decode(_mp4(lerobot_v3))[12:])


@pytest.mark.parametrize("keyframes, count, length", [
    (set(range(0, 12, 2)), 12, 2),  # LeRobot's g=2
    ({0, 3, 6, 9}, 10, 3),
    ({0, 5, 7}, 10, 5),  # a scene-cut keyframe at 7 is not needed
    ({0, 4, 7}, 10, 7),  # segments 0-6 and 7-9
    ({0, 4, 7}, 15, 15),  # no regular grid: one segment
    ({1, 2}, 3, None),  # not starting on a keyframe
])
def test_segment_length_is_the_shortest_keyframe_grid(keyframes, count, length):
    assert lerobot.segment_length(keyframes, count) == length
