"""The shapes world: captions follow the spec's grammar, splits keep held-out pairs out of
training, the stream is deterministic, and the scorer agrees with the generator's own drawings
(at 256, and at 64 upscaled) while catching each kind of wrong image."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image

from tools import evaluate
from tools import shapes_world as sw

# The grammar written out again from shared/specs/shapes-world.md, independently of the module.
_OBJ = r"a (small|large) (red|green|blue|yellow|purple|orange|white|black) (circle|square|triangle)"
_BG = r"on a (red|green|blue|yellow|purple|orange|white|black) background"
_POS = ("in the center|on the left|on the right|at the top|at the bottom|in the top left corner|"
        "in the top right corner|in the bottom left corner|in the bottom right corner")
SPEC_GRAMMAR = re.compile(
    rf"{_OBJ} ({_POS}) {_BG}|{_OBJ} on the left and {_OBJ} on the right {_BG}|{_OBJ} above {_OBJ} {_BG}")
HELDOUT_WORDS = ("purple triangle", "orange square", "green circle")


@pytest.fixture(scope="module")
def ground_truth():
    """300 examples: 100 from each of train, unseen and heldout."""
    return [ex for split in ("train", "unseen", "heldout") for ex in sw.examples(11, split, stop=100)]


def test_scorer_accepts_every_ground_truth_image_at_256_and_at_64(ground_truth):
    # Both must hold on every example: 256 is the spec's scoring size, and the base stage's
    # 64 x 64 targets (upscaled bilinearly by the scorer) keep every attribute.
    wrong256 = [ex.caption for ex in ground_truth if not sw.score(ex.image256, ex.caption)["correct"]]
    wrong64 = [ex.caption for ex in ground_truth if not sw.score(ex.image64, ex.scene)["correct"]]
    assert wrong256 == [] and wrong64 == []
    ex = ground_truth[0]
    assert ex.image256.shape == (256, 256, 3) and ex.image256.dtype == np.uint8
    assert ex.image64.shape == (64, 64, 3) and ex.image64.dtype == np.uint8
    # Any size is scored after resizing to 256: a 512 x 384 (stretched) copy still passes.
    big = np.asarray(Image.fromarray(ex.image256).resize((384, 512), Image.NEAREST))
    assert sw.score(big, ex.caption)["correct"]


def test_measured_fills_sit_near_the_spec_values(ground_truth):
    fills = {"circle": [], "square": [], "triangle": []}
    for ex in ground_truth[:60]:
        for region in sw.find_regions(ex.image256)[1]:
            fills[region["shape"]].append(region["fill"])
    for shape, target in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        assert fills[shape], shape
        assert max(abs(f - target) for f in fills[shape]) < 0.05, (shape, fills[shape])


def _first(split_seed: int, want) -> sw.Example:
    return next(ex for ex in sw.examples(split_seed, "all", stop=400) if want(ex.scene))


def _redraw(scene: sw.Scene, seed: int = 0) -> np.ndarray:
    return sw.draw(sw.place_objects(scene, np.random.default_rng(seed)))


def _flags(result: dict) -> dict:
    return {k: result[k] for k in sw.ATTRIBUTES + ("correct",)}


def _only_wrong(result: dict, *attributes: str) -> None:
    expected = {a: a not in attributes for a in sw.ATTRIBUTES} | {"correct": False}
    assert _flags(result) == expected


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_scorer_flags_each_kind_of_wrong_image(seed):
    two = _first(seed, lambda s: len(s.objects) == 2)
    first, second = two.scene.objects
    bg = two.scene.background

    other = next(c for c in sw.COLORS if c not in (bg, first.color, second.color))
    recoloured = dataclasses.replace(two.scene, objects=(dataclasses.replace(first, color=other), second))
    _only_wrong(sw.score(sw.draw(recoloured), two.caption), "color")

    reshaped_to = next(h for h in sw.SHAPES if h != first.shape)
    reshaped = dataclasses.replace(two.scene, objects=(dataclasses.replace(first, shape=reshaped_to), second))
    _only_wrong(sw.score(sw.draw(reshaped), two.caption), "shape")

    # A missing object fails the count and every attribute of the object that is not there.
    missing = dataclasses.replace(two.scene, objects=(first,), layout="single")
    _only_wrong(sw.score(sw.draw(missing), two.caption), "count", "color", "shape", "size", "position")

    # Swapped places: colours, shapes and sizes are all there, in the wrong order.
    swapped = dataclasses.replace(two.scene, objects=(
        dataclasses.replace(second, cell=first.cell), dataclasses.replace(first, cell=second.cell)))
    if (first.color, first.shape, first.size) != (second.color, second.shape, second.size):
        _only_wrong(sw.score(_redraw(swapped, seed), two.caption), "position")

    new_bg = next(c for c in sw.COLORS if c not in (bg, first.color, second.color))
    _only_wrong(sw.score(sw.draw(dataclasses.replace(two.scene, background=new_bg)), two.caption),
                "background")

    one = _first(seed, lambda s: len(s.objects) == 1)
    (obj,) = one.scene.objects
    moved_cell = (2 - obj.cell[0], 2 - obj.cell[1]) if obj.cell != (1, 1) else (0, 0)
    moved = dataclasses.replace(one.scene, objects=(dataclasses.replace(obj, cell=moved_cell),))
    _only_wrong(sw.score(_redraw(moved, seed), one.caption), "position")

    resized_to = "large" if obj.size == "small" else "small"
    resized = dataclasses.replace(one.scene, objects=(dataclasses.replace(obj, size=resized_to),))
    _only_wrong(sw.score(_redraw(resized, seed), one.caption), "size")

    extra = dataclasses.replace(one.scene, objects=(obj, sw.ShapeObject(
        next(c for c in sw.COLORS if c != one.scene.background), "square", "small",
        (2 - obj.cell[0], 2 - obj.cell[1]) if obj.cell != (1, 1) else (0, 0))))
    _only_wrong(sw.score(_redraw(extra, seed), one.caption), "count")


def test_scorer_fails_a_flat_image_and_noise():
    caption = "a small red circle in the center on a white background"
    flat = np.full((64, 64, 3), sw.PALETTE["white"], np.uint8)
    _only_wrong(sw.score(flat, caption), "count", "color", "shape", "size", "position")
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert not sw.score(noise, caption)["correct"]


def test_captions_follow_the_grammar_exactly():
    sampled = [ex for ex in sw.examples(5, "all", stop=60)]
    captions = sw.all_captions("all")
    assert len(captions) == len(set(captions))
    # One object: 8 backgrounds x 7 colours x 3 shapes x 2 sizes x 9 positions; two objects:
    # 8 x 2 layouts x 21 x 21 object pairs less both large (21 x 7 x 3... counted directly).
    assert sum(" and " not in c and " above " not in c for c in captions) == 8 * 7 * 3 * 2 * 9
    assert len(captions) == 8 * 7 * 3 * 2 * 9 + 8 * 2 * (42 * 42 - 21 * 21)
    for caption in captions[::50] + [ex.caption for ex in sampled]:
        assert SPEC_GRAMMAR.fullmatch(caption), caption
        assert sw.parse_caption(caption).caption == caption
    for ex in sampled:
        scene = ex.scene
        assert ex.caption == scene.caption
        assert all(o.color != scene.background for o in scene.objects)
        assert [o.size for o in scene.objects] != ["large", "large"]
        assert scene.layout in sw.LAYOUTS and len(scene.objects) == (1 if scene.layout == "single" else 2)
        if scene.layout != "single":
            assert tuple(o.cell for o in scene.objects) == sw.LAYOUT_CELLS[scene.layout]
        for o in scene.objects:  # drawn size within +-8% of nominal, inside the 2% margin
            x0, y0, x1, y1 = o.bbox
            nominal = sw.SIZE_FRACTION[o.size] * 256
            assert abs(x1 - x0 - nominal) <= 0.08 * nominal + 1e-6 and abs((x1 - x0) - (y1 - y0)) < 1e-6
            assert min(x0, y0) >= 0.02 * 256 - 1e-6 and max(x1, y1) <= 256 * 0.98 + 1e-6
        assert sw.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert {len(ex.scene.objects) for ex in sampled} == {1, 2}


def test_heldout_pairs_never_reach_the_train_split():
    train = sw.all_captions("train")
    unseen = sw.all_captions("unseen")
    heldout = sw.all_captions("heldout")
    assert not any(w in c for c in train + unseen for w in HELDOUT_WORDS)
    assert all(any(w in c for w in HELDOUT_WORDS) for c in heldout)
    assert sorted(train + unseen + heldout) == sorted(sw.all_captions("all"))
    assert not set(train) & set(unseen)
    assert 0.02 < len(unseen) / len(train + unseen) < 0.045  # about 1 in 32
    for ex in sw.examples(3, "train", stop=100):
        assert not any(w in ex.caption for w in HELDOUT_WORDS), ex.caption
        assert ex.scene.split == "train"
    rng = np.random.default_rng(0)
    for split in ("train", "unseen", "heldout"):
        assert all(sw.sample_description(rng, split).split == split for _ in range(200))


def test_stream_is_deterministic_from_the_seed():
    stream = list(sw.examples(7, "train", start=3, stop=8))
    again = [sw.example(7, i, "train") for i in reversed(range(3, 8))][::-1]
    for a, b in zip(stream, again):
        assert a.index == b.index and a.caption == b.caption and a.scene == b.scene
        np.testing.assert_array_equal(a.image256, b.image256)
        np.testing.assert_array_equal(a.image64, b.image64)
    other = [sw.example(8, i, "train").caption for i in range(3, 8)]
    assert other != [ex.caption for ex in stream]
    # The 64 x 64 image is the area average of the 256 one.
    ex = stream[0]
    area = ex.image256.astype(np.float64).reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    assert np.abs(area - ex.image64).max() <= 0.5 + 1e-9


def test_summarize_reports_groups_apart():
    ok = {a: True for a in sw.ATTRIBUTES} | {"correct": True}
    bad_colour = ok | {"color": False, "correct": False}
    summary = sw.summarize([ok, bad_colour, ok, ok], ["one_object", "one_object", "heldout", "two_objects"])
    assert summary["all"]["n"] == 4 and summary["all"]["correct"] == 0.75 and summary["all"]["color"] == 0.75
    assert summary["one_object"]["correct"] == 0.5 and summary["one_object"]["shape"] == 1.0
    assert summary["heldout"]["correct"] == 1.0 and summary["two_objects"]["n"] == 1


def test_evaluator_ground_truth_self_test(tmp_path):
    out = tmp_path / "report.json"
    assert evaluate.main(["--ground-truth", "--n", "10", "--seed", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["summary"]["all"]["correct"] == 1.0 and report["summary"]["heldout"]["n"] == 5
    assert len(report["examples"]) == 10
    assert {e["split"] for e in report["examples"]} == {"unseen", "heldout"}
    # Each example is filed under the group its summary counts it in.
    assert {e["group"] for e in report["examples"]} <= {"one_object", "two_objects", "heldout"}
    assert sum(e["group"] == "heldout" for e in report["examples"]) == 5


def test_evaluator_self_test_fails_when_the_scorer_disagrees(monkeypatch, tmp_path):
    """`--ground-truth` is the scorer's self-test: it exits non-zero when any drawing is
    scored wrong, so a broken scorer or generator cannot pass unnoticed."""
    real = evaluate.ground_truth_renderer

    def one_blank(resolution):
        render = real(resolution)

        def blanked(captions, seeds):
            images = render(captions, seeds)
            images[0] = np.full_like(images[0], sw.PALETTE[sw.parse_caption(captions[0]).background])
            return images

        return blanked

    monkeypatch.setattr(evaluate, "ground_truth_renderer", one_blank)
    assert evaluate.main(["--ground-truth", "--n", "4", "--seed", "4", "--out", str(tmp_path / "r.json")]) == 1


def test_ground_truth_at_64_scores_the_64_pixel_drawings():
    """`--ground-truth --resolution 64` scores the base stage's 64 x 64 images (the area
    average of the 256 drawing), not the 256 drawings themselves."""
    captions = [s.caption for s in evaluate.evaluation_scenes(2, seed=3)]
    small = evaluate.ground_truth_renderer(64)(captions, [5, 6])
    full = evaluate.ground_truth_renderer(256)(captions, [5, 6])
    for low, high in zip(small, full):
        assert low.shape == (64, 64, 3) and high.shape == (256, 256, 3)
        np.testing.assert_array_equal(low, sw.downsample(high, 64))


def test_evaluator_scores_a_renderer_that_draws_nothing():
    scenes = evaluate.evaluation_scenes(4, seed=0)

    def blank(captions, seeds):  # right background, no objects; one failed render
        return ["out of memory"] + [
            np.full((64, 64, 3), sw.PALETTE[sw.parse_caption(c).background], np.uint8) for c in captions[1:]]

    report = evaluate.evaluate(blank, scenes, [0, 1, 2, 3])
    assert report["summary"]["all"]["correct"] == 0.0 and report["summary"]["all"]["background"] == 0.75
    assert report["examples"][0]["error"] == "out of memory"



def test_a_renderer_that_returns_too_few_images_fails_the_evaluation():
    """A renderer that loses captions fails the evaluation instead of being scored on the
    captions it did return (a report of fewer examples, passed off as the run asked for)."""
    scenes = evaluate.evaluation_scenes(3, seed=0)

    def short(captions, seeds):
        return evaluate.ground_truth_renderer(64)(captions[:-1], seeds[:-1])

    with pytest.raises(RuntimeError, match="returned 2 images for 3 captions"):
        evaluate.evaluate(short, scenes, [0, 1, 2])


def test_the_model_renderer_renders_each_caption_with_its_own_seed(monkeypatch):
    """Each caption is rendered with the seed the report records for it, batch after batch,
    and an image that failed is passed on as its error."""
    import types

    import jaxdiff

    calls = []

    class Pipeline:
        def render(self, prompts, seeds):
            calls.append((list(prompts), list(seeds)))
            return [types.SimpleNamespace(image=None, error="boom") if seed == 13 else
                    types.SimpleNamespace(image=np.full((4, 4, 3), seed, np.uint8), error=None) for seed in seeds]

    monkeypatch.setattr(jaxdiff, "load_pipeline", lambda *args, **kwargs: Pipeline())
    images = evaluate.model_renderer(None, batch_size=2)(list("abcde"), [11, 12, 13, 14, 15])
    assert calls == [(["a", "b"], [11, 12]), (["c", "d"], [13, 14]), (["e"], [15])]
    assert images[2] == "boom" and [int(images[i][0, 0, 0]) for i in (0, 1, 3, 4)] == [11, 12, 14, 15]


def test_the_evaluators_options_reach_the_stage_they_name(monkeypatch, tmp_path):
    """--model, --upscaler and the sampling options reach the renderer of the stage asked for
    (not one of the shipped folders), and the report records the settings given."""
    import inspect

    calls = {}

    def recording(name):
        real = getattr(evaluate, name)

        def factory(*args, **kwargs):
            calls[name] = dict(inspect.signature(real).bind(*args, **kwargs).arguments)
            return evaluate.ground_truth_renderer(256)
        return factory

    for name in ("model_renderer", "vae_renderer", "upscaler_renderer"):
        monkeypatch.setattr(evaluate, name, recording(name))
    out = tmp_path / "report.json"
    common = ["--n", "2", "--batch-size", "3", "--out", str(out)]
    assert evaluate.main(["--model", "/m", "--upscaler", "/x4", "--steps", "7", "--guidance", "4",
                          "--upscale-guidance", "3", *common]) == 0
    assert calls["model_renderer"] == {
        "model": "/m", "batch_size": 3, "upscaler": "/x4", "settings": {
            "steps": 7, "guidance": 4.0, "upscale_steps": None, "upscale_guidance": 3.0, "noise_level": None}}
    assert json.loads(out.read_text())["settings"] == {"steps": 7, "guidance": 4.0, "upscale_guidance": 3.0}
    assert evaluate.main(["--stage", "vae", "--model", "/m", *common]) == 0
    assert calls["vae_renderer"] == {"model": "/m", "batch_size": 3}
    assert evaluate.main(["--stage", "upscaler", "--upscaler", "/x4", "--upscale-steps", "5",
                          "--noise-level", "20", *common]) == 0
    assert calls["upscaler_renderer"] == {"upscaler": "/x4", "batch_size": 3, "settings": {
        "steps": None, "guidance": None, "upscale_steps": 5, "upscale_guidance": None, "noise_level": 20}}


def test_the_upscaler_stage_samples_with_the_settings_given(monkeypatch):
    """`--stage upscaler --upscale-steps 3 --noise-level 40` upscales with those settings,
    not with the folder's recommended ones."""
    from jaxdiff import engine

    made = []

    class Recording(engine.Pipeline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(engine, "Pipeline", Recording)
    evaluate.upscaler_renderer(None, 2, upscale_steps=3, upscale_guidance=1.5, noise_level=40)
    (pipeline,) = made
    settings = pipeline.settings
    assert (settings.upscale_steps, settings.upscale_guidance, settings.noise_level) == (3, 1.5, 40)


@pytest.mark.parity
def test_the_vae_stage_shows_the_drawings_as_diffusers_vae_round_trips_them():
    """`--stage vae` scores the 64 x 64 drawings as the shipped VAE shows them: encoded to
    the latent mean and decoded as diffusers' AutoencoderKL does, to within rounding."""
    import os

    import torch
    from diffusers import AutoencoderKL

    from jaxdiff.checkpoints import default_model_path

    captions = [s.caption for s in evaluate.evaluation_scenes(2, seed=1)]
    ours = np.stack(evaluate.vae_renderer(None, 2)(captions, [3, 4])).astype(np.float32)
    drawings = np.stack(evaluate.ground_truth_renderer(64)(captions, [3, 4]))
    vae = AutoencoderKL.from_pretrained(os.path.join(default_model_path(), "vae"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.from_numpy(drawings).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.permute(0, 2, 3, 1).numpy()
    reference = np.round(np.clip((y + 1.0) * 127.5, 0, 255))
    assert ours.shape == reference.shape == (2, 64, 64, 3)
    assert np.abs(ours - reference).max() <= 2

@pytest.mark.faults
def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="grammar"):
        sw.parse_caption("A small red circle in the center on a white background.")
    with pytest.raises(ValueError, match="colour other than the background"):
        sw.parse_caption("a small red circle in the center on a red background")
    with pytest.raises(ValueError, match=r"uint8 RGB array of shape \(H, W, 3\)"):
        sw.score(np.zeros((64, 64, 3), np.float32), "a small red circle in the center on a white background")
    with pytest.raises(ValueError, match=r"uint8 RGB"):
        sw.score(np.zeros((64, 64), np.uint8), "a small red circle in the center on a white background")
    with pytest.raises(ValueError, match="use one of train, unseen, heldout, all"):
        sw.example(0, 0, "test")
    with pytest.raises(ValueError, match="one group name per score"):
        sw.summarize([{}], [])


def test_an_evaluation_report_names_the_weights_it_scored():
    import argparse

    def scored(**given):
        args = dict(ground_truth=False, stage="full", model=None, upscaler=None) | given
        return evaluate.scored_weights(argparse.Namespace(**args))

    assert scored() == {"model": "default", "upscaler": "default-x4"}
    assert scored(model="/m") == {"model": "/m", "upscaler": None}  # a folder renders its base stage only
    assert scored(model="/m", upscaler="/x4") == {"model": "/m", "upscaler": "/x4"}
    assert scored(stage="upscaler", upscaler="/x4") == {"model": None, "upscaler": "/x4"}
    assert scored(stage="vae", upscaler="/x4") == {"model": "default", "upscaler": None}
    assert scored(ground_truth=True) == {"model": None, "upscaler": None}
    # The upscaler stage alone, with no --upscaler: the shipped x4 is what renders.
    assert scored(stage="upscaler") == {"model": None, "upscaler": "default-x4"}


# The spec's tables, written out again from shared/specs/shapes-world.md.
SPEC_PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
                "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
                "white": (245, 245, 245), "black": (20, 20, 20)}
SPEC_CELLS = {"in the center": (1, 1), "on the left": (0, 1), "on the right": (2, 1), "at the top": (1, 0),
              "at the bottom": (1, 2), "in the top left corner": (0, 0), "in the top right corner": (2, 0),
              "in the bottom left corner": (0, 2), "in the bottom right corner": (2, 2)}


def _mask_of(image: np.ndarray, colour: str) -> np.ndarray:
    # Pixels at the object's exact palette value: the interior, without anti-aliased edges.
    return (image == np.array(SPEC_PALETTE[colour], np.uint8)).all(-1)


def _box_centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2


def test_drawn_places_match_the_position_words():
    """A caption's position words put the object where the spec says: "at the top" is drawn
    in the top row, "on the left" in the left column, each within the spec's 4% jitter of its
    cell centre; "above" and "on the left and" put the first-named object above / left."""
    for seed in range(4):
        for phrase, (col, row) in SPEC_CELLS.items():
            scene = sw.parse_caption(f"a small blue square {phrase} on a white background")
            cx, cy = _box_centre(_mask_of(_redraw(scene, seed), "blue"))
            # Small objects are never shifted by the margin: only the jitter moves them.
            assert abs(cx - (2 * col + 1) / 6 * 256) <= 0.04 * 256 + 1, (phrase, seed, cx)
            assert abs(cy - (2 * row + 1) / 6 * 256) <= 0.04 * 256 + 1, (phrase, seed, cy)
        for caption, axis in (("a small red circle above a small blue square on a white background", 1),
                              ("a small red circle on the left and a small blue square on the right "
                               "on a white background", 0)):
            image = _redraw(sw.parse_caption(caption), seed)
            assert _box_centre(_mask_of(image, "red"))[axis] < 256 / 3 < 2 * 256 / 3 \
                < _box_centre(_mask_of(image, "blue"))[axis], (caption, seed)


def test_drawn_colours_sizes_and_triangles_match_the_spec():
    """Objects and backgrounds are drawn in the spec's palette values, at the spec's sizes
    (22% / 42% of the side, +-8%), and triangles stand apex up on their base."""
    for i, colour in enumerate(SPEC_PALETTE):
        background = "black" if colour != "black" else "white"
        image = _redraw(sw.parse_caption(f"a large {colour} square in the center on a {background} background"), i)
        assert tuple(image[128, 128]) == SPEC_PALETTE[colour], colour
        assert tuple(image[2, 2]) == SPEC_PALETTE[background], background
    for seed in range(6):
        for size, fraction in (("small", 0.22), ("large", 0.42)):
            image = _redraw(sw.parse_caption(f"a {size} red square in the center on a white background"), seed)
            ys, xs = np.nonzero(_mask_of(image, "red"))
            side = xs.max() + 1 - xs.min()
            assert abs(side - fraction * 256) <= 0.08 * fraction * 256 + 2, (size, seed, side)
    triangle = _mask_of(_redraw(sw.parse_caption("a large red triangle in the center on a white background")), "red")
    rows = np.flatnonzero(triangle.any(1))
    widths = triangle[rows].sum(1)
    assert widths[2] < widths[len(rows) // 2] < widths[-3]  # narrow at the top, widest at the base


def test_streams_of_different_seeds_are_not_shifted_copies():
    """Two seeds give two different data sets: no example of one stream reappears in the
    other at a shifted index (which would repeat training data across seeded runs)."""
    def keys(seed):
        return {(ex.caption, ex.scene.objects[0].bbox) for ex in sw.examples(seed, "all", stop=30)}

    assert not keys(0) & keys(1)


def test_unseen_split_is_stable():
    """The captions held back as "unseen" are the same ones in every version and process: a
    model trained earlier is scored only on captions it never saw."""
    import hashlib

    unseen = sw.all_captions("unseen")
    assert len(unseen) == 605
    assert unseen[0] == "a small yellow circle in the top left corner on a red background"
    digest = hashlib.sha256("\n".join(sorted(unseen)).encode()).hexdigest()
    assert digest == "5cb0149961259e62d64e128b5796453c166f3e183aa0f38270a8f4ca9a5b41e5"


def test_scorer_ignores_specks_under_one_percent_of_the_canvas():
    """Stray specks (a few pixels, well under the spec's 1% of the canvas) are noise, not
    objects: an otherwise right image still scores correct; a blob over 1% is an object."""
    ex = _first(2, lambda s: len(s.objects) == 1 and s.objects[0].cell != (2, 2))
    colour = next(c for c in sw.COLORS if c not in (ex.scene.background, ex.scene.objects[0].color))
    specked = ex.image256.copy()
    specked[230:235, 230:235] = SPEC_PALETTE[colour]    # 25 pixels: 0.04% of the canvas
    assert sw.score(specked, ex.caption)["correct"]
    specked[220:247, 220:247] = SPEC_PALETTE[colour]    # 729 pixels: 1.1% of the canvas
    _only_wrong(sw.score(specked, ex.caption), "count")


def test_evaluation_captions_follow_the_seed():
    """`--seed` picks the captions scored: the same seed gives the same captions, another
    seed other ones (so repeated evaluations can cover more of the world)."""
    def captions(n, seed):
        return [s.caption for s in evaluate.evaluation_scenes(n, seed)]

    assert captions(6, 0) == captions(6, 0)
    assert captions(6, 0) != captions(6, 1)
    assert [s.split for s in evaluate.evaluation_scenes(6, 0)] == ["unseen"] * 3 + ["heldout"] * 3
