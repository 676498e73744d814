"""`strata up -f`: deploy/kubernetes/'s overlays, rendered by `kubectl kustomize`, run on this
machine with the commands, environment, volumes and probes of their manifests: each pod on
a loopback address of its own, the picker watching the pods through a local API server, the
Gateway as Envoy. Through it, the colocated overlay gives transformers' greedy tokens and the
pd overlay prefills on its prefill pod (NIXL) with a single server's tokens."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import uvicorn
from tokenizers import Tokenizer

from strata.cli import main, main_parser
from strata.kube.api_server import PodApi, write_kubeconfig
from strata.kube.local_pods import PodLayout
from strata.kube.objects import Manifests
from strata.router.k8s_source import PodSource
from tests.conftest import GOLDEN, STORIES, transformers_greedy
from tests.kustomize import KUSTOMIZE, kustomize
from tests.metrics_scrape import scrape
from tests.polling import async_wait_until, wait_until
from tests.server_process import free_port

MODELS = STORIES.parent
NETWORK = ipaddress.ip_network("127.10.0.0/24")
SELECTOR = "llm-d.ai/inferenceServing=true"  # the InferencePool's, as the picker is given it


def overlay(name: str) -> str:
    return kustomize(KUSTOMIZE / "overlays" / name)


def on_loopback(tmp_path: Path, name: str) -> str:
    """An overlay as an operator adapts it to a cluster, here to this machine: P/D peers are
    the pod network, which is loopback (a kustomization of its own, as docs/kubernetes.md
    shows)."""
    local = tmp_path / f"local-{name}"
    local.mkdir()
    (local / "kustomization.yaml").write_text(json.dumps({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUSTOMIZE / "overlays" / name, local)],
        "configMapGenerator": [{"name": "strata-pd", "namespace": "strata", "behavior": "merge",
                                "literals": ["kv-peers=127.0.0.0/8"],
                                "options": {"disableNameSuffixHash": True}}]}))
    return kustomize(local)


def layout(tmp_path: Path, text: str, **claims: Path) -> PodLayout:
    return PodLayout(Manifests.parse(text), NETWORK, tmp_path, claims or
                     {"strata-models": MODELS}, {"KUBECONFIG": "/the/kubeconfig"})


def parsed(container) -> tuple[str, object]:
    """The container's command as `strata` parses it."""
    python, flag, module, *argv = container.command
    assert (python, flag, module) == (sys.executable, "-m", "strata.cli")
    return argv[0], main_parser().parse_args(argv)


# --- The layout: addresses, commands, volumes, secrets ---------------------------------

@pytest.mark.timeout(60)
def test_pd_pods_get_an_address_each_their_volumes_and_the_same_generated_secret(tmp_path):
    lay = layout(tmp_path, overlay("pd"))
    pods = {pod.name: pod for pod in lay.pods()}
    assert sorted(pods) == ["strata-decode-0", "strata-decode-1", "strata-epp-0",
                            "strata-prefill-0"]
    assert len({pod.ip for pod in pods.values()}) == 4
    assert all(ipaddress.ip_address(pod.ip) in NETWORK for pod in pods.values())
    for name in ("strata-decode-0", "strata-prefill-0"):
        pod = pods[name]
        (container,) = pod.containers
        command, args = parsed(container)
        assert command == "serve" and container.serves_model
        assert args.host == args.kv_connector_host == pod.ip  # 0.0.0.0 and $(POD_IP)
        assert args.model_tag == str(MODELS / "stories260K")  # /models is the claim's folder
        assert args.kv_peers == ["10.0.0.0/8"]  # from the ConfigMap strata-pd
        assert pod.labels["llm-d.ai/role"] == name.split("-")[1]
        assert pod.ports == {"http": 8000, "kv-connector": 5600}
        assert container.probes["startup"].window == 600
    (epp,) = pods["strata-epp-0"].containers
    command, args = parsed(epp)
    assert command == "route" and not epp.serves_model
    assert (args.pool_selector, args.pool_namespace) == (SELECTOR, "strata")
    assert args.config.read_text() == Manifests.parse(overlay("pd")).config_map(
        "strata-epp-config")["config.yaml"]  # the ConfigMap volume, as files
    assert epp.env["KUBECONFIG"] == "/the/kubeconfig"
    assert epp.probes["readiness"].kind == "grpc" and epp.probes["readiness"].port == 9002
    # strata-kv-peer-token is the operator's to create: one random value, shared by all
    tokens = {c.env["STRATA_KV_PEER_TOKEN"] for pod in pods.values() for c in pod.containers}
    assert len(tokens) == 1 and len(tokens.pop()) >= 32
    assert list(lay.generated_secrets) == [("strata-kv-peer-token", "token")]


@pytest.mark.timeout(60)
def test_a_leaderworkerset_group_is_a_leader_and_workers_meeting_at_the_leaders_address(
        tmp_path):
    pods = {pod.name: pod for pod in layout(tmp_path, overlay("multinode")).pods()}
    leader, worker = pods["strata-0"], pods["strata-0-1"]
    assert leader.group == worker.group == "strata-0" and leader.ip != worker.ip
    for rank, pod in enumerate((leader, worker)):
        (container,) = pod.containers
        _, args = parsed(container)
        assert (args.nnodes, args.node_rank, args.master_addr) == (2, rank, leader.ip)
        assert args.headless == (rank == 1)
        assert container.env["LWS_LEADER_ADDRESS"] == leader.ip


@pytest.mark.timeout(60)
def test_what_cannot_run_here_is_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--volume strata-models=DIR"):
        layout(tmp_path, overlay("colocated"), other=tmp_path).pods()
    manifests = Manifests.parse(overlay("colocated"))
    manifests.one("Deployment", "strata")["spec"]["template"]["spec"]["initContainers"] = [
        {"name": "fetch", "image": "busybox"}]
    with pytest.raises(ValueError, match="pod strata-0: initContainers are not supported"):
        PodLayout(manifests, NETWORK, tmp_path, {"strata-models": MODELS}).pods()
    with pytest.raises(ValueError, match="inside 127.0.0.0/8"):
        PodLayout(Manifests([]), ipaddress.ip_network("10.0.0.0/24"), tmp_path, {})
    rendered = tmp_path / "colocated.yaml"
    rendered.write_text(overlay("colocated"))
    assert main(["up", "-f", str(rendered), "--replicas", "2", "--max-num-seqs=4"]) == 2
    assert "runs; --replicas, --max-num-seqs=4 cannot be given too" in capsys.readouterr().err


# --- The local API server, read by the picker's own pod source -------------------------

@pytest.mark.timeout(30)
def test_the_picker_follows_the_pods_readiness_through_the_local_api(tmp_path):
    pods = layout(tmp_path, overlay("colocated")).pods()
    replica_0, replica_1, picker = pods
    api = PodApi(pods)

    def urls(source: PodSource) -> list[str]:
        return sorted(endpoint.url for endpoint in source.endpoints())

    async def becomes(source: PodSource, expected: list[str]) -> None:
        async def check():
            return urls(source) == expected
        await async_wait_until(check, f"the endpoints {expected}", timeout=5)

    async def run() -> None:
        sock = socket.create_server(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(api.app, log_level="warning",
                                               timeout_graceful_shutdown=1))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        config = write_kubeconfig(tmp_path / "kubeconfig",
                                  f"http://127.0.0.1:{sock.getsockname()[1]}")
        source = PodSource(SELECTOR, "strata", 8000, config)
        watching = asyncio.create_task(source.run())
        try:
            for pod in (replica_0, picker):  # the picker is not in its own pool
                pod.running = pod.ready = True
                await api.changed(pod)
            await becomes(source, [f"http://{replica_0.ip}:8000"])
            assert [(e.role, e.model) for e in source.endpoints()] == [("both", "stories260K")]
            replica_1.running = replica_1.ready = True
            await api.changed(replica_1)
            await becomes(source, sorted(f"http://{p.ip}:8000" for p in (replica_0, replica_1)))
            replica_0.ready = False  # its readiness probe failed
            await api.changed(replica_0)
            await becomes(source, [f"http://{replica_1.ip}:8000"])
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await api.close()
            server.should_exit = True
            await serving

    asyncio.run(run())


# --- The overlays, running ------------------------------------------------------------

class LocalSet:
    """`strata up -f -` with the manifests on stdin, until it prints its gateway."""

    def __init__(self, tmp_path: Path, manifests: str) -> None:
        self.log = open(tmp_path / "up.log", "w+")  # noqa: SIM115 (read back on failure)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "up", "-f", "-", "--volume",
             f"strata-models={MODELS}", "--port", self.url.rsplit(":", 1)[1]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.process.stdin.write(manifests)
        self.process.stdin.close()
        self.pods: dict[str, tuple[str, int]] = {}  # name -> (address, pid)
        while not (line := self.process.stdout.readline()).startswith("  gateway: "):
            assert line, f"strata up -f ended early:\n{self._log_tail()}"
            if found := re.match(r"  pod (\S+) (\S+): \S+ \(pid (\d+)\)", line):
                self.pods[found[1]] = (found[2], int(found[3]))

    def complete(self, prompt: list[int], max_tokens: int) -> list[int]:
        response = httpx.post(f"{self.url}/v1/completions", timeout=60, json={
            "model": "stories260K", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    def metric(self, pod: str, name: str) -> float:
        """A sample of the pod's /metrics, summed over its label sets."""
        port = 9090 if pod.startswith("strata-epp") else 8000
        return scrape(f"http://{self.pods[pod][0]}:{port}").get(name, 0.0)

    def stop(self) -> None:
        """SIGTERM: each process drains and stops; the command exits 0."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(90) == 0, self._log_tail()
        for _, pid in self.pods.values():
            assert not os.path.exists(f"/proc/{pid}") or \
                Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", f"pid {pid} left"

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def _log_tail(self) -> str:
        return self.log_text()[-4000:]


@pytest.fixture
def local_set(tmp_path):
    sets = []

    def start(manifests: str) -> LocalSet:
        sets.append(LocalSet(tmp_path, manifests))
        return sets[-1]

    yield start
    for running in sets:
        if running.process.poll() is None:
            running.process.kill()


def golden() -> tuple[list[int], list[int]]:
    case = GOLDEN["stories260K"]
    prompt = case["prompt_ids"]
    return prompt, case["greedy_ids_48"][len(prompt):]


@pytest.mark.timeout(300)
def test_colocated_overlay_answers_through_gateway_and_picker_and_restarts_a_dead_pod(
        local_set):
    running = local_set(overlay("colocated"))
    assert sorted(running.pods) == ["strata-0", "strata-1", "strata-epp-0"]
    assert ("not acted on here: Role strata-epp, RoleBinding strata-epp, ServiceAccount "
            "strata-epp\n") in running.log_text()
    prompt, expected = golden()
    assert running.complete(prompt, len(expected)) == expected
    assert running.metric("strata-epp-0", "inference_pool_ready_pods") == 2
    # A model server's container dies: its pod is not ready (the picker drops it, requests
    # go on), then it starts again, and is ready again.
    os.kill(running.pods["strata-0"][1], signal.SIGKILL)
    wait_until(lambda: running.metric("strata-epp-0", "inference_pool_ready_pods") == 1,
               "the dead pod dropped", timeout=20)
    assert running.complete(prompt, 8) == expected[:8]
    wait_until(lambda: running.metric("strata-epp-0", "inference_pool_ready_pods") == 2,
               "the pod started again and ready", timeout=120)
    running.stop()


@pytest.mark.timeout(300)
def test_pd_overlay_prefills_on_the_prefill_pod_with_a_single_servers_tokens(
        local_set, tmp_path):
    running = local_set(on_loopback(tmp_path, "pd"))
    tokenizer = Tokenizer.from_file(str(MODELS / "stories260K" / "tokenizer.json"))
    text = " ".join(["Once upon a time, a little girl named Lily found a shiny red ball."] * 20)
    prompt = [1, *tokenizer.encode(text, add_special_tokens=False).ids][:320]
    assert len(prompt) > 256  # over the picker's --pd-threshold-tokens
    expected, _ = transformers_greedy(MODELS / "stories260K", prompt, 16)
    assert running.complete(prompt, 16) == expected
    assert running.metric("strata-epp-0", "strata:router_prefills_total") == 1
    assert running.metric("strata-prefill-0", "vllm:prompt_tokens_total") == len(prompt)
    transfers = [running.metric(f"strata-decode-{i}", "strata:kv_transfers_total")
                 for i in range(2)]
    assert sorted(transfers) == [0, 1]  # the decode pod read the prompt's blocks over NIXL
    running.stop()
