"""Cluster definitions: the launcher YAMLs pass Ray's own validation (the defaults merge and
schema check `ray up` does before touching a cloud), the KubeRay manifests validate against the
RayCluster / RayJob CRDs' openAPIV3Schema, and every definition keeps the security defaults."""
import copy
import functools
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT

CLUSTERS = ROOT / "clusters"
# KubeRay's CRDs (Apache-2.0) are not vendored: MMTRAIN_KUBERAY_CRDS names a folder holding
# ray.io_rayclusters.yaml and ray.io_rayjobs.yaml; our CI keeps them in ../shared/schemas/kuberay
CRDS = Path(os.environ.get("MMTRAIN_KUBERAY_CRDS") or ROOT.parent / "shared" / "schemas" / "kuberay")


def load(path):
    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def ray_up_config(name):
    """What `ray up` does with the file before it calls the cloud provider: merge the provider's
    defaults, merge setup commands, check docker settings, fill node type limits, validate
    against ray/autoscaler/ray-schema.json (plus Ray's cross-field checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(CLUSTERS / name)
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return raw, config


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_yaml_passes_rays_validation_and_is_secure(name, provider):
    raw, config = ray_up_config(name)
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head runs no tasks
    cpu = [t for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert cpu and gpu
    for t in cpu + gpu:
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu) >= 64
    assert sum(t["max_workers"] for t in cpu + gpu) <= config["max_workers"]

    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "RAY_AUTH_MODE=token ray start --address" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "object_spilling_config" in head_start and "--object-store-memory" in worker_start
    # the token travels as a file from the user's machine, never in the YAML
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", open(CLUSTERS / name).read())
    # the project is installed on every node, copied from an allow-list (never the whole checkout)
    assert any("pip install" in c and "raymm" in c for c in config["setup_commands"])
    project = {k: v for k, v in raw["file_mounts"].items() if k.startswith("~/raymm")}
    assert project == {f"~/raymm/{n}": f"./{n}" for n in LAUNCHER_UPLOAD}
    assert ".*" in config["rsync_exclude"]  # no hidden files (.env) from inside those folders, at any depth


# what the launcher YAMLs copy to the nodes: the job upload's allow-list plus pyproject's readme
LAUNCHER_UPLOAD = ("ray_job.py", "pyproject.toml", "README.md", "pipelines", "mmtrain", "clusters", "configs")


def test_aws_nodes_get_least_privilege_profiles_imdsv2_and_no_world_open_ssh():
    _, config = ray_up_config("aws.yaml")
    types = config["available_node_types"]
    for name, t in types.items():
        nc = t["node_config"]
        # IMDSv2 only: the instance profile's credentials need a session token
        assert nc["MetadataOptions"]["HttpTokens"] == "required", name
        assert nc["MetadataOptions"]["HttpPutResponseHopLimit"] == 1, name
        # a security group the user made: Ray creates none (its own admits ssh from 0.0.0.0/0)
        assert nc["SecurityGroupIds"] and all(g.startswith("sg-") for g in nc["SecurityGroupIds"]), name
        role = "raymm-head" if name == config["head_node_type"] else "raymm-worker"
        assert nc["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{role}"), name
    assert "security_group" not in config["provider"]

    head = json.load(open(CLUSTERS / "aws-iam" / "raymm-head-policy.json"))
    worker = json.load(open(CLUSTERS / "aws-iam" / "raymm-worker-policy.json"))
    for policy in (head, worker):
        for st in policy["Statement"]:
            assert st["Effect"] == "Allow"
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert not any(a == "*" or a.endswith(":*") for a in actions), st  # no wildcard actions
            if any(a.startswith("s3:") for a in actions):
                assert st["Resource"] in ("arn:aws:s3:::DATA_BUCKET", "arn:aws:s3:::DATA_BUCKET/*",
                                          "arn:aws:s3:::RUNS_BUCKET", "arn:aws:s3:::RUNS_BUCKET/RUNS_PREFIX/*"), st
                writes = {"s3:PutObject", "s3:DeleteObject"} & set(actions)
                assert not writes or st["Resource"] == "arn:aws:s3:::RUNS_BUCKET/RUNS_PREFIX/*", st
            if any(a in ("ec2:TerminateInstances", "ec2:StopInstances") for a in actions):
                assert st["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == config["cluster_name"]
            if "iam:PassRole" in actions:
                assert st["Resource"].endswith(":role/raymm-worker")
    assert not any(a.startswith(("ec2:", "iam:")) for st in worker["Statement"] for a in st["Action"])
    assert {st["Sid"] for st in worker["Statement"]} < {st["Sid"] for st in head["Statement"]}


def test_gcp_nodes_run_as_their_own_service_accounts_on_a_firewalled_network():
    _, config = ray_up_config("gcp.yaml")
    for name, t in config["available_node_types"].items():
        nc = t["node_config"]
        account = "raymm-head" if name == config["head_node_type"] else "raymm-worker"
        assert [a["email"].split("@")[0] for a in nc["serviceAccounts"]] == [account], name
        # not the project's default network (its default-allow-ssh admits 0.0.0.0/0): a subnetwork
        # whose firewall admits ssh from the user's range, and the tag the rules target
        (nic,) = nc["networkInterfaces"]
        assert nic["subnetwork"].endswith("/subnetworks/raymm-us-central1") and "network" not in nic, name
        assert nc["tags"]["items"] == ["raymm"], name
        assert nc["shieldedInstanceConfig"]["enableSecureBoot"] is True, name
    readme = open(CLUSTERS / "README.md").read()
    assert "--source-ranges" in readme and "--target-tags raymm" in readme


def test_launcher_validation_catches_mistakes():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(CLUSTERS / "aws.yaml")
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["resourcez"] = {"GPU": 8}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


@functools.lru_cache(maxsize=None)
def _crd(file):
    if not (CRDS / file).exists():
        pytest.skip(f"the KubeRay CRD {file} is not in {CRDS}: set MMTRAIN_KUBERAY_CRDS to a folder with "
                    f"KubeRay's CRDs (ray-operator/config/crd/bases in the kuberay repository)")
    return load(CRDS / file)


def crd_schema(file, version="v1"):
    crd = _crd(file)
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return crd["spec"]["names"]["kind"], copy.deepcopy(v["schema"]["openAPIV3Schema"])


def strict(schema):
    """The CRD schema with unknown fields refused (what `kubectl apply --validate=strict` does;
    the API server would otherwise drop a misspelled field silently)."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if not isinstance(s, dict):
            return
        if (s.get("type") == "object" and "properties" in s and "additionalProperties" not in s
                and not s.get("x-kubernetes-preserve-unknown-fields")):
            s["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for sub in (s.get(key) or {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "not"):
            walk(s.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in s.get(key) or []:
                walk(sub)

    walk(schema)
    # metadata is ObjectMeta, validated by the API server, not by the CRD
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate_manifest(path, crd_file):
    kind, schema = crd_schema(crd_file)
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    jsonschema.Draft7Validator(strict(schema)).validate(doc)
    return doc


def check_cluster_spec(spec):
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"] == {"mode": "token", "secretName": "raymm-ray-auth"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head.get("serviceType", "ClusterIP") == "ClusterIP"
    groups = spec["workerGroupSpecs"]
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                       .get("nvidia.com/gpu", 0)) for g in groups)
    assert gpus >= 64
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    # every pod mounts the shared volume the run directories live on
    for tpl in [head["template"]] + [g["template"] for g in groups]:
        mounts = {m["mountPath"] for c in tpl["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert "/mnt/shared" in mounts and "/dev/shm" in mounts


def no_literal_token(path):
    doc = load(path)

    def walk(x):
        if isinstance(x, dict):
            if x.get("name") == "RAY_AUTH_TOKEN":
                assert "value" not in x, "a token must come from a Secret"
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)


def test_kuberay_raycluster_validates_against_the_crd():
    path = CLUSTERS / "kuberay" / "raycluster.yaml"
    doc = validate_manifest(path, "ray.io_rayclusters.yaml")
    check_cluster_spec(doc["spec"])
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    no_literal_token(path)


def test_kuberay_rayjob_validates_against_the_crd():
    path = CLUSTERS / "kuberay" / "rayjob.yaml"
    doc = validate_manifest(path, "ray.io_rayjobs.yaml")
    spec = doc["spec"]
    assert re.match(r"^python \S*ray_job\.py train ", spec["entrypoint"])
    assert "--run-dir /mnt/shared/" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["entrypointNumCpus"] == 0
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["PYTHONUNBUFFERED"] == "1"
    check_cluster_spec(spec["rayClusterSpec"])
    no_literal_token(path)


def test_crd_validation_catches_mistakes():
    _, schema = crd_schema("ray.io_rayclusters.yaml")
    doc = load(CLUSTERS / "kuberay" / "raycluster.yaml")
    bad = copy.deepcopy(doc)
    bad["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # misspelled: dropped silently by the API server
    jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(strict(schema)).validate(bad)


def test_local_cluster_token_is_generated_0600_and_never_in_the_state(tmp_path, monkeypatch):
    from clusters import local, local_nodes

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path, source, generated = local._resolve_token(str(tmp_path), None)
    assert generated and source == "generated" and path == str(tmp_path / "auth_token")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    token = open(path).read()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    env = local_nodes.node_env("127.0.0.1:1", path)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == path and "RAY_AUTH_TOKEN" not in env
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # every node on 127.0.0.1
    state = {"token_file": path, "dashboard_url": "http://127.0.0.1:1", "token_source": source}
    lines = "\n".join(local.env_lines(state))
    assert f"RAY_AUTH_TOKEN_PATH={path}" in lines and token not in lines

    # Ray's order: RAY_AUTH_TOKEN wins and stays in the environment, not in a file
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    assert local._resolve_token(str(tmp_path / "other"), None) == (None, "RAY_AUTH_TOKEN", False)


def test_local_cluster_ports_are_all_distinct_even_when_the_kernel_repeats_one(monkeypatch):
    """A released port is free again at once; a repeat among one cluster's ports stops Ray's
    head ("port ... is used by other components"), so free_port never hands one out twice."""
    import socket

    from clusters import local_nodes

    monkeypatch.setattr(local_nodes, "_HANDED_OUT", set())
    first = local_nodes.free_port()
    real_bind = socket.socket.bind
    repeats = iter([first, first])   # the kernel gives the same port back twice, then any

    def bind(self, addr):
        host, port = addr
        return real_bind(self, (host, next(repeats, 0) if port == 0 else port))

    monkeypatch.setattr(socket.socket, "bind", bind)
    ports = [local_nodes.free_port() for _ in range(20)] + [local_nodes.free_port(first)]
    assert first not in ports
    assert len(set(ports)) == len(ports)


def test_local_cluster_refuses_a_temp_dir_too_long_for_unix_sockets(tmp_path):
    from clusters import local

    with pytest.raises(local.LocalClusterError, match="too long"):
        local.start(str(tmp_path / ("x" * 80)))


def test_the_token_is_found_in_rays_order_and_a_broken_token_file_is_one_line(tmp_path, monkeypatch):
    from clusters import auth

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert auth.locate() is None and auth.client_token() == (None, auth.LOOKED_IN)
    home = tmp_path / "home" / ".ray" / "auth_token"
    home.parent.mkdir(parents=True)
    home.write_text("")
    with pytest.raises(auth.TokenError, match="is empty"):  # present but broken: said, not skipped
        auth.client_token()
    home.write_text("from-home\n")
    assert auth.client_token() == ("from-home", f"~/.ray/auth_token ({home})")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(auth.TokenError, match="RAY_AUTH_TOKEN_PATH .*missing cannot be read"):
        auth.client_token()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth.client_token() == ("from-env", "RAY_AUTH_TOKEN")
    assert auth.locate(str(home)) == auth.TokenPlace("--token-file", str(home))  # the flag comes first
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth.client_token()[0] is None
    assert auth.auth_header(None) == {} and auth.auth_header("t") == {"Authorization": "Bearer t"}


def test_a_jobs_environment_is_refused_by_name_whatever_the_value_and_by_value():
    from clusters.job_package import JobCommandError, refuse_secrets

    refuse_secrets(["make-corpus", "/abs/c"], ["FOO=1", "CACHE=anon"], "nightly")
    with pytest.raises(JobCommandError) as e:
        refuse_secrets(["make-corpus", "/abs/c"], ["AWS_SESSION_TOKEN=", "RAY_AUTH_MODE=disabled", "FOO=1",
                                                   "BAR=AKIA" + "Q" * 16])
    message = str(e.value)
    assert "--env AWS_SESSION_TOKEN" in message and "--env RAY_AUTH_MODE" in message and "--env BAR" in message
    assert "FOO" not in message and "AKIA" not in message and "\n" not in message


def test_the_job_upload_is_an_allow_list_of_project_folders(tmp_path):
    """What Ray zips for a job (its own packaging, on our package folder) holds only the
    project's code and configs: decoys for everything a checkout accumulates stay behind."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from clusters import jobs

    root = tmp_path / "checkout"
    for name in ("ray_job.py", "pyproject.toml", "mmtrain/loop.py", "pipelines/source.py", "clusters/jobs.py",
                 "configs/tiny.json", "README.md", ".env", ".git/config", ".venv/bin/python", "runs/r/run_config.json",
                 "data/shard-000000.tar", "notes/aws_credentials", "mmtrain/.env", "configs/.secrets.json",
                 "pipelines/__pycache__/source.cpython-311.pyc", "configs/local.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("decoy" if "." in name.rsplit("/", 1)[-1][1:] or "/" in name else "x")
    (root / ".gitignore").write_text("configs/local.json\n")
    (root / "configs" / "aws").symlink_to(root / "notes")  # a link inside an allowed folder: not followed
    with jobs.project_package(str(root)) as package:
        zipped = tmp_path / "job.zip"
        create_package(package, zipped, include_gitignore=True, excludes=jobs.DEFAULT_EXCLUDES)
        names = sorted(n for n in zipfile.ZipFile(zipped).namelist() if not n.endswith("/"))
    assert not os.path.exists(package)  # the copy is gone once the job is submitted
    assert names == [".gitignore", "clusters/jobs.py", "configs/tiny.json", "mmtrain/loop.py", "pipelines/source.py",
                     "pyproject.toml", "ray_job.py"]

    # the real project: the allow-list matches its layout (everything a job needs is there)
    with jobs.project_package() as package:
        uploaded = set(os.listdir(package))
        assert {"ray_job.py", "mmtrain", "pipelines", "clusters", "configs"} <= uploaded
        assert jobs.check_package(package, jobs.DEFAULT_EXCLUDES) < 5 * 1024 * 1024
    assert not set(uploaded) & {".git", ".venv", "runs", "tests", "benchmarks", ".env"}


def pod_templates(path):
    """(where, pod spec) of every pod a KubeRay manifest makes: head, worker groups, submitter."""
    doc = load(path)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    found = [("head", spec["headGroupSpec"]["template"])]
    found += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    if "submitterPodTemplate" in doc["spec"]:
        found.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return spec, found


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_pods_run_unprivileged_without_a_token_or_a_client_port(name):
    spec, templates = pod_templates(CLUSTERS / "kuberay" / name)
    assert len(templates) == 3  # raycluster: head, cpu, gpu; rayjob: head, gpu, submitter
    for where, tpl in templates:
        pod = tpl["spec"]
        assert pod["automountServiceAccountToken"] is False, where
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, where
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in pod["containers"] + pod.get("initContainers", []):
            cc = c["securityContext"]
            assert cc["allowPrivilegeEscalation"] is False and cc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert not cc.get("privileged") and cc.get("runAsUser", 1) != 0 and "add" not in cc["capabilities"]
            assert all(p["containerPort"] != 10001 and p.get("name") != "client" for p in c.get("ports", []))
        if where != "submitter":
            assert tpl["metadata"]["labels"]["app.kubernetes.io/part-of"] == "raymm"  # networkpolicy.yaml's selector
    assert "ray-client-server-port" not in spec["headGroupSpec"]["rayStartParams"]
    autoscaler = spec.get("autoscalerOptions")
    if spec.get("enableInTreeAutoscaling"):
        # the sidecar alone gets a service account token, from a projected volume of the head pod
        assert autoscaler["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        (mount,) = autoscaler["volumeMounts"]
        assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and mount["readOnly"] is True
        (volume,) = [v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        assert any("serviceAccountToken" in s for s in volume["projected"]["sources"])
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert mount["name"] not in {m["name"] for m in head["volumeMounts"]}


def test_kuberay_network_policy_admits_other_pods_to_the_dashboard_only():
    doc = load(CLUSTERS / "kuberay" / "networkpolicy.yaml")
    assert doc["kind"] == "NetworkPolicy" and doc["spec"]["policyTypes"] == ["Ingress"]
    selector = doc["spec"]["podSelector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/part-of": "raymm", "ray.io/is-ray-node": "yes"}
    peers, public = doc["spec"]["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": selector}}]}  # Ray pods: every port
    assert public == {"ports": [{"protocol": "TCP", "port": 8265}]}  # anyone else: the Jobs API only


def test_the_image_build_context_is_an_allow_list():
    lines = [ln.strip() for ln in open(CLUSTERS / "kuberay" / "Dockerfile.dockerignore")
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # everything out, then back in by name
    assert tuple(ln[1:] for ln in lines if ln.startswith("!")) == LAUNCHER_UPLOAD
    assert "**/.*" in lines[lines.index("!configs"):]  # hidden files stay out of the allowed folders too
