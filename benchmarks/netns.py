"""Two "nodes" on one machine: network namespaces joined by a veth pair (needs root).

    with TwoNodeLink(rate="100mbit") as link:          # rate=None: no shaping
        result = link.run_torchrun("benchmarks.netbench_worker", args, timeout=600)

Each namespace holds one end of a veth pair (10.213.<n>.1 and .2, /24) and its own
loopback; nothing is routed out of them, so the run's traffic stays between the two.
``rate`` shapes the egress of *both* ends with ``tc qdisc ... tbf`` (a token bucket:
``burst`` bytes may go at line rate, then ``rate``), so each direction of the link has
that bandwidth. Namespaces are deleted on exit, on error and on SIGINT/SIGTERM.

``run_torchrun`` starts ``torchrun --nnodes 2 --nproc-per-node 1`` once in each
namespace (node 0 hosts the rendezvous), with ``GLOO_SOCKET_IFNAME`` set to the veth end,
and reads the interface counters (bytes sent per node) before and after the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent  # torchrun runs modules of the repository from here
_SUBNET_COUNTER = [0]


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def check_privileges() -> None:
    """Raise a clear error when namespaces cannot be created here."""
    if os.geteuid() != 0:
        raise PermissionError("network namespaces need root (ip netns add). HINT: run this benchmark as root, "
                              "e.g. in a container or VM you own.")
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise FileNotFoundError(f"`{tool}` not found. HINT: install iproute2 (apt-get install iproute2).")


class TwoNodeLink:
    """Two namespaces joined by a veth pair, optionally rate-limited (see the module docstring)."""

    def __init__(self, rate: str | None = None, burst: str = "256kb", latency: str = "200ms",
                 tag: str | None = None) -> None:
        self.rate, self.burst, self.latency = rate, burst, latency
        tag = tag or f"{os.getpid() % 100000}{_SUBNET_COUNTER[0]}"
        _SUBNET_COUNTER[0] += 1
        self.ns = (f"hgA{tag}", f"hgB{tag}")
        self.dev = (f"hgA{tag}v"[:15], f"hgB{tag}v"[:15])
        octet = 100 + (os.getpid() + _SUBNET_COUNTER[0]) % 150
        self.addr = (f"10.213.{octet}.1", f"10.213.{octet}.2")
        self._up = False
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "TwoNodeLink":
        check_privileges()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
            self._up = True
            _ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for ns, dev, addr in zip(self.ns, self.dev, self.addr):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                if self.rate:
                    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                                    "burst", self.burst, "latency", self.latency], check=True, capture_output=True)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._up:
            for ns in self.ns:  # deleting a namespace deletes its veth end (and so the pair)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            self._up = False
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.close()
        raise KeyboardInterrupt(f"signal {signum}")

    # ------------------------------------------------------------------ measurement
    def tx_bytes(self) -> tuple[int, int]:
        """Bytes sent so far by each node's veth end (kernel counters)."""
        out = []
        for ns, dev in zip(self.ns, self.dev):
            stats = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", dev))[0]["stats64"]
            out.append(int(stats["tx"]["bytes"]))
        return out[0], out[1]

    def run_torchrun(self, module: str, script_args: list[str], timeout: float, port: int = 29517,
                     env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run the Python ``module`` (from the repository root) as a 2-node torchrun job, one
        process per namespace."""
        before = self.tx_bytes()
        procs = []
        t0 = time.perf_counter()
        for node, (ns, dev) in enumerate(zip(self.ns, self.dev)):
            node_env = {**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": dev, "OMP_NUM_THREADS": "1",
                        "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                   "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", self.addr[0],
                   "--master-port", str(port), "--module", module, *script_args, "--iface", dev]
            procs.append(subprocess.Popen(cmd, cwd=_REPO_ROOT, env=node_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
        outputs, codes = [], []
        deadline = t0 + timeout

        def kill_all() -> None:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        try:
            for proc in procs:
                try:
                    out, _ = proc.communicate(timeout=max(deadline - time.perf_counter(), 1.0))
                    codes.append(proc.returncode)
                except subprocess.TimeoutExpired:
                    kill_all()
                    out, _ = proc.communicate()
                    codes.append("timeout")
                outputs.append(out)
        except BaseException:  # Ctrl-C / SIGTERM: no rank may outlive the namespaces
            kill_all()
            raise
        after = self.tx_bytes()
        return {"returncodes": codes, "wall_s": time.perf_counter() - t0,
                "job_tx_bytes": [a - b for a, b in zip(after, before)], "output_tails": [o[-4000:] for o in outputs]}
