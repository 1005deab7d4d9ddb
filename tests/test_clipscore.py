"""CLIPScore: both conventions on hand-computed embeddings, and the open_clip path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imagegen.evaluate.clipscore import clip_score, clip_score_images


def test_both_conventions_on_hand_computed_cosines():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # norms differ: scores must normalise
    txt = np.array([[5.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # cosines 1, 1/sqrt(2), -1
    out = clip_score(img, txt)
    np.testing.assert_allclose(out["cosine"], [1.0, 1 / math.sqrt(2), -1.0], atol=1e-12)
    # Hessel et al.: mean of 2.5 * max(cos, 0) -> the negative pair counts 0
    assert out["clipscore_hessel2021"] == pytest.approx(2.5 * (1 + 1 / math.sqrt(2) + 0) / 3)
    # torchmetrics: max(mean(100 * cos), 0) -> the negative pair pulls the mean down
    assert out["clipscore_torchmetrics"] == pytest.approx(100 * (1 + 1 / math.sqrt(2) - 1) / 3)
    assert out["n"] == 3 and set(out["definitions"]) == {"clipscore_hessel2021", "clipscore_torchmetrics"}


def test_clamps_differ_when_the_mean_cosine_is_negative():
    img = np.array([[1.0, 0.0], [1.0, 0.0]])
    txt = np.array([[0.6, 0.8], [-1.0, 0.0]])  # cosines 0.6 and -1: mean -0.2
    out = clip_score(img, txt)
    assert out["clipscore_hessel2021"] == pytest.approx(2.5 * 0.6 / 2)
    assert out["clipscore_torchmetrics"] == 0.0
    assert out["cosine_mean"] == pytest.approx(-0.2)


@pytest.mark.parametrize(
    ("img", "txt", "message"),
    [
        (np.ones((2, 3)), np.ones((3, 3)), "same shape"),
        (np.ones(3), np.ones(3), r"image_emb must be a non-empty \(N, D\)"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((2, 2)), "image_emb row 1 is all zeros"),
        (np.ones((2, 2)), np.array([[1.0, np.nan], [1.0, 1.0]]), "text_emb row 0 has NaN"),
    ],
)
def test_bad_embeddings(img, txt, message):
    with pytest.raises(ValueError, match=message):
        clip_score(img, txt)


def test_clip_score_images_through_open_clip(tmp_path, one_torch_thread):
    from _helpers import tiny_random_clip

    from imagegen.clip import encode_images, encode_texts, load_clip
    from imagegen.world.scene import WorldConfig, render_scene

    spec = tiny_random_clip(tmp_path / "clip")
    scenes = [render_scene(WorldConfig(seed=2), i) for i in range(6)]
    images = [im for _, im in scenes]
    captions = [sc.caption for sc, _ in scenes]
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    out = clip_score_images(spec, paths, captions, batch_size=4)
    clip = load_clip(spec)
    expected = (encode_images(clip, images) * encode_texts(clip, captions)).sum(axis=1)
    np.testing.assert_allclose(out["cosine"], expected, atol=1e-5)
    assert out["clipscore_hessel2021"] == pytest.approx(np.mean(2.5 * np.maximum(expected, 0)), abs=1e-5)
    assert out["clip"]["spec"] == str(clip.spec) and len(out["clip"]["weights_sha256"]) == 64
    with pytest.raises(ValueError, match="6 images but 5 captions"):
        clip_score_images(spec, paths, captions[:5])
