#!/usr/bin/env python3
"""A client of one worker for benches/nemesis.sh, run inside that worker's network namespace.

    nemesis_client.py NAME API_URL KEY OUT_DIR SECONDS

Until SECONDS have passed it alternates:
- a write of a property no other write uses (`NAME-t<k % 20>` / `p<k>` = k) through its worker, each logged as
  `write <thing> <property> <value> <status> <sent> <answered>` to OUT_DIR/NAME.log;
- an attempt on the lock `nemesis` (holder NAME, ttl 1 s, no wait): on a grant it holds the lock 100 ms, then
  releases it, logged as `lock <token> <sent> <granted> <release_sent> <ttl_ms> <release status>`.
Times are `time.time()` (one clock: every namespace shares the host's). Nothing is retried: what the worker
answered is what is logged.
"""

import json
import sys
import time
import urllib.error
import urllib.request

name, api, key, out_dir, seconds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
TTL_MS = 1000


def call(method, path, body=None, timeout=5):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api + path, data=data, method=method,
                                     headers={"x-api-key": key, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            raw = answer.read()
            return answer.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, None
    except Exception:
        return 0, None


log = open(f"{out_dir}/{name}.log", "a", buffering=1)
end = time.time() + seconds
k = 0
created = set()
while time.time() < end:
    thing = f"{name}-t{k % 20}"
    if thing not in created:
        status, _ = call("PUT", f"/v1/things/{thing}")
        if status in (200, 201):
            created.add(thing)
    sent = time.time()
    status, _ = call("PUT", f"/v1/things/{thing}/properties/p{k}?wait_ms=0", {"value": k})
    log.write(f"write {thing} p{k} {k} {status} {sent:.6f} {time.time():.6f}\n")
    k += 1
    if k % 5 == 0:
        sent = time.time()
        status, lease = call("POST", "/v1/locks/nemesis", {"holder": name, "ttl_ms": TTL_MS, "wait_ms": 0})
        if status == 200 and lease:
            granted = time.time()
            time.sleep(0.1)
            release_sent = time.time()
            rstatus, _ = call("DELETE", f"/v1/locks/nemesis?token={lease['token']}")
            log.write(f"lock {lease['token']} {sent:.6f} {granted:.6f} {release_sent:.6f} {TTL_MS} {rstatus}\n")
    time.sleep(0.02)
