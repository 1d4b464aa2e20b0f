"""``kvferry k8s render``: the generator's rules and refusals, its CLI, and the strictness of the
CRD validation the manifest tests rely on."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import ServeConfig
from cluster.k8s import DeploySpec, render
from cluster.k8s.spec import quantity_value
from tests.deploy.crd_schema import crd_errors

runner = CliRunner()


def _groups(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def test_colocated_mode_gets_one_mixed_group_sized_by_its_autoscaling() -> None:
    cfg = ServeConfig.model_validate({"mode": "colocated", "mixed": {
        "num_replicas": "auto", "autoscaling": {"min_replicas": 2, "max_replicas": 5, "initial_replicas": 3}}})
    doc = render(cfg, DeploySpec())
    (group,) = _groups(doc).values()
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"], group["replicas"]) == ("mixed", 2, 5, 3)
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert [d["name"] for d in serve["applications"][0]["deployments"]] == ["mixed", "ingress"]
    assert crd_errors(doc) == []


def test_pool_labels_and_resources_of_its_own_carry_over_to_its_group() -> None:
    cfg = ServeConfig.model_validate({"decode": {"num_gpus": 2, "num_cpus": 3, "node_labels": {"tier": "fast"},
                                                 "resources": {"ssd": 1}}})
    doc = render(cfg, DeploySpec(spare_cpus=0.5))
    decode = _groups(doc)["decode"]
    assert decode["labels"] == {"tier": "fast", "kvferry.io/pool": "decode"}
    assert decode["resources"] == {"CPU": "4", "GPU": "2", "kvferry_replica": "1", "ssd": "1"}
    container = decode["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    args = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["decode"]["resources"] == {"ssd": 1.0, "kvferry_replica": 1.0}
    assert args["http"]["host"] == "0.0.0.0"  # a pod's proxy listens beyond loopback


@pytest.mark.parametrize("port", [9100, 0])
def test_grpc_port_sets_the_proxy_and_the_serve_grpc_port_and_0_leaves_both_out(port: int) -> None:
    doc = render(ServeConfig.model_validate({"grpc": {"port": port}}), DeploySpec())
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    pods = [doc["spec"]["rayClusterConfig"]["headGroupSpec"], *_groups(doc).values()]
    ports = [{p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0]["ports"]} for g in pods]
    if port:
        assert serve["grpc_options"] == {"port": port, "enable_reflection": True, "grpc_servicer_functions": [
            "cluster.grpc.kvferry_pb2_grpc.add_InferenceServicer_to_server"]}
        assert all(p["serve-grpc"] == port for p in ports)
    else:
        assert "grpc_options" not in serve and not any("serve-grpc" in p for p in ports)
    assert crd_errors(doc) == []


def test_namespace_and_object_store_fit_in_dev_shm() -> None:
    from cluster.k8s.pods import object_store_bytes, shm_size

    spec = DeploySpec.model_validate({"namespace": "llm", "pools": {"prefill": {"object_store_memory": "1Gi"}}})
    doc = render(ServeConfig(), spec)
    assert doc["metadata"]["namespace"] == "llm"
    prefill = _groups(doc)["prefill"]
    store = int(prefill["rayStartParams"]["object-store-memory"])
    (shm,) = [v for v in prefill["template"]["spec"]["volumes"] if v["name"] == "shm"]
    # Ray puts the store on slow disk unless /dev/shm has at least its size free.
    assert store == 2**30 and quantity_value(shm["emptyDir"]["sizeLimit"]) > store
    assert shm_size(spec.pool_shape("prefill")) == "1280Mi" and object_store_bytes(spec.head) == str(256 * 2**20)


@pytest.mark.parametrize(("config", "spec", "message"), [
    ({"decode": {"num_gpus": 0.5}}, {}, "cannot share a GPU"),
    ({"prefill": {"num_replicas": 0}}, {}, "at least one replica"),
    ({"metrics": {"export_port": 0}}, {}, "metrics.export_port"),
    ({"prefill": {"node_labels": {"kvferry.io/pool": "decode"}}}, {}, "pins it to prefill"),
    ({"ingress": {"num_replicas": 4, "num_cpus": 1}}, {"spare_cpus": 1}, "spare CPUs"),
    ({"model": {"model": "/data/m"}}, {"model_volume": {"claim_name": "m", "mount_path": "/models"}}, "mount path"),
    ({"mode": "colocated"}, {"pools": {"decode": {}}}, "does not have"),
])
def test_render_refuses_what_cannot_run_on_kubernetes(config: dict, spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(ServeConfig.model_validate(config), DeploySpec.model_validate(spec))


@pytest.mark.parametrize(("spec", "message"), [
    ({"imagee": "x"}, "imagee"),
    ({"name": "Kvferry_1"}, "name"),
    ({"head": {"memory": "1Gi", "object_store_memory": "2Gi"}}, "must be below memory"),
    ({"pools": {"decode": {"memory": "lots"}}}, "not a Kubernetes quantity"),
])
def test_deploy_description_is_strict(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeploySpec.model_validate(spec)


def test_quantities() -> None:
    assert quantity_value("1Gi") == 2**30 and quantity_value("500m") == 0.5 and quantity_value("2") == 2


def test_cli_writes_the_rayservice(tmp_path: Path) -> None:
    cfg, deploy, out = tmp_path / "kvferry.yaml", tmp_path / "deploy.yaml", tmp_path / "rs.yaml"
    cfg.write_text("mode: colocated\nmixed: {num_replicas: 1}\n")
    deploy.write_text("name: demo\nimage: registry.example/kvferry:1\n")
    res = runner.invoke(app, ["k8s", "render", "--config", str(cfg), "--deploy", str(deploy), "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert text.startswith("# Generated by `kvferry k8s render` from kvferry.yaml + deploy.yaml")
    doc = yaml.safe_load(text)
    assert doc["metadata"]["name"] == "demo" and list(_groups(doc)) == ["mixed"]
    assert crd_errors(doc) == []


def test_cli_prints_to_stdout_without_out(tmp_path: Path) -> None:
    cfg = tmp_path / "kvferry.yaml"
    cfg.write_text("{}\n")
    res = runner.invoke(app, ["k8s", "render", "--config", str(cfg)])
    assert res.exit_code == 0 and yaml.safe_load(res.stdout)["kind"] == "RayService"


@pytest.mark.parametrize(("config", "deploy", "message"), [
    ("modle: {}\n", None, "modle"),
    ("decode: {num_gpus: 0.5}\n", None, "cannot share a GPU"),
    ("{}\n", "imagee: x\n", "imagee"),
    ("decode: [unclosed\n", None, "cannot render"),
])
def test_cli_bad_input_exits_2_with_the_reason_and_no_traceback(
    tmp_path: Path, config: str, deploy: str | None, message: str
) -> None:
    cfg = tmp_path / "kvferry.yaml"
    cfg.write_text(config)
    args = ["k8s", "render", "--config", str(cfg), "--out", str(tmp_path / "rs.yaml")]
    if deploy is not None:
        (tmp_path / "deploy.yaml").write_text(deploy)
        args += ["--deploy", str(tmp_path / "deploy.yaml")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "cannot render" in res.output and message in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)  # a clean exit, not a crash
    assert not (tmp_path / "rs.yaml").exists()


def test_cli_missing_config_file_exits_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["k8s", "render", "--config", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "cannot render" in res.output and "Traceback" not in res.output


@pytest.fixture(scope="module")
def base_doc() -> dict[str, Any]:
    return render(ServeConfig(), DeploySpec())


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["spec"].update(serveConfig="x"), "'serveConfig' was unexpected"),
    (lambda d: _groups(d)["decode"].update(minReplica=1), "'minReplica' was unexpected"),
    (lambda d: _groups(d)["decode"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
     "'imagePullPolicyy' was unexpected"),
    (lambda d: _groups(d)["decode"].update(maxReplicas="4"), "'4' is not of type 'integer'"),
    (lambda d: d["spec"]["rayClusterConfig"]["autoscalerOptions"].update(version="v3"), "'v3' is not one of"),
    (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "0 is not of type 'string'"),
    (lambda d: _groups(d)["decode"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "TOKENIZERS_PARALLELISM", "value": "true"}), "repeated entries"),
])
def test_crd_validation_rejects_unknown_fields_and_wrong_types(base_doc: dict, mutate: Any, message: str) -> None:
    assert crd_errors(base_doc) == []
    bad = copy.deepcopy(base_doc)
    mutate(bad)
    errors = crd_errors(bad)
    assert any(message in e for e in errors), errors


def test_crd_validation_honours_int_or_string() -> None:
    from tests.deploy.crd_schema import strict_schema

    schema = strict_schema({"type": "object", "properties": {"port": {"type": "string", "x-kubernetes-int-or-string": True}}})
    assert schema["properties"]["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert schema["additionalProperties"] is False
