"""The restricted unpickler admits numpy data and builtin containers, nothing else."""

from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest

from foresight.pipelines.ingest.safe_pickle import load_npy, load_pickled_dict, restricted_loads


def test_calvin_style_annotation_dict_round_trips(tmp_path):
    annotations = {"language": {"ann": ["open the drawer"], "task": ["open_drawer"],
                                "emb": np.arange(384, dtype=np.float32).reshape(1, 1, 384)},
                   "info": {"indx": [(358484, 358522)], "episodes": []}}
    np.save(tmp_path / "auto_lang_ann.npy", annotations, allow_pickle=True)
    loaded = load_pickled_dict(tmp_path / "auto_lang_ann.npy")
    assert loaded["language"]["ann"] == ["open the drawer"]
    assert loaded["info"]["indx"] == [(358484, 358522)]
    np.testing.assert_array_equal(loaded["language"]["emb"], annotations["language"]["emb"])


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_numpy_arrays_and_scalars_of_every_protocol(protocol):
    data = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "s": np.float64(2.5), "c": 1 + 2j, "t": (1, "x")}
    loaded = restricted_loads(pickle.dumps(data, protocol=protocol), "mem")
    np.testing.assert_array_equal(loaded["a"], data["a"])
    assert loaded["s"] == 2.5 and loaded["c"] == 1 + 2j and loaded["t"] == (1, "x")


def test_plain_numeric_npy_needs_no_pickle(tmp_path):
    np.save(tmp_path / "ep_start_end_ids.npy", np.array([[358482, 358551]], dtype=np.int64))
    np.testing.assert_array_equal(load_npy(tmp_path / "ep_start_end_ids.npy"), [[358482, 358551]])


@pytest.mark.parametrize("payload, name", [
    ({"cmd": os.system}, "posix.system"),
    ({"d": collections.OrderedDict(a=1)}, "collections.OrderedDict"),
    ({"f": eval}, "builtins.eval"),
])
def test_anything_else_is_refused_naming_file_and_global(tmp_path, payload, name):
    path = tmp_path / "scene_info.npy"
    np.save(path, np.array(payload, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError) as info:
        load_npy(path)
    message = str(info.value)
    assert str(path) in message and name in message and "numpy arrays" in message


def test_reduce_gadget_is_refused_before_it_runs(tmp_path):
    class Gadget:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with pytest.raises(ValueError, match="refusing to unpickle global"):
        restricted_loads(pickle.dumps([Gadget()]), "gadget.npy")
    assert not (tmp_path / "pwned").exists()


def test_truncated_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "auto_lang_ann.npy"
    np.save(path, {"language": {"ann": ["x" * 200]}}, allow_pickle=True)
    path.write_bytes(path.read_bytes()[:-60])
    with pytest.raises(ValueError, match="malformed pickle"):
        load_pickled_dict(path)


def test_non_dict_payload_is_rejected_for_dict_files(tmp_path):
    path = tmp_path / "scene_info.npy"
    np.save(path, np.array(["a", None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="expected a pickled dict"):
        load_pickled_dict(path)
