#!/usr/bin/env python3
"""Deposits of 1.00 into one wallet from WORKERS threads until the node stops answering,
for the SIGTERM check of scripts/e2e.sh. Prints one JSON line: the answers by status
(connection errors as "refused"/"error"). Once every worker has met a refused connection
it stops; the e2e then compares the wallet's balance in PostgreSQL with the 200s counted
here: an operation the node acknowledged must be committed, and none it did not.

usage: inflight.py TOKEN_FILE URL WALLET_ID READY_FILE
"""
import collections
import json
import sys
import threading
import time
import urllib.error
import urllib.request

WORKERS = 8
# A bound on the whole run, whatever the node does.
LIMIT_SECONDS = 60


def main():
    token = open(sys.argv[1]).read().strip()
    url, wallet, ready = sys.argv[2], sys.argv[3], sys.argv[4]
    body = json.dumps({"walletId": wallet, "operationType": "DEPOSIT", "amount": "1.00"}).encode()
    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
    statuses = collections.Counter()
    lock = threading.Lock()
    started = threading.Barrier(WORKERS + 1)

    deadline = time.monotonic() + LIMIT_SECONDS

    def worker():
        started.wait()
        while time.monotonic() < deadline:
            req = urllib.request.Request(f"{url}/api/v1/wallet", data=body, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    status = str(resp.status)
            except urllib.error.HTTPError as e:
                status = str(e.code)
            except urllib.error.URLError as e:
                # Refused: the listener is closed. Anything else (a reset, a close without an
                # answer) is ambiguous, and counted as such.
                status = "refused" if isinstance(e.reason, ConnectionRefusedError) else f"error:{e.reason}"
            except OSError as e:
                status = f"error:{type(e).__name__}"
            with lock:
                statuses[status] += 1
            if status == "refused":
                return
            if status.startswith("error"):
                time.sleep(0.05)  # no busy loop on a broken connection
        with lock:
            statuses["gave up at the time limit"] += 1

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    started.wait()
    open(ready, "w").close()
    for t in threads:
        t.join()
    print(json.dumps(dict(statuses)))


if __name__ == "__main__":
    main()
