"""benchmarks/matfile.py against scipy.io.loadmat on files scipy.io.savemat writes (compressed or not): numeric
arrays of each stored type, char, cell and struct arrays; a v7.3 (HDF5) file is refused in one line."""

import numpy as np
import pytest

from miniproclip.benchmarks.matfile import read_mat
from miniproclip.errors import BenchmarkError

sio = pytest.importorskip("scipy.io")


def assert_same(ours, theirs):
    """Our value equals scipy's: numeric and char arrays exactly (dtype, shape, values); cells entry by entry;
    a struct entry (ours a dict) field by field."""
    if isinstance(theirs, np.ndarray) and theirs.dtype.names:  # a struct array
        assert ours.shape == theirs.shape
        for mine, record in zip(ours.ravel(order="F"), theirs.ravel(order="F")):
            assert list(mine) == list(theirs.dtype.names)
            for name in theirs.dtype.names:
                assert_same(mine[name], record[name])
    elif isinstance(theirs, np.ndarray) and theirs.dtype == object:  # a cell array
        assert ours.shape == theirs.shape
        for mine, entry in zip(ours.ravel(order="F"), theirs.ravel(order="F")):
            assert_same(mine, entry)
    else:
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and np.array_equal(ours, theirs)


@pytest.mark.parametrize("compressed", [False, True])
def test_equals_scipy(tmp_path, compressed):
    rng = np.random.default_rng(0)
    struct = np.zeros((1, 3), dtype=[("class", "O"), ("fname", "O"), ("box", "O")])
    for i in range(3):
        struct[0, i] = (np.array([[i + 1]], dtype=np.uint8), f"{i:05d}.jpg", rng.random((1, 4)))
    variables = {
        "doubles": rng.random((3, 5)),  # column-major on disk: the shape must come back (3, 5)
        "small_ints_as_double": np.array([[1.0, 102.0, 7.0]]),  # scipy stores these as miUINT8, class double
        "int32": rng.integers(-1000, 1000, (2, 2, 2), dtype=np.int32),
        "uint16": np.array([[6, 4, 3]], dtype=np.uint16),
        "int64": np.array([[-(2 ** 40)]], dtype=np.int64),
        "single": rng.random((4, 1)).astype(np.float32),
        "logical": np.array([[True, False]]),
        "text": "AM General Hummer SUV 2000",
        "rows": np.array(["abc", "xyz"]),
        "cells": np.array([["Acura RL Sedan 2012", "Audi S4 Sedan 2007", "äöü"]], dtype=object),
        "annotations": struct,
    }
    path = tmp_path / "t.mat"
    sio.savemat(path, variables, do_compression=compressed)
    ours, theirs = read_mat(str(path)), sio.loadmat(path)
    assert set(ours) == set(variables)
    for name in variables:
        assert_same(ours[name], theirs[name])


def test_refuses_v73_and_foreign_files(tmp_path):
    hdf5 = tmp_path / "v73.mat"
    hdf5.write_bytes(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: ... HDF5 schema 1.00 ." + b" " * 200)
    with pytest.raises(BenchmarkError, match=r"v73\.mat: not a MATLAB level-5 \.mat file \(v7\.3/HDF5 files are "
                                             r"not read\)"):
        read_mat(str(hdf5))
    broken = tmp_path / "broken.mat"
    good = tmp_path / "good.mat"
    sio.savemat(good, {"x": np.arange(100.0)}, do_compression=True)
    broken.write_bytes(good.read_bytes()[:150])  # a torn download
    with pytest.raises(BenchmarkError, match=r"broken\.mat: a \.mat file this reader cannot read"):
        read_mat(str(broken))
