"""Client driver: Python boxsdk 10.x (package box_sdk_gen), client.events.get_event_stream().

Prints one JSON line per event received ({"kind": "event", "event_id": ...}) on
stdout. Exits by itself after --max-seconds.
"""

import argparse
import json
import os
import sys
import threading
import time
import traceback


def emit(**obj):
    obj["t"] = time.time()
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--api", required=True, help="main API root, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", required=True)
    p.add_argument("--max-seconds", type=float, default=300)
    args = p.parse_args()
    threading.Timer(args.max_seconds, lambda: os._exit(0)).start()

    from box_sdk_gen import BaseUrls, BoxClient, BoxDeveloperTokenAuth
    from box_sdk_gen.networking.version import __version__ as version

    client = BoxClient(auth=BoxDeveloperTokenAuth(token=args.token)).with_custom_base_urls(
        BaseUrls(base_url=args.api.rstrip("/"))
    )
    emit(kind="started", sdk="box_sdk_gen", version=version)
    try:
        for event in client.events.get_event_stream():
            emit(kind="event", event_id=event.event_id)
    except BaseException as e:
        emit(kind="fatal", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        os._exit(3)
    emit(kind="fatal", error="event stream ended")
    os._exit(4)


if __name__ == "__main__":
    main()
