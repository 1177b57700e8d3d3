"""Mask edits (issue 4, "Mask edits"): valid label maps, anatomy kept, seeded, spec errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from gem3d.data.phantoms import make_phantom
from gem3d.errors import ConfigError, DataError
from gem3d.masks import MaskEdit, apply_edits, is_valid_label_map, left_right_axis, parse_edits

NUM_LABELS = 5
LESION = 4


def phantom_label(seed: int, num_labels: int = NUM_LABELS) -> np.ndarray:
    """A ``[D, H, W]`` = ``[16, 24, 24]`` phantom label map (lesion 4 inside the core if 5 labels)."""
    _, label = make_phantom((24, 24, 16), num_labels=num_labels, seed=seed)
    return np.ascontiguousarray(label.transpose(2, 0, 1))


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


@pytest.mark.parametrize(
    "spec",
    [
        "rotate:15",
        "flip",
        "flip:0",
        "elastic:2",
        "shift-lesion:0.5",
        "transplant",
        "remove:4",
        "relabel:3=1",
        "rotate:10,flip,elastic:2,shift-lesion:0.5,transplant,remove:3,relabel:2=1",
    ],
)
def test_every_edit_returns_a_valid_label_map(spec: str) -> None:
    # prepare
    label = phantom_label(seed=1)
    original = label.copy()
    donor = phantom_label(seed=7)
    # execute
    out, records = apply_edits(label, parse_edits(spec), NUM_LABELS, np.random.default_rng(0), donors=[donor])
    # assert
    assert is_valid_label_map(out, NUM_LABELS)
    assert out.shape == label.shape and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.array_equal(label, original), "the input must not be modified"
    assert [r["name"] for r in records] == [e.name for e in parse_edits(spec)]
    json.dumps(records)  # provenance is JSON-serialisable
    assert any(r["changed"] for r in records)


def test_changed_flag_tells_whether_each_edit_changed_the_mask() -> None:
    # prepare
    label = phantom_label(seed=2)
    edits = parse_edits("rotate:0,relabel:1=1,flip")
    # execute
    out, records = apply_edits(label, edits, NUM_LABELS, np.random.default_rng(0))
    # assert
    assert [r["changed"] for r in records] == [False, False, True]
    assert not np.array_equal(out, label)


def test_edits_are_deterministic_for_a_seed_and_differ_across_seeds() -> None:
    # prepare
    label = phantom_label(seed=3)
    donors = [phantom_label(seed=8), phantom_label(seed=9)]
    edits = parse_edits("rotate:20,elastic:2,transplant")
    # execute
    first, first_records = apply_edits(label, edits, NUM_LABELS, np.random.default_rng(5), donors=donors)
    again, again_records = apply_edits(label, edits, NUM_LABELS, np.random.default_rng(5), donors=donors)
    other, other_records = apply_edits(label, edits, NUM_LABELS, np.random.default_rng(6), donors=donors)
    # assert
    assert np.array_equal(first, again) and first_records == again_records
    assert not np.array_equal(first, other)
    assert first_records[0]["angle_deg"] != other_records[0]["angle_deg"]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_twice_is_identity(axis: int) -> None:
    # prepare
    label = phantom_label(seed=4)
    edit = MaskEdit("flip", (axis,))
    # execute
    once, _ = apply_edits(label, [edit], NUM_LABELS, np.random.default_rng(0))
    twice, _ = apply_edits(label, [edit, edit], NUM_LABELS, np.random.default_rng(0))
    # assert
    assert np.array_equal(once, np.flip(label, axis))
    assert np.array_equal(twice, label)


def test_plain_flip_mirrors_left_right_for_the_slice_axis() -> None:
    # prepare: model grid [D, H, W] puts canonical x on H for axial/coronal, on D for sagittal
    axial, sagittal = parse_edits("flip"), parse_edits("flip", slice_axis=0)
    # execute
    axes = [left_right_axis(a) for a in (0, 1, 2)]
    # assert
    assert axes == [0, 1, 1]
    assert axial == [MaskEdit("flip", (1,))] and sagittal == [MaskEdit("flip", (0,))]


def test_rotate_by_zero_is_identity() -> None:
    # prepare
    label = phantom_label(seed=5)
    # execute
    out, records = apply_edits(label, parse_edits("rotate:0"), NUM_LABELS, np.random.default_rng(1))
    # assert
    assert np.array_equal(out, label)
    assert records[0]["angle_deg"] == 0.0 and records[0]["changed"] is False


def test_rotate_turns_each_slice_in_its_own_plane() -> None:
    # prepare: one bar in slice 3 only
    label = np.zeros((6, 21, 21), dtype=np.uint8)
    label[3, 10, 3:18] = 2
    # execute
    out, records = apply_edits(label, parse_edits("rotate:90"), 3, np.random.default_rng(0))
    # assert
    angle = np.deg2rad(records[0]["angle_deg"])
    assert abs(records[0]["angle_deg"]) <= 90
    assert out[[0, 1, 2, 4, 5]].max() == 0, "rotation must not move voxels across slices"
    points = np.argwhere(out[3] == 2) - 10.0
    # every voxel of the rotated bar lies within a voxel of the bar's line turned by the drawn
    # angle (the sign convention of the turn is MONAI's, so either sense is accepted)
    distance = [np.abs(points[:, 0] * np.cos(a) - points[:, 1] * np.sin(a)).max() for a in (angle, -angle)]
    assert len(points) >= 13 and min(distance) <= 1.0
    assert abs(records[0]["angle_deg"]) > 10, "this seed draws a clearly visible turn"


def test_elastic_moves_voxels_by_at_most_the_magnitude() -> None:
    # prepare
    label = phantom_label(seed=6)
    magnitude = 2.0
    reach = ndimage.generate_binary_structure(3, 3)
    # execute
    out, records = apply_edits(label, parse_edits("elastic:2"), NUM_LABELS, np.random.default_rng(3))
    identity, _ = apply_edits(label, parse_edits("elastic:0"), NUM_LABELS, np.random.default_rng(3))
    # assert: each output voxel's label occurs in the input within the displacement (+ rounding)
    assert records[0]["changed"] and np.array_equal(identity, label)
    radius = int(np.ceil(magnitude)) + 1
    for value in range(NUM_LABELS):
        nearby = ndimage.binary_dilation(label == value, structure=reach, iterations=radius)
        assert not ((out == value) & ~nearby).any()
    # a smooth field moves a few percent of the voxels, not a scramble
    assert 0 < (out != label).mean() < 0.25


def test_remove_lesion_takes_the_surrounding_tissue() -> None:
    # prepare
    label = phantom_label(seed=1)
    lesion = label == LESION
    # execute
    out, records = apply_edits(label, parse_edits("remove:4"), NUM_LABELS, np.random.default_rng(0))
    # assert
    assert lesion.any() and records[0]["changed"]
    assert not (out == LESION).any()
    assert (out[lesion] != 0).all(), "no background may open inside the anatomy"
    assert np.array_equal(out[~lesion], label[~lesion])
    # the fill comes from the tissues that touch the lesion
    touching = set(np.unique(label[ndimage.binary_dilation(lesion) & ~lesion]).tolist()) - {0}
    assert set(np.unique(out[lesion]).tolist()) <= touching


def test_shift_lesion_moves_it_toward_the_organ_centre_inside_the_foreground() -> None:
    # prepare
    label = phantom_label(seed=11)
    foreground = label != 0
    organ_centre = centroid(foreground)
    before = np.linalg.norm(centroid(label == LESION) - organ_centre)
    # execute
    out, records = apply_edits(label, parse_edits("shift-lesion:0.8"), NUM_LABELS, np.random.default_rng(0))
    # assert
    moved = out == LESION
    after = np.linalg.norm(centroid(moved) - organ_centre)
    assert records[0]["changed"] and any(records[0]["shift_voxels"])
    assert after < before
    assert moved.sum() == (label == LESION).sum(), "the lesion keeps its shape"
    assert np.array_equal(out != 0, foreground), "the anatomy keeps its outline"


def test_shift_lesion_without_a_lesion_is_recorded_as_skipped() -> None:
    # prepare
    label = phantom_label(seed=1, num_labels=4)
    # execute
    out, records = apply_edits(label, parse_edits("shift-lesion:0.5"), NUM_LABELS, np.random.default_rng(0))
    # assert
    assert np.array_equal(out, label)
    assert records[0]["changed"] is False and "no lesion" in records[0]["skipped"]


def test_transplant_adds_the_donor_lesion_inside_the_foreground() -> None:
    # prepare: a case without a lesion, a donor with one
    label = phantom_label(seed=12, num_labels=4)
    donor = phantom_label(seed=13)
    # execute
    out, records = apply_edits(label, parse_edits("transplant"), NUM_LABELS, np.random.default_rng(2), donors=[donor])
    # assert
    lesion = out == LESION
    assert not (label == LESION).any() and records[0]["changed"]
    assert lesion.sum() == (donor == LESION).sum() == records[0]["voxels"]
    assert (label[lesion] != 0).all(), "the lesion lies inside the foreground"
    assert np.array_equal(out[~lesion], label[~lesion])


def test_transplant_needs_a_donor_with_a_lesion() -> None:
    # prepare
    label = phantom_label(seed=12)
    no_lesion = phantom_label(seed=13, num_labels=4)
    rng = np.random.default_rng(0)
    # execute / assert
    with pytest.raises(DataError, match="no donor"):
        apply_edits(label, parse_edits("transplant"), NUM_LABELS, rng)
    with pytest.raises(DataError, match="has no lesion"):
        apply_edits(label, parse_edits("transplant"), NUM_LABELS, rng, donors=[no_lesion])


def test_relabel_maps_exactly() -> None:
    # prepare
    label = phantom_label(seed=1)
    expected = label.copy()
    expected[label == 3] = 1
    # execute
    out, records = apply_edits(label, parse_edits("relabel:3=1"), NUM_LABELS, np.random.default_rng(0))
    # assert
    assert np.array_equal(out, expected)
    assert records[0] == {"name": "relabel", "args": [3, 1], "from": 3, "to": 1, "changed": True}


def test_parse_edits_reads_every_edit() -> None:
    # prepare
    spec = "rotate:10, flip,elastic:2,shift-lesion:0.5,transplant,remove:3,relabel:3=1"
    # execute
    edits = parse_edits(spec)
    # assert
    assert edits == [
        MaskEdit("rotate", (10.0,)),
        MaskEdit("flip", (1,)),
        MaskEdit("elastic", (2.0,)),
        MaskEdit("shift-lesion", (0.5,)),
        MaskEdit("transplant", ()),
        MaskEdit("remove", (3,)),
        MaskEdit("relabel", (3, 1)),
    ]
    assert parse_edits("") == [] and parse_edits("  ") == []


@pytest.mark.parametrize(
    ("spec", "token"),
    [
        ("rotate:10,rotat:5", "rotat:5"),
        ("rotate", "rotate"),
        ("rotate:abc", "rotate:abc"),
        ("rotate:nan", "rotate:nan"),
        ("flip:7", "flip:7"),
        ("elastic:-1", "elastic:-1"),
        ("shift-lesion:1.5", "shift-lesion:1.5"),
        ("transplant:2", "transplant:2"),
        ("remove:0", "remove:0"),
        ("remove:1.5", "remove:1.5"),
        ("relabel:3", "relabel:3"),
        ("relabel:a=1", "relabel:a=1"),
        ("flip,,rotate:3", ""),
    ],
)
def test_parse_edits_errors_are_one_line_and_name_the_bad_token(spec: str, token: str) -> None:
    # execute
    with pytest.raises(ConfigError) as error:
        parse_edits(spec)
    # assert
    message = str(error.value)
    assert "\n" not in message
    assert f"mask edit {token!r}" in message


def test_apply_edits_rejects_invalid_labels_and_out_of_range_edits() -> None:
    # prepare
    label = phantom_label(seed=1)
    rng = np.random.default_rng(0)
    # execute / assert
    assert is_valid_label_map(label, NUM_LABELS) and not is_valid_label_map(label, 4)
    with pytest.raises(DataError, match=r"0\.\.3"):
        apply_edits(label, parse_edits("flip"), 4, rng)
    with pytest.raises(DataError, match="D, H, W"):
        apply_edits(label[0], parse_edits("flip"), NUM_LABELS, rng)
    with pytest.raises(ConfigError, match="relabel:3=9"):
        apply_edits(label, parse_edits("relabel:3=9"), NUM_LABELS, rng)
    with pytest.raises(ConfigError, match="remove:7"):
        apply_edits(label, parse_edits("remove:7"), NUM_LABELS, rng)
