"""Depth-map pickles: numeric 2-D arrays load; anything else is refused without running code."""
import os
import pickle

import numpy as np
import pytest

from common.io.safe_pickle import DepthmapError, load_depthmap


def dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int32])
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numeric_arrays_round_trip(tmp_path, dtype, protocol):
    depth = (np.arange(12).reshape(3, 4) * 7).astype(dtype)
    out = load_depthmap(dump(tmp_path / "d.pkl", depth, protocol))
    assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, depth.astype(np.float32))


def test_non_contiguous_and_fortran_arrays(tmp_path):
    depth = np.arange(30, dtype=np.float64).reshape(5, 6)
    for arr in (depth[:, ::2], np.asfortranarray(depth)):
        for protocol in (2, 5):
            np.testing.assert_array_equal(load_depthmap(dump(tmp_path / "d.pkl", arr, protocol)), arr)


def py2_pickle(data: np.ndarray) -> bytes:
    """A protocol-2 pickle as Python 2 with numpy 1.x writes it: ``numpy.core.multiarray``
    names and the array bytes as a Python 2 ``str`` (SHORT_BINSTRING, or BINSTRING from 256 bytes)."""
    raw = data.astype("<f4").tobytes()
    h, w = data.shape
    assert h < 256 and w < 256
    payload = b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + len(raw).to_bytes(4, "little")
    return (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02"
            b"K\x00\x85U\x01b\x87Rq\x03(K\x01K" + bytes([h]) + b"K" + bytes([w]) + b"\x86"
            b"cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R"
            b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            b"\x89" + payload + raw + b"tb.")


def test_python2_protocol2_pickle(tmp_path):
    depth = np.array([[0.0, 512.5, 600.0], [0.0, 0.0, 1e4]], np.float32)
    path = tmp_path / "depthmap400266.pkl"
    path.write_bytes(py2_pickle(depth))
    # the same bytes need encoding='latin1' with the plain unpickler too
    np.testing.assert_array_equal(pickle.loads(path.read_bytes(), encoding="latin1"), depth)
    np.testing.assert_array_equal(load_depthmap(path), depth)


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Prints:
    def __reduce__(self):
        return (print, ("this should never be printed",))


def test_malicious_pickles_are_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = dump(tmp_path / "depthmap400266.pkl", RunsShell(marker))
    with pytest.raises(DepthmapError) as err:
        load_depthmap(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "refused to load" in msg and "system" in msg
    assert "only numeric arrays are allowed" in msg
    assert not marker.exists()

    # hidden inside an otherwise valid structure, at an old protocol
    path = dump(tmp_path / "p.pkl", [np.zeros((2, 2)), Prints()], protocol=0)
    with pytest.raises(DepthmapError, match=r"refused to load '(__builtin__|builtins)\.print'"):
        load_depthmap(path)
    assert "never be printed" not in capsys.readouterr().out


def test_numpy_names_cannot_be_abused(tmp_path):
    # REDUCE on numpy.ndarray would allocate whatever shape the file asks for
    evil = b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85R."
    path = tmp_path / "alloc.pkl"
    path.write_bytes(evil)
    with pytest.raises(DepthmapError, match=r"alloc\.pkl: refused to call 'numpy.ndarray'"):
        load_depthmap(path)
    # another callable from numpy is not on the list
    path.write_bytes(b"\x80\x02cnumpy\nload\nX\x03\x00\x00\x00/x/\x85R.")
    with pytest.raises(DepthmapError, match="refused to load 'numpy.load'"):
        load_depthmap(path)


@pytest.mark.parametrize("obj, what", [
    (np.array([[1.0, None]], dtype=object), "dtype object"),
    (np.zeros((2, 3, 4), np.float32), r"shape \(2, 3, 4\)"),
    (np.zeros(5, np.float32), r"shape \(5,\)"),
    (np.zeros((0, 4), np.float32), "empty"),
    ("depth", "a str"),
    ({"depth": np.zeros((2, 2))}, "a dict"),
    (np.zeros((2, 2), complex), "complex128"),
    (np.zeros((2, 2), bool), "bool"),
    (np.array([[1.0, np.nan]]), "non-finite"),
    (np.array([[1.0, 1e300]]), "non-finite"),
])
def test_wrong_content_is_named(tmp_path, obj, what):
    path = dump(tmp_path / "depthmap400001.pkl", obj)
    with pytest.raises(DepthmapError, match=what) as err:
        load_depthmap(path)
    assert str(err.value).startswith(str(path))


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "depthmap400002.pkl"
    path.write_bytes(pickle.dumps(np.ones((8, 8), np.float32))[:-30])
    with pytest.raises(DepthmapError, match="not a readable depth-map pickle") as err:
        load_depthmap(path)
    assert str(err.value).startswith(str(path))
    path.write_bytes(b"")
    with pytest.raises(DepthmapError, match="not a readable"):
        load_depthmap(path)
    path.write_bytes(b"\xff\xd8\xff\xe0 a jpeg, not a pickle")
    with pytest.raises(DepthmapError, match="not a readable"):
        load_depthmap(path)
    with pytest.raises(FileNotFoundError):
        load_depthmap(tmp_path / "missing.pkl")


# The byte order in a pickled dtype's state, as numpy writes it at protocols 0, 2 and 4/5.
ORDER_IN_STATE = {0: b"(I3\nV{}\n", 2: b"(K\x03X\x01\x00\x00\x00{}", 5: b"(K\x03\x8c\x01{}"}


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_multibyte_dtype_without_byte_order_is_refused(tmp_path, dtype, protocol):
    """'|' (no byte order) is numpy's mark for one-byte types. On a big-endian float32 map it
    would make the loader read the bytes in the machine's order: garbage depths."""
    depth = np.array([[0, 512.5, 600], [700.25, 0, 1000]]).astype(dtype)
    big_endian = depth.astype(depth.dtype.newbyteorder(">"))
    data = pickle.dumps(big_endian, protocol=protocol)
    state = ORDER_IN_STATE[protocol]
    assert data.count(state.replace(b"{}", b">")) == 1
    path = tmp_path / "depthmap400266.pkl"
    path.write_bytes(data)  # as written: loads with its values
    np.testing.assert_array_equal(load_depthmap(path), depth.astype(np.float32))
    path.write_bytes(data.replace(state.replace(b"{}", b">"), state.replace(b"{}", b"|")))
    with pytest.raises(DepthmapError, match=r"has no byte order \('\|'\)") as err:
        load_depthmap(path)
    assert str(err.value).startswith(f"{path}: refused a dtype {np.dtype(dtype).str[1:]} ")


def test_one_byte_dtype_has_no_byte_order_and_loads(tmp_path):
    depth = np.array([[0, 12, 250]], np.uint8)
    data = pickle.dumps(depth, protocol=2)
    assert b"X\x01\x00\x00\x00|" in data  # numpy writes '|' for one-byte types
    np.testing.assert_array_equal(load_depthmap(dump(tmp_path / "d.pkl", depth, 2)), depth)


# ------------------------------------------------------------------------------ the fast reader
def numpy_pickles():
    """What the fast reader is for: plain arrays as numpy pickles them at protocols 2-5 (C and
    Fortran order, three dtypes, small and large payloads) and as Python 2 did."""
    depth = (np.arange(20 * 17, dtype=np.float32).reshape(20, 17) % 9) * 150
    out = []
    for dtype in (np.float32, ">f8", np.uint16):
        for array in (depth.astype(dtype), np.asfortranarray(depth.astype(dtype)), depth[:3, :2].astype(dtype)):
            out += [(f"{np.dtype(dtype).str} {array.shape} protocol {p}", pickle.dumps(array, protocol=p))
                    for p in (2, 3, 4, 5)]
    out += [("python 2 SHORT_BINSTRING", py2_pickle(depth[:2, :3])), ("python 2 BINSTRING", py2_pickle(depth))]
    return out


def same_array(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes(order="A") == b.tobytes(order="A") \
        and a.flags.f_contiguous == b.flags.f_contiguous


@pytest.mark.parametrize("name, data", numpy_pickles(), ids=lambda v: v if isinstance(v, str) else "")
def test_fast_reader_reads_numpys_own_pickles_as_the_careful_one_does(name, data):
    from common.io.safe_pickle import _careful_array, _fast_array

    fast = _fast_array(data)
    assert fast is not None, name  # taken: the speed is there
    assert same_array(fast, _careful_array(data, "x")), name
    np.testing.assert_array_equal(fast, pickle.loads(data, encoding="latin1"))  # numpy's own reading


def test_fast_reader_leaves_anything_else_to_the_careful_one():
    from common.io.safe_pickle import _fast_array

    depth = np.ones((3, 4), np.float32)
    plain = pickle.dumps(depth, protocol=2)
    assert _fast_array(plain) is not None
    for other in (pickle.dumps(depth, protocol=0), pickle.dumps(depth, protocol=1),  # text opcodes
                  plain + b"trailing", plain[:-1],  # bytes after STOP; no STOP
                  pickle.dumps([depth], protocol=4),  # a list (EMPTY_LIST, APPENDS)
                  pickle.dumps(RunsShell("/nonexistent/x"), protocol=4),  # a name not on the list
                  plain.replace(b"q\x01", b"r\x11\x27\x00\x00", 1)):  # LONG_BINPUT 10001 > the memo limit
        assert _fast_array(other) is None
    # An opcode running across the end of a FRAME (the unpickler reads a file frame by frame).
    data = pickle.dumps(depth, protocol=4)
    assert data[2] == 0x95
    size = int.from_bytes(data[3:11], "little")
    cut = data[:3] + (size - 20).to_bytes(8, "little") + data[11:]
    assert _fast_array(cut) is None


def test_fast_reader_agrees_with_the_careful_one_on_corrupt_pickles():
    """Seeded mutations of every kind of pickle: the fast reader either declines or gives exactly
    the careful reader's array (never one the careful reader refuses)."""
    from common.io.safe_pickle import DepthmapError, _careful_array, _fast_array
    from tools.fuzz import BINARY_MUTATIONS

    bases = [data for _name, data in numpy_pickles()]
    mutations = [m for m, _weight in BINARY_MUTATIONS.values()]
    rng = np.random.default_rng(0)
    taken = 0
    for case in range(3000):
        data = bases[case % len(bases)]
        for _ in range(1 + case % 2):
            data = mutations[int(rng.integers(len(mutations)))](data, rng)
        fast = _fast_array(data)
        if fast is None:
            continue
        taken += 1
        try:
            careful = _careful_array(data, "case")
        except DepthmapError as err:
            raise AssertionError(f"case {case}: the fast reader accepted what the careful one refuses: {err}")
        assert same_array(fast, careful), case
    assert taken > 300  # the mutations that keep a readable array (most change the payload)


def test_quick_depth_check_is_the_three_counts():
    """``_plausible_depths`` says yes exactly when the counts of non-finite, negative and too-small
    depths are all zero (for any positive depth_min)."""
    from common.io.safe_pickle import _plausible_depths

    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, -1.0, 0.5, 0.999999, 1.0, 3.4e38, 1e-45],
                        np.float32)
    for case in range(400):
        depth = rng.uniform(1, 2000, size=(7, 5)).astype(np.float32)
        depth[rng.uniform(size=depth.shape) < 0.4] = 0
        for _ in range(int(rng.integers(0, 3))):
            depth.flat[int(rng.integers(depth.size))] = specials[int(rng.integers(len(specials)))]
        depth_min = float(rng.choice([1.0, 0.5, 1e-3, 600.0]))
        with np.errstate(invalid="ignore"):
            counts = (int((~np.isfinite(depth)).sum()), int((depth < 0).sum()),
                      int(((depth > 0) & (depth < depth_min)).sum()))
        assert _plausible_depths(depth, depth_min) == (counts == (0, 0, 0)), (case, depth, depth_min)
    # depth_min <= 0: the counts decide (the quick check steps aside)
    assert not _plausible_depths(np.ones((2, 2), np.float32), 0.0)
