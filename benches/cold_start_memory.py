#!/usr/bin/env python3
"""Cold start to first proxied request with N keys in the store.

Prepares a store with N imported keys exactly as the load bench does
(benches/subject.sh with PREPARE_ONLY=1), starts `keygate serve`, and
measures the time from exec to the first 200 through the proxy, over a few
runs. Memory per cached key is measured in-process by
`cargo bench --bench cache_memory`.

    python3 benches/cold_start_memory.py target/release/keygate 1000000
"""
import http.server, os, secrets, statistics, string, subprocess, sys, tempfile, threading, time, urllib.request

binary, n = sys.argv[1], int(sys.argv[2])
runs = int(os.environ.get("RUNS", "5"))
work = tempfile.mkdtemp(prefix="keygate-cold-")
alpha = string.ascii_letters + string.digits
first = None
with open(f"{work}/keys.tsv", "w") as tsv:
    for i in range(n):
        tok = f"kg_{secrets.token_hex(6)}_" + "".join(secrets.choice(alpha) for _ in range(32))
        first = first or tok
        tsv.write(f"{tok}\tkey{i}\n")

class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "3"); self.end_headers(); self.wfile.write(b"ok\n")
    def log_message(self, *a): pass

upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
threading.Thread(target=upstream.serve_forever, daemon=True).start()
port = 18480
env = dict(os.environ, KEYGATE_BIN=binary, SUBJECT_PORT=str(port), UPSTREAM_PORT=str(upstream.server_address[1]),
           KEYS_TSV=f"{work}/keys.tsv", WORKDIR=work, PREPARE_ONLY="1")
t = time.time()
subprocess.run(["bash", os.path.join(os.path.dirname(__file__), "subject.sh")], env=env, check=True)
print(f"prepared {n} keys in {time.time() - t:.1f} s")

samples = []
for _ in range(runs):
    start = time.perf_counter()
    proc = subprocess.Popen([binary, "serve", "--config", f"{work}/keygate/keygate.toml"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {first}"})
            if urllib.request.urlopen(req, timeout=1).status == 200:
                break
        except Exception:
            time.sleep(0.002)
    samples.append((time.perf_counter() - start) * 1000)
    proc.terminate(); proc.wait()
print(f"cold start to first proxied request with {n} keys: median {statistics.median(samples):.1f} ms "
      f"(min {min(samples):.1f}, max {max(samples):.1f}, {runs} runs)")
