"""Spot-friendly cluster definitions: the GPU pools are spot / preemptible capacity, the head (and
the RayJob submitter) never are, and the training they run is elastic with its checkpoints off the
spot nodes. Parsed, not run: Ray's own launcher validation, the KubeRay CRD schemas, and the
Kubernetes node-affinity and toleration rules applied to example nodes."""
import re
import shlex

import pytest

from test_clusters import CLUSTERS, load, pod_templates, ray_up_config, validate_manifest

# the node labels that mark spot capacity: EKS managed node groups, Karpenter, GKE Spot node pools
SPOT_LABELS = {"eks.amazonaws.com/capacityType": "SPOT", "karpenter.sh/capacity-type": "spot",
               "cloud.google.com/gke-spot": "true"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
# example nodes: labels and taints as each platform sets them (the GKE taint is the one its docs give)
NODES = {
    "eks-spot-gpu": ({"eks.amazonaws.com/capacityType": "SPOT"},
                     [GPU_TAINT, {"key": "eks.amazonaws.com/capacityType", "value": "SPOT", "effect": "NoSchedule"}]),
    "eks-on-demand": ({"eks.amazonaws.com/capacityType": "ON_DEMAND"}, []),
    "karpenter-spot-gpu": ({"karpenter.sh/capacity-type": "spot"}, [GPU_TAINT]),
    "karpenter-on-demand": ({"karpenter.sh/capacity-type": "on-demand"}, []),
    "gke-spot-gpu": ({"cloud.google.com/gke-spot": "true"},
                     [GPU_TAINT, {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}]),
    "gke-preemptible": ({"cloud.google.com/gke-preemptible": "true"}, []),
    "gke-standard": ({"cloud.google.com/gke-nodepool": "default-pool"}, []),
    "unlabelled": ({}, []),
}
SPOT_NODES = {"eks-spot-gpu", "karpenter-spot-gpu", "gke-spot-gpu"}
ON_DEMAND_NODES = {"eks-on-demand", "karpenter-on-demand", "gke-standard", "unlabelled"}


def launcher_spot(provider, node_config):
    """Whether the cloud launches this node type as spot / preemptible capacity."""
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_gpu_pools_are_spot_and_the_head_is_not(name, provider):
    _, config = ray_up_config(name)  # what `ray up` validates
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert not launcher_spot(provider, types[head]["node_config"])
    workers = {n: t for n, t in types.items() if n != head}
    assert workers and all(launcher_spot(provider, t["node_config"]) for t in workers.values())
    gpu = [t["node_config"] for t in workers.values() if t["resources"].get("GPU")]
    assert gpu
    for nc in gpu:
        if provider == "aws":
            # reclaimed means gone: a stopped or hibernated spot node would keep its place in max_workers
            assert nc["InstanceMarketOptions"]["SpotOptions"] == {"SpotInstanceType": "one-time",
                                                                  "InstanceInterruptionBehavior": "terminate"}
        else:
            # Compute Engine refuses Spot VMs and GPU machines that restart or migrate by themselves
            assert nc["scheduling"] == {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                                        "onHostMaintenance": "TERMINATE", "automaticRestart": False}


def affinity_admits(pod, labels):
    """Kubernetes' required node affinity: any term whose expressions all hold (NotIn and
    DoesNotExist hold where the label is absent)."""
    required = (pod.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if not required:
        return True

    def holds(e):
        value = labels.get(e["key"])
        return {"In": value in e.get("values", []), "NotIn": value not in e.get("values", []),
                "Exists": value is not None, "DoesNotExist": value is None}[e["operator"]]

    return any(all(holds(e) for e in term.get("matchExpressions", [])) for term in required["nodeSelectorTerms"])


def tolerates(pod, taints):
    def tolerated(taint):
        return any(t.get("key") == taint["key"] and t.get("effect", taint["effect"]) == taint["effect"]
                   and (t.get("operator") == "Exists" or t.get("value") == taint["value"])
                   for t in pod.get("tolerations", []))

    return all(tolerated(taint) for taint in taints if taint["effect"] in ("NoSchedule", "NoExecute"))


def schedulable_on(pod):
    return {name for name, (labels, taints) in NODES.items() if affinity_admits(pod, labels) and tolerates(pod, taints)}


@pytest.mark.parametrize("name, crd", [("raycluster.yaml", "ray.io_rayclusters.yaml"),
                                       ("rayjob.yaml", "ray.io_rayjobs.yaml")])
def test_kuberay_gpu_pods_land_on_spot_nodes_only_and_the_head_never(name, crd):
    path = CLUSTERS / "kuberay" / name
    validate_manifest(path, crd)  # the placement fields are the pod spec's, misspellings refused
    spec, templates = pod_templates(path)
    gpu_groups = {g["groupName"] for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))}
    assert gpu_groups
    for where, tpl in templates:
        pod = tpl["spec"]
        if where in gpu_groups:
            # every spot platform's GPU nodes, nothing else: no on-demand GPU node is paid for by accident
            assert schedulable_on(pod) == SPOT_NODES, where
            required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert {e["key"] for t in required["nodeSelectorTerms"] for e in t["matchExpressions"]} == set(SPOT_LABELS)
        elif where in ("head", "submitter"):
            # the GCS, the driver and the job's submitter: never on capacity that may be reclaimed
            assert schedulable_on(pod) == ON_DEMAND_NODES, where


def entrypoint_argv(command):
    argv = shlex.split(command)
    assert re.search(r"ray_job\.py$", argv[1]) and argv[2] == "train", command
    return argv[3:]


def flag(argv, name):
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


def launcher_train_commands(name):
    """The `submit -- train ...` command in a launcher YAML's header, continuation lines joined."""
    lines = [ln[1:].strip() for ln in open(CLUSTERS / name) if ln.startswith("#")]
    text = " ".join(lines).replace("\\ ", " ")
    return [m.group(1) for m in re.finditer(r"--wait -- (train .*?)(?= ray down| python ray_job\.py|$)", text)]


def test_the_rayjob_trains_elastically_between_its_gpu_groups_bounds():
    doc = load(CLUSTERS / "kuberay" / "rayjob.yaml")
    argv = entrypoint_argv(doc["spec"]["entrypoint"])
    low, high = map(int, re.fullmatch(r"(\d+)-(\d+)", flag(argv, "--workers")).groups())
    assert flag(argv, "--max-failures") == "-1"  # spot losses have no fixed count
    gpus_per_worker = float(flag(argv, "--gpus-per-worker"))
    cluster = doc["spec"]["rayClusterSpec"]
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    pod_gpus = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    # the job starts on the group's minimum and grows to its maximum: whole pods at both ends
    assert low * gpus_per_worker == gpu["minReplicas"] * pod_gpus == gpu["replicas"] * pod_gpus
    assert high * gpus_per_worker == gpu["maxReplicas"] * pod_gpus and low < high
    assert cluster["enableInTreeAutoscaling"] is True  # without it the group never leaves minReplicas
    # checkpoints on the shared volume every pod mounts, never a spot node's disk
    assert flag(argv, "--run-dir").startswith("/mnt/shared/") and "--checkpoint-storage" not in argv


@pytest.mark.parametrize("name, store", [("aws.yaml", "s3://"), ("gcp.yaml", "gs://")])
def test_the_launcher_train_command_is_elastic_over_the_gpu_pool(name, store):
    (command,) = launcher_train_commands(name)
    argv = shlex.split(command)[1:]
    low, high = map(int, re.fullmatch(r"(\d+)-(\d+)", flag(argv, "--workers")).groups())
    assert flag(argv, "--max-failures") == "-1"
    assert flag(argv, "--checkpoint-storage").startswith(store) and flag(argv, "--run-dir").startswith("/mnt/shared/")
    _, config = ray_up_config(name)
    (gpu,) = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    per_node = gpu["resources"]["GPU"] / float(flag(argv, "--gpus-per-worker"))
    assert low == per_node and high == gpu["max_workers"] * per_node  # one node at least, the whole pool at most


def test_the_readme_says_what_a_reclaimed_node_costs():
    readme = open(CLUSTERS / "README.md").read()
    section = readme[readme.index("## Spot and preemptible nodes"):]
    assert "restart time from node loss to first step on the smaller group:" in section
    assert "steps redone: up to `checkpoint_every`" in section
