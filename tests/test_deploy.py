"""The deployment files against the schemas and against the service they deploy.

Kubernetes: every variant under deploy/kubernetes is rendered with kustomize (`kubectl kustomize`) and
validated with kubernetes-validate --strict against the oldest and newest Kubernetes versions we support
(1.30: the first with preStop.sleep on by default; 1.37: the newest schemas bundled). Schemas cannot say
whether a probe path is a real route, whether an env name is a real setting or whether the autoscaling target
is the service's traffic.concurrency: those checks read the real service (BentoML's own app factory, in a
subprocess so its global configuration stays out of this test process) and siglip.settings. KEDA's
ScaledObject has no bundled schema; its fields are checked here.

BentoCloud: deploy/bentocloud.yaml is structured with the attrs classes `bentoml deploy -f` uses, every key is
checked against their fields (they silently drop unknown ones) and the service names against service.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import typing
from functools import cache
from pathlib import Path

import attr
import httpx
import pytest
import yaml
from conftest import child_env

from siglip.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
BENTOCLOUD = ROOT / "deploy" / "bentocloud.yaml"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
README = K8S / "README.md"

VARIANTS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays/cpu",
    "keda": K8S / "overlays/keda",
    "offline": K8S / "overlays/offline",
    "baked": K8S / "overlays/baked",
}
GPU_VARIANTS = ("base", "keda", "offline", "baked")
K8S_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {"ScaledObject"}  # no bundled schema: checked field by field below
# Names the deployment may set besides SIGLIP_* settings, each read by a library the service runs on.
OTHER_ENV = {"HF_HOME", "HF_HUB_OFFLINE", "BENTOML_DO_NOT_TRACK"}
EXTERNAL_PVCS = {"siglip2-weights"}  # created and filled by the operator (README "Model weights")
AUTOSCALE_METRIC = "siglip_requests_in_flight"  # the gateway's own gauge (siglip/observe.py)
SETTING_NAMES = {f"SIGLIP_{f.name.upper()}" for f in dataclasses.fields(Settings)}


# ------------------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------------------
def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (its built-in kustomize renders deploy/kubernetes) is not installed")
        pytest.skip("kubectl is not installed: it renders the kustomizations")
    out = subprocess.run(
        [kubectl, "kustomize", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@cache
def _rendered(variant: str) -> str:
    return json.dumps(kustomize(VARIANTS[variant]))


def rendered(variant: str) -> list[dict]:
    return json.loads(_rendered(variant))  # a fresh copy: tests may not share mutations


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict]) -> dict:
    containers = pod_spec(docs)["containers"]
    assert len(containers) == 1, "one container: `bentoml serve` runs both services in it"
    return containers[0]


def configmap_env(docs: list[dict]) -> dict[str, str]:
    """What the container gets from its ConfigMaps (envFrom), then its own literal env on top."""
    by_name = {cm["metadata"]["name"]: cm.get("data", {}) for cm in kinds(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container(docs).get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in by_name, f"envFrom names ConfigMap {name!r}, which the kustomization does not render"
        env.update(by_name[name])
    for item in container(docs).get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def quantity_int(value: typing.Any, what: str) -> int:
    text = str(value)
    assert re.fullmatch(r"[1-9][0-9]*", text), f"{what} must be a whole number, not {value!r}"
    return int(text)


# ------------------------------------------------------------------------------------------------------------
# the real service, read without serving it
# ------------------------------------------------------------------------------------------------------------
PROBE = textwrap.dedent("""
    import json, sys
    import service
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.configuration.containers import BentoMLContainer

    entry = service.SiglipGateway
    entry.inject_config()  # what `bentoml serve` does first: loads the per-service configuration
    routes = [r.path for r in ServiceAppFactory(entry, is_main=True).routes]
    json.dump({"entry": entry.name, "routes": routes, "port": BentoMLContainer.http.port.get(),
               "services": {name: svc.config for name, svc in entry.all_services().items()},
               "torch_imported": "torch" in sys.modules}, sys.stdout)
""")


@cache
def _service_facts(env_items: frozenset) -> str:
    env = {k: v for k, v in child_env().items() if not k.startswith("SIGLIP_")}
    env.update(dict(env_items), BENTOML_DO_NOT_TRACK="True")
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"importing service.py with the deployment's settings failed:\n{out.stderr}"
    return out.stdout


def service_facts(env: dict[str, str]) -> dict:
    """Routes, HTTP port and per-service config of the real service under the given environment."""
    return json.loads(_service_facts(frozenset((k, v) for k, v in env.items() if k.startswith("SIGLIP_"))))


def target_concurrency(facts: dict, env: dict[str, str]) -> int:
    """The autoscaling target: the services' traffic.concurrency, which SIGLIP_TARGET_CONCURRENCY sets."""
    expected = Settings.from_env(env).target_concurrency
    for name, config in facts["services"].items():
        assert config.get("traffic", {}).get("concurrency") == expected, (
            f"{name}'s traffic.concurrency is {config.get('traffic', {}).get('concurrency')!r}, "
            f"not SIGLIP_TARGET_CONCURRENCY={expected}"
        )
    return expected


# ------------------------------------------------------------------------------------------------------------
# schemas
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_strictly(variant, version):
    import kubernetes_validate

    docs = rendered(variant)
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= {
        d["kind"] for d in docs
    }
    for doc in docs:
        name = f"{variant}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["kind"] in CRD_KINDS, f"{name}: no Kubernetes {version} schema for it"
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} is not valid Kubernetes {version}: {exc}")


def test_components_compose(tmp_path):
    """The KEDA component also applies on top of the CPU overlay (what README tells CPU users to do)."""
    rel = Path(os.path.relpath(K8S, tmp_path))  # kustomize refuses absolute paths
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "siglip",
                "resources": [str(rel / "overlays/cpu")],
                "components": [str(rel / "components/keda")],
            }
        )
    )
    docs = kustomize(tmp_path)
    assert not kinds(docs, "HorizontalPodAutoscaler")
    assert (
        one(docs, "ScaledObject")["spec"]["scaleTargetRef"]["name"]
        == one(docs, "Deployment")["metadata"]["name"]
    )
    assert container(docs)["image"] == container(rendered("cpu"))["image"]


# ------------------------------------------------------------------------------------------------------------
# the manifests against the service
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_and_port_match_the_service(variant):
    docs = rendered(variant)
    c = container(docs)
    env = configmap_env(docs)
    facts = service_facts(env)
    assert not facts["torch_imported"], "service.py must stay importable without torch (the gateway's side)"
    assert not {"BENTOML_PORT", "PORT"} & (set(env) | {e["name"] for e in c.get("env", [])}), (
        "the port is BentoML's default (3000); the Service and probes assume it"
    )
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": facts["port"]}, (
        f"container ports {ports}, but `bentoml serve` listens on {facts['port']}"
    )

    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, f"{probe} should ask {path}, not {get['path']}"
        assert get["path"] in facts["routes"], f"{probe} path {get['path']} is not a route of the service"
        assert get["port"] in ports or get["port"] == facts["port"], (
            f"{probe} port {get['port']!r} is not served"
        )

    svc, pdb = one(docs, "Service"), one(docs, "PodDisruptionBudget")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("http", facts["port"], "http")
    ]
    for kind, selector in (
        ("Service", svc["spec"]["selector"]),
        ("PDB", pdb["spec"]["selector"]["matchLabels"]),
    ):
        assert selector and selector.items() <= labels.items(), (
            f"{kind} selector {selector} misses pods {labels}"
        )
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def env_names(docs: list[dict]) -> set[str]:
    names = {e["name"] for e in container(docs).get("env", [])}
    for cm in kinds(docs, "ConfigMap"):
        names |= set(cm.get("data", {}))
    return names


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_names_are_real_settings(variant):
    docs = rendered(variant)
    unknown = {n for n in env_names(docs) if n not in SETTING_NAMES and n not in OTHER_ENV}
    assert not unknown, (
        f"{variant}: {sorted(unknown)} are neither SIGLIP_* settings nor known library variables"
    )
    env = configmap_env(docs)
    Settings.from_env(env)  # the values parse and validate as the service would at start-up

    secret_refs = [e for e in container(docs)["env"] if "valueFrom" in e]
    assert [e["name"] for e in secret_refs] == ["SIGLIP_API_TOKEN"]
    ref = secret_refs[0]["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional"), "the API token must not silently turn auth off when the Secret is missing"
    command = f"kubectl -n {one(docs, 'Namespace')['metadata']['name']} create secret generic {ref['name']}"
    assert f"{command} --from-literal={ref['key']}=" in README.read_text(), (
        f"README must show how to create Secret {ref['name']} with key {ref['key']}"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_resources_fit_the_variant(variant):
    docs = rendered(variant)
    spec, c = pod_spec(docs), container(docs)
    res = c["resources"]
    env = configmap_env(docs)
    for section in ("requests", "limits"):
        assert res.get(section, {}).get("memory"), f"{variant}: memory {section} missing"
    assert res["requests"].get("cpu"), f"{variant}: CPU request missing"
    if variant in GPU_VARIANTS:
        assert quantity_int(res["limits"].get("nvidia.com/gpu"), "nvidia.com/gpu limit") == 1
        if "nvidia.com/gpu" in res.get("requests", {}):
            assert str(res["requests"]["nvidia.com/gpu"]) == str(res["limits"]["nvidia.com/gpu"])
        assert any(
            t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
            for t in spec.get("tolerations", [])
        ), "GPU nodes' taint is not tolerated"
        assert spec.get("nodeSelector"), "GPU pods should select GPU nodes"
        assert env["SIGLIP_DEVICE"].startswith("cuda")
    else:
        gpu_keys = [k for section in res.values() for k in section if "gpu" in k]
        assert not gpu_keys, f"the CPU variant still asks for {gpu_keys}"
        assert not spec.get("tolerations") and not spec.get("nodeSelector")
        assert env["SIGLIP_DEVICE"] == "cpu"
        assert c["image"] != container(rendered("base"))["image"], "the CPU overlay must use the CPU image"
        # Converting the OpenVINO towers costs minutes and ~6 GB: the cache must survive restarts.
        mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if m["mountPath"] != "/dev/shm"]
        cache = env.get("SIGLIP_OPENVINO_CACHE_DIR", "")
        assert any(cache.startswith(m.rstrip("/") + "/") for m in mounts), (cache, mounts)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lifecycle_and_rollout(variant):
    docs = rendered(variant)
    deploy, spec, c = one(docs, "Deployment"), pod_spec(docs), container(docs)
    timeout_s = Settings.from_env(configmap_env(docs)).request_timeout_s
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 5 <= pre_stop <= 30
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + timeout_s, (
        f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} < preStop {pre_stop} s + "
        f"SIGLIP_REQUEST_TIMEOUT_S {timeout_s} s: in-flight requests would be cut at shutdown"
    )

    def budget(probe: str) -> int:
        p = c[probe]
        return p.get("periodSeconds", 10) * p.get("failureThreshold", 3)

    assert budget("startupProbe") >= 600, "the startup probe must cover a model download and load"
    assert budget("livenessProbe") >= 60 and c["livenessProbe"].get("timeoutSeconds", 1) >= 5, (
        "liveness should be conservative: a busy pod answers late"
    )
    assert c["readinessProbe"]["periodSeconds"] <= 10

    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1), "no surge pod waiting for a scarce GPU"
    assert deploy["spec"]["progressDeadlineSeconds"] >= budget("startupProbe")


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_as_the_bento_user(variant):
    from bentoml._internal.container.generate import BENTO_UID_GID  # the uid the containerized image runs as

    docs = rendered(variant)
    pod, c = pod_spec(docs)["securityContext"], container(docs)["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (BENTO_UID_GID,) * 3
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["allowPrivilegeEscalation"] is False and c["capabilities"]["drop"] == ["ALL"]
    assert one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("variant", VARIANTS)
def test_volumes_and_weights(variant):
    docs = rendered(variant)
    spec, c = pod_spec(docs), container(docs)
    env = configmap_env(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes), (
        f"mounts without a volume: {set(mounts.values()) - set(volumes)}"
    )
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert env["HF_HOME"] in mounts, "HF_HOME must be a mounted, writable volume"

    pvcs = {d["metadata"]["name"]: d for d in kinds(docs, "PersistentVolumeClaim")}
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v
    }
    assert claims <= set(pvcs) | EXTERNAL_PVCS, f"claims of no rendered PVC: {claims - set(pvcs)}"
    assert set(pvcs) <= claims, f"PVCs no pod mounts: {set(pvcs) - claims}"
    model = env["SIGLIP_MODEL"]
    if variant == "offline":
        assert env.get("HF_HUB_OFFLINE") == "1"
        assert model in mounts, f"SIGLIP_MODEL={model} is not a mounted directory"
        weights = volumes[mounts[model]]
        assert "persistentVolumeClaim" not in volumes[mounts[env["HF_HOME"]]], "no download cache needed"
        assert weights["persistentVolumeClaim"]["claimName"] in EXTERNAL_PVCS
        for name in EXTERNAL_PVCS:
            assert name in README.read_text(), f"README must say how to create and fill PVC {name}"
    elif variant == "baked":
        from bentoml._internal.container.generate import BENTO_PATH  # where the image holds the bento

        from siglip.bento import DEFAULT_MODEL_TAG  # the tag `python -m siglip.bento bake` stores

        assert env.get("HF_HUB_OFFLINE") == "1"
        assert model == f"{BENTO_PATH}/models/{DEFAULT_MODEL_TAG.replace(':', '/')}", (
            f"SIGLIP_MODEL={model} is not where the baked model sits in the image"
        )
        hiding = [m for m in mounts if model == m or model.startswith(m.rstrip("/") + "/")]
        assert not hiding, f"volumes mounted at {hiding} would hide the baked weights"
        assert not pvcs and not claims, "baked weights need no volume"
    else:
        assert model == Settings.model and "HF_HUB_OFFLINE" not in env
        cache_volume = volumes[mounts[env["HF_HOME"]]]
        assert cache_volume["persistentVolumeClaim"]["claimName"] in pvcs, "the hub cache should persist"


@pytest.mark.parametrize("variant", VARIANTS)
def test_namespaced_objects_share_the_namespace(variant):
    docs = rendered(variant)
    ns = one(docs, "Namespace")["metadata"]["name"]
    wrong = {
        f"{d['kind']}/{d['metadata']['name']}": d["metadata"].get("namespace")
        for d in docs
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != ns
    }
    assert not wrong, f"objects outside namespace {ns}: {wrong}"


def check_metric_filter(query: str, what: str) -> None:
    # Only the gateway's API requests are in the gauge (no probes, no model-service calls): nothing to filter, and
    # a leftover filter on BentoML's labels would match no series at all.
    assert AUTOSCALE_METRIC in query and "bentoml_" not in query, f"{what} must read {AUTOSCALE_METRIC}"
    assert "runner_name" not in query and "endpoint" not in query, f"{what} filters on labels the gauge lacks"


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscaling_targets_the_service_concurrency(variant):
    docs = rendered(variant)
    env = configmap_env(docs)
    facts = service_facts(env)
    target = target_concurrency(facts, env)
    deployment = one(docs, "Deployment")["metadata"]["name"]
    if variant == "keda":
        assert not kinds(docs, "HorizontalPodAutoscaler"), "KEDA owns the HPA: a second one would fight it"
        so = one(docs, "ScaledObject")
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] == deployment
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert (
            spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
                "stabilizationWindowSeconds"
            ]
            >= 300
        )
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") == "AverageValue"
        meta = trigger["metadata"]
        assert quantity_int(meta["threshold"], "KEDA threshold") == target
        assert re.match(r"https?://", meta["serverAddress"])
        assert f'namespace="{so["metadata"]["namespace"]}"' in meta["query"], (
            "the query must select this namespace"
        )
        assert meta["query"].strip().startswith(f"sum({AUTOSCALE_METRIC}{{"), (
            "KEDA divides the total by the threshold"
        )
        check_metric_filter(meta["query"], "the KEDA query")
        return
    assert not kinds(docs, "ScaledObject")
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == ("Deployment", deployment)
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods", "scale on requests in flight, not on CPU"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert quantity_int(metric["pods"]["target"]["averageValue"], "HPA averageValue") == target

    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"], (
        "the HPA reads a metric the adapter does not serve"
    )
    assert rule["seriesQuery"].startswith(AUTOSCALE_METRIC + "{")
    assert re.fullmatch(rf"\^?{AUTOSCALE_METRIC}\$?", rule["name"]["matches"])
    assert rule["metricsQuery"].startswith("sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"), "one sum per pod"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    check_metric_filter(rule["seriesQuery"] + rule["metricsQuery"].replace("<<.Series>>", AUTOSCALE_METRIC),
                        "the adapter rule")
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_service_exposes_the_autoscaling_metric(service):
    """The series the HPA and KEDA read exists on a real `bentoml serve`: one per pod, no labels to filter on."""
    from prometheus_client.parser import text_string_to_metric_families

    assert service.post("/text_embedding", {"inputs": "a photo of a cat"}).status_code == 200
    text = httpx.get(service.url + "/metrics", timeout=10).text
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == AUTOSCALE_METRIC]
    assert len(samples) == 1 and samples[0].labels == {}, f"/metrics: {AUTOSCALE_METRIC} series {samples}"


# ------------------------------------------------------------------------------------------------------------
# BentoCloud
# ------------------------------------------------------------------------------------------------------------
def unknown_keys(data: typing.Any, tp: typing.Any, where: str) -> list[str]:
    """Keys of `data` that no attrs field of `tp` takes (cattrs drops those silently: __forbid_extra_keys__
    is off in BentoCloud's schemas)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return unknown_keys(data, next(a for a in args if a is not type(None)), where)
    if origin is list and isinstance(data, list):
        return [k for i, item in enumerate(data) for k in unknown_keys(item, args[0], f"{where}[{i}]")]
    if origin is dict and isinstance(data, dict):
        return [k for key, item in data.items() for k in unknown_keys(item, args[1], f"{where}.{key}")]
    if attr.has(tp) and isinstance(data, dict):
        fields = attr.fields_dict(attr.resolve_types(tp))
        return [f"{where}.{key}" for key in data if key not in fields] + [
            k
            for key, item in data.items()
            if key in fields
            for k in unknown_keys(item, fields[key].type, f"{where}.{key}")
        ]
    return []


def bentocloud() -> dict:
    return yaml.safe_load(BENTOCLOUD.read_text())


def test_bentocloud_config_parses_as_bentoml_deploy_does():
    from bentoml._internal.cloud.deployment import CreateDeploymentSchemaV2, DeploymentAPI
    from bentoml._internal.cloud.schemas.modelschemas import DeploymentStrategy
    from bentoml._internal.utils.cattr import bentoml_cattr

    config = bentocloud()
    assert not unknown_keys(
        {k: v for k, v in config.items() if k != "cluster"}, CreateDeploymentSchemaV2, "bentocloud.yaml"
    ), "fields BentoCloud does not know (they would be dropped)"
    config.pop("cluster", None)  # `bentoml deploy` takes it out before structuring (DeploymentAPI.create)
    schema = bentoml_cattr.structure(config, CreateDeploymentSchemaV2)
    DeploymentAPI._fix_and_validate_schema(schema)  # min <= max replicas, max > 0
    strategies = {s.value for s in DeploymentStrategy}
    for name, svc in schema.services.items():
        assert svc.instance_type, f"{name} has no instance type"
        assert svc.scaling.min_replicas >= 1, f"{name} would scale to zero (needs external_queue)"
        assert svc.deployment_strategy in strategies | {None}, f"{name}: {svc.deployment_strategy}"


def test_bentocloud_config_matches_the_service():
    config = bentocloud()
    facts = service_facts({e["name"]: e["value"] for e in config.get("envs", [])})
    assert set(config["services"]) == set(facts["services"]), "service names differ from service.py's"
    assert config["services"][facts["entry"]]["instance_type"].startswith("cpu."), "the gateway needs no GPU"
    model_services = set(facts["services"]) - {facts["entry"]}
    for name in model_services:
        assert config["services"][name]["instance_type"].startswith("gpu."), f"{name} runs the model on a GPU"

    envs = [*config.get("envs", [])] + [
        e for svc in config["services"].values() for e in svc.get("envs") or []
    ]
    names = {e["name"] for e in envs}
    assert names <= SETTING_NAMES | OTHER_ENV, (
        f"unknown env names {sorted(names - SETTING_NAMES - OTHER_ENV)}"
    )
    for svc in config["services"].values():
        Settings.from_env(
            {e["name"]: e["value"] for e in [*config.get("envs", []), *(svc.get("envs") or [])]}
        )
    assert "SIGLIP_API_TOKEN" not in names, "the token belongs in a BentoCloud secret, not in plain envs"
    (secret,) = config["secrets"]
    assert f"bentoml secret create {secret} SIGLIP_API_TOKEN=" in BENTOCLOUD.read_text(), (
        "the file's header must show how to create the secret it names"
    )


# ------------------------------------------------------------------------------------------------------------
# KubeRay: the RayJob that runs `siglip-index build --engine ray`
# ------------------------------------------------------------------------------------------------------------
RAYJOB = K8S / "ray" / "rayjob.yaml"
# KubeRay v1 fields this manifest may use (the CRD is not bundled with kubernetes-validate; ScaledObject's way)
RAYJOB_FIELDS = {
    "spec": {"entrypoint", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit", "rayClusterSpec",
             "activeDeadlineSeconds", "runtimeEnvYAML", "submissionMode", "suspend"},
    "rayClusterSpec": {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                       "workerGroupSpecs"},
    "autoscalerOptions": {"idleTimeoutSeconds", "upscalingMode", "resources", "env", "image"},
    "headGroupSpec": {"rayStartParams", "template", "serviceType"},
    "workerGroupSpecs": {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"},
}


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (doc,) = yaml.safe_load_all(RAYJOB.read_text())
    return doc


def test_rayjob_uses_only_kuberay_fields(rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    for name, value in [("spec", spec), ("rayClusterSpec", cluster), ("autoscalerOptions",
                                                                      cluster["autoscalerOptions"]),
                        ("headGroupSpec", cluster["headGroupSpec"])] + [
            ("workerGroupSpecs", g) for g in cluster["workerGroupSpecs"]]:
        unknown = set(value) - RAYJOB_FIELDS[name]
        assert not unknown, f"{name}: {sorted(unknown)} are not KubeRay v1 fields"
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rayjob_pod_templates_validate_strictly(rayjob, version):
    import kubernetes_validate

    cluster = rayjob["spec"]["rayClusterSpec"]
    for name, group in [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in
                                                               cluster["workerGroupSpecs"]]:
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": group["template"]}
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"RayJob {name} pod template is not valid Kubernetes {version}: {exc}")


def test_rayjob_runs_the_ray_engine_on_a_cpu_and_a_gpu_group_from_zero(rayjob):
    import shlex

    from siglip.index.cli import parser

    spec = rayjob["spec"]
    command = shlex.split(spec["entrypoint"])
    assert command[0] == "siglip-index"
    args = parser().parse_args(command[1:])  # the entrypoint is a command the CLI takes
    assert (args.command, args.engine) == ("build", "ray")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    pinned = re.search(r'"ray\[data\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert cluster["rayVersion"] == pinned, "the cluster's Ray must be the [scale] extra's"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no work on the head, the driver's pod"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}

    def gpus(group):
        (c,) = group["template"]["spec"]["containers"]
        return int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))

    cpu = [g for g in groups.values() if gpus(g) == 0]
    gpu = [g for g in groups.values() if gpus(g) > 0]
    assert cpu and gpu, "a CPU group for decoding and a GPU group for the actors"
    for group in groups.values():
        assert group["minReplicas"] == 0 == group["replicas"] <= group["maxReplicas"], "scale from zero"
    gpu_total = sum(gpus(g) * g["maxReplicas"] for g in gpu)
    assert args.actors[1] <= gpu_total / args.gpus_per_actor, "more actors than the GPU group can hold"
    for name, group in [("head", cluster["headGroupSpec"])] + list(groups.items()):
        (c,) = group["template"]["spec"]["containers"]
        names = {e["name"] for e in c.get("env", [])}
        assert not names - SETTING_NAMES - OTHER_ENV, f"{name}: unknown env {sorted(names - SETTING_NAMES)}"
        Settings.from_env({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    assert str(RAYJOB.relative_to(ROOT)) in (ROOT / "docs" / "indexer.md").read_text(), "the indexer page names the RayJob"
