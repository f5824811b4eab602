"""Client driver: Python boxsdk 3.x, Events.generate_events_with_long_polling().

Prints one JSON line per event received ({"kind": "event", "event_id": ...}) on
stdout, and {"kind": "fatal", ...} if the SDK's generator ends with an error.
Runs in its own virtualenv (boxsdk 3.x and 10.x are one distribution name).
Exits by itself after --max-seconds.
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

    import boxsdk
    from boxsdk import Client, OAuth2
    from boxsdk.config import API

    API.BASE_API_URL = args.api.rstrip("/") + "/2.0"
    oauth = OAuth2(client_id="nudge-test-client", client_secret="nudge-test-secret", access_token=args.token)
    client = Client(oauth)
    emit(kind="started", sdk="boxsdk", version=boxsdk.__version__)
    try:
        for event in client.events().generate_events_with_long_polling():
            emit(kind="event", event_id=event["event_id"])
    except BaseException as e:  # the generator died: report it, as an application would see it
        emit(kind="fatal", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        sys.stdout.flush()
        os._exit(3)
    emit(kind="fatal", error="generator ended")
    os._exit(4)


if __name__ == "__main__":
    main()
