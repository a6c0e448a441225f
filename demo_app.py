"""Launch the toap-kit demo: protect a face photo and see a deep-hash face search engine's top 10
before and after (``toap_kit.demo.build_demo``).

    python demo_app.py [--host 127.0.0.1] [--port 7860]

Everything it shows comes from the shipped faces, models and perturbations (``data/``); nothing
is downloaded. It serves on the loopback address only, unless ``--host`` says otherwise; there
is never a public share link, and uploads above ``MAX_UPLOAD`` are refused. Ctrl-C or SIGTERM
stops it cleanly: the uploads and results it kept are deleted.
"""
import argparse
import logging
import os
import shutil
import signal
import tempfile

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    # Gradio's cache (uploads, and an empty temporary file its upload parser leaves for each
    # upload) goes to a folder of this server's own, set before Gradio is imported, so that all
    # of it is deleted when the server stops without touching another app's files
    own_cache = "GRADIO_TEMP_DIR" not in os.environ
    if own_cache:
        os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="toap-demo-gradio-")
    try:
        from toap_kit.demo import MAX_UPLOAD, build_demo

        # SIGTERM (a service manager's stop) stops the server like Ctrl-C, instead of killing the
        # process with the uploads and results on disk
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            demo = build_demo()
        except ValueError as e:  # a bad TOAP_DEVICE or TOAP_THREADS: one line, not a traceback
            raise SystemExit(f"demo_app.py: error: {e}") from None
        # share=False: never a public gradio.live link; uploads above MAX_UPLOAD are refused
        demo.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=MAX_UPLOAD)
        # launch returns on Ctrl-C or SIGTERM; close() also ends the open pages' streams, without
        # which the server's shutdown, where Gradio deletes its cached files, waits for them and never runs
        demo.close()
    finally:
        if own_cache:
            shutil.rmtree(os.environ.pop("GRADIO_TEMP_DIR"), ignore_errors=True)
