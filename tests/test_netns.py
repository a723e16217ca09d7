"""An executor node in a network namespace of its own, joined to the head
(in the test's namespace) by a veth pair: jobs run there with exact output,
a wrong CURVE key is refused, cutting the link ends the node's jobs `lost`
on both sides, and restoring it brings the node back by itself."""

from __future__ import annotations

import os
import random
import subprocess
import time
import uuid

import psutil
import pytest

from ccexec.client import Client
from support import (Daemon, ExecutorNode, async_test, free_port, line_printer, make_keys, node_executors,
                     remote_head_settings, wait_for)


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
    """A namespace and a veth pair: (namespace, head-side device, head address, node address)."""
    name = f"ccx{uuid.uuid4().hex[:8]}"
    head_dev, node_dev = f"{name}h", f"{name}n"
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    head_ip, node_ip = f"{subnet}.1", f"{subnet}.2"
    steps = [("netns", "add", name), ("link", "add", head_dev, "type", "veth", "peer", "name", node_dev),
             ("link", "set", node_dev, "netns", name), ("addr", "add", f"{head_ip}/30", "dev", head_dev),
             ("link", "set", head_dev, "up"), ("-n", name, "addr", "add", f"{node_ip}/30", "dev", node_dev),
             ("-n", name, "link", "set", node_dev, "up"), ("-n", name, "link", "set", "lo", "up")]
    try:
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield name, head_dev, head_ip, node_ip
    finally:
        _ip("link", "del", head_dev)  # takes its peer with it
        _ip("netns", "del", name)


def _first_output(job, timeout: float):
    async def first():
        async for event in job.events(timeout):
            if event["method"] == "process.output":
                return event["params"]["data"]
    return first()


@async_test(180)
async def test_a_node_across_a_veth_link_runs_jobs_is_authenticated_and_survives_a_cut(tmp_path, link):
    netns, head_dev, head_ip, _ = link
    keys = make_keys(tmp_path / "keys", "head", "far", "rogue")
    clients = tmp_path / "clients"
    clients.mkdir()
    (clients / "far.key").write_bytes(keys["far"][0].read_bytes())
    endpoint = f"tcp://{head_ip}:{free_port()}"
    head = Daemon(tmp_path / "head", remote_head_settings(endpoint, keys["head"], clients), executors=1)
    node = ExecutorNode(tmp_path / "node", endpoint, keys["far"], keys["head"][0], "far-node",
                        labels="site=far", netns=netns)
    rogue = ExecutorNode(tmp_path / "rogue", endpoint, keys["rogue"], keys["head"][0], "rogue-node", netns=netns)
    node_netns = f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]\n"
    printer, expected = line_printer(40_000)
    try:
        head.start()
        node.start()
        wait_for(lambda: node_executors(head, "far-node"), 30, what="the node registered across the link")
        async with Client(head.url) as client:
            # Jobs run in the node's namespace, and their output arrives exact.
            where = await (await client.execute("readlink /proc/self/ns/net", labels={"site": "far"})).wait(30)
            assert where.stdout == node_netns
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
            assert _ip("link", "set", head_dev, "down").returncode == 0
            cut_at = time.monotonic()
            lost = await running.wait(30)
            lost_after = time.monotonic() - cut_at
            assert lost.reason == "lost" and "far-node" in lost.completed["error"]
            # With the node gone, a job for it waits; one without labels runs here.
            waiting = await client.execute("readlink /proc/self/ns/net", labels={"site": "far"}, parallel=True)
            elsewhere = await client.execute("echo here", parallel=True)
            assert (await elsewhere.wait(30)).stdout == "here\n"
            # The node, cut off, ends the job itself (the head cannot reach it).
            wait_for(lambda: not psutil.pid_exists(running.pid)
                     or psutil.Process(running.pid).status() == psutil.STATUS_ZOMBIE,
                     20, what="the node ended its cut-off job")
            ended_after = time.monotonic() - cut_at
            assert (await client.job_status(waiting.job_id))["state"] == "queued"

            # Restore it: the node comes back by itself and takes the waiting job.
            assert _ip("link", "set", head_dev, "up").returncode == 0
            restored_at = time.monotonic()
            wait_for(lambda: node_executors(head, "far-node"), 30, what="the node re-registered")
            back_after = time.monotonic() - restored_at
            assert (await waiting.wait(30)).stdout == node_netns
        print(f"\nlink cut: job lost on the head after {lost_after:.1f} s, ended on the node after "
              f"{ended_after:.1f} s; link restored: node registered again after {back_after:.1f} s")
    finally:
        for daemon in (rogue, node, head):
            status = daemon.stop()
            left = daemon.leftovers()
            daemon.cleanup()
            assert status == 0 and not left, f"status {status}, left {left}:\n{daemon.log_tail()}"
