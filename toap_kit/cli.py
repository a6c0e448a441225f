"""The ``toap`` command: protect your photos, then check what a platform's copy gives away.

    toap protect INPUT... -o OUTDIR [-m low|mid|high]      # files and folders (recursive)
    toap protect INPUT... -o OUTDIR --refine [STEPS]       # each face refined against dlib's network
    toap verify ORIGINAL UPLOADED [--json]                  # the copy downloaded back from a platform
    toap verify ORIGINAL PROTECTED --simulate facebook      # a platform profile applied here
    toap crawl FOLDER --index outputs/faces.db [--engine NAME] [--label-from-folder] [--prune] [--shard I/N]
    toap search PHOTO --index outputs/faces.db [--k 10] [--json]

``protect`` writes protected copies under OUTDIR keeping names and formats (JPEG at quality 95,
the quality the kit measured to keep the protection), strips GPS and other EXIF (``--keep-exif``
keeps it), keeps the colour profile, and records every photo in ``OUTDIR/toap-manifest.jsonl``;
a rerun skips the photos already done (also after OUTDIR was moved), and a second run on an
OUTDIR another one is writing to is refused (``toap_kit.batch``). ``-m/--mode`` and
``-d/--directory`` mean what they mean in Fawkes. ``verify`` reports, per search engine of the
kit's zoo (with its threat tier), the Hamming distance between the two faces' codes and whether
the engine still returns the person in its top 10, in both threat settings, then one verdict line.

``crawl`` and ``search`` are the threat itself, built small: a crawler that indexes every face
of a folder of photos (``toap_kit.crawl``: each face found by the kit's detector, cut as the
kit's engines see it, encoded by a zoo engine, stored with its source file, box and, with
``--label-from-folder``, the identity named by its folder) into a face index on any backend of
``toap_kit.index`` (``--index``: ``PATH.db`` Milvus Lite, ``faiss://PATH`` a FAISS file,
``http://HOST:19530`` a Milvus server), and a search that lists the top k for every face of a
photo (``crawl.search_photo``). The index remembers its engine and code length: a crawl or search
with another engine is refused. A rerun of ``crawl`` skips every file already indexed (same
path relative to FOLDER, size, modification and change time; where only the times moved, the
sha256 decides; ``--verify-sha`` compares it for every file); a changed file is indexed again
(its old faces removed first). The index keys files by that relative path: crawl one folder tree
into one index. The summary counts the indexed files that are gone from FOLDER; ``--prune``
removes their faces. One crawl at a time: a second crawl or a search into a FAISS file or Milvus
Lite index in use is refused ("index in use by another run (pid N)"; the lock is ``PATH.lock``,
none for a server), and an index location that cannot be used is refused before any photo is
read. Names print as ``toap_kit.index.shown`` gives them (bytes that are not UTF-8 as \\xNN).

Environment: ``TOAP_DEVICE`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``; default CUDA when present)
runs the networks there; ``TOAP_THREADS`` sets torch's CPU threads (default
``config.cpu_threads``: the idle physical cores, or what ``OMP_NUM_THREADS`` says). A bad value
of either is refused by every command before any photo is read.

Exit codes: 0 done; 1 a runtime problem (one line on stderr; ``--debug`` shows the traceback)
or, for ``protect`` and ``crawl``, at least one path failed (listed in the summary, and for
``protect`` in the manifest); 2 bad arguments; 3 ``verify`` only: the two photos are not the same
photo (``verify.same_photo``: another photo, another person, a rotated or mirrored copy), so no
verdict is given ("NOT COMPARABLE: ...").
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from . import batch, config, crawl, protect, verify
from .data import sha256_file
from .index import MILVUS_MAX_LIMIT

__all__ = ["REFINE_MAX_STEPS", "main"]

REFINE_MAX_STEPS = 2000
"""The most ``--refine`` steps a face: 20x the refinement's default (``refine.DEFAULT_STEPS`` = 100);
more gains nothing worth hours of work (``--refine 1000000000`` used to run, an ETA of 415,115 h)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own usage block is dropped)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _whole(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in ``lo..hi``, else an argument error (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number in {lo}..{hi}, got {text!r}")
        return value
    return parse


def _text(text: str) -> str:
    """An argparse ``type``: a value that is not empty (``--engine ''`` is not "not given")."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


def _path(text: str) -> Path:
    """An argparse ``type``: a path that is not empty (``Path('')`` is the current folder)."""
    return Path(_text(text))


def _networks(text: str) -> tuple[str, ...]:
    """An argparse ``type``: distinct names of ``recognizers.NAMES``, comma-separated."""
    from .recognizers import NAMES

    nets = tuple(n.strip() for n in _text(text).split(","))
    if not all(n in NAMES for n in nets) or len(set(nets)) != len(nets):
        raise argparse.ArgumentTypeError(f"takes distinct names of {', '.join(NAMES)}, comma-separated; got {text!r}")
    return nets


def _shard(text: str) -> tuple[int, int]:
    """An argparse ``type``: ``I/N``, whole numbers with 0 <= I < N <= 1024."""
    i, _, n = text.partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = None
    if shard is None or not 0 <= shard[0] < shard[1] <= 1024:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N <= 1024 (e.g. 0/4), got {text!r}")
    return shard


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="toap", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser("protect", help="protect the faces in photos", description=protect_help())
    pr.add_argument("inputs", nargs="*", type=_path, metavar="INPUT", help="image files or folders (recursive)")
    pr.add_argument("-d", "--directory", action="append", type=_path, default=[], metavar="DIR",
                    help="a folder of photos (as in Fawkes; same as giving it as INPUT)")
    pr.add_argument("-o", "--output", type=_path, required=True, metavar="OUTDIR",
                    help="folder for the protected copies (created; never an input's own folder)")
    strength = pr.add_mutually_exclusive_group()
    strength.add_argument("-m", "--mode", choices=list(protect.STRENGTHS), default=None,
                          help=f"strength: low/mid/high = {', '.join(protect.STRENGTHS.values())} "
                               f"(eps 4/8/12 over 255; default {protect.DEFAULT_STRENGTH})")
    strength.add_argument("--perturbation", type=_text, metavar="NAME_OR_PATH",
                          help="any perturbation: a shipped name "
                               f"({', '.join(protect.Perturbation.shipped())}) or a file")
    pr.add_argument("--refine", nargs="?", type=_whole(1, REFINE_MAX_STEPS), const=None, default=0, metavar="STEPS",
                    help="refine every face against dlib's face network (the real engines' backbone), "
                         f"STEPS steps a face, 1..{REFINE_MAX_STEPS} (default when given without a number: "
                         "the refinement's default, a few seconds a face on a laptop); much stronger on "
                         "those engines")
    pr.add_argument("--against", type=_networks, default=None, metavar="NETS",
                    help="with --refine: the face networks to refine against, comma-separated, of "
                         "dlib, mobileface, faceres (default dlib; see results/networks.json for what each "
                         "choice leaves on a network it never used)")
    pr.add_argument("--no-detect", action="store_true",
                    help="do not detect faces: each image is one face (its central square)")
    pr.add_argument("--no-face", choices=("skip", "copy"), default="skip",
                    help="a photo without a face: leave it out (default) or write it unprotected")
    pr.add_argument("--jpeg-quality", type=_whole(1, 100), default=None, metavar="Q",
                    help=f"quality of JPEG outputs, 1..100 (default {protect.DEFAULT_JPEG_QUALITY}; lower warns)")
    pr.add_argument("--keep-exif", action="store_true",
                    help="keep the EXIF block (GPS included!); default: written without EXIF")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    pr.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    ve = sub.add_parser("verify", help="does a search engine still find the person?", description=verify_help())
    ve.add_argument("original", type=_path, metavar="ORIGINAL", help="the original, unprotected photo")
    ve.add_argument("uploaded", type=_path, metavar="UPLOADED",
                    help="the copy downloaded back from a platform, or the protected photo with --simulate")
    ve.add_argument("--simulate", type=_text, metavar="PROFILE",
                    help="apply a platform profile (facebook, weibo, wechat, ...) or a post-processing "
                         "spec (jpeg:75) to UPLOADED first")
    ve.add_argument("--engines", nargs="+", type=_text, metavar="NAME", help="only these zoo engines (default: all)")
    which = ve.add_mutually_exclusive_group()
    which.add_argument("-m", "--mode", choices=list(protect.STRENGTHS), default=None,
                       help="the strength the photo was protected with (for the threat tiers)")
    which.add_argument("--perturbation", type=_text, metavar="NAME_OR_PATH",
                       help="the perturbation the photo was protected with (default: read from the "
                            "manifest next to UPLOADED; else the tiers are 'unknown')")
    ve.add_argument("--json", action="store_true", help="print one JSON object")
    ve.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    index_help = ("the face index: PATH.db (Milvus Lite), faiss://PATH (a FAISS file) or http://HOST:19530 "
                  "(a Milvus server); options ?ivf=NLIST&nprobe=N&collection=NAME")
    cr = sub.add_parser("crawl", help="index every face of a folder of photos (a face search engine's crawler)",
                        description=crawl_help())
    cr.add_argument("folder", type=_path, metavar="FOLDER", help="a folder of photos (recursive)")
    cr.add_argument("--index", required=True, type=_text, metavar="URI", help=index_help + " (created if missing)")
    cr.add_argument("--engine", type=_text, metavar="NAME",
                    help="the zoo engine that encodes the faces (default: the index's, or dlib_itq_32 for a new one)")
    cr.add_argument("--label-from-folder", action="store_true",
                    help="record each face's identity as the name of the folder its photo is in")
    cr.add_argument("--prune", action="store_true",
                    help="remove the faces of indexed files that are gone from FOLDER (the summary counts them "
                         "either way)")
    cr.add_argument("--verify-sha", action="store_true",
                    help="compare the sha256 of every indexed file (default: only of files whose size is the "
                         "same but whose modification or change time moved)")
    cr.add_argument("--shard", type=_shard, metavar="I/N",
                    help="be crawler I of N writing to one Milvus server at once: only the files whose path "
                         "hashes to I, row ids from the shard's own block (the index must exist: make it with "
                         "one crawl without --shard)")
    cr.add_argument("--no-progress", action="store_true", help="no progress bar")
    cr.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    cr.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    cr.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    se = sub.add_parser("search", help="search a face index with the faces of a photo",
                        description="List the top k of every face of PHOTO in a face index made by `toap crawl`, "
                                    "with each result's source file and Hamming distance; the faces are encoded "
                                    "by the engine the index was built with.")
    se.add_argument("photo", type=_path, metavar="PHOTO", help="a photo (every face found is searched)")
    se.add_argument("--index", required=True, type=_text, metavar="URI", help=index_help)
    se.add_argument("--k", type=_whole(1, MILVUS_MAX_LIMIT), default=10,
                    help=f"results per face, 1..{MILVUS_MAX_LIMIT} (Milvus' most a query; default 10)")
    se.add_argument("--engine", type=_text, metavar="NAME", help="refuse unless the index was built with this engine")
    se.add_argument("--json", action="store_true", help="print one JSON object")
    se.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def crawl_help() -> str:
    return ("Walk FOLDER, find every face in every photo with the kit's detector, encode each with a zoo "
            "engine and insert it into a face index with its source file (relative to FOLDER), box and, with "
            "--label-from-folder, identity. A rerun skips the files already indexed (same relative path, size, "
            "modification and change time; where only the times moved, the sha256 decides) and indexes changed "
            "ones again; the index remembers its engine. Indexed files gone from FOLDER are counted (--prune "
            "removes their faces). One crawl at a time per index (PATH.lock next to a file index); on a Milvus "
            "server, N crawlers at once with --shard 0/N ... N-1/N.")


def protect_help() -> str:
    return ("Protect every face in photos with a shipped universal perturbation, at full resolution. "
            "Outputs keep names and formats; GPS and other EXIF are removed unless --keep-exif; "
            f"JPEG is written at quality {protect.DEFAULT_JPEG_QUALITY}. A manifest "
            f"({batch.MANIFEST}) lists every photo; a rerun resumes, also in a moved output folder; "
            "a second run on the same output folder is refused while one is writing.")


def verify_help() -> str:
    return ("Compare the original photo with the copy a platform serves (or --simulate one): per engine, "
            "the Hamming distance between the two faces' codes and whether the engine still returns the "
            "person in its top 10, with the original's face in the database (query setting) or the "
            "copy's (database setting). No verdict (exit 3) unless the two are the same photo, as a "
            "platform serves it (re-encoded, resized, centrally cropped).")


def _setup_logging(debug: bool, quiet: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING,
                        format="toap: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    logging.captureWarnings(True)


def _refine_steps(refine: int | None) -> int:
    """``--refine``'s steps a face: 0 not given, None given without a number (the refinement's
    default; None cannot be typed, so no typed number means the default)."""
    if refine is None:
        from .refine import DEFAULT_STEPS  # the refinement loads dlib's network: only when asked for

        return DEFAULT_STEPS
    return refine


def _cmd_protect(args: argparse.Namespace) -> int:
    inputs = list(args.inputs) + list(args.directory)
    p = protect.load_perturbation(args.perturbation, args.mode)
    steps = _refine_steps(args.refine)
    against = tuple(n.strip() for n in (args.against or "dlib").split(","))
    rows = batch.protect_files(inputs, args.output, p, detect=not args.no_detect, no_face=args.no_face,
                               jpeg_quality=args.jpeg_quality, keep_exif=args.keep_exif,
                               progress=not (args.no_progress or args.quiet), refine_steps=steps, against=against)
    failed = sum(r["status"] == "error" for r in rows)
    if not args.quiet:
        info = batch._perturbation_info(p)
        how = f", each face refined for {steps} steps against {' + '.join(against)}" if steps else ""
        print(f"perturbation {info['perturbation']} (eps {info['eps_255']:g}/255, sha256 "
              f"{info['perturbation_sha256'][:12]}){how}; manifest {Path(args.output) / batch.MANIFEST}")
        print(batch.summarize(rows, args.output))
    return 1 if failed else 0


def _protection_for(path: Path) -> tuple[str | None, list[str]]:
    """The perturbation named in a ``toap protect`` manifest for the file ``path`` and the
    networks its faces were refined against (``[]``: not refined), or ``(None, [])``: the
    finished row whose output sha256 is the file's, in the manifests of its folder and up to three
    folders above (by content, so a moved output folder or a renamed copy is found too; an
    unreadable or damaged manifest is passed over)."""
    try:
        sha = sha256_file(path)
    except OSError:
        return None, []
    folder = path.resolve().parent
    for d in [folder, *list(folder.parents)[:3]]:
        try:
            rows = batch.read_manifest(d / batch.MANIFEST)
        except protect.ProtectError:
            continue
        for row in rows:
            if row.get("output_sha256") == sha and isinstance(row.get("perturbation"), str):
                settings = row.get("settings") if isinstance(row.get("settings"), dict) else {}
                refined = settings.get("refine_steps") and settings.get("against", ["dlib"])
                return row["perturbation"], [n for n in refined or [] if isinstance(n, str)]
    return None, []


def _open(path: Path):
    try:
        return protect.open_photo(path)[0]
    except protect.ProtectError as e:
        raise protect.ProtectError(f"{path}: {e}") from None


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import postprocess

    original, uploaded = (_open(args.original), _open(args.uploaded))
    if args.simulate:
        try:
            uploaded = postprocess.apply(protect._upright(uploaded, []).convert("RGB"), args.simulate)
        except ValueError as e:
            raise protect.ProtectError(f"--simulate {args.simulate}: {e}") from None
    name, against = args.perturbation or (protect.STRENGTHS[args.mode] if args.mode else None), []
    if name is None:
        name, against = _protection_for(args.uploaded)
    rows = verify.verify(original, uploaded, engines=args.engines, perturbation=name, refined_against=against)
    verdict = verify.verdict(rows)
    first = rows[0] if rows else {}
    check = {"same_photo": first.get("same_photo"), "similarity": first.get("photo_similarity"),
             "threshold": verify.SAME_PHOTO_MIN, "crop": first.get("photo_crop"), "turned": first.get("photo_turned")}
    code = 3 if check["same_photo"] is False else 0
    if args.json:
        print(json.dumps({"original": str(args.original), "uploaded": str(args.uploaded), "simulate": args.simulate,
                          "perturbation": name, "refined_against": against, "photo_check": check, "rows": rows, "verdict": verdict}, indent=1))
        return code

    def face(key: str) -> str:
        return "face found" if first.get(key) else "NO face found: its central square was used"

    print(f"original: {args.original} ({face('face_found_original')})")
    print(f"uploaded: {args.uploaded}{f' after --simulate {args.simulate}' if args.simulate else ''} "
          f"({face('face_found_uploaded')})")
    refined = f", each face refined against {' + '.join(against)}" if against else ""
    print(f"perturbation: {name or 'unknown (pass -m or --perturbation for the threat tiers)'}{refined}")
    if rows:
        print(f"photo check: {'the same photo' if check['same_photo'] else 'NOT the same photo'} (similarity "
              f"{check['similarity']:.4f}, {'>=' if check['same_photo'] else '<'} {verify.SAME_PHOTO_MIN})")
    print("found = still in the engine's top 10 (ties in random order, more likely than not); query: the copy "
          "searches, the original is in the database; database: the reverse")
    head = f"{'engine':22} {'tier':22} {'hamming':>9} {'query':>14} {'database':>14}"
    print(head)
    print("-" * len(head))
    for r in rows:
        q = f"{'FOUND' if r['found_top10_query'] else 'no'} ({r['p_top10_query']:.2f})"
        d = f"{'FOUND' if r['found_top10_database'] else 'no'} ({r['p_top10_database']:.2f})"
        print(f"{r['engine']:22} {r['tier']:22} {r['hamming']:>4}/{r['bits']:<4} {q:>14} {d:>14}")
    print(verdict)
    return code


def _cmd_crawl(args: argparse.Namespace) -> int:
    s = crawl.crawl_folder(args.folder, args.index, args.engine, label_from_folder=args.label_from_folder,
                           progress=not (args.no_progress or args.quiet or args.json), prune=args.prune,
                           verify_sha=args.verify_sha, shard=args.shard)
    if args.json:
        print(json.dumps(s, indent=1))
    elif not args.quiet:
        print(crawl.crawl_summary(s))
    return 1 if s["failed"] else 0


def _cmd_search(args: argparse.Namespace) -> int:
    r = crawl.search_photo(args.photo, args.index, args.k, args.engine)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{r['photo']}: {len(r['faces'])} face{'s' * (len(r['faces']) != 1)}; index {r['index']} "
          f"({r['rows']} faces, engine {r['engine']}, {r['bits']} bits); ties listed in the order indexed")
    for n, f in enumerate(r["faces"], 1):
        x0, y0, side = f["box"]
        what = f"face {n} at x {x0}, y {y0}, side {side}" if f["face_found"] else "no face found: the central square"
        print(what)
        for h in f["results"]:
            print(f"  {h['rank']:>3}. hamming {h['hamming']:>3}/{r['bits']:<3} {h['identity'] or '-':24} {h['source']}"
                  + (f" (face at {h['box'][0]}, {h['box'][1]}, side {h['box'][2]})" if h.get("box") else ""))
    return 0


def _check_environment() -> None:
    """``TOAP_DEVICE`` and ``TOAP_THREADS``, read once before any photo: a bad value is refused
    by every command (``config.device``: not a device, no CUDA, ``cuda:N`` past the devices torch
    sees); torch gets the threads ``config.cpu_threads`` chooses (the idle physical cores)."""
    try:
        config.device()
        torch.set_num_threads(config.cpu_threads())
    except ValueError as e:
        raise protect.ProtectError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """Run ``toap``; returns the exit code (the console script exits with it)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "protect" and not (args.inputs or args.directory):
        parser.error("protect: no input: give photos or folders (INPUT... or -d DIR)")
    if args.command == "protect" and args.against is not None and args.refine == 0:
        _Parser(prog="toap protect").error("argument --against: chooses the networks of --refine: give --refine too")
    _setup_logging(args.debug, getattr(args, "quiet", False))
    threads = torch.get_num_threads()
    try:
        _check_environment()
        return {"protect": _cmd_protect, "verify": _cmd_verify, "crawl": _cmd_crawl,
                "search": _cmd_search}[args.command](args)
    except KeyboardInterrupt:
        print("toap: interrupted (a rerun resumes where this one stopped)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for people, the traceback with --debug
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (protect.ProtectError, OSError)):
            msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
        print(f"toap: error: {msg}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)  # main() called from Python leaves torch as it found it


if __name__ == "__main__":
    sys.exit(main())
