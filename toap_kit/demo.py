"""The demo's Gradio Blocks: a face photo's top-10 results in a deep-hash face search engine.

The engine's database is the open-set protocol's database (evaluation identities' photos plus
2,000 distractors), the people no shipped model was trained on. Pick a shipped query face or
upload a photo (the largest face is detected and cropped like the shipped crops), choose a
model, and see the top 10 with Hamming distances, right and wrong matches marked.

The search functions are plain Python (``Engine.search``) so they can be tested without a
browser; ``build_demo()`` only wires them to widgets.
"""
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps

from . import retrieval, zoo
from .data import check_pixels, crop_face, load_faceset, make_protocol, retrieval_sets
from .postprocess import from_pil, to_pil

__all__ = ["Engine", "MAX_UPLOAD", "SearchResult", "build_demo", "search_shipped", "search_upload"]

DISPLAY = 112  # side of the images the demo keeps and shows
UPLOAD_MAX_SIDE = 2000  # uploads are shrunk to this long side first (12 MP: 0.8 s and ~1/3 the memory, not 2 s)
MAX_UPLOAD = "20mb"  # Gradio's max_file_size at launch (demo_app.py)
NO_FACE = "No face was detected: the centre of the photo was used."

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """Top-k of one query: database indices, Hamming distances, identity names, and whether
    each is the query's identity (``None`` for an uploaded photo of unknown identity)."""

    indices: list[int]
    distances: list[int]
    names: list[str]
    correct: list[bool] | None


class Engine:
    """A face search engine over the open-set database, one code table per model."""

    def __init__(self):
        faces = load_faceset("lfw158", DISPLAY)
        dis = load_faceset("distractors", DISPLAY)
        self.sets = retrieval_sets(make_protocol(faces, len(dis)), faces, dis)
        self.query_names = [faces.identities[int(i)] for i in self.sets.query_labels]
        names = faces.names()
        self.db_names = [names[int(s)] if s >= 0 else dis.identities[int(-1 - s)]
                         for s in self.sets.db_source]
        self.models = zoo.names()
        if not self.models:
            raise FileNotFoundError("no models in data/zoo: run `make artifacts`")
        # shown first: the engine that retrieves best on clean photos (a real one, like a deployed engine)
        self.default_model = max(self.models, key=lambda n: zoo.card(n)["clean_map_all"]["open"])

    @lru_cache(maxsize=None)
    def _model_and_index(self, name: str) -> tuple[torch.nn.Module, retrieval.HammingIndex]:
        model = zoo.load(name)
        index = retrieval.HammingIndex(model.bits)
        index.add(model.encode(self.sets.db_images))
        return model, index

    def search(self, image: torch.Tensor, model_name: str, k: int = 10,
               identity: str | None = None) -> SearchResult:
        """Top-``k`` database faces for one ``3 x H x W`` [0, 1] face crop (float64 is
        converted; uint8, NaN or out-of-range pixels raise, see ``data.check_pixels``)."""
        if model_name not in self.models:
            raise ValueError(f"unknown model {model_name!r}; choose one of {self.models}")
        image = check_pixels(image, "query image", ndim=(3,))
        model, index = self._model_and_index(model_name)
        d, i = index.search(model.encode(image[None]), k)
        names = [self.db_names[j] for j in i[0]]
        correct = None if identity is None else [n == identity for n in names]
        return SearchResult(i[0].tolist(), d[0].tolist(), names, correct)

    def query(self, n: int) -> tuple[torch.Tensor, str]:
        """Shipped query ``n`` (an integer; ``2.0`` is accepted, ``2.5`` is not): its image
        and identity."""
        whole = isinstance(n, (int, np.integer)) or (isinstance(n, (float, np.floating)) and float(n).is_integer())
        if isinstance(n, bool) or not whole:
            raise ValueError(f"query number must be a whole number, got {n!r}")
        n = int(n)
        if not 0 <= n < len(self.query_names):
            raise IndexError(f"query index must be in 0..{len(self.query_names) - 1}, got {n}")
        return self.sets.query_images[n], self.query_names[n]


def _gallery(engine: Engine, res: SearchResult) -> list[tuple[Image.Image, str]]:
    out = []
    for rank, (j, d, name) in enumerate(zip(res.indices, res.distances, res.names)):
        mark = "" if res.correct is None else ("✔ " if res.correct[rank] else "✘ ")
        out.append((to_pil(engine.sets.db_images[j]), f"{mark}{rank + 1}. {name.replace('_', ' ')}  d={d}"))
    return out


def _summary(res: SearchResult, name: str | None, model: str) -> str:
    if res.correct is None:
        return (f"**{model}**: top-10 for the uploaded face (its identity is unknown, so matches "
                "are not marked).")
    hits = sum(res.correct)
    return (f"**{model}**: {hits} of the top 10 are {name.replace('_', ' ')} "
            f"(the database holds other photos of this person).")


def search_shipped(engine: Engine, n: int, model_name: str):
    """Callback: shipped query ``n`` -> (query image, top-10 gallery, summary markdown)."""
    image, name = engine.query(n)
    res = engine.search(image, model_name, identity=name)
    return to_pil(image), _gallery(engine, res), _summary(res, name, model_name)


def search_upload(engine: Engine, photo: Image.Image | None, model_name: str):
    """Callback: an uploaded photo (turned upright by its EXIF orientation, shrunk to a long
    side of ``UPLOAD_MAX_SIDE``, face detected and cropped) -> (crop, gallery, summary).

    Raises:
        ValueError: no photo, or not a PIL image.
    """
    if photo is None:
        raise ValueError("no photo: upload a photo with a face first")
    if not isinstance(photo, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(photo).__name__}")
    photo = ImageOps.exif_transpose(photo).convert("RGB")
    if max(photo.size) > UPLOAD_MAX_SIDE:
        r = UPLOAD_MAX_SIDE / max(photo.size)
        photo = photo.resize((max(1, round(photo.width * r)), max(1, round(photo.height * r))),
                             Image.LANCZOS, reducing_gap=3.0)
    crop, found = crop_face(from_pil(photo), DISPLAY)
    res = engine.search(crop, model_name)
    note = "" if found else " " + NO_FACE
    return to_pil(crop), _gallery(engine, res), _summary(res, None, model_name) + note


def build_demo(engine: Engine | None = None):
    """The Gradio Blocks of the demo (``demo_app.py`` launches it)."""
    import gradio as gr

    engine = engine or Engine()
    log.info("encoding the database with %s (the page's first search then answers at once)", engine.default_model)
    engine._model_and_index(engine.default_model)
    thumbs = [(to_pil(engine.sets.query_images[i]), engine.query_names[i].replace("_", " "))
              for i in range(len(engine.query_names))]

    def run_shipped(n: int, model_name: str):
        try:
            return search_shipped(engine, n, model_name)
        except (IndexError, ValueError) as e:
            raise gr.Error(str(e)) from e

    def run_upload(photo, model_name: str):
        if photo is None:
            raise gr.Error("Upload a photo with a face first.")
        try:
            out = search_upload(engine, photo, model_name)
        except (TypeError, ValueError) as e:
            raise gr.Error(f"This photo cannot be searched: {e}") from e
        if NO_FACE in out[2]:
            gr.Warning(NO_FACE)
        return out

    def on_select(evt: gr.SelectData):
        return evt.index

    with gr.Blocks(title="toap-kit: deep-hash face search") as demo:
        gr.Markdown("# Deep-hash face search\nA face search engine on binary hash codes (Hamming "
                    "distance): a real face recognizer with a hash layer (`dlib_itq_*`) or a small "
                    "hash CNN. Its database holds photos of "
                    f"{len(set(engine.query_names))} people no model was trained on, plus 2,000 "
                    "other people. Pick a face or upload one. Protection joins in a later release.")
        with gr.Row():
            model_dd = gr.Dropdown(engine.models, value=engine.default_model, label="hash model")
            query_no = gr.Number(value=0, precision=0, label="shipped query #", minimum=0,
                                 maximum=len(engine.query_names) - 1)
        with gr.Row():
            with gr.Column(scale=1):
                picker = gr.Gallery(thumbs, label="shipped query faces (click one)", columns=6,
                                    height=300, allow_preview=False)
                upload = gr.Image(type="pil", label="or upload a face photo")
                upload_btn = gr.Button("Search with the uploaded photo")
            with gr.Column(scale=2):
                shown = gr.Image(label="query as searched", height=160)
                summary = gr.Markdown()
                results = gr.Gallery(label="top-10 (✔ same person, ✘ someone else)", columns=5, height=340)
        picker.select(on_select, None, query_no)
        outs = [shown, results, summary]
        query_no.change(run_shipped, [query_no, model_dd], outs, api_name="search_shipped")
        model_dd.change(run_shipped, [query_no, model_dd], outs)
        upload_btn.click(run_upload, [upload, model_dd], outs, api_name="search_upload")
        demo.load(run_shipped, [query_no, model_dd], outs)
    return demo
