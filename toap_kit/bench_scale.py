"""``python -m toap_kit.bench scale [--json]``: the face index and the protection at scale (issue 21, item 4).

Two measurements (``bench_scale``):

1. **Backends** (``backends``, ``BACKENDS``): for each database size, the first ``n`` simulated
   strangers of ``crowd.simulate_codes("dlib_itq_64", n, seed)`` (64-bit codes; crowds grow by
   prefix) go into FAISS in memory (``open_index("faiss")``, exact), Milvus Lite (a ``.db`` in a
   temporary folder; flushed), and a Milvus server (``milvus_server.start``: the ``milvus``
   wheel's standalone binary, a fresh one per row; or ``TOAP_MILVUS_URI``) twice: ``BIN_FLAT``
   (``milvus-server``, exact) and ``BIN_IVF_FLAT`` (``milvus-server-ivf``, ``ivf_lists``: nlist and
   nprobe, in the row). Per size and backend: ``build_s`` (open, add every code; for Milvus the
   flush; for a server also the wait for its index and loading the collection again),
   ``rss_mb`` (growth of the resident memory over the build, psutil, noisy, a lower bound where
   freed memory is reused: this process tree's, or the server process's; ``server_rss_mb``:
   the server's total after the build), the latency of ``n_queries`` single top-``k`` queries
   (``index.search`` of one code, metadata fetch included; queries: ``simulate_codes(...,
   seed + 1)``), ``p50_ms`` / ``p95_ms``, and of the same queries in batches of ``BATCH``
   (``batch_p50_ms`` / ``batch_p95_ms``). ``identical_top_k`` says whether every exact backend
   returned FAISS's ids and distances on every query; the IVF row has ``recall_at_k`` (tie-aware)
   and ``recall_ids_at_k`` against FAISS's top k instead (``recall_at_k``).

2. **Protection** (``protection``): for each dlib engine, the database is **2k real + m
   simulated**: the shipped open-set database codes (``engine.db_codes``: the evaluation
   identities' 775 photos and 2,000 real distractors) plus the first ``m`` simulated strangers
   (``crowd.simulate_codes(engine, m, seed)``, hashed by that engine's own layer). Queries: the
   protocol's 174 query faces (``DISPLAY`` x ``DISPLAY`` crops), clean, and protected with the
   shipped ``toap-mid`` perturbation (``Perturbation.apply``, no post-processing), encoded by the
   engine. Per ``m`` and query kind: tie-aware ``map_all`` (mAP@all), ``p_10`` (P@10) and
   ``median_first_rank``: the median over queries of the expected 1-based rank of the first true
   match, ties in random order (a match in a tie group of ``n`` items holding ``r`` matches,
   after ``s`` items, is expected at ``s + (n + 1) / (r + 1)``).

   The metrics read full rows of distances (every database item), computed in chunks with
   packed codes and popcount: since only the count of items and of true matches at each
   Hamming distance matters to a tie-aware metric, each row is kept as two histograms, which is
   what makes a million strangers cheap. ``check_m0`` compares the histogram metrics at m = 0
   with ``retrieval.evaluate`` on the full distance matrix (they must agree to rounding).
   The third query kind, ``refine-mid``, is each query face refined against dlib's network
   (issue 18, ``toap protect --refine``: ``results.refined``, cached in ``outputs/results/refined``,
   the same faces and cache as the results run's ``refine-mid`` rows).

3. **Crawl** (``crawl``, ``bench_crawl``): the crawler's throughput into a Milvus server, one
   crawler and two shards at once (``toap crawl --shard``), and where a face's time goes.

``python -m toap_kit.bench scale`` writes ``results/scale.json``, ``results/scale.png`` (the
curves), the README's tables (``update_readme``) and ``docs/deploy.md``'s crawl table;
``--parts backends`` (or ``protection``, ``crawl``) reruns one part and keeps the others' rows
from the existing ``scale.json`` (each part records when it was measured).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import crowd, engine, results, retrieval, toap
from . import index as face_index
from .bench_crawl import bench_crawl
from .perturbation import Perturbation

__all__ = ["BACKENDS", "DEPLOY_BEGIN", "DEPLOY_END", "PARTS", "PROTECTION_M", "README_BEGIN", "README_END", "bench_scale",
           "crawl_markdown", "deploy_block", "histogram_metrics", "ivf_lists", "markdown", "readme_block", "recall_at_k",
           "run_scale", "scale_figure", "update_readme", "write_scale"]

PARTS = ("backends", "protection", "crawl")
BACKENDS = ("faiss", "milvus-lite", "milvus-server", "milvus-server-ivf")
"""The backends part's rows at each size, FAISS first (the reference)."""
BATCH = 100
"""Queries per batch in the batch latency."""

PROTECTION_M = (0, 10_000, 100_000, 1_000_000)
"""Simulated strangers added to the 2k real database in the protection part."""
_ADD_CHUNK = 50_000   # codes per add() call (a progress step)
_DIST_CHUNK = 16_384  # database rows per distance block
_INDEX_WAIT_S = 1800.0  # most seconds a Milvus server may take to build a row's index


def _tree_rss(proc) -> int:
    """Resident bytes of a ``psutil.Process`` and all its descendants (0 for one that is gone)."""
    import psutil

    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in members:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


# ---------------------------------------------------------------- backends
def _done(row: dict) -> dict:
    """Show a finished row on stderr (so a run cut short still tells what it measured)."""
    tqdm.write("scale: " + json.dumps({k: v for k, v in row.items() if k != "check_m0"}), file=sys.stderr)
    return row


def ivf_lists(n: int) -> tuple[int, int]:
    """``(nlist, nprobe)`` of the ``milvus-server-ivf`` row for ``n`` codes: ``nlist`` the power
    of two nearest sqrt(n), ``nprobe`` = nlist / 16 (at least 1): a search scans about a
    sixteenth of the database, at every size."""
    nlist = 2 ** int(round(np.log2(max(np.sqrt(n), 1.0))))
    return nlist, max(1, nlist // 16)


def recall_at_k(exact_d: np.ndarray, got_d: np.ndarray, got_ids: np.ndarray,
                exact_ids: np.ndarray) -> tuple[float, float]:
    """Recall of an approximate top k (``Nq x k`` distances and ids, -1 where fewer came back)
    against the exact one: tie-aware (per query, the share of the exact top k's distance
    multiset that the approximate one holds: a tied item in place of another counts) and by id
    (the share of the exact top k's ids, ties broken by lowest id, that came back)."""
    k, bins = exact_d.shape[1], int(max(exact_d.max(initial=0), got_d.max(initial=0))) + 1
    ties, ids = [], []
    for de, dg, ie, ig in zip(exact_d, got_d, exact_ids, got_ids):
        he, hg = np.bincount(de[de >= 0], minlength=bins), np.bincount(dg[dg >= 0], minlength=bins)
        ties.append(np.minimum(he, hg).sum() / k)
        ids.append(len(set(ie.tolist()) & set(ig[ig >= 0].tolist())) / k)
    return float(np.mean(ties)), float(np.mean(ids))


def _build(uri: str, codes: np.ndarray, label: str, proc, ready=None,
           **open_kw) -> tuple[face_index.FaceIndex, float, float | None]:
    """Open ``uri`` (``open_kw``: collection, ivf, nprobe), add ``codes``, flush a Milvus index,
    then ``ready()`` when given; returns the index, the seconds, and the growth of ``proc``'s
    resident memory (a ``psutil.Process`` and its children, MB; None without one)."""
    gc.collect()
    before = _tree_rss(proc) if proc is not None else 0
    t = time.perf_counter()
    ix = face_index.open_index(uri, bits=codes.shape[1], engine="dlib_itq_64", **open_kw)
    for j in tqdm(range(0, len(codes), _ADD_CHUNK), desc=f"{label}: add", unit="chunk", leave=False):
        ix.add(codes[j:j + _ADD_CHUNK])
    if isinstance(ix, face_index.MilvusIndex):
        ix.save()  # flush: durable
    if ready is not None:
        ready()
    seconds = time.perf_counter() - t
    return ix, seconds, None if proc is None else (_tree_rss(proc) - before) / 2**20


def _latency(ix: face_index.FaceIndex, queries: np.ndarray, k: int, label: str) -> tuple[np.ndarray, np.ndarray, list]:
    ids, dists, ms = [], [], []
    for q in tqdm(queries, desc=f"{label}: queries", leave=False):
        t = time.perf_counter()
        hits = ix.search(q[None], k)
        ms.append((time.perf_counter() - t) * 1000)
        ids.append(hits.ids[0])
        dists.append(hits.distances[0])
    return np.stack(ids), np.stack(dists), ms


def _batch_latency(ix: face_index.FaceIndex, queries: np.ndarray, k: int, size: int) -> list:
    """Milliseconds of ``ix.search`` on each full batch of ``size`` queries."""
    ms = []
    for j in range(0, len(queries) - size + 1, size):
        t = time.perf_counter()
        ix.search(queries[j:j + size], k)
        ms.append((time.perf_counter() - t) * 1000)
    return ms


def _client(uri: str):
    from pymilvus import MilvusClient

    return MilvusClient(uri, token=os.environ.get("TOAP_MILVUS_TOKEN", ""))


def _index_built(uri: str, name: str, timeout_s: float = _INDEX_WAIT_S) -> None:
    """Wait until the server has built the index of every row of ``name`` (at most ``timeout_s``),
    then release and load the collection, so that searches run on the built index."""
    client = _client(uri)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            d = client.describe_index(name, "code")
            if int(d.get("pending_index_rows", 0)) == 0 and int(d["indexed_rows"]) >= int(d["total_rows"]):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{uri}: the index of {name} was not built in {timeout_s:.0f} s ({d})")
            time.sleep(0.5)
        client.release_collection(name)
        client.load_collection(name)
    finally:
        client.close()


@contextlib.contextmanager
def _server_row(milvus, backend: str, n: int):
    """``(uri, collection, process)`` for one server row: on ``milvus`` (a ``LocalServer`` or a
    URI; ``process`` None for a URI: its memory is not measured), or, when None, on a fresh
    local server started for the row (``milvus_server.start``) and removed after it. The row's
    collection is dropped before and after."""
    import psutil

    from . import milvus_server

    local = milvus_server.start() if milvus is None else None
    try:
        server = local or milvus
        uri = server if isinstance(server, str) else server.uri
        proc = None if isinstance(server, str) else psutil.Process(server.pid)
        name = f"toap_bench_{backend.replace('-', '_')}_{n}"
        face_index.drop_index(uri, name)
        try:
            yield uri, name, proc
        finally:
            face_index.drop_index(uri, name)
    finally:
        if local is not None:
            local.stop()


def _server_name(milvus) -> str:
    if isinstance(milvus, str):
        return "a Milvus server named by TOAP_MILVUS_URI"
    from milvus import __version__

    return f"Milvus {__version__} standalone (the milvus wheel), " + ("a fresh server per row" if milvus is None
                                                                     else "one server for every row")


def _backend_row(backend: str, n: int, db: np.ndarray, queries: np.ndarray, k: int, batch: int, tmp: str,
                 milvus) -> tuple[dict, np.ndarray, np.ndarray]:
    """One backend at ``n`` codes: its row and its single-query top k (ids, distances)."""
    import psutil

    label = f"{backend} {n:,}"
    row = {"n_codes": n, "backend": backend}
    with contextlib.ExitStack() as stack:
        if backend in ("faiss", "milvus-lite"):
            uri = "faiss" if backend == "faiss" else os.path.join(tmp, "scale.db")
            ix, build_s, rss_mb = _build(uri, db, label, psutil.Process(os.getpid()))
        else:
            uri, name, proc = stack.enter_context(_server_row(milvus, backend, n))
            kw = {"collection": name}
            if backend == "milvus-server-ivf":
                kw["ivf"], kw["nprobe"] = ivf_lists(n)
                row.update(nlist=kw["ivf"], nprobe=kw["nprobe"])
            ix, build_s, rss_mb = _build(uri, db, label, proc, ready=lambda: _index_built(uri, name), **kw)
            row["server"] = _server_name(milvus)
            if proc is not None:
                row["server_rss_mb"] = _tree_rss(proc) / 2**20
        stack.callback(ix.close)
        ids, dists, ms = _latency(ix, queries, k, label)
        size = min(batch, len(queries))
        batch_ms = _batch_latency(ix, queries, k, size)
    row.update(build_s=build_s, rss_mb=rss_mb, p50_ms=float(np.percentile(ms, 50)), p95_ms=float(np.percentile(ms, 95)),
               batch_size=size, batch_p50_ms=float(np.percentile(batch_ms, 50)),
               batch_p95_ms=float(np.percentile(batch_ms, 95)), n_queries=len(queries), k=k)
    return row, ids, dists


def _bench_backends(sizes, n_queries: int, k: int, seed: int, backends=BACKENDS, milvus=None,
                    batch: int = BATCH) -> tuple[list[dict], float]:
    if backends[0] != "faiss" or set(backends) - set(BACKENDS):
        raise ValueError(f"backends must start with 'faiss' (the reference) and be among {BACKENDS}, got {backends}")
    t = time.perf_counter()
    crowd_codes = crowd.simulate_codes("dlib_itq_64", max(sizes), seed)
    simulate_s = time.perf_counter() - t
    queries = crowd.simulate_codes("dlib_itq_64", n_queries, seed + 1)
    rows = []
    for n in sizes:
        db, done, found = crowd_codes[:n], [], {}
        with tempfile.TemporaryDirectory(prefix="toap-bench-scale-") as tmp:
            for backend in backends:
                row, ids, dists = _backend_row(backend, n, db, queries, k, batch, tmp, milvus)
                found[backend] = (ids, dists)
                done.append(row)
        fi, fd = found["faiss"]
        same = all(np.array_equal(fi, found[b][0]) and np.array_equal(fd, found[b][1])
                   for b in found if b != "milvus-server-ivf")
        for r in done:
            if r["backend"] == "milvus-server-ivf":
                r["identical_top_k"] = None  # approximate: its recall instead
                r["recall_at_k"], r["recall_ids_at_k"] = recall_at_k(fd, found[r["backend"]][1],
                                                                     found[r["backend"]][0], fi)
            else:
                r["identical_top_k"] = same
            rows.append(_done(r))
    return rows, simulate_s


# ---------------------------------------------------------------- protection
def _packed64(codes: np.ndarray) -> np.ndarray:
    """Codes as one row of uint64 words each (bits zero-padded to a multiple of 64)."""
    p = np.packbits(codes > 0, axis=1)
    pad = -p.shape[1] % 8
    p = np.concatenate([p, np.zeros((len(p), pad), np.uint8)], axis=1) if pad else p
    return np.ascontiguousarray(p).view(np.uint64)


def _histograms(q: np.ndarray, db: np.ndarray, bits: int, relevant: np.ndarray | None = None) -> np.ndarray:
    """``Nq x (bits + 1)`` counts of database rows at each Hamming distance (only the rows
    ``relevant[query]`` marks, when given: ``Nq x Ndb`` bool)."""
    qp, out = _packed64(q), np.zeros((len(q), bits + 1), np.int64)
    offsets = (np.arange(len(q)) * (bits + 1))[:, None]
    for j in range(0, len(db), _DIST_CHUNK):
        dp = _packed64(db[j:j + _DIST_CHUNK])
        d = np.bitwise_count(qp[:, None, :] ^ dp[None, :, :]).sum(axis=2, dtype=np.int64)
        idx = d + offsets
        if relevant is not None:
            idx = idx[relevant[:, j:j + _DIST_CHUNK]]
        out += np.bincount(idx.ravel(), minlength=out.size).reshape(out.shape)
    return out


def histogram_metrics(all_hist: np.ndarray, rel_hist: np.ndarray, k: int = 10) -> dict:
    """Tie-aware mAP@all, P@k and the median expected rank of the first true match from, per
    query, the counts of database items (``all_hist``) and of true matches (``rel_hist``) at
    each distance: the same expectations as ``retrieval``'s ``ties="expected"`` (queries without
    a true match are skipped and counted)."""
    keep = rel_hist.sum(1) > 0
    a, r = all_hist[keep].astype(np.float64), rel_hist[keep].astype(np.float64)
    m = int(all_hist[0].sum())
    k = min(int(k), m)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, m + 1))])
    s = np.cumsum(a, 1) - a                       # items ahead of each distance's group
    big_r = np.cumsum(r, 1) - r                   # true matches ahead of it
    n = np.maximum(a, 1)
    si, ni = s.astype(np.int64), a.astype(np.int64)
    h1 = harmonic[si + ni] - harmonic[si]
    h2 = a - (s + 1) * h1
    f = np.where(a > 1, (r - 1) / np.maximum(a - 1, 1), 0.0)
    ap = (r / n * ((big_r + 1) * h1 + f * h2)).sum(1) / r.sum(1)
    g = np.argmax(s + a >= k, axis=1)[:, None]    # the group holding place k
    sg, ag, rg, bg = (np.take_along_axis(x, g, 1)[:, 0] for x in (s, a, r, big_r))
    p_k = (bg + rg * (k - sg) / np.maximum(ag, 1)) / k
    first = np.argmax(r > 0, axis=1)[:, None]
    sf, af, rf = (np.take_along_axis(x, first, 1)[:, 0] for x in (s, a, r))
    first_rank = sf + (af + 1) / (rf + 1)
    return {"map_all": float(ap.mean()), f"p_{k}": float(p_k.mean()),
            "median_first_rank": float(np.median(first_rank)), "n_queries": int(len(keep)),
            "n_skipped": int((~keep).sum())}


def _bench_protection(engines, ms, seed: int, perturbation: str, refine_steps: int | None) -> list[dict]:
    sets = engine._database()[0]
    pert = Perturbation.load(perturbation)
    images = {"clean": sets.query_images, perturbation: pert.apply(sets.query_images),
              results.REFINED: results.refined(sets.query_images, refine_steps, start=perturbation)}
    surrogates = {perturbation: pert.card.get("surrogates", []), results.REFINED: [toap.DLIB_DESCRIPTOR]}
    q_labels, db_labels = sets.query_labels.numpy(), sets.db_labels.numpy()
    relevant = db_labels[None, :] == q_labels[:, None]
    rows = []
    for name in engines:
        model = engine.model(name)
        with torch.no_grad():
            queries = {kind: model.encode(x).numpy().astype(np.int8) for kind, x in images.items()}
        real = engine.db_codes(name)
        bits = real.shape[1]
        strangers = crowd.simulate_codes(name, max(ms), seed) if max(ms) else np.zeros((0, bits), np.int8)
        for kind, q in queries.items():
            rel_hist = _histograms(q, real, bits, relevant)
            base = _histograms(q, real, bits)
            check = retrieval.evaluate(retrieval.hamming_distance(q, real), q_labels, db_labels, k=100, p_k=10)
            grown, done = base.copy(), 0
            for m in tqdm(sorted(ms), desc=f"{name} {kind}: strangers", leave=False):
                grown += _histograms(q, strangers[done:m], bits) if m > done else 0
                done = max(done, m)
                r = histogram_metrics(grown, rel_hist, 10)
                tier = toap.threat_tier(surrogates[kind], name) if kind in surrogates else None
                row = {"engine": name, "queries": kind, "tier": tier, "m": m, "db_size": len(real) + m, **r}
                if m == 0:
                    row["check_m0"] = {"map_all": check.map_all, "p_10": check.precision_k}
                rows.append(_done(row))
    return rows


@torch.no_grad()
def bench_scale(sizes=(10_000, 100_000, 1_000_000), n_queries: int = 1000, k: int = 10, seed: int = 0,
                protection_m=PROTECTION_M, engines=crowd.ENGINES, perturbation: str = "toap-mid",
                refine_steps: int | None = None, parts=PARTS, backends=BACKENDS, milvus=None,
                crawl_copies: int = 20) -> dict:
    """The measured ``parts`` (module docstring) as one dict (the ``--json`` contract):
    ``backends`` (one row per size and backend in ``backends``), ``protection`` (one row per
    engine, query kind and ``m``; ``refine_steps``: the refinement's steps, default
    ``refine.DEFAULT_STEPS``) and ``crawl`` (``bench_crawl`` on ``crawl_copies`` copies of the
    shipped photos); a part not asked for is empty. ``measured`` gives each part's UTC time.
    ``milvus``: the server of the server rows and the crawl, a ``milvus_server.LocalServer`` or a
    URI (its memory then not measured); None: a fresh local server for each row, and one for the
    crawl."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {list(parts)}")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    out = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "seed": seed,
           "crowd_model": crowd.DEFAULT_MODEL,
           "database": "2k real + m simulated: the shipped open-set database (the evaluation identities' 775 "
                       "photos + 2,000 real distractors) + the first m simulated strangers",
           "perturbation": perturbation, "backends": [], "protection": [], "crawl": {}, "measured": {}, "seconds": {}}
    if "backends" in parts:
        t = time.perf_counter()
        out["backends"], out["seconds"]["simulate_max_size"] = _bench_backends(sizes, n_queries, k, seed,
                                                                               tuple(backends), milvus)
        out["seconds"]["backends"], out["measured"]["backends"] = time.perf_counter() - t, now
    if "protection" in parts:
        t = time.perf_counter()
        out["protection"] = _bench_protection(engines, protection_m, seed, perturbation, refine_steps)
        out["seconds"]["protection"], out["measured"]["protection"] = time.perf_counter() - t, now
    if "crawl" in parts:
        t = time.perf_counter()
        out["crawl"] = bench_crawl(crawl_copies, milvus=milvus)
        out["seconds"]["crawl"], out["measured"]["crawl"] = time.perf_counter() - t, now
    return out


def scale_figure(r: dict):
    """mAP@all and the median rank of the first true match against the database size (log x),
    one panel pair per dlib engine, one line per query kind (clean, universal, refined)."""
    import matplotlib.pyplot as plt

    rows = r["protection"]
    engines = list(dict.fromkeys(p["engine"] for p in rows))
    fig, axes = plt.subplots(2, len(engines), figsize=(5.2 * len(engines), 6.4), squeeze=False)
    for j, name in enumerate(engines):
        for kind, style in zip(dict.fromkeys(p["queries"] for p in rows), ("o-", "s--", "^:", "d-.")):
            pts = sorted((p["db_size"], p["map_all"], p["median_first_rank"]) for p in rows
                         if p["engine"] == name and p["queries"] == kind)
            xs, maps, ranks = zip(*pts)
            axes[0, j].plot(xs, maps, style, label=kind)
            axes[1, j].plot(xs, ranks, style, label=kind)
        axes[0, j].set_title(f"{name}: mAP@all")
        axes[0, j].set_ylabel("mAP@all (tie-aware)")
        axes[1, j].set_title(f"{name}: where the person first appears")
        axes[1, j].set_ylabel("median rank of the first true match")
        axes[1, j].set_yscale("log")
        for ax in axes[:, j]:
            ax.set_xscale("log")
            ax.set_xlabel("database size (faces: 2,775 real + simulated strangers)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    tiers = sorted({toap.TIER_LABELS[p["tier"]] for p in rows if p.get("tier")})
    fig.suptitle(f"protection among up to {max(p['m'] for p in rows):,} simulated strangers\n"
                 f"{rows[0]['n_queries']} protocol queries, no post-processing; tier: {', '.join(tiers)}")
    fig.tight_layout()
    return fig


def write_scale(r: dict, folder: Path = results.RESULTS_DIR) -> list[Path]:
    """``scale.json`` (a part ``r`` did not measure is kept from the existing file) and, when
    protection rows exist, ``scale.png`` (``scale_figure``), atomically. Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scale.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = {**r, "measured": {**old.get("measured", {}), **r["measured"]},
              "seconds": {**old.get("seconds", {}), **r["seconds"]}}
    for part in PARTS:
        if part not in r["measured"] and part in old:
            merged[part] = old[part]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(path)
    out = [path]
    if merged["protection"]:
        fig = scale_figure(merged)
        png = folder / "scale.png"
        fig.savefig(png.with_name("scale.tmp.png"), dpi=100)
        plt.close(fig)
        png.with_name("scale.tmp.png").replace(png)
        out.append(png)
    return out


def run_scale(parts: list[str] | None = None) -> dict:
    """``python -m toap_kit.bench scale [--parts ...]``: ``bench_scale`` at the README's sizes,
    written to ``results/`` (``write_scale``) and into the README's tables (``update_readme``);
    returns what was written (both parts). The server rows run on ``TOAP_MILVUS_URI`` when set,
    else on a fresh local server per row."""
    r = bench_scale(parts=tuple(parts or PARTS), milvus=os.environ.get("TOAP_MILVUS_URI") or None)
    write_scale(r)
    merged = json.loads((results.RESULTS_DIR / "scale.json").read_text())
    update_readme(merged)
    if merged.get("crawl"):
        results.replace_block(DEPLOY, DEPLOY_BEGIN, DEPLOY_END, deploy_block(merged))
    return merged


README_BEGIN = "<!-- bench scale: begin (generated from results/scale.json by toap_kit.bench_scale.update_readme) -->"
README_END = "<!-- bench scale: end -->"
DEPLOY = results.RESULTS_DIR.parent / "docs" / "deploy.md"
DEPLOY_BEGIN = "<!-- bench crawl: begin (generated from results/scale.json by toap_kit.bench_scale.run_scale) -->"
DEPLOY_END = "<!-- bench crawl: end -->"


def markdown(r: dict) -> str:
    """The two tables of ``r`` (a ``bench_scale`` result): backends per size, and per engine and
    query kind the metrics as the database grows (the README's block between its markers)."""
    out = ["| codes | backend | build (s) | memory (MB) | p50 (ms) | p95 (ms) | batch p50 (ms) | batch p95 (ms) | "
           "top-k identical across exact backends / recall |",
           "|---|---|---|---|---|---|---|---|---|"]
    for b in r["backends"]:
        if b.get("identical_top_k") is None and "recall_at_k" in b:
            what = (f"recall@{b['k']} {b['recall_at_k']:.3f} tie-aware, {b['recall_ids_at_k']:.3f} by id "
                    f"(nprobe {b['nprobe']:,} of {b['nlist']:,} lists)")
        else:
            what = f"{'yes' if b['identical_top_k'] else 'NO'} ({b['n_queries']:,} queries, top-{b['k']})"
        memory = "-" if b["rss_mb"] is None else f"{b['rss_mb']:.0f}" + (" (server)" if "server" in b else "")
        batch = " | ".join(f"{b[key]:.2f}" if key in b else "-" for key in ("batch_p50_ms", "batch_p95_ms"))
        out.append(f"| {b['n_codes']:,} | {b['backend']} | {b['build_s']:.2f} | {memory} | {b['p50_ms']:.2f} | "
                   f"{b['p95_ms']:.2f} | {batch} | {what} |")
    servers = [b for b in r["backends"] if "server" in b]
    if servers:
        size = max(b.get("batch_size", 0) for b in r["backends"])
        out += ["", f"Batch: one search of {size} queries. Server rows: {servers[0]['server']}; build = open + add + "
                    "flush + the server's index built and the collection loaded again; memory = the server process's "
                    "growth over the build. `milvus-server-ivf`: `BIN_IVF_FLAT`, nlist the power of two nearest the "
                    "square root of the codes, nprobe = nlist / 16; recall against the exact top "
                    f"{servers[0]['k']}, tie-aware (a tied item in place of another counts) and by id."]
    rows = r["protection"]
    if rows:
        sizes = sorted({p["db_size"] for p in rows})
        top = sizes[-1]
        out += ["", f"| engine | queries | tier | mAP@all at {' / '.join(f'{n:,}' for n in sizes)} faces | "
                    f"P@10 at {top:,} | median rank of the first true match at {sizes[0]:,} / {top:,} |",
                "|---|---|---|---|---|---|"]
        for (name, kind), group in _groups(rows).items():
            by = {p["db_size"]: p for p in group}
            tier = toap.TIER_LABELS[group[0]["tier"]] if group[0].get("tier") else "-"
            maps = " / ".join(f"{by[n]['map_all']:.3f}" for n in sizes)
            out.append(f"| `{name}` | {kind} | {tier} | {maps} | "
                       f"{by[top]['p_10']:.3f} | {by[sizes[0]]['median_first_rank']:,.1f} / "
                       f"{by[top]['median_first_rank']:,.1f} |")
    if r.get("crawl"):
        out += ["", crawl_markdown(r["crawl"])]
    return "\n".join(out)


def crawl_markdown(c: dict) -> str:
    """The crawl part's table (``bench_crawl``): faces a second by number of shards, and where a
    face's time goes in one crawler."""
    ph = c["phases"]
    out = ["| crawlers at once (`--shard i/N`) | photos | faces | wall (s) | faces/s |", "|---|---|---|---|---|"]
    out += [f"| {r['shards']} | {r['photos']:,} | {r['faces']:,} | {r['wall_s']:.1f} | {r['faces_per_s']:.1f} |"
            for r in c["runs"]]
    out += ["", f"{c['photos']:,} photos ({c['copies']} copies of the 23 shipped 250 x 250 photos), engine "
                f"`{c['engine']}`, {c['cpus']} CPUs, into a Milvus server; wall time from the start of the "
                f"processes to the last exit, start-up included (a process opens the index and loads the engine in "
                f"{c['startup_s']:.1f} s, after its imports). One crawler, a "
                f"face: read {ph['read_ms_per_face']:.1f} ms, detect {ph['detect_ms_per_face']:.1f} ms, encode "
                f"{ph['encode_ms_per_face']:.1f} ms, insert {ph['insert_ms_per_face']:.1f} ms."]
    return "\n".join(out)


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for p in rows:
        out.setdefault((p["engine"], p["queries"]), []).append(p)
    return out


def readme_block(r: dict) -> str:
    """``markdown(r)`` between the README's markers."""
    return f"{README_BEGIN}\n\n{markdown(r)}\n\n{README_END}"


def deploy_block(r: dict) -> str:
    """``crawl_markdown`` of ``r``'s crawl part between docs/deploy.md's markers."""
    return f"{DEPLOY_BEGIN}\n\n{crawl_markdown(r['crawl'])}\n\n{DEPLOY_END}"


def update_readme(r: dict, path: Path = results.RESULTS_DIR.parent / "README.md") -> bool:
    """Replace the README's block (``README_BEGIN`` ... ``README_END``) with ``readme_block(r)``
    (atomically); False when the README has no such block."""
    return results.replace_block(path, README_BEGIN, README_END, readme_block(r))


def _print_scale(r: dict) -> None:
    when = r.get("measured", {})
    kinds = ", ".join(dict.fromkeys(p["queries"] for p in r["protection"]))
    print(f"face index at scale: 64-bit codes of simulated strangers (dlib_itq_64), {r['cpus']} CPUs; build = open + "
          f"add (+ flush for Milvus, + the index built and loaded for a server); measured "
          f"{when.get('backends', '-')}.\nprotection: database = "
          f"{r['database']}; the protocol's query faces ({kinds}), no post-processing; measured "
          f"{when.get('protection', '-')}\n")
    print(markdown(r))
    print("\ntime (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
