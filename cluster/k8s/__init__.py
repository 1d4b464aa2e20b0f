"""Kubernetes deployment of kvferry: ``ServeConfig`` + deploy description -> KubeRay RayService.

``render`` (``rayservice.py``) is what ``kvferry k8s render`` runs; ``spec.py`` is the deploy
description (image, pod sizes, volumes); ``pinning.py`` ties each pool to its worker group;
``serve_config.py`` builds ``serveConfigV2``; ``pods.py`` the pod templates. The committed
manifests under ``k8s/`` are this package's output (``tests/deploy`` checks they match).
"""

from cluster.k8s.rayservice import RAY_VERSION, render
from cluster.k8s.spec import DeploySpec

__all__ = ["RAY_VERSION", "DeploySpec", "render"]
