"""A head and an executor node, each in a network namespace of its own,
joined by a veth pair: jobs run on the node with exact output, a wrong
CURVE key is refused, cutting the link ends the node's jobs `lost` on both
sides, and restoring it brings the node back by itself. The test reaches
the head's loopback port from inside its namespace (support.connect_in_netns)."""

from __future__ import annotations

import os
import random
import subprocess
import time
import uuid

import pytest

from support import (Daemon, ExecutorNode, async_test, cluster_keys, finish, free_port, line_printer, node_executors,
                     pid_running, remote_head_settings, wait_for)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"ccxprobe{uuid.uuid4().hex[:6]}"
    try:
        added = _ip("netns", "add", probe)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if added.returncode != 0:
        return f"`ip netns add` is not permitted here: {added.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


UNAVAILABLE = _netns_unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


@pytest.fixture
def link():
    """Two namespaces joined by a veth pair: (head namespace, node namespace,
    head-side device, head address)."""
    name = f"ccx{uuid.uuid4().hex[:8]}"
    head_ns, node_ns, head_dev, node_dev = f"{name}h", f"{name}n", f"{name}h", f"{name}n"
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    head_ip, node_ip = f"{subnet}.1", f"{subnet}.2"
    steps = [("netns", "add", head_ns), ("netns", "add", node_ns),
             ("link", "add", head_dev, "type", "veth", "peer", "name", node_dev),
             ("link", "set", head_dev, "netns", head_ns), ("link", "set", node_dev, "netns", node_ns)]
    for ns, dev, ip in ((head_ns, head_dev, head_ip), (node_ns, node_dev, node_ip)):
        steps += [("-n", ns, "addr", "add", f"{ip}/30", "dev", dev), ("-n", ns, "link", "set", dev, "up"),
                  ("-n", ns, "link", "set", "lo", "up")]
    try:
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield head_ns, node_ns, head_dev, head_ip
    finally:
        _ip("netns", "del", head_ns)  # takes the veth pair with it
        _ip("netns", "del", node_ns)


def _netns_inode(netns: str) -> str:
    """What `readlink /proc/self/ns/net` prints inside netns."""
    return f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]\n"


def _first_output(job, timeout: float):
    async def first():
        async for event in job.events(timeout):
            if event["method"] == "process.output":
                return event["params"]["data"]
    return first()


@async_test(180)
async def test_a_node_across_a_veth_link_runs_jobs_is_authenticated_and_survives_a_cut(tmp_path, link):
    head_ns, node_ns, head_dev, head_ip = link
    keys, clients = cluster_keys(tmp_path)
    endpoint = f"tcp://{head_ip}:{free_port()}"
    head = Daemon(tmp_path / "head", remote_head_settings(endpoint, keys["head"], clients), executors=1,
                  netns=head_ns)
    node = ExecutorNode(tmp_path / "node", endpoint, keys["far"], keys["head"][0], "far-node",
                        labels="site=far", netns=node_ns)
    rogue = ExecutorNode(tmp_path / "rogue", endpoint, keys["rogue"], keys["head"][0], "rogue-node", netns=node_ns)
    printer, expected = line_printer(40_000)
    where = "readlink /proc/self/ns/net"
    try:
        head.start()
        node.start()
        wait_for(lambda: node_executors(head, "far-node"), 30, what="the node registered across the link")
        async with head.client() as client:
            # Jobs run in the node's namespace, and their output arrives exact.
            assert (await (await client.execute(where, labels={"site": "far"})).wait(30)).stdout == \
                _netns_inode(node_ns)
            bulk = await (await client.execute(argv=printer, labels={"site": "far"}, stream_mode="chunks")).wait(60)
            assert bulk.exit_code == 0 and bulk.stdout == expected
            assert (await (await client.attach(bulk.job_id)).wait(30)).stdout == expected

            # A node whose key the head does not list never gets in.
            refusals = head.log_path.read_text(errors="replace").count("remote.refused")
            rogue.start()
            wait_for(lambda: head.log_path.read_text(errors="replace").count("remote.refused") > refusals, 20,
                     what="the head refuses the unknown key")
            assert node_executors(head, "rogue-node") == []
            rogue.stop()

            # Cut the link while a job runs on the node.
            running = await client.execute("echo started; exec sleep 300", labels={"site": "far"})
            assert await _first_output(running, 30) == "started\n"
            assert _ip("-n", head_ns, "link", "set", head_dev, "down").returncode == 0
            cut_at = time.monotonic()
            lost = await running.wait(30)
            lost_after = time.monotonic() - cut_at
            assert lost.reason == "lost" and "far-node" in lost.completed["error"]
            # With the node gone, a job for it waits; one without labels runs on the head.
            waiting = await client.execute(where, labels={"site": "far"}, parallel=True)
            elsewhere = await client.execute(where, parallel=True)
            assert (await elsewhere.wait(30)).stdout == _netns_inode(head_ns)
            # The node, cut off, ends the job itself (the head cannot reach it).
            wait_for(lambda: not pid_running(running.pid), 20, what="the node ended its cut-off job")
            ended_after = time.monotonic() - cut_at
            assert (await client.job_status(waiting.job_id))["state"] == "queued"

            # Restore it: the node comes back by itself and takes the waiting job.
            assert _ip("-n", head_ns, "link", "set", head_dev, "up").returncode == 0
            restored_at = time.monotonic()
            wait_for(lambda: node_executors(head, "far-node"), 30, what="the node re-registered")
            back_after = time.monotonic() - restored_at
            assert (await waiting.wait(30)).stdout == _netns_inode(node_ns)
        print(f"\nlink cut: job lost on the head after {lost_after:.1f} s, ended on the node after "
              f"{ended_after:.1f} s; link restored: node registered again after {back_after:.1f} s")
    finally:
        finish(rogue, node, head)
