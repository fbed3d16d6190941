"""Exposure checks for infra/: Ray token authentication in every manifest, no literal token, the
dashboard (whose Jobs API runs arbitrary code) never open without the token, a non-root image; and the
Serve config file and the RayService that embeds it: valid for Ray Serve's own schema, and in agreement.

The manifests are parsed as YAML and the Dockerfile as text; nothing is deployed (tests/test_serving.py
deploys infra/serve_config.yaml on a real Serve).
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
LAUNCHER = INFRA / "ray-cluster.yaml"
RAYJOB = INFRA / "rayjob.yaml"
RAYSERVICE = INFRA / "rayservice.yaml"
SERVE_CONFIG = INFRA / "serve_config.yaml"
KUBERAY = (RAYJOB, RAYSERVICE)
DOCKERFILE = INFRA / "Dockerfile"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KUBERAY_DEFAULT_DASHBOARD_HOST = "0.0.0.0"  # what KubeRay sets when rayStartParams has none


def load(path):
    return yaml.safe_load(path.read_text())


# ---- cluster launcher -------------------------------------------------------------------------------


def launcher_container_env(cfg):
    """Environment the launcher gives every container: the -e/--env flags of docker.run_options."""
    env = {}
    args = shlex.split(" ".join(cfg.get("docker", {}).get("run_options", [])))
    for flag, value in zip(args, args[1:] + [""]):
        if flag in ("-e", "--env"):
            name, _, val = value.partition("=")
            env[name] = val
        elif flag.startswith("--env="):
            name, _, val = flag[len("--env="):].partition("=")
            env[name] = val
    return env


def launcher_start_commands(cfg):
    return cfg.get("head_start_ray_commands", []) + cfg.get("worker_start_ray_commands", [])


def launcher_dashboard_hosts(cfg):
    hosts = []
    for command in launcher_start_commands(cfg):
        if "ray start" in command and "--head" in command:
            found = re.findall(r"--dashboard-host[= ](\S+)", command)
            hosts += found or ["127.0.0.1"]  # `ray start` binds loopback by default
    return hosts


def launcher_token_auth(cfg):
    env = launcher_container_env(cfg)
    from_env = env.get("RAY_AUTH_MODE") == "token"
    in_every_start = all("RAY_AUTH_MODE=token" in c for c in launcher_start_commands(cfg) if "ray start" in c)
    return from_env or in_every_start


# ---- KubeRay ----------------------------------------------------------------------------------------


def kuberay_cluster_spec(doc):
    field = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(doc["kind"])
    return doc["spec"][field] if field else doc["spec"]


def kuberay_pod_specs(cluster_spec):
    yield cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["template"]["spec"]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def kuberay_token_auth(cluster_spec):
    """authOptions.mode=token, or RAY_AUTH_MODE=token set by hand in every Ray container."""
    if (cluster_spec.get("authOptions") or {}).get("mode") == "token":
        return True
    ray_containers = [pod["containers"][0] for pod in kuberay_pod_specs(cluster_spec)]
    return all(env_of(c).get("RAY_AUTH_MODE", {}).get("value") == "token" for c in ray_containers)


def kuberay_dashboard_host(cluster_spec):
    params = cluster_spec["headGroupSpec"].get("rayStartParams") or {}
    return params.get("dashboard-host", KUBERAY_DEFAULT_DASHBOARD_HOST)


# ---- generic ----------------------------------------------------------------------------------------


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def env_entries(doc):
    for node in walk(doc):
        if isinstance(node, dict) and "name" in node and ("value" in node or "valueFrom" in node):
            yield node


# ---- the checks -------------------------------------------------------------------------------------


def test_every_manifest_enables_token_auth():
    assert launcher_token_auth(load(LAUNCHER)), f"{LAUNCHER.name}: RAY_AUTH_MODE=token not set for ray start"
    for path in KUBERAY:
        assert kuberay_token_auth(kuberay_cluster_spec(load(path))), f"{path.name}: token auth not enabled"


def test_dashboard_never_reachable_without_token():
    launcher = load(LAUNCHER)
    assert launcher_dashboard_hosts(launcher), f"{LAUNCHER.name}: no dashboard host found (the check would be empty)"
    for host in launcher_dashboard_hosts(launcher):
        assert host in LOOPBACK or launcher_token_auth(launcher), f"{LAUNCHER.name}: dashboard on {host} without token"
    for path in KUBERAY:
        spec = kuberay_cluster_spec(load(path))
        host = kuberay_dashboard_host(spec)
        assert host in LOOPBACK or kuberay_token_auth(spec), f"{path.name}: dashboard on {host} without token"


def test_launcher_dashboard_on_loopback():
    # With the launcher nothing off the head needs the dashboard: `ray dashboard` tunnels over ssh.
    hosts = launcher_dashboard_hosts(load(LAUNCHER))
    assert hosts and all(h in LOOPBACK for h in hosts), hosts


def test_launcher_token_comes_from_a_mounted_file():
    cfg = load(LAUNCHER)
    env = launcher_container_env(cfg)
    assert "RAY_AUTH_TOKEN" not in env, "the token itself must not be in the launcher config"
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")
    assert token_path in cfg.get("file_mounts", {}), f"{token_path} is not copied to the nodes (file_mounts)"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_token_comes_from_a_secret(path):
    doc = load(path)
    spec = kuberay_cluster_spec(doc)
    assert kuberay_pod_specs(spec), f"{path.name}: no pod spec found (the checks below would be empty)"
    for entry in env_entries(doc):
        if entry["name"] == "RAY_AUTH_TOKEN":
            assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), entry
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        # KubeRay injects RAY_AUTH_TOKEN as a secretKeyRef; infra/README.md says how to create this Secret.
        assert auth.get("secretName"), "authOptions without the secretName that infra/README.md documents"
    else:  # enabled by hand: every Ray container must read the token from a Secret
        for pod in kuberay_pod_specs(spec):
            entry = env_of(pod["containers"][0]).get("RAY_AUTH_TOKEN", {})
            assert "secretKeyRef" in entry.get("valueFrom", {}), pod["containers"][0]["name"]


@pytest.mark.parametrize("path", sorted(INFRA.iterdir()), ids=lambda p: p.name)
def test_no_literal_token_in_infra(path):
    text = path.read_text()
    literal = re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?(?!\$)[A-Za-z0-9+/_-]{8,}", text)
    assert literal is None, f"{path.name}: literal token {literal.group(0)!r}"
    assert not re.search(r"\b[0-9a-f]{32,}\b", text), f"{path.name}: something that looks like a token"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pods_run_as_non_root(path):
    for pod in kuberay_pod_specs(kuberay_cluster_spec(load(path))):
        security = pod.get("securityContext") or {}
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) != 0, security


# ---- Dockerfile -------------------------------------------------------------------------------------


def dockerfile_instructions():
    """(instruction, arguments, comment lines just above it), continuation lines joined."""
    result, comments, pending = [], [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if not pending:  # Docker drops comment lines inside a continued instruction
                comments.append(stripped.lstrip("# "))
            continue
        if not stripped:
            comments = [] if not pending else comments
            continue
        pending += " " + stripped.rstrip("\\")
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), args.strip(), comments))
        comments, pending = [], ""
    return result


def test_dockerfile_runs_as_non_root():
    users = [args for keyword, args, _ in dockerfile_instructions() if keyword == "USER"]
    assert users, "no USER: the image runs as root"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0"), final_user


def test_dockerfile_exposes_only_commented_needed_ports():
    exposed = {}
    for keyword, args, comments in dockerfile_instructions():
        if keyword == "EXPOSE":
            for port in args.split():
                exposed[int(port.split("/")[0])] = " ".join(comments)
    assert exposed, "the Dockerfile exposes no port: the checks below would pass on nothing"
    for port, comment in exposed.items():
        assert comment, f"EXPOSE {port} has no comment saying why"
    if 6379 in exposed:
        assert "needed" in exposed[6379].lower(), "EXPOSE 6379 (GCS) without saying why it is needed"
    assert 10001 not in exposed, "Ray Client exposed but nothing here uses it"
    if 8000 in exposed:  # Serve's HTTP proxy: the Ray token does not cover it, and the comment must say so
        assert "not covered" in exposed[8000].lower(), "EXPOSE 8000 (Serve) without saying the token does not cover it"


def test_readme_lists_every_declared_port():
    readme = (INFRA / "README.md").read_text()
    declared = set()
    for keyword, args, _ in dockerfile_instructions():
        if keyword == "EXPOSE":
            declared |= {int(p.split("/")[0]) for p in args.split()}
    for path in KUBERAY:
        for node in walk(load(path)):
            if isinstance(node, dict) and "containerPort" in node:
                declared.add(int(node["containerPort"]))
    declared.add(load(SERVE_CONFIG)["http_options"]["port"])
    for port in declared:
        assert re.search(rf"^\| {port} \|", readme, re.MULTILINE), f"infra/README.md has no row for port {port}"


# ---- Ray Serve: the config file and the RayService that embeds it -----------------------------------

# What may differ between infra/serve_config.yaml and the RayService's serveConfigV2, as the header of
# infra/rayservice.yaml documents: the paths (the same relative paths on the cluster volume), each tier
# replica's resources, and the proxies' host.
CLUSTER_ROOT = "/mnt/shared"
PATH_ARGS = ("small", "large", "routing.router")
RESOURCE_ARGS = ("tiers.small.num_cpus", "tiers.small.num_gpus", "tiers.large.num_cpus", "tiers.large.num_gpus")


def embedded_serve_config():
    return yaml.safe_load(load(RAYSERVICE)["spec"]["serveConfigV2"])


def the_application(config):
    (app,) = config["applications"]
    return app


def test_serve_configs_are_valid_for_ray_serve():
    schema = pytest.importorskip("ray.serve.schema").ServeDeploySchema
    for name, config in ((SERVE_CONFIG.name, load(SERVE_CONFIG)), ("serveConfigV2", embedded_serve_config())):
        (app,) = schema.model_validate(config).applications
        assert app.import_path == "serving.deploy:app_builder" and app.route_prefix == "/", name
        assert {d.name for d in app.deployments} <= {"small", "large", "ingress"}, name  # serving/app.py's names


def test_serve_config_listens_on_loopback():
    # Serve's HTTP proxy has no authentication: on one machine it stays on loopback, as python -m moe.serve.
    assert load(SERVE_CONFIG)["http_options"]["host"] in LOOPBACK


def test_rayservice_embeds_the_serve_config():
    local, cluster = load(SERVE_CONFIG), embedded_serve_config()
    assert cluster["proxy_location"] == local["proxy_location"]
    # On Kubernetes the serve Service reaches each pod's proxy at the pod's address.
    assert cluster["http_options"] == {**local["http_options"], "host": "0.0.0.0"}
    local_app, cluster_app = the_application(local), the_application(cluster)
    assert {k: v for k, v in cluster_app.items() if k != "args"} == {k: v for k, v in local_app.items() if k != "args"}
    local_args, cluster_args = local_app["args"], cluster_app["args"]
    assert cluster_args.keys() == local_args.keys()
    for key in PATH_ARGS:
        assert not local_args[key].startswith("/"), f"{SERVE_CONFIG.name}: {key} relative to the repository"
        assert cluster_args[key] == f"{CLUSTER_ROOT}/{local_args[key]}", key
    for key in local_args.keys() - set(PATH_ARGS) - set(RESOURCE_ARGS):
        assert cluster_args[key] == local_args[key], key


def test_rayservice_cluster_is_the_rayjobs():
    """Same image, Ray version, token Secret, non-root user and shared volume as the training RayJob."""
    service, job = kuberay_cluster_spec(load(RAYSERVICE)), kuberay_cluster_spec(load(RAYJOB))
    pinned = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (INFRA.parent / "pyproject.toml").read_text()).group(1)
    assert service["rayVersion"] == job["rayVersion"] == pinned
    assert service["authOptions"] == job["authOptions"]
    pods = list(kuberay_pod_specs(service))
    job_pod = next(kuberay_pod_specs(job))
    assert {c["image"] for pod in pods for c in pod["containers"]} == {job_pod["containers"][0]["image"]}
    for pod in pods:
        assert pod["securityContext"] == job_pod["securityContext"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
        assert claims.get(mounts.get(CLUSTER_ROOT)) == "moe-shared", pod["containers"][0]["name"]


def test_rayservice_serve_port_stays_in_the_cluster():
    doc = load(RAYSERVICE)
    spec = kuberay_cluster_spec(doc)
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    # KubeRay builds the serve Service from the head container's port named `serve`.
    ports = {p.get("name"): p["containerPort"] for p in head.get("ports", [])}
    assert ports.get("serve") == embedded_serve_config()["http_options"]["port"]
    # The Serve API has no authentication: its Service (type from headGroupSpec) is not published.
    service_type = (doc["spec"].get("serveService") or {}).get("spec", {}).get("type")
    assert (service_type or spec["headGroupSpec"].get("serviceType", "ClusterIP")) == "ClusterIP"


def test_rayservice_has_the_gpus_its_tiers_scale_to():
    app = the_application(embedded_serve_config())
    overrides = {d["name"]: d for d in app["deployments"]}
    needed = 0
    for tier in ("small", "large"):
        override = overrides.get(tier, {})
        replicas = (override.get("autoscaling_config") or {}).get("max_replicas") or override.get("num_replicas", 1)
        needed += replicas * app["args"].get(f"tiers.{tier}.num_gpus", 0)
    available = 0
    for group in kuberay_cluster_spec(load(RAYSERVICE))["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        available += group["maxReplicas"] * int(limits.get("nvidia.com/gpu", 0))
    assert 0 < needed <= available, (needed, available)
