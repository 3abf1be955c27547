"""Inputs shared by the generation tests: prompt specs, random images, canonical records."""

from __future__ import annotations

import numpy as np

from ilvr_jax.data.records import latent_step, make_record, text_step

# (question image sizes (h, w), question text) of the test prompts.
PROMPT_SPECS = (
    ((), "what is the map"),
    (((56, 84),), "where is the hole"),
    (((56, 84), (84, 56)), "which one"),
    (((84, 84),), "move left then up and reach the goal ?"),
)


def random_image(height: int, width: int, seed: int):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def eval_records(tmp_path):
    """Three records (two images, placed images, text only) with their images under tmp_path."""
    paths = []
    for j, (h, w) in enumerate([(56, 84), (84, 56), (84, 84)]):
        p = tmp_path / f"im{j}.png"
        random_image(h, w, 50 + j).save(p)
        paths.append(p.name)
    plan = [text_step("First look."), latent_step(paths[2]), text_step("The answer is \\boxed{B}.")]
    return [
        make_record("which picture shows the goal", [paths[0], paths[1]], plan, "B", id="two-images"),
        make_record("look at <image> and then at <image>, which one ?", [paths[1], paths[0]], plan, "A", id="placed"),
        make_record("is the ice safe", [], plan, "C", id="text-only"),
    ]
