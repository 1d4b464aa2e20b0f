"""Validate custom resources against a CRD's ``openAPIV3Schema`` offline, as strictly as the
API server: unknown fields are errors (the server prunes them silently, so a misspelt key
would vanish), ``x-kubernetes-int-or-string`` takes either, and ``list-type: map``/``set``
lists may not repeat a key. CEL rules (``x-kubernetes-validations``) are not evaluated.

The CRDs are KubeRay's, in ``shared/k8s-crds/`` beside the repository (CI clones it the
same way); a missing directory is a failure, not a skip.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import ValidationError, validators
from openapi_schema_validator import OAS30StrictValidator

CRD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "k8s-crds"
CRD_FILES = {("ray.io", "RayService"): "ray.io_rayservices.yaml", ("ray.io", "RayCluster"): "ray.io_rayclusters.yaml"}


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a structural schema in which every object with ``properties`` is closed."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict_schema(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _unique_list(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    """``x-kubernetes-list-type``: a ``map`` list is keyed by its map keys (defaults applied),
    a ``set`` list by its items; the API server rejects repeats."""
    if not validator.is_type(instance, "array") or list_type not in ("map", "set"):
        return
    if list_type == "map":
        props = schema.get("items", {}).get("properties", {})
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [json.dumps([item.get(k, props.get(k, {}).get("default")) for k in keys]) for item in instance]
    else:
        seen = [json.dumps(item, sort_keys=True) for item in instance]
    repeated = sorted({s for s in seen if seen.count(s) > 1})
    if repeated:
        yield ValidationError(f"list-type {list_type}: repeated entries {', '.join(repeated)}")


KubeValidator = validators.extend(OAS30StrictValidator, {"x-kubernetes-list-type": _unique_list})


@functools.cache
def crd_validator(group: str, kind: str, version: str) -> Any:
    """The strict validator of ``kind`` (``group/version``) from the stored KubeRay CRDs."""
    if not CRD_DIR.is_dir():
        raise FileNotFoundError(f"KubeRay CRDs not found at {CRD_DIR}: the repo must sit beside shared/")
    crd = yaml.safe_load((CRD_DIR / CRD_FILES[(group, kind)]).read_text())
    (schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]
    return KubeValidator(strict_schema(schema), format_checker=OAS30StrictValidator.FORMAT_CHECKER)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema error of one RayService/RayCluster document, as ``path: message``."""
    group, version = doc["apiVersion"].split("/")
    validator = crd_validator(group, doc["kind"], version)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
