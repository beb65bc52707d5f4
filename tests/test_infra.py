"""infra/ without Docker or a cluster: YAML lint, Compose against the compose-spec schema, Kubernetes
objects against Kubernetes' schemas (kubernetes-validate), KubeRay objects against
tests/schemas/kuberay-v1.schema.json (their pod templates against Kubernetes' PodTemplateSpec), and
cross-checks that catch drift between infra/ and the code (settings names, Serve config, CLI
commands, Ray version, image tags, ports)."""

from __future__ import annotations

import importlib.resources
import json
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE_FILE = INFRA / "compose" / "compose.yaml"
ENV_EXAMPLE = INFRA / "compose" / ".env.example"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSION = "1.33.0"
FLAWLINE_IMAGE = "ghcr.io/flawline/flawline"
# Manifests in infra/k8s that kustomization.yaml leaves out on purpose (its comment says why).
NOT_IN_KUSTOMIZATION = {
    "rayjob-train.yaml": "a workload, applied per training run",
    "monitoring.yaml": "needs the Prometheus operator's CRDs",
}


# ---------------------------------------------------------------- loading


def _yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml"})


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@lru_cache(maxsize=None)
def _docs(path: Path) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def _objects() -> list[tuple[str, dict]]:
    """(where, object) for every object in infra/k8s, where = 'file: Kind/name'."""
    out = []
    for path in _manifest_files():
        for doc in _docs(path):
            out.append((f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return out


def _of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(w, o) for w, o in _objects() if o.get("kind") == kind]


@lru_cache(maxsize=1)
def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _path(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(root)"


def _errors(validator: jsonschema.protocols.Validator, instance: Any, where: str) -> list[str]:
    return [f"{where}: at {_path(e)}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def _pod_templates(kind: str, spec: dict) -> Iterator[tuple[str, dict]]:
    """(path, template) of every pod template inside a KubeRay object's spec."""
    def cluster(prefix: str, cspec: dict) -> Iterator[tuple[str, dict]]:
        yield f"{prefix}/headGroupSpec/template", cspec["headGroupSpec"]["template"]
        for i, group in enumerate(cspec.get("workerGroupSpecs") or []):
            yield f"{prefix}/workerGroupSpecs/{i}({group.get('groupName')})/template", group["template"]

    if kind == "RayCluster":
        yield from cluster("spec", spec)
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            yield from cluster("spec/rayClusterSpec", spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            yield "spec/submitterPodTemplate", spec["submitterPodTemplate"]
    elif kind == "RayService":
        yield from cluster("spec/rayClusterConfig", spec["rayClusterConfig"])


def _containers(obj: Any) -> Iterator[dict]:
    """Every container (and init container) anywhere inside a Kubernetes object."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in {"containers", "initContainers"} and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _containers(item)


# ---------------------------------------------------------------- lint and schemas


def test_yamllint_clean() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(INFRA / ".yamllint.yaml"))
    problems = []
    files = _yaml_files()
    assert COMPOSE_FILE in files and len(files) > 10, files
    for path in files:
        for problem in linter.run(path.read_text(), conf, str(path)):
            if problem.level == "error":
                problems.append(f"{path.relative_to(ROOT)}:{problem.line}:{problem.column}: {problem.message}"
                                f" ({problem.rule})")
    assert not problems, "yamllint errors:\n" + "\n".join(problems)


def test_compose_matches_compose_spec() -> None:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(ref.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = _errors(validator, _compose(), str(COMPOSE_FILE.relative_to(ROOT)))
    assert not errors, "\n".join(errors)


def test_core_kubernetes_objects_validate() -> None:
    errors, checked = [], 0
    for where, obj in _objects():
        if obj.get("apiVersion", "").split("/")[0] in {"ray.io", "monitoring.coreos.com"}:
            continue  # custom resources: see the tests below
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{where}: at {_path(err)}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            errors.append(f"{where}: {err}")
    assert not errors, "\n".join(errors)
    assert checked >= 10


@lru_cache(maxsize=1)
def _pod_template_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' strict PodTemplateSpec schema as bundled with kubernetes-validate, its $refs
    resolved against the bundled _definitions.json."""
    folder = importlib.resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict")
    schema = json.loads(folder.joinpath("podtemplatespec-v1.json").read_text())
    definitions = json.loads(folder.joinpath("_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


@lru_cache(maxsize=1)
def _kuberay_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "kuberay-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_kuberay_objects_validate() -> None:
    errors, kinds = [], set()
    for where, obj in _objects():
        if obj.get("apiVersion", "").split("/")[0] != "ray.io":
            continue
        kinds.add(obj["kind"])
        errors += _errors(_kuberay_validator(), obj, where)
        for path, template in _pod_templates(obj.get("kind"), obj.get("spec") or {}):
            errors += _errors(_pod_template_validator(), template, f"{where} {path}")
    assert not errors, "\n".join(errors)
    assert kinds == {"RayCluster", "RayJob", "RayService"}


def test_kuberay_schema_catches_typos() -> None:
    """The schema is only worth something if it rejects what KubeRay would reject or ignore."""
    [(_, cluster)] = _of_kind("RayCluster")
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = 1                  # typo
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0        # not a string
    bad["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"            # not an enum value
    paths = {_path(e) for e in _kuberay_validator().iter_errors(bad)}
    assert {"spec/workerGroupSpecs/0", "spec/headGroupSpec/rayStartParams/num-cpus",
            "spec/autoscalerOptions/upscalingMode"} <= paths, paths
    template = json.loads(json.dumps(cluster["spec"]["headGroupSpec"]["template"]))
    template["spec"]["containers"][0]["resource"] = {}                    # typo of resources
    assert list(_pod_template_validator().iter_errors(template))


def test_podmonitors_validate() -> None:
    schema = json.loads((SCHEMAS / "podmonitor-v1.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    monitors = _of_kind("PodMonitor")
    assert monitors
    errors = [e for where, obj in monitors for e in _errors(validator, obj, where)]
    assert not errors, "\n".join(errors)
    # They scrape container ports the Ray pods declare.
    declared = {p["name"] for _, rc in _of_kind("RayCluster") for c in _containers(rc) for p in c.get("ports", [])}
    for where, obj in monitors:
        for endpoint in obj["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in declared, f"{where}: port {endpoint['port']} is not declared on a Ray pod"
        assert obj["spec"]["namespaceSelector"]["matchNames"] == ["flawline"], where


# ---------------------------------------------------------------- cross-checks


def test_flawline_settings_names_exist() -> None:
    from flawline.config import Settings

    fields = set(Settings.model_fields)
    unknown = []
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for match in re.finditer(r"\bFLAWLINE_([A-Z0-9_]+)(\*)?", line):
                name, wildcard = match.group(1).lower(), match.group(2)
                ok = any(f.startswith(name) for f in fields) if wildcard else name in fields
                if not ok:
                    unknown.append(f"{path.relative_to(ROOT)}:{lineno}: {match.group(0)}")
    assert not unknown, "not settings of flawline.config.Settings:\n" + "\n".join(unknown)


def _fill(value: str) -> str:
    """Compose interpolation: a variable's default (``${VAR:-default}``) where it has one, else x."""
    return re.sub(r"\$\{[^}:]*(?::-([^}]*))?[^}]*\}", lambda m: m.group(1) if m.group(1) is not None else "x", value)


def test_settings_values_parse() -> None:
    """The values Compose and the ConfigMap give are accepted by Settings (types, ranges)."""
    from flawline.config import Settings

    compose_env = _compose()["x-flawline-env"]
    [(_, config)] = [x for x in _of_kind("ConfigMap") if x[1]["metadata"]["name"] == "flawline-config"]
    for where, env in (("compose x-flawline-env", compose_env), ("flawline-config", config["data"])):
        values = {k.removeprefix("FLAWLINE_").lower(): _fill(str(v)) for k, v in env.items()}
        try:
            Settings(**values)
        except Exception as err:  # pydantic ValidationError
            pytest.fail(f"{where}: {err}")


def test_rayservice_mirrors_serve_config() -> None:
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    [(where, service)] = _of_kind("RayService")
    remote = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert [a["name"] for a in remote["applications"]] == [a["name"] for a in local["applications"]], where
    for mine, theirs in zip(remote["applications"], local["applications"]):
        for key in ("import_path", "route_prefix", "args"):
            assert mine.get(key) == theirs.get(key), f"{where}: application {mine['name']}: {key} differs"
        assert [d["name"] for d in mine["deployments"]] == [d["name"] for d in theirs["deployments"]], where
        for dep, ref in zip(mine["deployments"], theirs["deployments"]):
            dep, ref = json.loads(json.dumps(dep)), json.loads(json.dumps(ref))
            gpus = dep.get("ray_actor_options", {}).pop("num_gpus", None)
            ref.get("ray_actor_options", {}).pop("num_gpus", None)
            assert dep == ref, f"{where}: deployment {dep['name']} options differ from serve/config.yaml"
            if dep["name"] == "ModelServer":
                assert gpus == 1, f"{where}: ModelServer should have num_gpus: 1 on the cluster"
    assert remote["http_options"]["host"] == "0.0.0.0"
    # flawline predict reaches it through KubeRay's serve Service named in the ConfigMap.
    data = next(o for _, o in _of_kind("ConfigMap") if o["metadata"]["name"] == "flawline-config")["data"]
    assert data["FLAWLINE_SERVE_HOST"].split(".")[0] == f"{service['metadata']['name']}-serve-svc"
    assert int(data["FLAWLINE_SERVE_PORT"]) == remote["http_options"]["port"]


def _flawline_commands() -> list[tuple[str, str]]:
    """(where, command line) of every `flawline ...` command that infra/ runs."""
    found = []
    for name, service in _compose()["services"].items():
        command = service.get("command")
        text = " ".join(command) if isinstance(command, list) else (command or "")
        if "flawline " in text:
            found.append((f"compose service {name}", text))
    for where, obj in _objects():
        if obj["kind"] == "RayJob":
            found.append((where, obj["spec"]["entrypoint"]))
        for container in _containers(obj):
            text = " ".join(container.get("command", []) + container.get("args", []))
            if re.search(r"(^|[\s;&|])flawline\s", text):
                found.append((f"{where} container {container['name']}", text))
    commands = []
    for where, text in found:
        for part in re.split(r"&&|\|\||;|\|", text):
            words = shlex.split(part)
            if "flawline" in words:
                commands.append((where, " ".join(words[words.index("flawline"):])))
    return commands


def test_infra_runs_flawline_commands() -> None:
    commands = {c for _, c in _flawline_commands()}
    assert {c.split(" --")[0] for c in commands} >= {"flawline db upgrade", "flawline monitor start",
                                                     "flawline train submit"}, commands


@pytest.mark.parametrize("where,command", _flawline_commands(), ids=lambda v: str(v)[:90])
def test_flawline_command_exists(where: str, command: str) -> None:
    import typer.main
    from typer.testing import CliRunner

    from flawline.cli.main import app

    words = command.split()[1:]
    path = []
    for word in words:
        if word.startswith("-"):
            break
        path.append(word)
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"{where}: `flawline {' '.join(path)} --help` failed: {result.output[-400:]}"
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    known = {opt for param in cmd.params for opt in param.opts + param.secondary_opts}
    given = {w.split("=")[0] for w in words if w.startswith("-")}
    assert given <= known, f"{where}: `flawline {' '.join(path)}` has no option {sorted(given - known)}"
    for param in cmd.params:
        if param.required and param.opts and param.opts[0].startswith("-"):
            assert given & set(param.opts), f"{where}: `flawline {' '.join(path)}` needs {param.opts[0]}"


def _pinned_ray() -> str:
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if line.startswith("ray=="):
            return line.split("==")[1].strip()
    raise AssertionError(".ci/constraints.txt pins no ray")


def test_dockerfile_ray_version_and_weights() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M)
    assert base, "Dockerfile: no `ARG RAY_IMAGE=rayproject/ray:<version>-...`"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    version = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+(-gpu)?", base.group(1))
    assert version and version.group(1) == _pinned_ray(), f"base image {base.group(1)} vs ray=={_pinned_ray()}"
    for _, obj in _of_kind("RayCluster") + _of_kind("RayJob") + _of_kind("RayService"):
        for cluster in (obj["spec"], obj["spec"].get("rayClusterConfig"), obj["spec"].get("rayClusterSpec")):
            if isinstance(cluster, dict) and "rayVersion" in cluster:
                assert cluster["rayVersion"] == _pinned_ray(), obj["metadata"]["name"]
    installs = [line for line in text.splitlines() if "pip install" in line and "-c .ci/constraints.txt" in line]
    assert any('".[weights]"' in line for line in installs), "the image must install flawline with the weights extra"
    assert re.search(r"ENV FLAWLINE_JOBS_DIR=/app/jobs\b", text) and re.search(r"PYTHONPATH=/app\b", text)
    assert re.search(r"^WORKDIR /app$", text, re.M)
    # What the image copies is also in the build context (.dockerignore is an allow-list).
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for needed in ("platform", "jobs", "serve", "migrations", "pyproject.toml", "README.md", ".ci/constraints.txt"):
        assert re.search(rf"^COPY .*\s{re.escape(needed)}", text, re.M), f"Dockerfile does not copy {needed}"
        assert needed in allowed, f".dockerignore keeps {needed} out of the build context"


def _tag_ok(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.split(":", 1)[1] not in {"", "latest"} and "${" not in image


def test_every_image_is_pinned() -> None:
    images = [(f"compose service {name}", s["image"]) for name, s in _compose()["services"].items() if "image" in s]
    assert len(images) == len(_compose()["services"]), "every Compose service names its image"
    images += [(where, c["image"]) for where, obj in _objects() for c in _containers(obj)]
    bad = [f"{where}: {image}" for where, image in images if not _tag_ok(image)]
    assert not bad, "images without a pinned tag:\n" + "\n".join(bad)
    flawline = {image for _, image in images if image.startswith(FLAWLINE_IMAGE + ":")}
    assert len(flawline) == 1, f"one flawline image tag everywhere, got {flawline}"


def test_kustomization_lists_every_manifest() -> None:
    text = (K8S / "kustomization.yaml").read_text()
    kustomization = yaml.safe_load(text)
    listed = kustomization["resources"]
    files = {p.name for p in _manifest_files()}
    assert len(listed) == len(set(listed)), "duplicates in kustomization.yaml"
    assert set(listed) <= files, f"listed but missing: {set(listed) - files}"
    missing = files - set(listed) - set(NOT_IN_KUSTOMIZATION)
    assert not missing, f"kustomization.yaml does not list {sorted(missing)}"
    for name in NOT_IN_KUSTOMIZATION:
        assert name not in listed and name in text, f"kustomization.yaml should say why {name} is left out"
    assert kustomization["namespace"] == "flawline"
    for where, obj in _objects():
        if obj["kind"] not in {"Namespace", "PodMonitor"}:
            assert obj["metadata"].get("namespace") == "flawline", f"{where}: namespace"


def test_secrets_and_config_references_resolve() -> None:
    secret_keys = {line.split("=", 1)[0] for line in (K8S / "secrets.example.env").read_text().splitlines()
                   if line and not line.startswith("#")}
    config_keys = set(next(o for _, o in _of_kind("ConfigMap") if o["metadata"]["name"] == "flawline-config")["data"])
    problems = []

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, dict):
            for kind, keys, name in (("secretKeyRef", secret_keys, "flawline-secrets"),
                                     ("configMapKeyRef", config_keys, "flawline-config")):
                ref = obj.get(kind)
                if ref and ref["name"] == name and ref["key"] not in keys:
                    problems.append(f"{where}: {kind} {name}/{ref['key']} does not exist")
                elif ref and ref["name"] != name:
                    problems.append(f"{where}: {kind} to unknown {ref['name']}")
            for key in ("secretRef", "configMapRef"):
                if key in obj and obj[key]["name"] not in {"flawline-secrets", "flawline-config"}:
                    problems.append(f"{where}: {key} to unknown {obj[key]['name']}")
            for value in obj.values():
                walk(value, where)
        elif isinstance(obj, list):
            for value in obj:
                walk(value, where)

    for where, obj in _objects():
        walk(obj, where)
    assert not problems, "\n".join(problems)
    assert "kubectl -n flawline create secret generic flawline-secrets --from-env-file=" in (
        INFRA / "README.md").read_text()


def test_flawline_containers_get_the_same_settings() -> None:
    """Every flawline process on Kubernetes (Ray head and workers, RayService, init Job) reads the
    same ConfigMap and the same secret settings; a worker without them would talk to another S3."""
    reference, seen = None, 0
    for where, obj in _objects():
        for container in _containers(obj):
            if not container["image"].startswith(FLAWLINE_IMAGE) or container["name"] == "ray-job-submitter":
                continue
            seen += 1
            assert {"configMapRef": {"name": "flawline-config"}} in container.get("envFrom", []), where
            env = [e for e in container.get("env", []) if e["name"].startswith("FLAWLINE_")
                   or e["name"] == "CATALOG_DB_PASSWORD"]
            reference = reference or env
            assert env == reference, f"{where} container {container['name']}: FLAWLINE_* env differs"
    assert seen >= 6 and {e["name"] for e in reference} >= {
        "FLAWLINE_CATALOG_URL", "FLAWLINE_S3_ACCESS_KEY", "FLAWLINE_S3_SECRET_KEY", "FLAWLINE_LABELSTUDIO_TOKEN"}


def test_rayjob_uses_the_shared_cluster() -> None:
    clusters = {o["metadata"]["name"] for _, o in _of_kind("RayCluster")}
    data = next(o for _, o in _of_kind("ConfigMap") if o["metadata"]["name"] == "flawline-config")["data"]
    for name in clusters:
        assert data["FLAWLINE_RAY_DASHBOARD_URL"].startswith(f"http://{name}-head-svc."), data
        assert data["FLAWLINE_RAY_ADDRESS"].startswith(f"{name}-head-svc.")
    for where, job in _of_kind("RayJob"):
        spec = job["spec"]
        assert spec["clusterSelector"].get("ray.io/cluster") in clusters, where
        # KubeRay: with clusterSelector no cluster is created, and none may be shut down.
        assert "rayClusterSpec" not in spec and not spec.get("shutdownAfterJobFinishes"), where
        assert not spec.get("ttlSecondsAfterFinished"), where


def test_raycluster_autoscaling_and_gpu_groups() -> None:
    for where, obj in _of_kind("RayCluster") + _of_kind("RayService"):
        cluster = obj["spec"].get("rayClusterConfig", obj["spec"])
        assert cluster["enableInTreeAutoscaling"] is True and "autoscalerOptions" in cluster, where
        assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0", where
        groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
        gpu = groups["gpu"]["template"]["spec"]
        assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1, where
        assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"]), where
        for container in _containers(obj):
            resources = container.get("resources", {})
            assert resources.get("requests") and resources.get("limits"), f"{where}: {container['name']} resources"
    for where, obj in _objects():
        for container in _containers(obj):
            resources = container.get("resources", {})
            assert resources.get("requests") and resources.get("limits"), f"{where}: {container['name']} resources"


def test_postgres_init_script_is_the_same() -> None:
    [(where, config)] = [x for x in _of_kind("ConfigMap") if x[1]["metadata"]["name"] == "postgres-init"]
    [script] = config["data"].values()
    assert script == (INFRA / "compose" / "postgres-init.sh").read_text(), f"{where} differs from postgres-init.sh"


def test_compose_variables_documented() -> None:
    text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    documented = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
                  if line and not line.startswith("#")}
    assert used == documented, f"used, not in .env.example: {used - documented}; unused: {documented - used}"


def _host_ports(service: dict) -> list[int]:
    ports = []
    for entry in service.get("ports", []):
        text = str(entry if not isinstance(entry, dict) else f"{entry.get('published')}:{entry['target']}")
        parts = text.split("/")[0].split(":")
        assert len(parts) >= 2, f"port {entry} is not published explicitly (host:container)"
        ports.append(int(parts[-2]))
    return ports


def test_compose_ports() -> None:
    services = _compose()["services"]
    published = [(name, port) for name, s in services.items() for port in _host_ports(s)]
    ports = [p for _, p in published]
    assert len(ports) == len(set(ports)), f"a host port is published twice: {published}"
    for name in ("label-studio", "minio"):
        assert 8080 not in _host_ports(services[name]), f"{name} must not take the host's port 8080"
    assert 18080 in _host_ports(services["label-studio"])
    assert 18000 in _host_ports(services["ray-head"]) and 8265 in _host_ports(services["ray-head"])
    env = _compose()["x-flawline-env"]
    assert env["FLAWLINE_SERVE_PORT"] == "18000"
    head = " ".join(services["ray-head"]["command"])
    assert "--metrics-export-port=8081" in head and "--num-gpus=0" in head
    devices = services["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    init = services["flawline-init"]["depends_on"]
    assert init["postgres"]["condition"] == "service_healthy" and init["ray-head"]["condition"] == "service_healthy"


def test_prometheus_and_grafana_provisioning() -> None:
    services = _compose()["services"]
    prometheus = yaml.safe_load((INFRA / "monitoring" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {"ray-head:8081", "ray-worker-gpu:8081", "ray-head:44227"} <= targets, targets
    for target in targets:
        assert target.split(":")[0] in set(services) | {"localhost"}, f"{target} is no Compose service"
    # The Grafana provider loads the folder that Compose mounts infra/monitoring/grafana/dashboards at.
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider_file = INFRA / "monitoring" / "grafana" / "provisioning" / "dashboards" / "flawline.yaml"
    [provider] = yaml.safe_load(provider_file.read_text())["providers"]
    assert provider["type"] == "file"
    assert mounts["../monitoring/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert (INFRA / "monitoring" / "grafana" / "dashboards").is_dir()
    datasources = yaml.safe_load(
        (INFRA / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    [source] = datasources["datasources"]
    assert source["name"] == "Prometheus" and source["url"] == "http://prometheus:9090"
    head_env = services["ray-head"]["environment"]
    assert head_env["RAY_PROMETHEUS_HOST"] == source["url"]
    assert head_env["RAY_GRAFANA_HOST"] == "http://grafana:3000"
    assert head_env["RAY_GRAFANA_IFRAME_HOST"].endswith(":" + str(_host_ports(services["grafana"])[0]))


def test_grafana_dashboards_use_provisioned_datasources() -> None:
    datasources = yaml.safe_load(
        (INFRA / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]} | {d["name"] for d in datasources["datasources"]}
    types = {d["type"] for d in datasources["datasources"]}

    def refs(obj: Any) -> Iterator[Any]:
        if isinstance(obj, dict):
            if "datasource" in obj:
                yield obj["datasource"]
            for value in obj.values():
                yield from refs(value)
        elif isinstance(obj, list):
            for value in obj:
                yield from refs(value)

    for path in sorted((INFRA / "monitoring" / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())  # a broken file would stop Grafana's provider from loading it
        for ref in refs(dashboard):
            uid = ref.get("uid") if isinstance(ref, dict) else ref
            kind = ref.get("type") if isinstance(ref, dict) else None
            if isinstance(uid, str) and not uid.startswith("$"):
                assert uid in uids, f"{path.name}: datasource {uid!r} is not provisioned"
            if kind:
                assert kind in types, f"{path.name}: datasource type {kind!r} is not provisioned"
