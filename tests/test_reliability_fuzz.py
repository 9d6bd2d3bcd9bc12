"""Fuzzed inputs: damaged or hostile Analyze/NIfTI/PNG files end in a reported skip.

Hypothesis mutates small valid files (truncation, bit flips, random overwrites, appended
junk) and writes headers with odd fields (zero, negative and huge dims, NaN/inf scalings,
unknown data types, absurd offsets and voxel sizes). Each case must end in a result or a
skip with a reason, never an exception out of the per-case function, a hang (hypothesis
deadline) or an allocation beyond a bound set by the readers' size guards (tracemalloc).
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tempfile
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_prep import volume as volume_mod
from data_prep.prepare import prepare_dataset, process_case
from data_prep.readers import PngCase, PngSlice, VolumeCase
from data_prep.readers import png_slices as png_mod
from pipeline.core.config import PrepareConfig

FUZZ = settings(
    max_examples=40,
    deadline=3000,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # stateless file-writing factories
    ],
)
CFG = PrepareConfig(n_slices=4, image_size=16, workers=1)
SHAPE = (20, 24, 20)
#: Size guards used while fuzzing (the defaults are 512**3 voxels and 4096**2 pixels).
MAX_VOXELS = 64**3
MAX_PIXELS = 256**2
#: Peak Python/numpy allocation allowed for one case: a few float64 copies of the largest
#: accepted volume. A reader that trusted a header's dims would exceed it by orders of
#: magnitude.
PEAK_BYTES = 12 * 8 * MAX_VOXELS


@pytest.fixture(autouse=True)
def small_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lower the readers' size guards so the allocation bound can be checked cheaply."""
    monkeypatch.setattr(volume_mod, "MAX_VOXELS", MAX_VOXELS)
    monkeypatch.setattr(png_mod, "MAX_PIXELS", MAX_PIXELS)


def _volume(seed: int = 0) -> np.ndarray:
    """A small brain-like blob with zero background, (20, 24, 20) float32."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    rng = np.random.default_rng(seed)
    return (
        np.where(r < 0.8, 100.0 + 50 * (r < 0.4), 0) + rng.normal(0, 1, SHAPE) * (r < 0.8)
    ).astype(np.float32)


# ---------------------------------------------------------------------------- mutations


@st.composite
def mutated(draw: st.DrawFn, blob: bytes) -> bytes:
    """``blob`` after 1-4 random edits: truncate, flip bits, overwrite, append, or replace."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "append", "random"]))
        n = len(data)
        if op == "truncate":
            del data[draw(st.integers(0, max(0, n - 1))) :]
        elif op == "flip" and n:
            for _ in range(draw(st.integers(1, 16))):
                i = draw(st.integers(0, n - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite" and n:
            i = draw(st.integers(0, n - 1))
            chunk = draw(st.binary(min_size=1, max_size=64))
            data[i : i + len(chunk)] = chunk
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=256))
        elif op == "random":
            data = bytearray(draw(st.binary(min_size=0, max_size=2048)))
    return bytes(data)


ODD_DIMS = st.sampled_from([0, 1, -1, 2, 7, 20, 24, 32767, -32768])
HUGE_DIMS = st.sampled_from([0, 1, -1, 20, 2**15, 2**30, 2**40, -(2**40)])
ODD_FLOATS = st.sampled_from([0.0, 1.0, -1.0, 2.5, 1e38, -1e38, float("nan"), float("inf")])
DATATYPES = st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1536, 1792, 2304, 99])


@st.composite
def odd_header(draw: st.DrawFn, nifti2: bool) -> dict[str, object]:
    """Header fields to overwrite: dims, data type, scaling, offset, voxel sizes, orientation."""
    dims = HUGE_DIMS if nifti2 else ODD_DIMS
    fields: dict[str, object] = {}
    if draw(st.booleans()):
        ndim = draw(st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 7, 8]))
        fields["dim"] = [ndim, *draw(st.lists(dims, min_size=7, max_size=7))]
    if draw(st.booleans()):
        fields["datatype"] = draw(DATATYPES)
    if draw(st.booleans()):
        fields["scl_slope"] = draw(ODD_FLOATS)
        fields["scl_inter"] = draw(ODD_FLOATS)
    if draw(st.booleans()):
        offsets = [0, 17, 352, 540, 10**9, -5] + ([] if nifti2 else [float("nan")])
        fields["vox_offset"] = draw(st.sampled_from(offsets))
    if draw(st.booleans()):
        fields["pixdim"] = [1.0, *draw(st.lists(ODD_FLOATS, min_size=7, max_size=7))]
    if draw(st.booleans()):
        fields["sform_code"] = draw(st.sampled_from([0, 1, 4, 99]))
        fields["srow_x"] = draw(st.lists(ODD_FLOATS, min_size=4, max_size=4))
        fields["quatern_b"] = draw(ODD_FLOATS)
    return fields


def _raw_nifti(fields: dict[str, object], nifti2: bool, data_bytes: int | None) -> bytes:
    """A single-file NIfTI whose header fields are set without any validation."""
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(_volume(), np.diag([1.0, 1.0, 1.0, 1.0]))
    header = img.header
    header.set_data_dtype(np.int16)
    payload = np.rint(img.get_fdata()).astype(np.int16).tobytes(order="F")
    offset = int(header["vox_offset"]) or header.sizeof_hdr + 4
    header["vox_offset"] = offset
    for key, value in fields.items():
        header[key] = value
    blob = header.binaryblock + b"\0" * (offset - header.sizeof_hdr) + payload
    return blob if data_bytes is None else blob[: offset + data_bytes]


def _valid_blobs(folder: Path) -> dict[str, dict[str, bytes]]:
    """The files of one valid volume per format, by suffix: nii, nii.gz, Analyze hdr+img."""
    folder.mkdir(parents=True, exist_ok=True)
    data = _volume()
    out: dict[str, dict[str, bytes]] = {}
    for name, img in (
        ("v.nii", nib.Nifti1Image(data, np.eye(4))),
        ("v.nii.gz", nib.Nifti1Image(data, np.eye(4))),
        ("v.hdr", nib.AnalyzeImage(np.rint(data).astype(np.int16), np.eye(4))),
    ):
        nib.save(img, folder / name)
        files = [name] if name != "v.hdr" else ["v.hdr", "v.img"]
        out[name] = {f: (folder / f).read_bytes() for f in files}
    return out


@pytest.fixture(scope="module")
def valid_blobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """``{"v.nii": {...}, "v.nii.gz": {...}, "v.hdr": {"v.hdr": ..., "v.img": ...}}``."""
    return _valid_blobs(tmp_path_factory.mktemp("valid"))


def _png_bytes(size: int = 24) -> bytes:
    """An 8-bit grayscale PNG of a bright disc, like a slice of the PNG release."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2) * (90 + yy)
    buffer = io.BytesIO()
    Image.fromarray(disc.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_with_ihdr(width: int, height: int, bit_depth: int, color: int) -> bytes:
    """A valid 24x24 PNG whose IHDR claims other dims (CRC fixed, so only the dims lie)."""
    blob = bytearray(_png_bytes())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    blob[16:29] = ihdr
    blob[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(blob)


# ---------------------------------------------------------------------------- helpers


def _bounded(fn: Callable[[], object]) -> object:
    """Run ``fn`` under tracemalloc; fail if its peak allocation exceeds ``PEAK_BYTES``."""
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak allocation {peak / 2**20:.1f} MiB"
    return out


def _check_volume_case(root: Path, image: str) -> None:
    """process_case on one volume: a result with slices, or a skip with a reason."""
    case = VolumeCase(subject="s", session="", root=root, image=image)
    result = _bounded(lambda: process_case(case, CFG))
    if result.slices is None:
        assert result.skipped and all(s.reason for s in result.skipped)
    else:
        assert result.slices.images.shape == (CFG.n_slices, CFG.image_size, CFG.image_size)
        assert np.isfinite(result.slices.images.astype(np.float32)).all()


# ---------------------------------------------------------------------------- tests


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["v.nii", "v.nii.gz", "v.hdr", "v.img"]))
def test_mutated_volume_files_are_skipped_or_read(
    valid_blobs: dict[str, dict[str, bytes]], data: st.DataObject, fmt: str
) -> None:
    group = "v.hdr" if fmt in ("v.hdr", "v.img") else fmt
    files = dict(valid_blobs[group])
    files[fmt] = data.draw(mutated(files[fmt]), label="bytes")
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        _check_volume_case(Path(tmp), "v.img" if group == "v.hdr" else group)


@FUZZ
@given(
    nifti2=st.booleans(),
    data=st.data(),
    data_bytes=st.one_of(st.none(), st.integers(0, 2 * int(np.prod(SHAPE)))),
    gz=st.booleans(),
)
def test_odd_nifti_headers_are_skipped_or_read(
    nifti2: bool, data: st.DataObject, data_bytes: int | None, gz: bool
) -> None:
    fields = data.draw(odd_header(nifti2), label="fields")
    blob = _raw_nifti(fields, nifti2, data_bytes)
    name = "v.nii.gz" if gz else "v.nii"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(gzip.compress(blob, compresslevel=1) if gz else blob)
        _check_volume_case(Path(tmp), name)


@FUZZ
@given(
    data=st.data(),
    dims=st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from([0, 1, 24, 4096, 60000, 2**30, 2**31 - 1]),
            st.sampled_from([0, 1, 24, 4096, 60000, 2**30]),
            st.sampled_from([1, 8, 16]),
            st.sampled_from([0, 2, 4, 6]),
        ),
    ),
)
def test_mutated_png_slices_are_skipped_or_read(data: st.DataObject, dims) -> None:
    blob = _png_with_ihdr(*dims) if dims is not None else data.draw(mutated(_png_bytes()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        good = _png_bytes()
        slices = []
        for z in range(3):
            name = f"keras_png_slices_train/case_001_slice_{z}.nii.png"
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).write_bytes(blob if z == 1 else good)
            slices.append(PngSlice(z, name))
        case = PngCase("case_001", "train", 3, root, tuple(slices))
        result = _bounded(lambda: process_case(case, CFG))
    names = [s.file for s in result.skipped]
    assert names in ([], [slices[1].image]), names
    assert result.slices is not None  # the two good slices survive


@settings(FUZZ, max_examples=25)
@given(data=st.data(), fmt=st.sampled_from(["nii.gz", "hdr", "img", "png"]))
def test_prepare_reports_the_fuzzed_file_and_keeps_the_rest(
    data: st.DataObject, fmt: str, phantom, write_nifti, write_analyze
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        if fmt == "png":
            for split in ("train", "validate", "test"):
                for case in range(2):
                    for z in range(3):
                        name = f"keras_png_slices_{split}/case_00{case}_slice_{z}.nii.png"
                        (raw / name).parent.mkdir(parents=True, exist_ok=True)
                        (raw / name).write_bytes(_png_bytes())
            victim = raw / "keras_png_slices_train" / "case_000_slice_1.nii.png"
        elif fmt == "nii.gz":
            for s in range(4):
                write_nifti(raw / f"s{s}.nii.gz", phantom(s, SHAPE))
            victim = raw / "s0.nii.gz"
        else:
            for s in range(4):
                stem = f"OAS1_000{s}_MR1_mpr_n4_anon_111_t88_masked_gfc"
                write_analyze(
                    raw / "disc1" / f"OAS1_000{s}_MR1" / f"{stem}.hdr", phantom(s, SHAPE) * 100
                )
            victim = next((raw / "disc1").rglob(f"OAS1_0000_*.{fmt}"))
        victim.write_bytes(data.draw(mutated(victim.read_bytes()), label="bytes"))
        result = _bounded(
            lambda: prepare_dataset(raw, out / "prepared", CFG, report_dir=out / "reports")
        )
        report = json.loads((out / "reports" / "prepare_report.json").read_text())
    assert report["status"] == "ok" and report == json.loads(json.dumps(result.report))
    skipped = {Path(s["file"]).name for s in report["skipped"]}
    assert skipped <= {
        victim.name,
        victim.with_suffix(".hdr").name,
        victim.with_suffix(".img").name,
    }
    # a PNG case keeps its two good slices; a volume is kept unless it is the skipped file
    assert report["total"]["volumes"] == (6 if fmt == "png" else 4 - bool(skipped))
