#!/usr/bin/env python3
"""A short load loop for scripts/e2e-prometheus.sh (not a benchmark: no figures are kept).

Spreads creations, deposits, withdrawals (some of them rejected: 409), reads and a few
client errors (401, 404, 422) over every node's public URL for DURATION seconds, so that
every dashboard panel has something to show. Prints one JSON line: the answers by status
and the requests sent to each URL, which the adapter check compares with Prometheus.

usage: load.py TOKEN_FILE DURATION URL...
"""
import collections
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request

WORKERS = 12


def main():
    token = open(sys.argv[1]).read().strip()
    duration = float(sys.argv[2])
    urls = sys.argv[3:]
    auth = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
    statuses = collections.Counter()
    per_url = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + duration
    started = time.time()

    def call(base, method, path, body=None, headers=auth):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        except OSError as e:  # refused or reset: counted, never retried
            status, payload = f"error:{type(e).__name__}", b""
        with lock:
            statuses[str(status)] += 1
            per_url[base] += 1
        return status, payload

    def worker(seed):
        rng = random.Random(seed)
        wallets = []
        while time.monotonic() < deadline:
            base = rng.choice(urls)
            roll = rng.random()
            if not wallets or roll < 0.05:
                status, payload = call(base, "POST", "/api/v1/wallets")
                if status == 201:
                    wallets.append(json.loads(payload)["walletId"])
                continue
            wallet = rng.choice(wallets)
            if roll < 0.55:
                call(base, "POST", "/api/v1/wallet",
                     {"walletId": wallet, "operationType": "DEPOSIT", "amount": f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}"})
            elif roll < 0.75:
                # Large enough to be refused now and then: 409 insufficient funds.
                call(base, "POST", "/api/v1/wallet",
                     {"walletId": wallet, "operationType": "WITHDRAW", "amount": f"{rng.randint(1, 2000)}.00"})
            elif roll < 0.95:
                call(base, "GET", f"/api/v1/wallets/{wallet}")
            elif roll < 0.97:
                call(base, "GET", f"/api/v1/wallets/{wallet}", headers={})  # 401
            elif roll < 0.99:
                call(base, "GET", "/api/v1/wallets/00000000-0000-4000-8000-000000000000")  # 404
            else:
                call(base, "POST", "/api/v1/wallet", {"walletId": wallet, "operationType": "DEPOSIT", "amount": "0"})  # 422

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"started": started, "ended": time.time(), "statuses": dict(statuses),
                      "per_url": dict(per_url)}))


if __name__ == "__main__":
    main()
