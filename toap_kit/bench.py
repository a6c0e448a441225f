"""Benchmarks that print the README's tables (speed and quality are measured here, not in tests).

    python -m toap_kit.bench retrieval [--json]   # zoo mAP, teacher ceiling, FAISS vs numpy
    python -m toap_kit.bench attacks [--json]     # baselines: noise, per-image PGD, UAP
    python -m toap_kit.bench cg [--json]          # Compression Generator fidelity to real codecs
    python -m toap_kit.bench toap [--json]        # TOAP vs baselines, every tier (``make results``)
    python -m toap_kit.bench protect [--json]     # ``toap protect``/``verify`` speed, the odd-input corpus
    python -m toap_kit.bench scale [--json]       # FAISS, Milvus Lite, a Milvus server to 1M codes; protection among 1M strangers; crawl throughput

Every number is measured on the shipped data with the shipped models, on the open-set
protocol (``toap_kit.data.make_protocol``) unless a column says closed-set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import attacks, cg, evaluate, postprocess, report, results, retrieval, teacher, zoo
from .config import OUTPUT_DIR, cpu_threads
from .data import load_faceset, make_protocol, retrieval_sets
from .hashing import ITQ
from .bench_scale import PARTS as SCALE_PARTS, _print_scale, _tree_rss, bench_scale, run_scale
from .perturbation import Perturbation

__all__ = ["bench_attacks", "bench_cg", "bench_demo_load", "bench_index", "bench_models", "bench_protect",
           "bench_retrieval", "bench_scale", "bench_teacher", "bench_toap", "main"]


def _metrics(q_codes, db_codes, sets, ties: str = "expected") -> retrieval.RetrievalResult:
    return retrieval.evaluate(retrieval.hamming_distance(q_codes, db_codes), sets.query_labels,
                              sets.db_labels, k=100, p_k=10, ties=ties)


def bench_models(names: list[str] | None = None) -> list[dict]:
    """Clean retrieval of every zoo model (or of ``names``): open-set (mAP@all, mAP@100, P@10, mAP@all with
    JPEG q75 queries) and the closed-set mAP@all / mAP@100 / P@10, all tie-aware; beside them
    the open-set mAP@all with ties broken by database index (``map_all_index``), to show what
    that rule does (the database stores the evaluation people before the distractors)."""
    rows = []
    cache: dict[int, tuple] = {}
    for name in names or zoo.names():
        c = zoo.card(name)
        s = c["input_size"]
        if s not in cache:
            cache[s] = zoo.protocol_sets(s)
        open_sets, closed_sets = cache[s]["open"], cache[s]["closed"]
        model = zoo.load(name)
        db = model.encode(open_sets.db_images)
        q = model.encode(open_sets.query_images)
        clean = _metrics(q, db, open_sets)
        jpg = _metrics(model.encode(postprocess.apply(open_sets.query_images, "jpeg:75")), db, open_sets)
        closed = _metrics(model.encode(closed_sets.query_images), model.encode(closed_sets.db_images), closed_sets)
        rows.append({"name": name, "role": c["role"], "backbone": c["backbone"], "objective": c["objective"],
                     "bits": c["bits"], "map_all": clean.map_all, "map_all_index": _metrics(q, db, open_sets, "index").map_all,
                     "map_100": clean.map_k, "p_10": clean.precision_k,
                     "map_all_jpeg75": jpg.map_all, "closed_map_all": closed.map_all,
                     "closed_map_100": closed.map_k, "closed_p_10": closed.precision_k})
    return rows


def bench_teacher(bits: tuple[int, ...] = (16, 32, 64)) -> dict:
    """The real recognizer's ceiling on the open-set protocol: float mAP@all (cosine) and
    mAP@all of ITQ codes fitted on the training faces (training identities + distractors)."""
    faces = load_faceset("lfw158", 32)  # the images are not used: only the split and labels
    emb, _ = teacher.load_embeddings("lfw158")
    dis, _ = teacher.load_embeddings("distractors")
    proto = make_protocol(faces, len(dis))
    q = emb[proto.queries]
    db = np.concatenate([emb[proto.database_faces], dis])
    q_lab = faces.labels[proto.queries].numpy()
    db_lab = np.concatenate([faces.labels[proto.database_faces].numpy(), -1 - np.arange(len(dis))])

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    float_map = retrieval.mean_average_precision(-unit(q) @ unit(db).T, q_lab, db_lab)
    fit_on = np.concatenate([emb[proto.train], dis])
    hashed = {}
    for b in bits:
        itq = ITQ(b).fit(fit_on)
        hashed[b] = retrieval.mean_average_precision(
            retrieval.hamming_distance(itq.encode(q), itq.encode(db)), q_lab, db_lab)
    return {"float_map": float_map, "hashed": hashed}


def bench_index(n_codes: int = 1_000_000, n_queries: int = 64, bits: int = 64, k: int = 100,
                seed: int = 0) -> dict:
    """Queries/s of exact top-k Hamming search over ``n_codes`` random codes: FAISS
    ``IndexBinaryFlat`` vs the numpy reference, same queries, same machine, one run."""
    rng = np.random.default_rng(seed)
    db = np.where(rng.random((n_codes, bits), dtype=np.float32) > 0.5, 1, -1).astype(np.int8)
    q = np.where(rng.random((n_queries, bits)) > 0.5, 1, -1).astype(np.int8)
    out = {"n_codes": n_codes, "bits": bits, "k": k, "n_queries": n_queries}
    results = {}
    for backend in ("faiss", "numpy"):
        index = retrieval.HammingIndex(bits, backend)
        index.add(db)
        t = time.perf_counter()
        results[backend] = index.search(q, k)
        out[f"{backend}_qps"] = n_queries / (time.perf_counter() - t)
    out["same_distances"] = bool((results["faiss"][0] == results["numpy"][0]).all())
    return out


@torch.no_grad()
def bench_retrieval() -> dict:
    """The whole retrieval benchmark as one dict (the ``--json`` contract)."""
    return {"protocol": make_protocol(load_faceset("lfw158", 32), 2000).describe(),
            "models": bench_models(), "teacher": bench_teacher(), "index": bench_index()}


def _print_retrieval(r: dict) -> None:
    print(r["protocol"])
    cols = ["name", "role", "bits", "map_all", "map_all_index", "map_100", "p_10", "map_all_jpeg75",
            "closed_map_all", "closed_map_100", "closed_p_10"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for m in r["models"]:
        print("| " + " | ".join(f"{m[c]:.3f}" if isinstance(m[c], float) else str(m[c]) for c in cols) + " |")
    t = r["teacher"]
    print(f"\nteacher (dlib ResNet, 128-D): float mAP@all {t['float_map']:.3f}; ITQ-hashed "
          + ", ".join(f"{b} bits {v:.3f}" for b, v in t["hashed"].items()))
    i = r["index"]
    print(f"\nexact top-{i['k']} Hamming search, {i['n_codes']:,} random {i['bits']}-bit codes: "
          f"FAISS {i['faiss_qps']:.0f} queries/s, numpy {i['numpy_qps']:.1f} queries/s "
          f"({i['faiss_qps'] / i['numpy_qps']:.0f}x), same distances: {i['same_distances']}")


def bench_attacks(eps: float = 8 / 255, pgd_steps: int = 10, posts: tuple[str, ...] = ("none", "jpeg:75"),
                  perturbation: str = "uap-mid-cnn") -> dict:
    """The baseline table on the open-set evaluation identities: random sign noise, per-image
    PGD (made on the ensemble of surrogates) and the shipped UAP, each at ``eps``, on every
    zoo model, in both threat settings, with and without real post-processing."""
    torch.set_grad_enabled(True)
    faces, dis = load_faceset("lfw158", 112), load_faceset("distractors", 112)
    sets = retrieval_sets(make_protocol(faces, len(dis)), faces, dis)
    surrogates = [zoo.load(n) for n in zoo.surrogates()]
    uap = Perturbation.load(perturbation)
    own = sets.db_images[sets.db_source >= 0]
    gen = torch.Generator().manual_seed(0)
    protections: dict[str, dict[str, evaluate.Protect]] = {"noise": {}, "pgd": {}, "uap": {}}
    for setting, x in (("query", sets.query_images), ("database", own)):
        noise = eps * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)
        protections["noise"][setting] = evaluate.precomputed(x, (x + noise).clamp(0, 1))
        delta = attacks.pgd(surrogates, x, eps=eps, alpha=eps / 4, steps=pgd_steps)
        protections["pgd"][setting] = evaluate.precomputed(x, x + delta)
        protections["uap"][setting] = uap.apply
    rows = []
    for name in zoo.names():
        ev, role = evaluate.Evaluator(zoo.load(name), sets), zoo.card(name)["role"]
        for method, by_setting in protections.items():
            for setting, protect in by_setting.items():
                for post in posts:
                    r = ev(protect, setting, post)
                    rows.append({"method": method, "victim": name, "role": role, "setting": setting,
                                 "post": post, "map_clean": r.map_clean, "map_after": r.map_after,
                                 "rel_drop": r.rel_drop, "anti_retrieval": r.anti_retrieval,
                                 "bits_flipped": r.bits_flipped, "psnr": r.psnr, "ssim": r.ssim})
    return {"eps": eps, "pgd_steps": pgd_steps, "perturbation": uap.card, "rows": rows}


def _print_attacks(r: dict) -> None:
    print(f"eps = {r['eps'] * 255:.0f}/255; PGD: {r['pgd_steps']} steps on the surrogate ensemble; "
          f"UAP: {r['perturbation'].get('method')} on {r['perturbation'].get('surrogates')}")
    cols = ["method", "victim", "role", "setting", "post", "map_clean", "map_after", "rel_drop",
            "anti_retrieval", "bits_flipped", "psnr", "ssim"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for m in r["rows"]:
        print("| " + " | ".join(f"{m[c]:.3f}" if isinstance(m[c], float) else str(m[c]) for c in cols) + " |")
    # the same numbers, one line per victim and method: relative mAP drop per setting x post
    keys = sorted({(m["setting"], m["post"]) for m in r["rows"]}, key=lambda k: (k[0] != "query", k[1] != "none", k))
    cells = {(m["victim"], m["method"], m["setting"], m["post"]): m for m in r["rows"]}
    print("\nrelative mAP@all drop (clean mAP@all in brackets)")
    print("| victim | role | method | " + " | ".join(f"{s} / {p}" for s, p in keys) + " | PSNR, queries (dB) | SSIM, queries |")
    print("|" + "---|" * (len(keys) + 5))
    for victim, role, method in dict.fromkeys((m["victim"], m["role"], m["method"]) for m in r["rows"]):
        row = [cells[victim, method, s, p] for s, p in keys]
        print(f"| {victim} | {role} | {method} | "
              + " | ".join(f"{c['rel_drop']:.1%} ({c['map_clean']:.3f})" for c in row)
              + f" | {row[0]['psnr']:.1f} | {row[0]['ssim']:.3f} |")


@torch.no_grad()
def bench_cg(n_faces: int = 300) -> dict:
    """Fidelity of the shipped Compression Generator to the real codecs on ``n_faces``
    held-out faces (evaluation identities, 112x112), per JPEG quality 50..95 (Pillow, 4:2:0)
    and per platform profile: PSNR of CG(x), kornia's differentiable JPEG and x itself to
    real(x), and the share of hash bits (mean over every zoo model) that agree with real(x)."""
    model = cg.load()
    x = cg.heldout_faces(112, n_faces)
    names = zoo.names()
    rows = cg.measure_fidelity(model, x, cg.BENCH_SETTINGS, [zoo.load(n) for n in names])
    return {"n_faces": len(x), "models": names, "cg_card": {k: cg.card()[k] for k in ("sha256", "train_minutes")},
            "rows": rows}


def _print_cg(r: dict) -> None:
    print(f"{r['n_faces']} held-out faces (evaluation identities, 112x112); bits over {len(r['models'])} "
          f"zoo models: {', '.join(r['models']) or 'none'}")
    cols = ["setting", "psnr_cg", "psnr_diffjpeg", "psnr_identity", "bits_agree_cg", "bits_agree_diffjpeg",
            "bits_agree_identity"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for m in r["rows"]:
        print("| " + " | ".join("-" if m[c] is None else f"{m[c]:.2f}" if c.startswith("psnr") else
                                f"{m[c]:.4f}" if isinstance(m[c], float) else str(m[c]) for c in cols) + " |")


def bench_toap(parts: list[str] | None = None) -> dict:
    """TOAP's results (``toap_kit.results.run``, all ``results.PARTS`` or ``parts``) and their
    tables (``report.write_markdown``), written to ``results/`` (or, in fast mode, ``TOAP_FAST=1``,
    to ``outputs/results-fast/`` so a smoke run never replaces them); a full run also writes the
    cards' headline numbers and the README's generated blocks (``report.update_readme``)."""
    torch.set_grad_enabled(True)
    r = results.run(parts=parts or results.PARTS)
    folder = OUTPUT_DIR / "results-fast" if r["fast"] else results.RESULTS_DIR
    results.write(r, folder)
    report.write_markdown(r, folder)
    if not r["fast"] and "grid" in r["parts"]:
        results.annotate_cards(r)
        report.update_readme(r)
    return r


def _print_toap(r: dict) -> None:
    print(report.markdown(r))


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def _photo(i: int, width: int, height: int):
    """Shipped photo ``i`` (250x250) upscaled (bicubic) to a ``height`` square, centred on a
    ``width x height`` canvas of the same photo stretched: a big photo with one real face."""
    from PIL import Image

    from .odd_inputs import shipped_photo

    small = shipped_photo(i)
    canvas = small.resize((width, height), Image.BICUBIC)
    canvas.paste(small.resize((height, height), Image.BICUBIC), ((width - height) // 2, 0))
    return canvas


DEMO_APP = Path(__file__).resolve().parent.parent / "demo_app.py"


def bench_demo_load(requests: int = 20, photo: str | Path | None = None, start_timeout_s: float = 600,
                    request_timeout_s: float = 1800) -> dict:
    """``requests`` users press *Protect and search* at once on ``demo_app.py``.

    The app runs as a child process on a free 127.0.0.1 port with a fresh ``TMPDIR`` (so its
    result folder, Gradio's cache and the uploads all land in one folder); once it answers,
    ``requests`` parallel ``/protect`` calls go through ``gradio_client`` with the page's
    default settings (strength mid, refined for the photo, ``engine.DEFAULT_ENGINE``, upload
    facebook, quality 75) and a shipped photo (default ``George_W_Bush/01.jpg``), each
    downloading every file the page returns. Then the app is stopped with SIGTERM.

    Returns:
        ``requests``, ``failed`` (``errors``: their distinct messages); latency from submit to
        files downloaded: ``min_s``, ``p50_s``, ``p95_s``, ``max_s``; ``idle_rss_mb`` (before
        the load) and ``peak_rss_mb`` of the server's process tree (sampled every 0.2 s, and the
        main process's own high-water mark); ``leftover_files`` in its ``TMPDIR`` after it
        stopped (``leftover_where``: per top folder).
    """
    import signal
    import socket
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import psutil
    from gradio_client import Client, handle_file

    from .data import DATA_DIR
    from .engine import DEFAULT_ENGINE

    if not DEMO_APP.is_file():
        raise FileNotFoundError(f"{DEMO_APP} not found: the demo load test runs from a clone of the kit")
    photo = Path(photo) if photo else DATA_DIR / "photos250" / "George_W_Bush" / "01.jpg"
    with tempfile.TemporaryDirectory(prefix="toap-bench-demo-") as tmp:
        tmp = Path(tmp)
        server_tmp, client_tmp = tmp / "server", tmp / "client"
        server_tmp.mkdir()
        client_tmp.mkdir()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "TMPDIR": str(server_tmp)}
        env.pop("GRADIO_TEMP_DIR", None)
        url = f"http://127.0.0.1:{port}/"
        with open(tmp / "server.log", "wb") as log_file:
            server = subprocess.Popen([sys.executable, str(DEMO_APP), "--port", str(port)], cwd=DEMO_APP.parent,
                                      env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    why = "timeout" if server.returncode is None else f"exit status {server.returncode}"
                    tail = (tmp / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"demo_app.py did not answer on {url} ({why}):\n{tail}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            proc = psutil.Process(server.pid)
            idle = _tree_rss(proc)
            peak, done = [idle], threading.Event()

            def sample() -> None:
                while not done.wait(0.2):
                    peak.append(_tree_rss(proc))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            client = Client(url, verbose=False, download_files=str(client_tmp))

            def one(_) -> tuple[float, str | None]:
                t = time.perf_counter()
                try:
                    client.predict(handle_file(str(photo)), "mid", DEFAULT_ENGINE, "facebook", 75, True,
                                   api_name="/protect")
                    return time.perf_counter() - t, None
                except Exception as e:  # noqa: BLE001 - a failed request is what this counts
                    return time.perf_counter() - t, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"

            # gradio_client leaves an empty folder in the temporary folder for each file it
            # downloads: keep them in ours
            tempdir, tempfile.tempdir = tempfile.tempdir, str(client_tmp)
            try:
                with ThreadPoolExecutor(max_workers=requests) as pool:
                    runs = list(pool.map(one, range(requests), timeout=request_timeout_s))
            finally:
                tempfile.tempdir = tempdir
            done.set()
            sampler.join()
            try:  # Linux: the main process's own peak, between two samples included
                hwm = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{server.pid}/status").read_text()
                           .splitlines() if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                hwm = 0
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)  # demo_app.py stops as on Ctrl-C: it deletes its files
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
        left = [f for f in server_tmp.rglob("*") if f.is_file()]
        where: dict[str, int] = {}
        for f in left:
            top = f.relative_to(server_tmp).parts[0]
            top = "toap-demo-*" if top.startswith("toap-demo-") else top
            where[top] = where.get(top, 0) + 1
    seconds = np.array([t for t, _ in runs])
    errors = [e for _, e in runs if e]
    return {"requests": requests, "failed": len(errors), "errors": sorted(set(errors)),
            "engine": DEFAULT_ENGINE, "stopped_with": server.returncode,
            "min_s": float(seconds.min()), "p50_s": float(np.percentile(seconds, 50)),
            "p95_s": float(np.percentile(seconds, 95)), "max_s": float(seconds.max()),
            "idle_rss_mb": idle / 2**20, "peak_rss_mb": max(max(peak), hwm) / 2**20,
            "leftover_files": len(left), "leftover_where": where}


TWO_NETWORKS = (("dlib", "mobileface"), ("dlib", "faceres"), ("mobileface", "faceres"))
"""The refinements against two networks whose time a face ``bench protect`` measures (issue 29: <= 20 s)."""


@torch.no_grad()
def bench_protect(n_face: int = 200, n_photo: int = 5, n_folder: int = 100, folder_size: tuple = (1600, 1200)) -> dict:
    """``toap protect`` and ``toap verify`` on this machine (toap-mid), and the odd-input corpus.

    - ``face_ms``: ``protect_image`` on a 112x112 face crop (no detection: the crop is the face),
      median of ``n_face``; ``face_detect_ms`` the same with detection;
    - ``refine_face_s``: the same face refined against dlib's network (``toap protect --refine``,
      ``refine.DEFAULT_STEPS`` steps; dlib's network already loaded: the demo's path; on
      ``config.cpu_threads()`` threads (``refine_threads``), as the command line), median of 3;
      ``refine_against_face_s``: the same against two networks (``TWO_NETWORKS``, ``--against``);
      ``refine_cli_face_s``: ``toap protect FACE --refine STEPS --no-detect`` on a 250x250 photo,
      the whole fresh process timed (imports, network, its own torch threads), median of 3;
    - ``photo_12mp_ms``: a 4000x3000 photo (a shipped photo upscaled), detection included,
      median of ``n_photo``; ``photo_12mp_file_ms``: the same file to file (decode, protect,
      JPEG q95 encode, checksums, manifest);
    - ``folder_100_s``: ``protect_files`` over a folder of ``n_folder`` JPEGs of ``folder_size``
      (shipped photos upscaled), progress bar on;
    - ``verify_ms``: ``verify`` of a 250x250 photo against its protected copy, every zoo engine,
      median of 3 in one process (``verify_first_call_s``: ``toap verify --json`` in a fresh
      process, imports and model loading included; the database codes are shipped);
      ``verify_12mp_ms`` the same on the 12-megapixel photo;
    - ``bad_inputs``: ``odd_inputs.run_odd_inputs`` (counts; each case in ``bad_input_cases``);
    - ``crawl_bad_inputs``: ``odd_crawl.run_odd_crawl``, the odd names, files, URIs, index
      locations, races and stale files of ``toap crawl``/``toap search`` (counts and seconds; each
      case in ``crawl_bad_input_cases``);
    - ``demo_load``: ``bench_demo_load()``, 20 users protecting a photo at once on the demo.
    """
    from PIL import Image

    from . import batch, odd_crawl, odd_inputs, protect, verify

    p = protect.load_perturbation()
    out: dict = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "perturbation": p.card.get("name")}
    face = odd_inputs.shipped_photo(0).resize((112, 112), Image.LANCZOS)
    protect.protect_image(face, p)  # loads the detector
    out["face_ms"] = _median_ms(lambda: protect.protect_image(face, p, detect=False), n_face)
    out["face_detect_ms"] = _median_ms(lambda: protect.protect_image(face, p), n_face // 4)
    from .refine import DEFAULT_STEPS, KnownRecognizer, known_recognizer

    rec = KnownRecognizer()
    protect.protect_image(face, p, refine_steps=1, recognizer=rec)  # warm-up
    threads = torch.get_num_threads()
    torch.set_num_threads(out.setdefault("refine_threads", cpu_threads()))  # as `toap` sets them
    try:
        out["refine_face_s"] = _median_ms(lambda: protect.protect_image(face, p, detect=False,
                                                                         refine_steps=DEFAULT_STEPS, recognizer=rec),
                                          3) / 1000
        out["refine_against_face_s"] = {}
        for against in TWO_NETWORKS:
            two = known_recognizer(against=against)
            protect.protect_image(face, p, refine_steps=1, recognizer=two, against=against)  # warm-up
            out["refine_against_face_s"]["+".join(against)] = _median_ms(lambda: protect.protect_image(
                face, p, detect=False, refine_steps=DEFAULT_STEPS, recognizer=two, against=against), 3) / 1000
    finally:
        torch.set_num_threads(threads)
    out["refine_steps"] = DEFAULT_STEPS
    with tempfile.TemporaryDirectory() as tmp:  # as a user runs it: a fresh process, each into a new folder
        odd_inputs.shipped_photo(0).save(Path(tmp) / "face.png")
        runs = iter(range(3))
        out["refine_cli_face_s"] = _median_ms(lambda: subprocess.run(
            [sys.executable, "-m", "toap_kit.cli", "protect", str(Path(tmp) / "face.png"), "-o",
             str(Path(tmp) / f"out{next(runs)}"), "--refine", str(DEFAULT_STEPS), "--no-detect", "-q"],
            capture_output=True, check=True), 3) / 1000
    big = _photo(2, 4000, 3000)
    out["photo_12mp_faces"] = len(protect.protect_image(big, p).boxes)
    out["photo_12mp_ms"] = _median_ms(lambda: protect.protect_image(big, p), n_photo)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "one").mkdir()
        big.save(tmp / "one" / "big.jpg", quality=92)
        runs = iter(range(n_photo))
        out["photo_12mp_file_ms"] = _median_ms(lambda: batch.protect_files(
            [tmp / "one" / "big.jpg"], tmp / f"one-out{next(runs)}", p, progress=False), n_photo)
        folder = tmp / "folder"
        folder.mkdir()
        for i in range(n_folder):
            _photo(i % 23, *folder_size).save(folder / f"photo{i:03d}.jpg", quality=90)
        t = time.perf_counter()
        rows = batch.protect_files([folder], tmp / "folder-out", p, progress=True)
        out["folder_100_s"] = time.perf_counter() - t
        out["folder_photos"], out["folder_photo_size"] = len(rows), list(folder_size)
        out["folder_protected"] = sum(r["status"] == "protected" for r in rows)
        original = odd_inputs.shipped_photo(3)
        protected = protect.protect_image(original, p).image
        original.save(tmp / "original.png")
        protected.save(tmp / "protected.png")
        t = time.perf_counter()  # a fresh process, as a user's first `toap verify` (imports, models, codes)
        first = subprocess.run([sys.executable, "-m", "toap_kit.cli", "verify", str(tmp / "original.png"),
                                str(tmp / "protected.png"), "-m", "mid", "--json"],
                               capture_output=True, text=True, check=True)
        out["verify_first_call_s"] = time.perf_counter() - t
        out["verify_engines"] = len(json.loads(first.stdout)["rows"])
        out["verify_ms"] = _median_ms(lambda: verify.verify(original, protected, perturbation=p), 3)
        big_protected = protect.protect_image(big, p).image
        out["verify_12mp_ms"] = _median_ms(lambda: verify.verify(big, big_protected, perturbation=p), 3)
        bad = odd_inputs.run_odd_inputs(tmp / "corpus", p)
    out["bad_inputs"] = {k: bad[k] for k in ("files", "clear_errors", "correct_results", "crashes", "hangs",
                                             "silently_wrong", "unexpected", "originals_modified")}
    out["bad_input_cases"] = bad["cases"]
    with tempfile.TemporaryDirectory() as tmp:
        crawled = odd_crawl.run_odd_crawl(tmp)
    out["crawl_bad_inputs"] = {k: crawled[k] for k in ("files", "clear_errors", "correct_results", "crashes", "hangs",
                                                       "silently_wrong", "unexpected", "originals_modified", "seconds")}
    out["crawl_bad_input_cases"] = crawled["cases"]
    out["demo_load"] = bench_demo_load()
    return out


def _print_corpus(title: str, b: dict, cases: list[dict]) -> None:
    took = f"; {b['seconds']:.0f} s" if "seconds" in b else ""
    print(f"\n{title}: {b['files']} cases, {b['clear_errors']} clear errors, {b['correct_results']} correct results, "
          f"{b['crashes']} crashes, {b['hangs']} hangs, {b['silently_wrong']} silently wrong, {b['unexpected']} "
          f"unexpected, {b['originals_modified']} originals modified{took}")
    for c in cases:
        print(f"  {c['outcome']:14} {c['case']}: {c['detail'][:100]}")


def _print_protect(r: dict) -> None:
    print(f"toap protect / verify with {r['perturbation']}, {r['threads']} torch thread(s), {r['cpus']} CPUs")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| protect a 112x112 face (no detection) | {r['face_ms']:.2f} ms | < 5 ms |")
    print(f"| protect a 112x112 face, with detection | {r['face_detect_ms']:.1f} ms | |")
    print(f"| refine and protect one face ({r['refine_steps']} steps, --refine) | {r['refine_face_s']:.1f} s | <= 15 s |")
    for nets, sec in r.get("refine_against_face_s", {}).items():
        print(f"| the same against two networks, `--against {nets.replace('+', ',')}` | {sec:.1f} s | <= 20 s |")
    print(f"| the same from the command line: `toap protect --refine` in a fresh process, 250x250 face | "
          f"{r['refine_cli_face_s']:.1f} s | <= 2x the row above |")
    print(f"| protect a 12-megapixel photo, detection included ({r['photo_12mp_faces']} face) | "
          f"{r['photo_12mp_ms']:.0f} ms | < 500 ms |")
    print(f"| the same, file to file (decode, JPEG q95 encode, manifest) | {r['photo_12mp_file_ms']:.0f} ms | |")
    w, h = r["folder_photo_size"]
    print(f"| a folder of {r['folder_photos']} photos ({w}x{h} JPEG; {r['folder_protected']} protected) | "
          f"{r['folder_100_s']:.1f} s | |")
    print(f"| verify, {r['verify_engines']} engines, 250x250 photo (models loaded) | "
          f"{r['verify_ms']:.0f} ms | |")
    print(f"| verify, {r['verify_engines']} engines, 12-megapixel photo | {r['verify_12mp_ms']:.0f} ms | |")
    print(f"| verify, first call: `toap verify --json` in a fresh process | {r['verify_first_call_s']:.1f} s | < 30 s |")
    _print_corpus("bad or odd inputs", r["bad_inputs"], r["bad_input_cases"])
    _print_corpus("bad or odd inputs of toap crawl/search", r["crawl_bad_inputs"], r["crawl_bad_input_cases"])
    d = r["demo_load"]
    print(f"\nthe demo under load: {d['requests']} users press Protect and search at once (refined, {d['engine']}, "
          f"facebook): {d['failed']} failed; latency p50 {d['p50_s']:.1f} s, p95 {d['p95_s']:.1f} s, max "
          f"{d['max_s']:.1f} s; server memory {d['idle_rss_mb']:.0f} MB idle, {d['peak_rss_mb']:.0f} MB at peak; "
          f"{d['leftover_files']} files left after it stopped {d['leftover_where'] or ''}")
    for e in d["errors"]:
        print(f"  {e}")


BENCHES = {"retrieval": (bench_retrieval, _print_retrieval), "attacks": (bench_attacks, _print_attacks),
           "cg": (bench_cg, _print_cg), "toap": (bench_toap, _print_toap),
           "protect": (bench_protect, _print_protect), "scale": (run_scale, _print_scale)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m toap_kit.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=sorted(BENCHES))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--parts", nargs="+", choices=results.PARTS + SCALE_PARTS,
                   help=f"toap: only these parts of the results run {results.PARTS}; scale: {SCALE_PARTS}")
    args = p.parse_args(argv)
    run, show = BENCHES[args.what]
    wrong = set(args.parts or ()) - set({"toap": results.PARTS, "scale": SCALE_PARTS}.get(args.what, ()))
    if wrong:
        p.error(f"--parts {sorted(wrong)} is not a part of {args.what}")
    result = run(args.parts) if args.what in ("toap", "scale") else run()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        show(result)


if __name__ == "__main__":
    main()
