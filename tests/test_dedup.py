"""Grouping: exact and near duplicates become groups with one deterministic representative."""

import io
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance
from skimage import data as samples

from photoprep.core.params import DedupParams
from photoprep.images import candidates, dedup, keep, sheets
from photoprep.images.probe import ProbeSpec, fine_hashes, probe
from photoprep.images.provenance import provenance

A = "f0f0f0f0f0f0f0f0"
A_NEAR = "f0f0f0f0f0f0f0f3"  # 2 bits from A
A_FAR = "f0f0f0f0f0f00f0f"  # 16 bits from A
B = "0123456789abcdef"


def _images(rows: list[tuple]) -> pd.DataFrame:
    """rows: (id, sha256, hash, width, height[, status, valid])."""
    out = []
    for row in rows:
        rid, sha, h, w, hh, *rest = row
        status, valid = rest if rest else ("ok", True)
        out.append(
            {
                "source": "s",
                "id": rid,
                "sha256": sha,
                "hash": h,
                "width": w,
                "height": hh,
                "status": status,
                "valid": valid,
            }
        )
    return pd.DataFrame(out)


def test_exact_copies_point_at_the_largest_then_smallest_key():
    images = _images([("b", "x", A, 64, 64), ("a", "x", A, 64, 64), ("c", "y", B, 64, 64)])
    table = dedup.find_duplicates(images, DedupParams()).table.set_index("id")
    assert table.loc["a", "dup_of"] == ""
    assert table.loc["b", "dup_of"] == "s/a"
    assert table.loc["b", "dup_reason"] == "exact"
    assert table.loc["c", "dup_of"] == ""


def test_near_copy_keeps_the_one_with_most_pixels():
    images = _images([("a", "x", A, 64, 64), ("z", "y", A_NEAR, 96, 96), ("f", "w", A_FAR, 96, 96)])
    result = dedup.find_duplicates(images, DedupParams(near_threshold=4))
    table = result.table.set_index("id")
    assert table.loc["a", "dup_of"] == "s/z"
    assert (table.loc["a", "dup_reason"], table.loc["a", "dup_distance"]) == ("near", 2)
    assert table.loc["f", "dup_of"] == ""
    assert result.counts == {"exact_duplicates": 0, "near_duplicates": 1, "after_dedup": 2}


def test_minus_one_turns_near_dedup_off_but_exact_stays():
    images = _images([("a", "x", A, 64, 64), ("b", "y", A_NEAR, 64, 64), ("c", "x", A, 64, 64)])
    counts = dedup.find_duplicates(images, DedupParams(near_threshold=-1)).counts
    assert counts == {"exact_duplicates": 1, "near_duplicates": 0, "after_dedup": 2}


def test_chains_join_one_group_and_broken_or_failed_rows_stay_out():
    images = _images(
        [
            ("a", "1", "0000000000000000", 64, 64),
            ("b", "2", "0000000000000007", 64, 64),  # 3 from a
            ("c", "3", "000000000000003f", 64, 64),  # 3 from b, 6 from a
            ("d", "4", "", 0, 0, "ok", False),  # broken: validate reports it
            ("e", "4", "", 0, 0, "ok", False),  # the same broken bytes: not a duplicate either
            ("f", None, None, None, None, "failed", None),
        ]
    )
    table = dedup.find_duplicates(images, DedupParams(near_threshold=3)).table.set_index("id")
    assert table.loc[["a", "b", "c"], "group"].nunique() == 1
    assert list(table.loc[["b", "c"], "dup_of"]) == ["s/a", "s/a"]
    assert table.loc["c", "dup_distance"] == 6
    assert list(table.loc[["d", "e", "f"], "dup_of"]) == ["", "", ""]
    assert list(table.loc[["d", "e", "f"], "group"]) == [-1, -1, -1]


def test_result_does_not_depend_on_input_order():
    rows = [(f"{i:03d}", f"sha{i % 7}", [A, A_NEAR, B, A_FAR][i % 4], 64 + i % 3, 64) for i in range(40)]
    one = dedup.find_duplicates(_images(rows), DedupParams()).table
    two = dedup.find_duplicates(_images(rows[::-1]), DedupParams()).table
    key = ["source", "id"]
    pd.testing.assert_frame_equal(
        one.sort_values(key).reset_index(drop=True), two.sort_values(key).reset_index(drop=True)
    )


def test_duplicates_report_has_one_row_per_group_member():
    images = _images(
        [("a", "x", A, 64, 64), ("b", "x", A, 64, 64), ("c", "y", A_NEAR, 32, 32), ("d", "z", B, 8, 8)]
    )
    table = dedup.find_duplicates(images, DedupParams()).table
    report = dedup.duplicate_groups(table)
    assert list(report["id"]) == ["a", "b", "c"]
    assert list(report["role"]) == ["kept", "exact", "near"]
    groups = dedup.near_groups_for_sheet(table, 5)
    assert len(groups) == 1 and list(groups[0]["id"]) == ["a", "b", "c"]


# -- the keep rule: the best copy, and why ------------------------------------------------------


def _members(rows: list[dict]) -> pd.DataFrame:
    """Near copies of one picture (hashes 0..2 bits apart), each with the probe's facts."""
    base = {"source": "s", "status": "ok", "valid": True, "width": 64, "height": 64, "colour": True}
    base |= {"lossless": False, "quality": 90, "camera": False, "fine_hash": "", "format": "JPEG"}
    hashes = [A, A_NEAR, "f0f0f0f0f0f0f0f1"]
    return pd.DataFrame(
        [
            base | {"id": f"m{i}", "sha256": f"sha{i}", "hash": hashes[i % 3]} | row
            for i, row in enumerate(rows)
        ]
    )


def _facts(by_id: dict[str, dict]) -> keep.Evidence:
    """Evidence that gives each asked row the facts listed for its id (the defaults otherwise)."""

    def evidence(rows: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            [keep.EVIDENCE_DEFAULTS | by_id.get(rid, {}) for rid in rows["id"]], index=rows.index
        )

    return evidence


def _kept(images: pd.DataFrame, evidence: keep.Evidence | None = None, **params) -> tuple[str, str]:
    table = dedup.find_duplicates(images, DedupParams(near_threshold=4, **params), evidence=evidence).table
    kept = table[(table["dup_of"] == "") & (table["group"] == table["group"].iloc[0])]
    assert len(kept) == 1
    return kept["id"].iloc[0], kept["keep_reason"].iloc[0]


@pytest.mark.parametrize(
    ("winner", "loser", "reason"),
    [
        ({"colour": True, "width": 32}, {"colour": False, "width": 96}, "colour"),
        ({"width": 96}, {"width": 64, "lossless": True, "quality": 0}, "pixels"),
        ({"lossless": True, "quality": 0, "format": "PNG"}, {"quality": 98}, "lossless"),
        ({"quality": 95}, {"quality": 70}, "quality"),
        ({"camera": True}, {"camera": False}, "camera"),
    ],
)
def test_best_copy_is_chosen_criterion_by_criterion(winner, loser, reason):
    # The loser comes first by key, so only the criterion can make the winner win.
    images = _members([loser, winner])
    assert _kept(images) == ("m1", reason)
    table = dedup.find_duplicates(images, DedupParams(near_threshold=4)).table.set_index("id")
    assert table.loc["m0", "keep_reason"] == reason  # ... and the copy that lost says on what


def _thumb(shift: int = 0, band: int = 0) -> bytes:
    """A 32 x 32 grey thumbnail: a ramp, brightened by `shift`, with a white band of `band` rows."""
    ramp = np.tile(np.arange(32, dtype=np.int64) * 6 + 20, (32, 1)) + shift
    ramp[32 - band :] = 255
    return np.clip(ramp, 0, 255).astype(np.uint8).tobytes()


def test_medoid_keeps_the_copy_closest_to_all_others():
    # Four copies alike on every fact a file states: m2 is the untouched picture, the others one
    # edit from it each (brighter, a caption band, darker), so two edits from each other.
    thumbs = {"m0": _thumb(shift=40), "m1": _thumb(band=5), "m2": _thumb(), "m3": _thumb(shift=-30)}
    evidence = _facts({rid: {"thumb": thumb} for rid, thumb in thumbs.items()})
    assert _kept(_members([{}, {}, {}, {}]), evidence) == ("m2", "medoid")


@pytest.mark.parametrize(
    ("winner", "loser", "reason"),
    [
        # A PNG made from a JPEG ranks as lossy: a lossy copy with a camera then wins over it.
        ({"camera": True}, {"lossless": True, "quality": 0, "history": 95}, "history"),
        ({"lossless": True, "quality": 0, "depth": 16}, {"lossless": True, "quality": 0}, "depth"),
        (
            {"lossless": True, "quality": 0},
            {"lossless": True, "quality": 0, "depth": 8, "upconverted": True},
            "history",
        ),
        ({"lossless": True, "quality": 0}, {"lossless": True, "quality": 0, "history": 80}, "lossless"),
        ({"quality": 90, "camera": True}, {"quality": 98}, "camera"),
        # Two PNGs of JPEGs rank as the JPEGs they came from.
        (
            {"lossless": True, "quality": 0, "history": 90},
            {"lossless": True, "quality": 0, "history": 80},
            "quality",
        ),
    ],
)
def test_pixel_facts_rank_a_copy_as_what_it_was_made_from(winner, loser, reason):
    facts = ("history", "depth", "upconverted")
    images = _members([{k: v for k, v in row.items() if k not in facts} for row in (loser, winner)])
    evidence = _facts(
        {f"m{i}": {k: v for k, v in row.items() if k in facts} for i, row in enumerate((loser, winner))}
    )
    assert _kept(images, evidence) == ("m1", reason)


def test_evidence_is_asked_once_per_payload_of_groups_with_two_payloads():
    asked: list[list[str]] = []

    def evidence(rows: pd.DataFrame) -> pd.DataFrame:
        asked.append(sorted(rows["id"]))
        return pd.DataFrame([keep.EVIDENCE_DEFAULTS] * len(rows), index=rows.index)

    images = _images(
        [("a", "x", A, 64, 64), ("b", "x", A, 64, 64), ("c", "y", A_NEAR, 64, 64), ("d", "z", B, 64, 64)]
    )
    images = images.assign(**{"colour": True, "lossless": False, "quality": 90, "camera": False})
    dedup.find_duplicates(images, DedupParams(near_threshold=4), evidence=evidence)
    assert asked == [["a", "c"]]  # b is a's bytes; d is alone
    dedup.find_duplicates(images, DedupParams(near_threshold=4, keep="largest"), evidence=evidence)
    assert len(asked) == 1  # only `best` reads the pixels' facts


def test_key_breaks_a_complete_tie():
    assert _kept(_members([{}, {}])) == ("m0", "key")


def test_keep_largest_and_first_ignore_quality_and_colour():
    images = _members([{"width": 32, "quality": 98}, {"width": 96, "colour": False}])
    assert _kept(images, keep="largest") == ("m1", "pixels")
    images["first_line"] = [7, 3]
    assert _kept(images, keep="first") == ("m1", "first")
    two_sources = images.assign(source=["a", "b"], first_line=[9, 1])
    table = dedup.find_duplicates(two_sources, DedupParams(near_threshold=4, keep="first"), ["a", "b"]).table
    assert list(table.loc[table["dup_of"] == "", "id"]) == ["m0"]  # source order wins over the line


def test_exact_copies_are_counted_by_pair_whatever_is_kept():
    # m0 and m1 are byte-identical; m2, a near copy with more pixels, is kept. Before, both
    # m0 and m1 counted as near duplicates of m2.
    images = _members([{"sha256": "x"}, {"sha256": "x"}, {"sha256": "y", "width": 96}])
    result = dedup.find_duplicates(images, DedupParams(near_threshold=4))
    table = result.table.set_index("id")
    assert table.loc["m2", "dup_of"] == ""
    assert sorted(table.loc[["m0", "m1"], "dup_reason"]) == ["exact", "near"]
    assert result.counts == {"exact_duplicates": 1, "near_duplicates": 1, "after_dedup": 1}


def test_report_lists_the_kept_copy_first_with_the_reasons():
    images = _members([{"quality": 70}, {"quality": 95}, {"sha256": "sha1", "id": "m9", "quality": 95}])
    report = dedup.duplicate_groups(dedup.find_duplicates(images, DedupParams(near_threshold=4)).table)
    assert list(report["id"]) == ["m1", "m0", "m9"]
    assert list(report["role"]) == ["kept", "near", "exact"]
    assert list(report["keep_reason"]) == ["quality", "quality", "key"]
    assert {"format", "quality", "colour", "lossless", "camera", "keep_reason"} <= set(report.columns)


def test_sheet_caption_says_why_each_member_lost():
    images = _members([{"quality": 70, "colour": False}, {"quality": 95}])
    groups = dedup.near_groups_for_sheet(
        dedup.find_duplicates(images, DedupParams(near_threshold=4)).table, 5
    )
    assert list(groups[0]["id"]) == ["m1", "m0"]  # the kept copy first
    captions = [sheets.member_caption(member) for _, member in groups[0].iterrows()]
    assert captions == ["kept (colour)\n64x64\nJPEG q95", "d=2 lost colour\n64x64\nJPEG q70 grey"]


# -- verification and transforms ---------------------------------------------------------------


def test_verification_drops_candidate_pairs_whose_fine_hashes_disagree():
    images = _members([{"fine_hash": "00" * 32}, {"fine_hash": "ff" * 4 + "00" * 28}])  # 32 bits apart
    assert dedup.find_duplicates(images, DedupParams(near_threshold=4)).counts["near_duplicates"] == 1
    verified = DedupParams(near_threshold=4, verify_threshold=16)
    assert dedup.find_duplicates(images, verified).counts["near_duplicates"] == 0
    assert dedup.find_duplicates(images, verified.model_copy(update={"verify_threshold": 32})).counts == {
        "exact_duplicates": 0,
        "near_duplicates": 1,
        "after_dedup": 1,
    }


def _real(
    pictures: dict[str, np.ndarray], transforms: tuple[str, ...], p: DedupParams | None = None
) -> pd.DataFrame:
    p = p or DedupParams(margin=0, crops=[])
    rows = []
    for name, picture in pictures.items():
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(picture)).save(out, "PNG")
        spec = ProbeSpec.from_dedup(p.model_copy(update={"transforms": list(transforms)}))
        record = probe(out.getvalue(), spec) | fine_hashes(out.getvalue(), spec)
        rows.append({"source": "s", "id": name, "sha256": name, "status": "ok"} | record)
    return pd.DataFrame(rows)


def test_mirrors_and_rotations_are_found_only_when_asked():
    photo = samples.chelsea()
    pictures = {
        "a_original": photo,
        "b_mirror": photo[:, ::-1],
        "c_turned": np.rot90(photo, 1),
        "d_upside_down": np.rot90(photo, 2),
        "e_other": samples.coffee(),
    }
    off = dedup.find_duplicates(_real(pictures, ()), DedupParams(near_threshold=4))
    assert off.counts["near_duplicates"] == 0
    transforms = ("hflip", "rot90", "rot180", "rot270")
    probed = _real(pictures, transforms)
    probed.loc[probed["id"] == "a_original", "camera"] = True  # the camera original is kept
    on = dedup.find_duplicates(probed, DedupParams(near_threshold=4, transforms=list(transforms)))
    table = on.table.set_index("id")
    assert table.loc["a_original", "dup_of"] == ""
    assert table.loc["b_mirror", "dup_reason"] == "near_hflip"
    assert table.loc["c_turned", "dup_reason"] == "near_rot90"
    assert table.loc["d_upside_down", "dup_reason"] == "near_rot180"
    assert table.loc["e_other", "group"] != table.loc["a_original", "group"]
    assert on.counts["near_duplicates"] == 3


def _jpeg(im: Image.Image, quality: int, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality, **options)
    return out.getvalue()


def _png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def _ranked(payloads: dict[str, bytes]) -> pd.DataFrame:
    """The dedup table of real payloads, with the probe and the provenance of each."""
    rows = [
        {"source": "s", "id": name, "sha256": name, "status": "ok"} | probe(payload)
        for name, payload in payloads.items()
    ]

    def evidence(asked: pd.DataFrame) -> pd.DataFrame:
        found = [provenance(payloads[name]) for name in asked["id"]]
        facts = pd.DataFrame([f for f, _ in found], index=asked.index)
        return facts.assign(thumb=[t.tobytes() for _, t in found])

    return dedup.find_duplicates(pd.DataFrame(rows), DedupParams(near_threshold=4), evidence=evidence).table


def test_real_copies_keep_the_camera_original():
    photo = Image.fromarray(samples.coffee())
    exif = Image.Exif()
    exif[0x010F] = "Nikon"
    original = _jpeg(photo, 95, exif=exif.tobytes())
    decoded = Image.open(io.BytesIO(original)).convert("RGB")
    brighter = ImageEnhance.Brightness(decoded).enhance(1.25)
    ok, sixteen = cv2.imencode(".png", np.asarray(decoded)[..., ::-1].astype(np.uint16) * 257)
    assert ok
    table = _ranked(
        {
            "z_original": original,
            "a_reencoded": _jpeg(photo, 70),
            "b_grey": _jpeg(photo.convert("L"), 95),
            "c_half": _jpeg(photo.resize((300, 200)), 95),
            "d_resaved": _jpeg(photo, 95),
            "e_png": _png(decoded.convert("RGBA")),  # lossless, holding the original's JPEG pixels
            "f_sixteen_bit": sixteen.tobytes(),  # the same, up-converted to 16 bits
            "g_brighter_at_98": _jpeg(brighter, 98),  # a higher quality than the original's
            "h_brighter_with_exif": _jpeg(brighter, 95, exif=exif.tobytes()),  # equal on every stated fact
        }
    ).set_index("id")
    assert table.loc["z_original", "dup_of"] == ""
    assert table.loc["z_original", "keep_reason"] == "medoid"  # over the brightened copy with its EXIF
    assert dict(table.drop("z_original")["keep_reason"]) == {
        "a_reencoded": "camera",
        "b_grey": "colour",
        "c_half": "pixels",
        "d_resaved": "camera",
        "e_png": "history",
        "f_sixteen_bit": "history",
        "g_brighter_at_98": "camera",
        "h_brighter_with_exif": "medoid",
    }


def test_a_lossless_original_is_kept_over_its_16_bit_and_brightened_copies():
    photo = Image.fromarray(samples.astronaut())
    ok, sixteen = cv2.imencode(".png", np.asarray(photo)[..., ::-1].astype(np.uint16) * 257)
    assert ok
    table = _ranked(
        {
            "z_original": _png(photo),
            "a_sixteen_bit": sixteen.tobytes(),
            "b_brighter": _png(ImageEnhance.Brightness(photo).enhance(1.25)),
            "c_darker": _png(ImageEnhance.Brightness(photo).enhance(0.85)),
            "d_jpeg": _jpeg(photo, 98),
        }
    ).set_index("id")
    assert table.loc["z_original", "dup_of"] == ""
    assert dict(table.drop("z_original")["keep_reason"]) == {
        "a_sixteen_bit": "history",
        "b_brighter": "medoid",
        "c_darker": "medoid",
        "d_jpeg": "lossless",
    }


def test_margin_and_crops_find_captioned_and_cropped_copies():
    photo = samples.chelsea()  # 300 x 451
    h, w = photo.shape[:2]
    captioned = photo.copy()
    captioned[h - 27 :] = 255  # a white band over the bottom 9 %
    pictures = {
        "a_original": photo,
        "b_cropped": photo[h * 5 // 100 : h * 95 // 100, w * 5 // 100 : w * 95 // 100],  # 5 % a side
        "c_captioned": captioned,
        "d_other": samples.coffee(),
    }
    whole = DedupParams(margin=0, crops=[])
    assert dedup.find_duplicates(_real(pictures, (), whole), whole).counts["near_duplicates"] == 0
    p = DedupParams()  # margin 0.1, crops [0.03, 0.06]
    result = dedup.find_duplicates(_real(pictures, (), p), p)
    table = result.table.set_index("id")
    assert table.loc["a_original", "dup_of"] == ""
    assert table.loc["b_cropped", "dup_of"] == "s/a_original"
    assert table.loc["b_cropped", "dup_reason"] == "near_crop"
    assert table.loc["c_captioned", "dup_of"] == "s/a_original"
    assert table.loc["c_captioned", "dup_reason"] == "near"
    assert table.loc["d_other", "group"] != table.loc["a_original", "group"]
    assert result.counts["near_duplicates"] == 2


def test_a_crop_match_counts_only_when_the_fine_hashes_agree(monkeypatch):
    """Two different handwritten 3s of the demo: 4 bits apart through a cropped hash, 70
    through the fine one. The fine check is what keeps them apart."""
    cdn = Path(__file__).resolve().parents[1] / "pipeline" / "sources" / "demo" / "cdn"
    p = DedupParams()
    spec = ProbeSpec.from_dedup(p)
    rows = [
        {"source": "demo", "id": rid, "sha256": rid, "status": "ok"}
        | probe((cdn / rid).read_bytes(), spec)
        | fine_hashes((cdn / rid).read_bytes(), spec)
        for rid in ("2ec30a31-43f7-522d-b292-c34efdb62e60", "3578ba50-f885-59d3-a609-35cad0ae8083")
    ]
    table = pd.DataFrame(rows)
    assert dedup.find_duplicates(table, p).counts["near_duplicates"] == 0
    monkeypatch.setattr(dedup, "CROP_FINE_THRESHOLD", 256)
    matched = dedup.find_duplicates(table, p).table
    assert matched["dup_reason"].tolist().count("near_crop") == 1


def test_crops_and_transforms_share_one_search():
    photo = samples.chelsea()
    h, w = photo.shape[:2]
    pictures = {
        "a_original": photo,
        "b_cropped": photo[h * 5 // 100 : h * 95 // 100, w * 5 // 100 : w * 95 // 100],
        "c_mirror": photo[:, ::-1],
        "d_other": samples.coffee(),
    }
    transforms = ("hflip", "rot90", "rot180", "rot270")
    p = DedupParams(transforms=list(transforms))
    table = dedup.find_duplicates(_real(pictures, transforms, p), p).table.set_index("id")
    assert table.loc["b_cropped", "dup_reason"] == "near_crop"
    assert table.loc["c_mirror", "dup_reason"] == "near_hflip"
    assert table.loc[["b_cropped", "c_mirror"], "dup_of"].tolist() == ["s/a_original"] * 2
    assert table.loc["d_other", "group"] != table.loc["a_original", "group"]


def _synthetic(n: int, seed: int = 0) -> pd.DataFrame:
    """n records of two sources ("a" and "a-b": the keys "a-b/..." sort before "a/..."), sorted by
    source and id, with planted exact copies, near copies, crops and mirrors, and failed and broken
    records."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**63, (n, 8), dtype=np.int64).astype(np.uint64)
    earlier = (rng.random(n) * np.arange(n)).astype(np.int64)
    kind = rng.choice(["own", "exact", "near", "crop", "mirror"], n, p=[0.8, 0.05, 0.07, 0.04, 0.04])
    kind[0] = "own"
    base = np.where(kind == "own", np.arange(n), earlier)
    hashes = [f"{w:016x}" for w in words[base, 0]]
    fine = ["".join(f"{w:016x}" for w in row) for row in words[base, 1:5]]
    crops = [f"{a:016x},{b:016x}" for a, b in words[:, 5:7]]
    crop_fine = [f"{f},{f}" for f in fine]
    mirrors = [f"{w:016x}" for w in words[:, 7]]
    sha = [f"{b:064x}" for b in np.where(kind == "exact", earlier, np.arange(n))]
    for i in np.flatnonzero(kind == "near"):
        hashes[i] = f"{int(hashes[i], 16) ^ (1 << int(rng.integers(64))):016x}"
    for i in np.flatnonzero(kind == "crop"):  # this record's crop looks like the earlier one
        hashes[i], crops[i] = f"{words[i, 0]:016x}", f"{hashes[earlier[i]]},{crops[i].split(',')[1]}"
        crop_fine[i] = f"{fine[earlier[i]]},{fine[earlier[i]]}"
        fine[i] = fine[earlier[i]]
    for i in np.flatnonzero(kind == "mirror"):  # the earlier one's mirrored hash is this record's
        hashes[i] = f"{words[i, 0]:016x}"
        mirrors[earlier[i]] = hashes[i]
    status = np.where(rng.random(n) < 0.02, "failed", "ok")
    table = pd.DataFrame(
        {
            "source": np.where(np.arange(n) % 3 == 0, "a-b", "a"),
            "id": [f"p{i:05d}" for i in range(n)],
            "status": status,
            "valid": (rng.random(n) > 0.02) & (status == "ok"),
            "sha256": sha,
            "hash": hashes,
            "fine_hash": fine,
            "crop_hashes": crops,
            "crop_fine_hashes": crop_fine,
            "transform_hashes": [f"{m},{m}" for m in mirrors],
            "width": rng.choice([200.0, 320.0, 640.0], n),
            "height": 240.0,
            "quality": rng.choice([70.0, 90.0], n),
            "colour": rng.random(n) > 0.1,
            "first_line": np.arange(n) + 1,
        }
    )
    return table.sort_values(["source", "id"], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"transforms": ["hflip", "rot90"]},
        {"verify_threshold": 40},
        {"keep": "first"},
        {"keep": "largest"},
    ],
)
def test_a_table_in_a_file_gives_what_the_table_in_memory_gives_whatever_the_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params: dict
) -> None:
    """Dedup of a Parquet table a slice at a time (the sha256s in hash partitions) writes the
    table that dedup of the frame gives, and the same bytes for any memory param."""
    table = _synthetic(3000)
    p = DedupParams(near_threshold=4, **params)
    want = dedup.find_duplicates(table, p, ["a", "a-b"])
    assert want.counts["exact_duplicates"] and want.counts["near_duplicates"]
    if params.get("transforms"):
        assert (want.table["dup_reason"] == "near_hflip").any()
    if not params:
        assert (want.table["dup_reason"] == "near_crop").any()
    table.to_parquet(tmp_path / "probed.parquet", index=False)
    monkeypatch.setattr(candidates, "PACK_ROWS", 256)  # many slices of candidates
    files = set()
    # 256, 3 and 1 partitions of the sha256s; slices of 1,024 rows at the smaller budgets
    for memory_mb, sha_bytes in ((1, 200), (8, 2000), (1000, 200)):
        monkeypatch.setattr(candidates, "_SHA_BYTES", sha_bytes)
        out = tmp_path / f"dedup-{memory_mb}-{sha_bytes}.parquet"
        counts = dedup.find_duplicates_in_file(tmp_path / "probed.parquet", out, p, memory_mb, ["a", "a-b"])
        assert counts == want.counts
        pd.testing.assert_frame_equal(pd.read_parquet(out), want.table)
        files.add(out.read_bytes())
    assert len(files) == 1


def test_a_table_in_a_file_must_be_sorted_by_source_and_id(tmp_path: Path) -> None:
    table = _synthetic(50)
    table.iloc[::-1].to_parquet(tmp_path / "probed.parquet", index=False)
    with pytest.raises(ValueError, match="not sorted by source and id"):
        dedup.find_duplicates_in_file(
            tmp_path / "probed.parquet", tmp_path / "out.parquet", DedupParams(), 64
        )


def test_payloads_are_the_same_whether_packed_or_grouped_as_texts(tmp_path: Path, monkeypatch) -> None:
    """A slice of sha256s that are all digests is packed and sorted, one with another text is
    grouped by Arrow's hash kernel: a table that mixes them gives the groups of either."""
    table = _synthetic(3000, seed=2)
    taking_part = table.index[((table["status"] == "ok") & table["valid"]).to_numpy()]
    texts = taking_part[::97]  # a hand-made sha256 text, the same for every 97th candidate
    table.loc[texts, "sha256"] = "not a digest"
    want = dedup.find_duplicates(table, DedupParams(near_threshold=4))  # one slice: as texts
    assert want.table.loc[texts, "group"].nunique() == 1  # one payload, one group
    table.to_parquet(tmp_path / "probed.parquet", index=False)
    monkeypatch.setattr(candidates, "PACK_ROWS", 64)  # slices without a text are packed
    monkeypatch.setattr(candidates, "_SHA_BYTES", 2000)
    dedup.find_duplicates_in_file(
        tmp_path / "probed.parquet", tmp_path / "out.parquet", DedupParams(near_threshold=4), 8
    )
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out.parquet"), want.table)


@pytest.mark.parametrize("params", [{}, {"verify_threshold": 40}])
def test_fine_hashes_are_asked_once_and_only_for_the_candidates_they_decide(
    tmp_path: Path, params: dict
) -> None:
    """Without fine hash columns, dedup asks its `fine` reader for the rows a crop match or a
    verification reads, each row once, and decides what it decides with the columns, in a file
    too."""
    table = _synthetic(3000)
    p = DedupParams(near_threshold=4, **params)
    want = dedup.find_duplicates(table, p, ["a", "a-b"])
    fine_columns = ["fine_hash", "crop_fine_hashes"]
    by_id = table.set_index("id")[fine_columns]
    asked: list[int] = []

    def fine(rows: pd.DataFrame) -> pd.DataFrame:
        asked.append(len(rows))
        assert not rows.index.duplicated().any()
        return by_id.loc[rows["id"]].set_index(rows.index)

    lean = table.drop(columns=fine_columns)
    got = dedup.find_duplicates(lean, p, ["a", "a-b"], fine=fine)
    assert got.counts == want.counts
    pd.testing.assert_frame_equal(got.table.drop(columns=fine_columns), want.table.drop(columns=fine_columns))
    assert 0 < sum(asked) < len(table) // 3 and len(asked) == (2 if params else 1)
    lean.to_parquet(tmp_path / "probed.parquet", index=False)
    out = tmp_path / "dedup.parquet"
    counts = dedup.find_duplicates_in_file(tmp_path / "probed.parquet", out, p, 8, ["a", "a-b"], fine=fine)
    assert counts == want.counts and sum(asked) == 2 * sum(asked[: len(asked) // 2])
    pd.testing.assert_frame_equal(pd.read_parquet(out), got.table)
    assert (got.table["dup_reason"] == "near_crop").any()


def test_a_picture_near_its_own_cropped_hash_asks_for_no_fine_hash() -> None:
    """Most pictures are within the threshold of their own cropped hashes (a crop of a few %
    moves a hash little): such a pair joins nothing, and no fine hash is read for it."""
    table = _synthetic(2000)
    p = DedupParams(near_threshold=4)
    groups = dedup.find_duplicates(table, p).table["group"]
    alone = groups.map(groups.value_counts()).eq(1) & groups.ge(0)  # groups of one
    assert alone.sum() > 1000
    selfish = table.copy()
    selfish.loc[alone, "crop_hashes"] = [
        f"{h},{c.split(',')[1]}"
        for h, c in zip(table.loc[alone, "hash"], table.loc[alone, "crop_hashes"], strict=True)
    ]
    by_id = table.set_index("id")[["fine_hash", "crop_fine_hashes"]]
    asked: dict[str, int] = {}

    def reader(name: str) -> dedup.FineHashes:
        def fine(rows: pd.DataFrame) -> pd.DataFrame:
            asked[name] = asked.get(name, 0) + len(rows)
            return by_id.loc[rows["id"]].set_index(rows.index)

        return fine

    lean = ["fine_hash", "crop_fine_hashes"]
    want = dedup.find_duplicates(table.drop(columns=lean), p, fine=reader("plain"))
    got = dedup.find_duplicates(selfish.drop(columns=lean), p, fine=reader("selfish"))
    pd.testing.assert_series_equal(got.table["group"], want.table["group"])
    assert got.counts == want.counts and asked["selfish"] == asked["plain"] > 0


def test_raw_tables_read_narrow_hold_the_same_rows_at_the_same_positions(tmp_path: Path) -> None:
    # The dedup stage probes from a narrow read and joins the probe to a wide read after it by position.
    rng = np.random.default_rng(0)
    for name in ("b", "a"):
        ids = [f"{name}{i:03d}" for i in rng.permutation(40)]
        table = pd.DataFrame(
            {
                "source": name,
                "id": ids,
                "url": [f"u/{i}" for i in ids],
                "status": rng.choice(["ok", "failed"], 40),
                "sha256": [f"{i:064x}" for i in rng.integers(0, 10, 40)],
                "size": rng.integers(1, 9, 40),
            }
        )
        table.to_parquet(tmp_path / f"{name}.parquet")
    wide = dedup.read_raw_tables(tmp_path, ["b", "a"])
    narrow = dedup.read_raw_tables(tmp_path, ["b", "a"], ["status", "sha256", "source"])
    assert list(narrow.columns) == ["source", "id", "status", "sha256"]
    assert list(wide["source"] + wide["id"]) == sorted(wide["source"] + wide["id"])
    pd.testing.assert_frame_equal(narrow, wide[narrow.columns.tolist()])
