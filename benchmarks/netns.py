"""N "nodes" on one machine: network namespaces on a private bridge (needs root).

    with Cluster(num_nodes=4, rate="100mbit") as cluster:   # rate=None: no shaping
        result = cluster.run_torchrun("benchmarks.netbench_worker", args, timeout=600)

Topology: a hub namespace holds a Linux bridge; every node namespace holds one end of a
veth pair (10.213.<o>.<i + 1>/24) whose other end is a port of the bridge. Nothing is
routed out, so a run's traffic stays between the nodes. ``rate`` shapes, with
``tc ... tbf`` (a token bucket: ``burst`` bytes, by default 10 ms of the rate, may go at
line rate, then ``rate``), both
the node's egress and the hub's egress towards the node, so each node's link has that
bandwidth in each direction. ``TwoNodeLink`` is the two-node case. Namespaces are deleted
on exit, on error and on SIGINT/SIGTERM.

``run_torchrun`` starts ``torchrun --nnodes N --nproc-per-node 1`` once in each node
namespace (node 0 hosts the rendezvous), with ``GLOO_SOCKET_IFNAME`` set to the node's
veth end, and reads the interface counters (bytes each node sent) before and after the job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import start_process, wait_all

_COUNTER = [0]


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _tbf(ns: str, dev: str, rate: str, burst: str, latency: str) -> None:
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                    "latency", latency], check=True, capture_output=True)


def tbf_burst(rate: str | None) -> str:
    """tbf bucket: 10 ms worth of ``rate`` ("100mbit", "1gbit", ...), at least 32 KiB."""
    if not rate:
        return "256kb"
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, scale in units.items():
        if rate.endswith(unit):
            try:
                bits = float(rate[: -len(unit)]) * scale
            except ValueError:
                break
            return f"{max(int(bits / 8 * 0.01), 32 * 1024)}b"
    raise ValueError(f"rate={rate!r}: expected a number with kbit, mbit or gbit. HINT: e.g. 100mbit or 1gbit.")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be created here (with a HINT), or None when they can."""
    if os.geteuid() != 0:
        return ("network namespaces need root (ip netns add). HINT: run this benchmark as root, e.g. in a "
                "container or VM you own.")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found. HINT: install iproute2 (apt-get install iproute2)."
    return None


def check_privileges() -> None:
    """Raise a clear error when namespaces cannot be created here."""
    reason = unavailable_reason()
    if reason is not None:
        raise PermissionError(reason)


class Cluster:
    """``num_nodes`` namespaces on a private bridge, optionally rate-limited (see the module docstring)."""

    def __init__(self, num_nodes: int = 2, rate: str | None = None, burst: str | None = None,
                 latency: str = "200ms", tag: str | None = None) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or not 2 <= num_nodes <= 200:
            raise ValueError(f"num_nodes={num_nodes!r} must be an integer in [2, 200]. HINT: one node per rank.")
        self.num_nodes, self.rate, self.latency = num_nodes, rate, latency
        self.burst = burst or tbf_burst(rate)  # default: 10 ms of the rate
        tag = tag or f"{os.getpid() % 10000}{_COUNTER[0]}"
        _COUNTER[0] += 1
        self.hub = f"hgH{tag}"
        self.ns = [f"hg{tag}n{i}" for i in range(num_nodes)]
        self.dev = [f"hg{tag}v{i}"[:15] for i in range(num_nodes)]  # node end (inside node i)
        self.port_dev = [f"hg{tag}p{i}"[:15] for i in range(num_nodes)]  # hub end (bridge port)
        octet = 100 + (os.getpid() + _COUNTER[0]) % 150
        self.addr = [f"10.213.{octet}.{i + 1}" for i in range(num_nodes)]
        self._made: list[str] = []
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Cluster":
        check_privileges()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._add_namespace(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for node in range(self.num_nodes):
                self._add_node(node)
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)

    def _add_node(self, node: int) -> None:
        ns, dev, port = self.ns[node], self.dev[node], self.port_dev[node]
        self._add_namespace(ns)
        _ip("link", "add", dev, "type", "veth", "peer", "name", port)
        _ip("link", "set", dev, "netns", ns)
        _ip("link", "set", port, "netns", self.hub)
        _ip("-n", self.hub, "link", "set", port, "master", "br0")
        _ip("-n", self.hub, "link", "set", port, "up")
        _ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        for space in (ns, self.hub):  # no IPv6 autoconfiguration chatter in the byte counts
            subprocess.run(["ip", "netns", "exec", space, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                           capture_output=True)
        if self.rate:
            _tbf(ns, dev, self.rate, self.burst, self.latency)  # node -> hub
            _tbf(self.hub, port, self.rate, self.burst, self.latency)  # hub -> node

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for ns in reversed(self._made):  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.close()
        raise KeyboardInterrupt(f"signal {signum}")

    # ------------------------------------------------------------------ measurement
    def tx_bytes(self) -> list[int]:
        """Bytes sent so far by each node's veth end (kernel counters)."""
        out = []
        for ns, dev in zip(self.ns, self.dev):
            stats = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", dev))[0]["stats64"]
            out.append(int(stats["tx"]["bytes"]))
        return out

    def _node_command(self, node: int, module: str, script_args: list[str], port: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[node], sys.executable, "-m", "torch.distributed.run",
                "--nnodes", str(self.num_nodes), "--nproc-per-node", "1", "--node-rank", str(node),
                "--master-addr", self.addr[0], "--master-port", str(port), "--module", module, *script_args,
                "--iface", self.dev[node]]

    def run_torchrun(self, module: str, script_args: list[str], timeout: float, port: int = 29517,
                     env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run the Python ``module`` (from the repository root) as an N-node torchrun job, one
        process per namespace.

        Returns the return codes (``"timeout"`` for a node killed at the deadline), the
        wall time, the bytes each node sent during the job and the tail of each node's output.
        """
        before = self.tx_bytes()
        procs = []
        t0 = time.perf_counter()
        for node in range(self.num_nodes):
            node_env = {**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": self.dev[node], "OMP_NUM_THREADS": "1",
                        "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            procs.append(start_process(self._node_command(node, module, script_args, port), env=node_env))
        outputs, codes = wait_all(procs, t0 + timeout)
        after = self.tx_bytes()
        return {"returncodes": codes, "wall_s": time.perf_counter() - t0,
                "job_tx_bytes": [a - b for a, b in zip(after, before)], "output_tails": [o[-4000:] for o in outputs]}


class TwoNodeLink(Cluster):
    """The two-node case of ``Cluster`` (kept for the two-node benchmarks)."""

    def __init__(self, rate: str | None = None, burst: str | None = None, latency: str = "200ms",
                 tag: str | None = None) -> None:
        super().__init__(2, rate=rate, burst=burst, latency=latency, tag=tag)
