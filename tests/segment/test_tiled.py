import cv2
import numpy as np
import pytest
import zarr

from histo.errors import Cancelled
from histo.segment import load_model, segment_slide
from tests.segment.conftest import DISCS


class _EdgeArtefact:
    """A model that is right (bone) inside its tile and wrong (marrow) within ``edge_px`` of
    the tile's sides, like a network near its padded borders."""

    working_pixel_size_um = 1.0
    n_outputs = 6
    edge_px = 8

    def predict_scores(self, rgb):
        h, w = rgb.shape[:2]
        e = self.edge_px
        scores = np.zeros((6, h, w), np.float32)
        scores[1] = 1.0
        scores[1, e : h - e, e : w - e] = 0.0
        scores[2] = 1.0 - scores[1]
        return scores


@pytest.mark.parametrize("tiling", [(256, 48), (384, 64), (200, 32)])
def test_tapered_blending_leaves_no_seams(tiling):
    """Where tiles overlap, a tile's unreliable edge weighs next to nothing against its
    neighbour's interior: the class map is the interior's everywhere but at the slide's own
    border (no neighbour there), so no line marks where tiles met."""
    img = np.full((700, 900, 3), 128, np.uint8)
    res = segment_slide(img, _EdgeArtefact(), tile_px=tiling[0], overlap_px=tiling[1])
    e = _EdgeArtefact.edge_px
    assert (res.class_map[e:-e, e:-e] == 2).all()
    assert (res.class_map[:e] == 1).all() and (res.class_map[:, -e:] == 1).all()


@pytest.mark.parametrize("tiling", [(256, 48), (384, 64), (512, 96)])
def test_counts_do_not_depend_on_tiles_classical(drawn_shapes, tiling):
    img, n_discs, _ = drawn_shapes
    model = load_model("classical")
    whole = segment_slide(img, model, tile_px=1024, overlap_px=0)
    tiled = segment_slide(img, model, tile_px=tiling[0], overlap_px=tiling[1])
    assert whole.n_osteoclasts == tiled.n_osteoclasts == n_discs
    assert whole.n_osteocytes == tiled.n_osteocytes
    assert (whole.class_map == tiled.class_map).mean() > 0.995
    # labels are slide-wide and consecutive: each object once
    assert sorted(np.unique(tiled.osteoclast_labels))[1:] == list(range(1, n_discs + 1))
    # each disc, those on tile borders too, is one object, whole: one label inside it, of
    # about the disc's area
    for y, x, r in DISCS:
        yy, xx = np.ogrid[: img.shape[0], : img.shape[1]]
        inside = (yy - y) ** 2 + (xx - x) ** 2 <= (r - 2) ** 2
        labels = np.unique(tiled.osteoclast_labels[inside])
        assert labels.size == 1 and labels[0] > 0, (y, x, labels)
        area = np.count_nonzero(tiled.osteoclast_labels == labels[0])
        assert abs(area - np.pi * r * r) < 0.15 * np.pi * r * r, (y, x, area)


def test_counts_do_not_depend_on_tiles_network(synthetic_section):
    sec = synthetic_section("oc-rich", size=640, seed=3, counterstain="hematoxylin")
    model = load_model("default")
    a = segment_slide(sec.image, model, tile_px=640, overlap_px=96)
    b = segment_slide(sec.image, model, tile_px=352, overlap_px=96)
    assert a.n_osteoclasts == b.n_osteoclasts
    assert a.n_osteocytes == b.n_osteocytes
    assert (a.class_map == b.class_map).mean() > 0.995


def test_zarr_sink_function_source_progress(drawn_shapes):
    img, n_discs, _ = drawn_shapes
    h, w = img.shape[:2]
    sink = {
        "class_map": zarr.zeros((h, w), chunks=(128, 128), dtype="uint8"),
        "osteoclasts": zarr.zeros((h, w), chunks=(128, 128), dtype="int32"),
        "osteocytes": zarr.zeros((h, w), chunks=(128, 128), dtype="int32"),
    }
    reads, fractions = [], []

    def read(y, x, hh, ww):
        reads.append((hh, ww))
        return img[y : y + hh, x : x + ww]

    res = segment_slide(
        read,
        "classical",
        tile_px=256,
        overlap_px=32,
        shape=(h, w),
        sink=sink,
        progress=lambda f, m: fractions.append(f),
    )
    assert res.class_map is sink["class_map"]
    assert int(np.asarray(sink["osteoclasts"][:]).max()) == n_discs
    assert max(r[0] for r in reads) <= 256 and max(r[1] for r in reads) <= 256
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)


def test_cancel(drawn_shapes):
    img, _, _ = drawn_shapes
    with pytest.raises(Cancelled):
        segment_slide(img, "classical", tile_px=256, overlap_px=32, cancel=lambda: True)


class _Recording:
    """The classical model, recording the tiles it scores; with ``white_is_glass``, a tile
    that is all white gets the scores segment_slide gives a tile of glass (background 1)."""

    working_pixel_size_um = 1.0
    n_outputs = 6

    def __init__(self, white_is_glass: bool = False) -> None:
        self.calls: list = []
        self.white_is_glass = white_is_glass
        self.classical = load_model("classical")

    def predict_scores(self, rgb):
        self.calls.append(rgb.shape)
        if self.white_is_glass and rgb.min() == 255:
            scores = np.zeros((self.n_outputs, *rgb.shape[:2]), np.float32)
            scores[0] = 1.0
            return scores
        return self.classical.predict_scores(rgb)


def test_tissue_mask_skips_glass(drawn_shapes):
    """Tiles with no tissue within the overlap are neither read nor scored: every read lies
    within a tile's reach of the tissue (the top-left 160 px), and the rest is glass."""
    from types import SimpleNamespace

    img, _, _ = drawn_shapes
    h, w = img.shape[:2]
    reads = []

    def read(y, x, hh, ww):
        reads.append((y, x))
        return img[y : y + hh, x : x + ww]

    mask = np.zeros((44, 57), bool)  # 16 µm/px
    mask[:10, :10] = True
    tissue = SimpleNamespace(mask=mask, pixel_size_um=16.0)
    res = segment_slide(read, "classical", tile_px=256, overlap_px=32, tissue=tissue, shape=(h, w))
    assert reads and all(y < 160 + 32 and x < 160 + 32 for y, x in reads), reads
    assert (res.class_map[300:, 300:] == 0).all()
    assert res.n_osteoclasts == 1  # the disc at (120, 130), inside the tissue


def test_glass_tiles_blend_as_background_scores(drawn_shapes):
    """Tiles the tissue mask calls glass are not scored (nor kept as arrays of scores): they
    blend as a score of 1 for background and 0 for the rest, the same class map as a model
    that returns those scores for them."""
    from types import SimpleNamespace

    img, _, _ = drawn_shapes
    img = img.copy()
    img[:, 500:] = 255  # glass right of column 500
    mask = np.zeros((44, 57), bool)  # 16 µm/px
    mask[:, :32] = True
    tissue = SimpleNamespace(mask=mask, pixel_size_um=16.0)
    on_mask, on_all = _Recording(white_is_glass=True), _Recording(white_is_glass=True)
    masked = segment_slide(img, on_mask, tile_px=256, overlap_px=32, tissue=tissue)
    whole = segment_slide(img, on_all, tile_px=256, overlap_px=32)
    assert len(on_mask.calls) < len(on_all.calls)  # some tiles were glass
    assert np.array_equal(masked.class_map, whole.class_map)
    assert (masked.class_map[:, 520:] == 0).all()
    assert np.array_equal(masked.osteoclast_labels, whole.osteoclast_labels)


def test_streamed_labels_write_each_chunk_once(drawn_shapes, tmp_path, monkeypatch):
    """Into a LabelsWriter, segment_slide writes bands of whole rows of chunks at every
    pyramid level: each chunk of the store is compressed and written exactly once (a chunk
    written in two parts is read back, decoded and written twice), and the maps are those of
    an in-memory run."""
    from collections import Counter

    from zarr.storage import LocalStore

    from histo.io.label_store import LabelsSink
    from histo.io.ome_zarr import LabelsWriter, read_labels

    img, n_discs, _ = drawn_shapes
    h, w = img.shape[:2]
    writes: Counter = Counter()
    set_chunk = LocalStore.set

    async def counting_set(self, key, value):
        writes[key] += 1
        await set_chunk(self, key, value)

    monkeypatch.setattr(LocalStore, "set", counting_set)
    writer = LabelsWriter(tmp_path / "l.ome.zarr", (h, w), 1.0, chunk_px=64, buffer_mb=0)
    assert writer.block_px == (64, 256)
    sink = {k: LabelsSink(writer, k) for k in ("class_map", "osteoclasts", "osteocytes")}
    streamed = segment_slide(img, "classical", tile_px=256, overlap_px=32, sink=sink)
    writer.finalize()
    in_memory = segment_slide(img, "classical", tile_px=256, overlap_px=32)

    chunks = {k: n for k, n in writes.items() if k.startswith("labels/") and "/c/" in k}
    # class map, osteoclasts, osteocytes: 11 x 15 chunks of 64², 11 x 8 of 32 x 64 (level 1,
    # 350 x 450 px) and 11 x 4 of 16 x 64 (level 2, 175 x 225 px)
    assert len(chunks) == 3 * (11 * 15 + 11 * 8 + 11 * 4)
    assert set(chunks.values()) == {1}
    assert streamed.n_osteoclasts == in_memory.n_osteoclasts == n_discs
    back = read_labels(tmp_path / "l.ome.zarr")
    assert np.array_equal(back["class_map"][0], in_memory.class_map)
    assert np.array_equal(back["osteoclasts"][0], in_memory.osteoclast_labels)
    assert np.array_equal(back["osteocytes"][0], in_memory.osteocyte_labels)


# ---------------------------------------------------------------- column strips


def test_strip_layout_partitions_the_slide_on_the_tile_grid():
    from histo.segment.tiled import _starts, strip_layout

    width, tile, overlap, margin = 32768, 768, 64, 256
    grid = _starts(width, tile, tile - overlap)
    strips = strip_layout(width, tile, overlap, margin, strip_cols=12288, align=4096)
    assert len(strips) == 3
    # owned columns: a partition of the slide on multiples of the alignment
    assert strips[0].own0 == 0 and strips[-1].own1 == width
    for a, b in zip(strips[:-1], strips[1:], strict=True):
        assert a.own1 == b.own0 and a.own1 % 4096 == 0
    for st in strips:
        assert st.own1 - st.own0 <= 12288
        # a run of the slide's tile grid, covering the owned columns and their context: full
        # scores from overlap px inside the strip, objects reaching margin px to the right
        i = grid.index(st.xs[0])
        assert list(st.xs) == grid[i : i + len(st.xs)]
        assert st.x0 == st.xs[0] and st.x1 == min(width, st.xs[-1] + tile)
        assert st.own0 == 0 or st.x0 + overlap <= st.own0 - 3
        assert st.own1 == width or st.xs[-1] + tile - overlap >= st.own1 + margin + 3
    # the context costs a few tiles per row of tiles, not a strip's worth
    assert len(grid) < sum(len(st.xs) for st in strips) <= len(grid) + 2 * 2
    # a slide no wider than a strip is one strip without context
    (one,) = strip_layout(8192, tile, overlap, margin, strip_cols=12288, align=4096)
    assert (one.x0, one.own0, one.own1, one.x1) == (0, 0, 8192, 8192)


def test_objects_across_strip_borders_are_labelled_once_whole():
    """Red discs (osteoclasts) drawn across the borders of 1024-px strips: each is one
    object, labelled once, with one label on both sides of the border."""
    import cv2

    from tests.segment.conftest import BLUE_GREY, RED

    rng = np.random.default_rng(1)
    img = np.clip(np.full((600, 3000, 3), BLUE_GREY) + rng.normal(0, 2, (600, 3000, 3)), 0, 255)
    img = img.astype(np.uint8)
    discs = [(150, 1024, 20), (300, 1010, 18), (420, 2048, 22), (520, 2060, 17), (200, 500, 19)]
    for y, x, r in discs:
        cv2.circle(img, (x, y), r, RED, -1)
    res = segment_slide(img, "classical", tile_px=256, overlap_px=32, strip_cols=1024)
    assert res.n_osteoclasts == len(discs)
    assert sorted(np.unique(res.osteoclast_labels))[1:] == list(range(1, len(discs) + 1))
    for y, x, r in discs:
        left, right = res.osteoclast_labels[y, x - r // 2], res.osteoclast_labels[y, x + r // 2]
        assert left == right > 0
        assert res.class_map[y, x - r // 2] == res.class_map[y, x + r // 2] == 3


def _same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    fa, fb = a.ravel(), b.ravel()
    if not np.array_equal(fa > 0, fb > 0):
        return False
    pairs = np.unique(np.stack([fa[fa > 0], fb[fb > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("phenotype,seed", [("oc-rich", 1), ("normal", 2)])
def test_strips_give_the_whole_width_result(synthetic_section, phenotype, seed):
    """A synthetic section cut into three strips by the network: the class map and the
    objects of a single strip, labels numbered strip by strip. (Exact as long as no two
    watershed basins meet on equal centre values: skimage breaks such ties in the order of its
    heap, which depends on the other components of the window; the classical baseline's
    flat centre map has some.)"""
    sec = synthetic_section(phenotype, size=(900, 3000), seed=seed)
    model = load_model("default")
    whole = segment_slide(sec.image, model, strip_cols=10**9)
    cut = segment_slide(sec.image, model, strip_cols=1024)
    np.testing.assert_array_equal(cut.class_map, whole.class_map)
    assert cut.n_osteoclasts == whole.n_osteoclasts > 20
    assert cut.n_osteocytes == whole.n_osteocytes > 100
    assert _same_up_to_relabelling(cut.osteoclast_labels, whole.osteoclast_labels)
    assert _same_up_to_relabelling(cut.osteocyte_labels, whole.osteocyte_labels)
    # objects do cross the borders (the test exercises the hand-over between strips)
    across = 0
    for labels in (cut.osteoclast_labels, cut.osteocyte_labels):
        for border in (1024, 2048):
            same = np.intersect1d(labels[:, border - 1], labels[:, border])
            across += int(np.count_nonzero(same))
    assert across >= 2, across


class _NoisyScores:
    """Eight outputs (7 classes and the centre map) from the pixel's colours and position:
    class probabilities that change from pixel to pixel, some ties between classes, and
    class-3 regions with a centre map, so that blending decides every class everywhere."""

    working_pixel_size_um = 1.0
    n_outputs = 8

    def predict_scores(self, rgb):
        h, w = rgb.shape[:2]
        x = rgb.astype(np.float32) / 255.0
        scores = np.empty((8, h, w), np.float32)
        for c in range(7):
            scores[c] = x[..., c % 3] * (1.0 + 0.1 * c)
        scores[3] += 3.0 * (rgb[..., 0] == 255) * (rgb[..., 2] == 255)  # the discs
        scores[:7] /= scores[:7].sum(axis=0) + 1e-6
        scores[2] = np.where(x[..., 0] > 0.8, scores[1], scores[2])  # exact ties
        scores[7] = x[..., 1]
        return scores


def test_blending_rows_at_a_time_gives_the_whole_block_result(monkeypatch):
    """Class map, labels and the margin tally (histograms and map) are the same whether a
    row of tiles' columns are blended BLEND_ROWS rows at a time or whole."""
    from histo.segment import tiled

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (900, 1300, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(image[::4, ::4], 4, axis=0), 4, axis=1)[:900, :1300]
    image[..., 0] = np.minimum(image[..., 0], 254)
    for y, x in rng.integers(20, (880, 1280), size=(40, 2)):
        cv2.circle(image, (int(x), int(y)), 12, (255, int(rng.integers(256)), 255), -1)

    def run():
        return segment_slide(
            image, _NoisyScores(), tile_px=320, overlap_px=48, strip_cols=700, margin_map=True
        )

    chunked = run()
    monkeypatch.setattr(tiled, "BLEND_ROWS", 10**6)
    whole = run()
    assert tiled.TALLY_ROWS < 320 - 48  # rows of tiles are blended in several pieces
    np.testing.assert_array_equal(chunked.class_map, whole.class_map)
    np.testing.assert_array_equal(chunked.osteoclast_labels, whole.osteoclast_labels)
    np.testing.assert_array_equal(chunked.osteocyte_labels, whole.osteocyte_labels)
    assert chunked.n_osteoclasts == whole.n_osteoclasts > 0
    np.testing.assert_array_equal(
        chunked.confidence.class_histograms, whole.confidence.class_histograms
    )
    np.testing.assert_array_equal(chunked.confidence.margin_map, whole.confidence.margin_map)
    assert len(np.unique(np.asarray(chunked.class_map))) >= 5


def test_lookahead_holds_at_most_its_budget_of_scores(monkeypatch):
    """Tiles scored ahead: LOOKAHEAD_TILES while their scores fit LOOKAHEAD_MB, fewer for a
    network with more outputs or larger tiles, at least one, none when switched off."""
    from histo.segment import tiled

    def tiles(tile_px, n_outputs):
        schedule = tiled.TileSchedule.plan((4096, 4096), tile_px, 64, 1.0, 12288, 1024)
        return tiled.lookahead_tiles(schedule, n_outputs)

    assert tiles(768, 6) == 8  # 8 x 14 MB
    assert tiles(768, 8) == 6  # 6 x 19 MB: 113 MB
    assert tiles(768, 8) * 8 * 768**2 * 4 <= tiled.LOOKAHEAD_MB * 2**20
    assert tiles(3072, 8) == 1
    monkeypatch.setattr(tiled, "LOOKAHEAD_TILES", 0)
    assert tiles(768, 6) == 0


class _ClassesOnly:
    """Scores that differ from tile to tile (each call shifts them), over classes 0-2 only:
    no objects, so the class map is the blended argmax itself."""

    working_pixel_size_um = 1.0
    n_outputs = 6

    def __init__(self):
        self.calls = 0

    def predict_scores(self, rgb):
        self.calls += 1
        x = rgb.astype(np.float32) / 255.0
        scores = np.zeros((6, *rgb.shape[:2]), np.float32)
        for c in range(3):
            scores[c] = x[..., c] + np.float32(0.07 * ((self.calls * (c + 1)) % 5))
        scores[:3] /= scores[:3].sum(axis=0)
        return scores


def test_blending_is_the_weighted_mean_of_the_tiles_bit_for_bit():
    """The blender's class map is the first argmax of sum(scores * taper) / sum(taper) over
    every tile that covers a pixel, summed in the schedule's order (float32): the shortcuts
    where one tile alone covers a pixel (no product, no division) change no bit."""
    from histo.segment.tiled import TileSchedule, taper

    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8)
    tile, overlap = 256, 40
    result = segment_slide(image, _ClassesOnly(), tile_px=tile, overlap_px=overlap)
    schedule = TileSchedule.plan(image.shape[:2], tile, overlap, 1.0, 10**6, 1)
    model = _ClassesOnly()
    acc = np.zeros((6, *image.shape[:2]), np.float32)
    weight = np.zeros(image.shape[:2], np.float32)
    xs, ys = schedule.strips[0].xs, schedule.ys
    for y, x, th, tw in schedule.jobs():
        iy, ix = ys.index(y), xs.index(x)
        wy = taper(th, overlap, at_start=iy > 0, at_end=iy < len(ys) - 1)
        wx = taper(tw, overlap, at_start=ix > 0, at_end=ix < len(xs) - 1)
        wt = wy[:, None] * wx[None, :]
        acc[:, y : y + th, x : x + tw] += model.predict_scores(image[y : y + th, x : x + tw]) * wt
        weight[y : y + th, x : x + tw] += wt
    expected = np.argmax(acc[:5] / np.maximum(weight, 1e-6), axis=0)
    assert len(xs) > 2 and len(ys) > 2
    np.testing.assert_array_equal(np.asarray(result.class_map), expected)
